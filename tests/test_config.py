"""Configuration: layering, overrides, env expansion, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.core.config import Config, conf_dir, load_config, merge, parse_override
from pipelines.core.errors import ConfigError

OVERLAYS = sorted(path.stem for path in conf_dir().glob("*.yaml") if path.stem != "base")


def test_base_resolves_to_typed_defaults():
    config = load_config()
    assert isinstance(config, Config)
    assert config.catalog.name == "synthetic"
    assert config.catalog.synthetic is not None and config.catalog.synthetic.rows > 0
    assert config.workdir.is_absolute()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_shipped_overlay_validates(overlay, monkeypatch):
    monkeypatch.setenv("PRODVEC_DATA", "/data")
    config = load_config([overlay])
    assert config.catalog.name
    if config.catalog.path is not None:
        assert config.catalog.path.startswith("/data/")


def test_catalog_overlay_replaces_the_whole_catalog():
    config = load_config(["flipkart"])
    assert config.catalog.synthetic is None
    assert config.catalog.columns.description is None  # synthetic's mapping must not leak
    assert config.catalog.attributes.keys() == {"pid", "retail_price", "product_rating"}
    assert config.clean.max_title_chars == load_config().clean.max_title_chars


def test_partial_catalog_override_merges():
    config = load_config(overrides=["catalog.synthetic.rows=123", "catalog.currency=EUR"])
    assert config.catalog.synthetic.rows == 123
    assert config.catalog.currency == "EUR"
    assert config.catalog.columns.title == "name"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1", {"a": 1}),
        ("a.b=2.5", {"a": {"b": 2.5}}),
        ("a.b.c=true", {"a": {"b": {"c": True}}}),
        ("a=null", {"a": None}),
        ("a=[x, y]", {"a": ["x", "y"]}),
        ("a=local[2]", {"a": "local[2]"}),
        ("a=x=y", {"a": "x=y"}),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["novalue", "a..b=1", "=1"])
def test_bad_override_is_an_error(text):
    with pytest.raises(ConfigError):
        parse_override(text)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("sparkk.master=x", "unknown key 'sparkk'"),
        ("clean.max_titel_chars=3", "unknown key 'clean.max_titel_chars'"),
        ("catalog.columns.titel=x", "unknown key 'catalog.columns.titel'"),
        ("clean.max_title_chars=many", "'clean.max_title_chars'"),
        ("spark.shuffle_partitions=0", "'spark.shuffle_partitions'"),
        ("catalog.format=xml", "'catalog.format'"),
        ("catalog.path=/x.csv", "exactly one of 'path' or 'synthetic'"),
    ],
)
def test_invalid_config_names_the_key(override, named):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert named in str(caught.value)


def test_unknown_overlay_lists_known_ones():
    with pytest.raises(ConfigError, match="no overlay named 'nope'.*flipkart"):
        load_config(["nope"])


def test_overlay_file_with_bad_yaml(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([str(bad)])


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("PRODVEC_TEST_SEPARATOR", "|")
    config = load_config(overrides=["catalog.category_separator=${PRODVEC_TEST_SEPARATOR}"])
    assert config.catalog.category_separator == "|"
    monkeypatch.delenv("PRODVEC_TEST_SEPARATOR")
    with pytest.raises(ConfigError, match="PRODVEC_TEST_SEPARATOR is not set"):
        load_config(overrides=["catalog.category_separator=${PRODVEC_TEST_SEPARATOR}"])
    assert (
        load_config(overrides=["catalog.currency=${PRODVEC_TEST_SEPARATOR:-INR}"]).catalog.currency
        == "INR"
    )


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = merge(base, {"a": {"b": 5}, "d": [2]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_digest_is_stable_and_sensitive():
    assert load_config().digest() == load_config().digest()
    assert load_config().digest() != load_config(overrides=["seed=1"]).digest()


def _restated(layer: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys a YAML layer sets to exactly the value the settings classes already default to."""
    found = []
    for key, value in layer.items():
        if key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            found += _restated(value, defaults[key], f"{prefix}{key}.")
        elif value == defaults[key]:
            found.append(f"{prefix}{key}")
    return found


def test_base_yaml_restates_no_default():
    """One source of defaults: the settings classes. conf/base.yaml only sets what belongs to
    the embedded catalog, so a default changed in code is never silently shadowed."""
    base = yaml.safe_load((conf_dir() / "base.yaml").read_text())
    defaults = Config.model_construct().model_dump(mode="json", exclude={"catalog"})
    defaults = {key: getattr(Config.model_fields[key], "default", None) for key in defaults}
    defaults = {
        key: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        for key, value in defaults.items()
    }
    assert _restated({k: v for k, v in base.items() if k != "catalog"}, defaults) == []


def test_an_unknown_task_kind_or_model_type_names_the_known_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown task kind 'ordinal'; kinds are binary, "
        r"decoding, multiclass, multilabel, regression",
    ):
        load_config(overrides=["shard.tasks=[{name: x, kind: ordinal, source: brand}]"])
    with pytest.raises(
        ConfigError,
        match=r"unknown model type 'bert'; model types are mrnet, "
        r"mrnet_per_group, productnet",
    ):
        load_config(overrides=["train.model=bert"])


@pytest.mark.parametrize(
    ("workdir", "expected"),
    [("file:///data/prodvec", Path("/data/prodvec")), ("/data/prodvec", Path("/data/prodvec"))],
)
def test_the_workdir_is_a_path_or_a_file_uri(workdir, expected):
    assert load_config(overrides=[f"workdir={workdir}"]).workdir == expected


def test_an_object_store_workdir_is_refused_with_where_the_table_can_go():
    with pytest.raises(
        ConfigError, match=r"workdir s3a://bucket/p is an object-store URI.*table_path"
    ):
        load_config(overrides=["workdir=s3a://bucket/p"])
