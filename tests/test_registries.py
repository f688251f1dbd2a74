"""The two registries: every shipped task kind and model type is found by its module name, an
unknown name is refused in one place, and adding a kind takes one new file: the README's
example kind, dropped into the kinds folder as it stands, is accepted by the configuration
and trained through the real shard stage and training loop."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from pipelines.core.config import load_config
from pipelines.data.shards import load_manifest
from pipelines.model_types.registry import model_type, model_type_names
from pipelines.stages import clean, corpus, shard
from pipelines.tasks import kind_names, kind_of, kinds
from pipelines.training.inputs import loop_spec, word_vectors
from pipelines.training.launch import Launch, train_model
from pipelines.training.reporting import read_history

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_kind_and_type_is_registered_under_its_module_name():
    assert kind_names() == ("binary", "decoding", "multiclass", "multilabel", "regression")
    assert {name: kind_of(name).name for name in kind_names()} == {n: n for n in kind_names()}
    assert model_type_names() == ("mrnet", "mrnet_per_group", "productnet")
    assert all(model_type(name).name == name for name in model_type_names())


@pytest.mark.parametrize(
    ("lookup", "name", "message"),
    [
        (kind_of, "ordinal", "unknown task kind 'ordinal'"),
        (model_type, "bert", "unknown model type 'bert'"),
    ],
)
def test_an_unknown_name_is_refused(lookup, name, message):
    with pytest.raises(ValueError, match=message):
        lookup(name)


def _readme_kind() -> str:
    """The example kind module exactly as the README's development section shows it."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n# pipelines/tasks/kinds/rating\.py\n(.*?)```", text, re.DOTALL)
    assert block, "the README lost its example task kind"
    return block.group(1)


@pytest.fixture
def rating_kind(tmp_path, monkeypatch):
    """The README's `rating` kind as one new file in a folder the kinds package searches."""
    folder = tmp_path / "kinds"
    folder.mkdir()
    (folder / "rating.py").write_text(_readme_kind())
    monkeypatch.setattr(kinds, "__path__", [*kinds.__path__, str(folder)])
    yield
    sys.modules.pop(f"{kinds.__name__}.rating", None)


@pytest.mark.slow
def test_the_readme_example_kind_is_one_file_that_trains(spark, tmp_path, rating_kind):
    config = load_config(
        overrides=[
            f"workdir={tmp_path}",
            "catalog.synthetic.rows=600",
            "word2vec.epochs=1",
            "word2vec.min_count=2",
            "word2vec.dims=8",
            "shard.text_fields={title: 12}",
            "shard.split.stratify_by=null",
            "shard.tasks=[{name: stars, kind: rating, source: attributes.weight_kg}]",
            "train.embedding_size=8",
            "train.batch_size=32",
            "train.epochs=2",
            "train.lr=0.02",
            "train.calibration_batches=3",
        ]
    )
    for stage in (clean, corpus, shard):
        stage.run(spark, config)
    manifest = load_manifest(config.outputs.shards)
    (entry,) = manifest["tasks"]
    assert entry["kind"] == "rating" and entry["labelled"]["train"] > 0
    (tmp_path / "train").mkdir()
    vectors = word_vectors(config, config.outputs.shards, tmp_path / "train")
    mrnet = model_type("mrnet")
    launch = Launch("driver", 1, False, 1)
    spec = loop_spec(
        config,
        config.outputs.shards,
        tmp_path / "run",
        vectors,
        launch,
        mrnet.fingerprint_part(config),
    )
    train_model(launch, spec, mrnet.factory(config, vectors))
    history = read_history(tmp_path / "run")
    assert history[-1]["val_stars_loss"] < history[0]["val_stars_loss"]
    assert history[-1]["val_stars_rmse_stars"] > 0
