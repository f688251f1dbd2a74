"""The optional image_features stage: a tiny seeded CNN exported with torch.export over
generated images gives the same features as the CNN run directly; missing, corrupt and
absent images give null features with counts, never fewer rows; bad settings and unsafe
archives fail with one message naming the key or the problem."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from pipelines.core.config import load_config
from pipelines.core.errors import CatalogError, ConfigError, ImageFeaturesError
from pipelines.core.outputs import COMPLETION_RECORD
from pipelines.data.catalog import read_clean
from pipelines.stages import clean, image_features
from pipelines.stages.registry import get_stage, run_stage

SIZE = 24
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


def export(module: nn.Module, path: Path) -> Path:
    example = (torch.zeros(2, 3, SIZE, SIZE),)
    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def expected_features(module: nn.Module, path: Path) -> np.ndarray:
    """The CNN on the image decoded here, independently of the stage's code."""
    pixels = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    array = (np.asarray(pixels, dtype=np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    with torch.no_grad():
        return module(torch.from_numpy(array.transpose(2, 0, 1)[None].copy()))[0].numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """40 products: 30 images (PNG and JPEG, RGB, grayscale, RGBA; relative and absolute
    paths), 5 paths to nothing, 1 corrupt file, 4 without a path; the CNN archive."""
    root = tmp_path_factory.mktemp("image_features")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    rows, expected = [], {}
    for i in range(40):
        sku, path = f"p{i:03d}", ""
        if i < 30:
            mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png")][i % 3]
            shape = (rng.integers(10, 60), rng.integers(10, 60))
            pixels = rng.integers(0, 256, (*shape, len(mode)), dtype=np.uint8).squeeze()
            name = f"{sku}.{suffix}"
            Image.fromarray(pixels).save(images / name)  # mode from the shape
            path, expected[sku] = (name if i % 2 else str(images / name)), "ok"
        elif i < 35:
            path, expected[sku] = f"gone/{sku}.png", "missing"
        elif i == 35:
            (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
            path, expected[sku] = "corrupt.jpg", "unreadable"
        else:
            expected[sku] = "no_path"
        rows.append({"sku": sku, "name": f"product number {i}", "image": path})
    catalog = root / "catalog.csv"
    pd.DataFrame(rows).to_csv(catalog, index=False)
    module = tiny_cnn()
    return {
        "root": root,
        "images": images,
        "catalog": catalog,
        "expected": expected,
        "module": module,
        "weights": export(module, root / "cnn.pt2"),
    }


def make_config(setup, *extra: str):
    catalog = (
        f"catalog={{name: pictures, format: csv, path: '{setup['catalog']}', "
        "columns: {product_id: sku, title: name}}"
    )
    return load_config(
        overrides=[
            f"workdir={setup['root'] / 'work'}",
            catalog,
            "spark.shuffle_partitions=2",
            "image_features.enabled=true",
            "image_features.path_column=image",
            f"image_features.image_root={setup['images']}",
            f"image_features.image_size={SIZE}",
            f"image_features.mean={list(MEAN)}",
            f"image_features.std={list(STD)}",
            "image_features.batch_size=7",
            f"image_features.backbone.weights={setup['weights']}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cleaned(spark, setup):
    config = make_config(setup)
    clean.run(spark, config)
    return config


def test_features_equal_the_cnn_and_missing_images_are_null_and_counted(spark, setup, cleaned):
    before = read_clean(spark, cleaned, featured=False).toPandas().set_index("product_id")
    result = image_features.run(spark, make_config(setup, "image_features.dims=16"))
    counts = pd.Series(setup["expected"]).value_counts().to_dict()
    assert result.rows == {
        "in": 40,
        **{status: counts.get(status, 0) for status in image_features.STATUSES},
    }
    assert result.rows == {
        "in": 40, "ok": 30, "no_path": 4, "missing": 5, "unreadable": 1, "too_large": 0,
        "outside_root": 0,
    }  # fmt: skip
    assert result.metrics["dims"] == 16 and result.metrics["null_features"] == 10

    after = read_clean(spark, cleaned).toPandas().set_index("product_id")
    assert sorted(after.index) == sorted(before.index)  # rows in = rows out
    sealed = json.loads((Path(result.outputs["catalog"]) / COMPLETION_RECORD).read_text())
    assert sealed["rows"] == 40 and sealed["files"]  # read_clean checks it as clean's
    for sku, status in setup["expected"].items():
        features = after.loc[sku, "image_features"]
        if status != "ok":
            assert features is None, sku
            assert after.loc[sku, "content_hash"] == before.loc[sku, "content_hash"]
            continue
        name = next(setup["images"].glob(f"{sku}.*"))
        np.testing.assert_allclose(
            features, expected_features(setup["module"], name), rtol=1e-4, atol=1e-5, err_msg=sku
        )
        assert after.loc[sku, "content_hash"] != before.loc[sku, "content_hash"]
    assert after.drop(columns=["image_features", "content_hash"]).equals(
        before.loc[after.index].drop(columns=["image_features", "content_hash"])
    )

    clean.run(spark, cleaned)  # a new clean catalog: the features are stale now
    with pytest.raises(CatalogError, match="clean catalog changed after image_features"):
        read_clean(spark, cleaned)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["image_features.backbone.weights=null"],
            ConfigError,
            "image_features.backbone.weights is not set",
        ),
        (
            ["image_features.backbone.weights=/nonexistent/cnn.pt2"],
            ConfigError,
            "image_features.backbone.weights=/nonexistent/cnn.pt2 is not a file",
        ),
        (
            ["image_features.dims=7"],
            ConfigError,
            "image_features.dims=7 but the backbone .* produces 16-d features",
        ),
        (
            ["image_features.path_column=picture"],
            CatalogError,
            "image_features.path_column 'picture' is not a column of catalog 'pictures'",
        ),
        (["image_features.image_size=2"], ConfigError, "'image_features.image_size'"),
        (["image_features.backbone.format=torchvision"], ConfigError, "backbone.arch"),
    ],
)
def test_bad_settings_fail_naming_the_key(spark, setup, cleaned, overrides, error, message):
    with pytest.raises(error, match=message):
        image_features.run(spark, make_config(setup, *overrides))


def _rewrite(archive: Path, target: Path, member: str, change) -> Path:
    """A copy of the archive with one JSON member changed."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith(member):
                loaded = json.loads(data)
                change(loaded)
                data = json.dumps(loaded).encode()
            copy.writestr(item, data)
    return target


def _first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize(
    ("member", "change", "problem"),
    [
        (
            "models/model.json",
            lambda p: _first_node(p).update(target="builtins.eval"),
            "graph call builtins.eval",
        ),
        ("models/model.json", lambda p: p.update(guards_code=["__import__('os')"]), "guard code"),
        (
            "models/model.json",
            lambda p: p["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0][
                "as_expr"
            ].update(expr_str="__import__('os').getcwd()"),
            "shape expression",
        ),
        (
            "weights/model_weights_config.json",
            lambda c: next(iter(c["config"].values())).update(use_pickle=True),
            "pickled payload",
        ),
        (
            "models/model.json",
            lambda p: _first_node(p).update(target="torch.ops.aten.from_file.default"),
            "graph call torch.ops.aten.from_file.default",
        ),
    ],
)
def test_archives_that_could_run_code_are_refused(setup, tmp_path, member, change, problem):
    unsafe = _rewrite(setup["weights"], tmp_path / "unsafe.pt2", member, change)
    with pytest.raises(ImageFeaturesError, match=problem):
        image_features.load_export(str(unsafe))


def test_archives_with_members_beyond_a_plain_export_are_refused(setup, tmp_path):
    """AOTInductor's compiled shared libraries would be loaded as native code."""
    unsafe = tmp_path / "aoti.pt2"
    with zipfile.ZipFile(setup["weights"]) as source, zipfile.ZipFile(unsafe, "w") as copy:
        for item in source.infolist():
            copy.writestr(item, source.read(item))
        root = source.namelist()[0].split("/")[0]
        copy.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ImageFeaturesError, match="unexpected member .*/data/aotinductor/"):
        image_features.load_export(str(unsafe))


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    weights = tmp_path / "state.pt"
    torch.save(tiny_cnn().state_dict(), weights)
    with pytest.raises(ImageFeaturesError, match="not a torch.export archive"):
        image_features.load_export(str(weights))


def test_disabled_stage_is_skipped(spark, tmp_path):
    config = load_config(overrides=[f"workdir={tmp_path}"])
    assert not get_stage("image_features").enabled(config)
    result = run_stage("image_features", config, spark)
    assert result.rows == {} and result.outputs == {"skipped": "image_features.enabled is false"}


@pytest.mark.skipif(HAVE_TORCHVISION, reason="checks the message when torchvision is absent")
def test_torchvision_format_without_torchvision_says_so(tmp_path):
    with pytest.raises(ImageFeaturesError, match="needs torchvision importable"):
        image_features.load_torchvision("resnet18", str(tmp_path / "w.pt"), drop_head=True)


@pytest.mark.skipif(
    not HAVE_TORCHVISION, reason="torchvision is not installable beside the pinned torch 2.13 here"
)
def test_torchvision_format_loads_a_state_dict_and_drops_the_head(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    loaded = image_features.load_torchvision("resnet18", str(tmp_path / "resnet18.pt"), True)
    model.fc = nn.Identity()
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_image_reads_stay_under_the_root_and_the_size_bound(tmp_path):
    """A catalog row cannot point a task outside `image_root` (absolute path, URI, `..`,
    symlink) or make it read a huge file (/dev/zero) into memory: those rows get a status."""
    root, outside = tmp_path / "images", tmp_path / "outside.png"
    root.mkdir()
    Image.new("RGB", (2, 2), "red").save(root / "ok.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "big.png")
    Image.new("RGB", (2, 2), "red").save(outside)
    (root / "link").symlink_to("/etc")
    limit = (root / "ok.png").stat().st_size
    spec = image_features.BackboneSpec(
        "export", "unused", None, False, 8, (0.5,) * 3, (0.5,) * 3, str(root), 4, 4, limit
    )
    paths = ["ok.png", "big.png", "../outside.png", str(outside), "/dev/zero",
             "link/hostname", "file:///etc/hostname"]  # fmt: skip
    images, statuses = image_features.load_images(paths, spec)
    assert statuses == ["ok", "too_large", *["outside_root"] * 5] and images.shape == (1, 3, 8, 8)
    unrooted = image_features.BackboneSpec(**{**spec.__dict__, "image_root": None})
    assert image_features.load_images(["/dev/zero"], unrooted)[1] == ["too_large"]


WORDS = ["lamp", "chair", "mug", "towel", "vase", "rug", "desk", "bowl", "shelf", "clock"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


@pytest.mark.slow
def test_the_master_models_image_branch_trains_end_to_end(spark, tmp_path, shared_tracking):
    """Products whose titles say nothing of their class and whose images show it (a colour
    per class): clean -> image_features -> corpus -> shard -> train (ProductNet) learns the
    class from the image branch alone."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for i in range(240):
        colour = list(COLOURS)[i % len(COLOURS)]
        noise = rng.integers(-25, 26, (SIZE, SIZE, 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"p{i}.png")
        name = " ".join(rng.choice(WORDS, 3))  # no number: its subwords would give i % 4 away
        rows.append({"sku": f"p{i}", "name": name, "category": colour, "image": f"p{i}.png"})
    pd.DataFrame(rows).to_csv(tmp_path / "catalog.csv", index=False)
    module = tiny_cnn()
    catalog = (
        f"catalog={{name: colours, format: csv, path: '{tmp_path / 'catalog.csv'}', "
        "columns: {product_id: sku, title: name, category_path: category}}"
    )
    config = load_config(
        overrides=[
            f"workdir={tmp_path / 'work'}",
            shared_tracking,
            catalog,
            "image_features.enabled=true",
            "image_features.path_column=image",
            f"image_features.image_root={images}",
            f"image_features.image_size={SIZE}",
            f"image_features.backbone.weights={export(module, tmp_path / 'cnn.pt2')}",
            "shard.tasks=[{name: colour, kind: multiclass, source: 'category_path[0]', top_n: 10}]",
            "shard.split.stratify_by=colour",
            "word2vec.min_count=1",
            "word2vec.dims=8",
            "train.model=productnet",
            "train.tasks=[colour]",
            "train.embedding_size=8",
            "train.batch_size=16",
            "train.epochs=8",
            "train.lr=0.01",
            "train.contrastive.weight=0",
            "train.distributed=false",
            "train.productnet.field_size=8",
            "train.productnet.hidden_size=16",
            "train.productnet.image_size=8",
        ]
    )
    for stage in ("clean", "image_features", "corpus", "shard"):
        run_stage(stage, config, spark)
    result = run_stage("train", config, spark)
    history = json.loads((config.outputs.training / "model" / "history.json").read_text())
    best = max(row["val_colour_accuracy"] for row in history)
    assert best >= 0.9, history  # the titles alone give 0.25
    served = mlflow.pytorch.load_model(result.outputs["registered_model"])
    assert served.image_dim == 16  # the CNN's features reached the model
