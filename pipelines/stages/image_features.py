"""Image-feature stage (optional): a vision backbone over each product's image fills the
clean catalog's `image_features` column, which shard (and so ProductNet) and embed read.

Where the output goes, and why: the stage reads the clean stage's catalog and writes a full
copy of it, with `image_features` filled and `content_hash` recomputed, to
`<workdir>/<catalog>/image_features/catalog`. With `image_features.enabled`, `read_clean`
hands every later stage that copy instead of clean's own (checking it was made from the
clean catalog there now). Data keeps flowing one way: clean's output is never rewritten, a
rerun of this stage reads the same input, and a disabled stage leaves the pipeline as before.
The copy is written beside the old one and swapped in by rename, so readers never see half.

Image paths come from the source catalog (`image_features.path_column`; the clean catalog
normalises every text it keeps, which would break paths), joined on product_id. Relative
paths resolve against `image_features.image_root`; URIs (s3://, gs://, hdfs://, file://) are
read with pyarrow's filesystems. With an image root, no path (absolute, URI, `..` or a
symlink) leads outside it; no file is read past `image_features.max_image_bytes`. Every row
comes out (rows in = rows out): a row with no path, a path outside the root, a missing, too
large or undecodable file gets null features, counted by status.

The backbone (never downloaded: `backbone.weights` is a local file):
- `format: export`: a `torch.export` archive. `torch.export.load` in torch 2.13 is NOT safe
  on an untrusted file: it unpickles weights and constants stored with `use_pickle`
  (`torch.load(weights_only=False)`, `pickle.loads`), falls back to `weights_only=False` for
  the sample inputs, `exec`s the archive's `guards_code`, `sympy.sympify`s (eval) shape
  expressions and resolves node targets as any attribute of `torch` or `operator`. So
  `load_export` first refuses any archive that uses one of these (pure aten/prims graphs
  with plain tensor payloads and at most a symbolic batch size pass: what exporting a
  torchvision backbone gives) and loads the rest with weights-only loads forced.
- `format: torchvision`: `torchvision.models.get_model(arch, weights=None)` and a state dict
  read with `torch.load(weights_only=True)`; torchvision must import on every executor.

Inference runs as embed does: `mapInArrow` over Arrow batches, the model loaded once per
Python worker and kept, one torch thread per CPU task, or the GPU Spark assigned to the task.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image
from pyspark import SparkFiles, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from torch import nn
from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX

from pipelines.core import faults
from pipelines.core.config import Config, ImageFeaturesConfig, inside
from pipelines.core.devices import infer, task_inference
from pipelines.core.errors import CatalogError, ConfigError, ImageFeaturesError
from pipelines.core.outputs import StageResult, publish_folder
from pipelines.data.catalog import (
    CLEAN_SCHEMA,
    FEATURED_STAMP,
    clean_files_stamp,
    content_hash,
    read_clean,
    seal_catalog,
)
from pipelines.stages import clean

__all__ = [
    "STATUSES",
    "BackboneSpec",
    "backbone_spec",
    "check_export_archive",
    "decode",
    "featurise_frame",
    "image_paths",
    "load_backbone",
    "load_export",
    "load_images",
    "load_torchvision",
    "probe_dims",
    "read_bytes",
    "resolve",
    "run",
]

log = logging.getLogger(__name__)

STATUSES = ("ok", "no_path", "missing", "unreadable", "too_large", "outside_root")
_PATH, _STATUS = "_image_path", "_image_status"
_SHIPPED = "sparkfiles:"
_PROBE_BATCH = 2  # the driver's probe: 2, not 1, so a batch size fixed at export shows
# What a safe archive's graph may call: tensor ops, and plain arithmetic on sizes.
_OPS = re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_ARITHMETIC = {
    f"_operator.{name}"
    for name in (
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "truediv",
        "mod",
        "neg",
        "pow",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
    )
}
_SYMBOL = re.compile(r"Symbol\('[a-z]+[0-9]+'(, (positive|integer)=True)*\)")
# What torch.export.save writes for a plain module; anything else (AOTInductor's shared
# libraries under data/aotinductor/, extra files) is refused.
_MEMBERS = re.compile(
    r"[^/]+/(archive_format|archive_version|byteorder|\.data/(version|serialization_id)|"
    r"models/[^/]+\.json|data/(weights|constants)/[^/]+|data/sample_inputs/[^/]+\.pt)"
)
_FILE_OPS = re.compile(r"torch\.ops\.aten\.(from_file|_?load\w*|save\w*)\.\w+")  # read disk
_FEATURES = pa.list_(pa.field("element", pa.float32()))  # array<float>, as Spark names it


@dataclass(frozen=True)
class BackboneSpec:
    """What a worker needs, small enough to ship in every task's closure."""

    format: str
    weights: str  # a local path, or _SHIPPED + its name
    arch: str | None
    drop_head: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_root: str | None
    batch_size: int
    gpu_batch_size: int
    max_image_bytes: int


def backbone_spec(settings: ImageFeaturesConfig) -> BackboneSpec:
    """The settings a run needs, checked: the weights file is given and is a file."""
    weights = settings.backbone.weights
    if weights is None:
        raise ConfigError(
            "image_features.backbone.weights is not set: give the local "
            "backbone file (it is never downloaded)"
        )
    if not Path(weights).is_file():
        raise ConfigError(f"image_features.backbone.weights={weights} is not a file")
    if settings.path_column is None:
        raise ConfigError(
            "image_features.path_column is not set: name the catalog column that holds image paths"
        )
    return BackboneSpec(
        settings.backbone.format,
        str(Path(weights).resolve()),
        settings.backbone.arch,
        settings.backbone.drop_head,
        settings.image_size,
        settings.mean,
        settings.std,
        settings.image_root,
        settings.batch_size,
        settings.gpu_batch_size,
        settings.max_image_bytes,
    )


# ---- loading the backbone ---------------------------------------------------------------------


def _json_values(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from _json_values(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _json_values(value, key)


def check_export_archive(path: str) -> None:
    """Refuse an archive whose loading could run code it carries (see the module doc)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ImageFeaturesError(f"{path} is not a torch.export archive: {err}") from None
    with archive:
        names = archive.namelist()
        models = [name for name in names if re.search(r"/models/[^/]+\.json$", name)]
        if not models:
            raise ImageFeaturesError(f"{path} is not a torch.export archive (no models/*.json)")
        problems = [
            f"legacy pickled file {name}"
            for name in names
            if re.search(r"/data/(weights|constants)/[^/]+\.pt$", name)
        ]
        problems += [
            f"unexpected member {name}"
            for name in names
            if not (name.endswith("/") or _MEMBERS.fullmatch(name))
        ]
        for name in names:
            if re.search(r"/data/(weights|constants)/[^/]+_config\.json$", name):
                config = json.loads(archive.read(name))["config"]
                problems += [
                    f"pickled payload {fqn}"
                    for fqn, meta in config.items()
                    if meta.get("use_pickle")
                    or (
                        "/constants/" in name
                        and not (meta["path_name"].startswith(TENSOR_CONSTANT_FILENAME_PREFIX))
                    )
                ]
        for name in models:
            program = json.loads(archive.read(name))
            if program.get("guards_code"):
                problems.append("guard code (export with a plain torch.export.Dim batch)")
            problems += [
                f"graph call {target}"
                for target in _json_values(program, "target")
                if not (_OPS.fullmatch(target) or target in _ARITHMETIC)
                or _FILE_OPS.fullmatch(target)
            ]
            problems += [
                f"shape expression {expr}"
                for expr in _json_values(program, "expr_str")
                if not _SYMBOL.fullmatch(expr)
            ]
            problems += [
                f"range key {key}"
                for key in program.get("range_constraints", {})
                if not re.fullmatch(r"[a-z]+[0-9]+", key)
            ]
    if problems:
        raise ImageFeaturesError(
            f"{path}: refused, loading it could run code it carries: {sorted(set(problems))[:5]}"
            " (export a plain module: tensor ops only, at most the batch size dynamic)"
        )


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside is weights-only, whatever its call site asks for."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_export(path: str) -> nn.Module:
    """A checked torch.export archive as a callable module (the archive's own, unlifted)."""
    check_export_archive(path)
    with _weights_only_loads():
        return torch.export.load(path).module()


def _drop_head(model: nn.Module, arch: str) -> nn.Module:
    for name in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
            return model
    raise ImageFeaturesError(
        f"torchvision model {arch} has no fc / classifier / heads / head "
        "to drop (set image_features.backbone.drop_head: false)"
    )


def load_torchvision(arch: str, path: str, drop_head: bool) -> nn.Module:
    """torchvision's architecture with the state dict in `path` (tensors only)."""
    try:
        import torchvision  # only this format needs it, and only here
    except (ImportError, RuntimeError, OSError) as err:  # RuntimeError: built for another torch
        raise ImageFeaturesError(
            "image_features.backbone.format torchvision needs torchvision importable on the "
            f"driver and every executor ({type(err).__name__}: {err}); or export the "
            "backbone once and use format: export"
        ) from None
    model = torchvision.models.get_model(arch, weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return (_drop_head(model, arch) if drop_head else model).eval()


def load_backbone(spec: BackboneSpec, device: torch.device) -> nn.Module:
    if spec.format == "export":
        module = load_export(spec.weights)
    else:
        module = load_torchvision(spec.arch or "", spec.weights, spec.drop_head)
    return module.to(device)


def probe_dims(spec: BackboneSpec) -> int:
    """The backbone's feature length, from one forward pass on the driver."""
    module = load_backbone(spec, torch.device("cpu"))
    example = torch.zeros(_PROBE_BATCH, 3, spec.image_size, spec.image_size)
    try:
        with torch.inference_mode():
            output = module(example)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise ImageFeaturesError(
            f"backbone {spec.weights} fails on a {tuple(example.shape)} batch "
            f"(image_features.image_size={spec.image_size}; export with a dynamic batch: "
            f"torch.export.Dim): {str(err).splitlines()[0][:300]}"
        ) from None
    if not isinstance(output, torch.Tensor) or output.shape[0] != _PROBE_BATCH:
        raise ImageFeaturesError(f"backbone {spec.weights} must return one [batch, ...] tensor")
    return int(output[0].numel())


# ---- the workers -------------------------------------------------------------------------------

_BACKBONES: dict[tuple[str, str], nn.Module] = {}


def _cached_backbone(spec: BackboneSpec, device: torch.device) -> nn.Module:
    key = (spec.weights, str(device))
    if key not in _BACKBONES:
        weights = (
            SparkFiles.get(spec.weights[len(_SHIPPED) :])
            if spec.weights.startswith(_SHIPPED)
            else spec.weights
        )
        _BACKBONES[key] = load_backbone(
            BackboneSpec(**{**spec.__dict__, "weights": weights}), device
        )
    return _BACKBONES[key]


def resolve(location: str, root: str | None) -> str:
    """A catalog path as read: URIs and absolute paths as given, others under `root`."""
    if "://" in location or root is None or location.startswith("/"):
        return location
    return f"{root.rstrip('/')}/{location}"


@cache
def _filesystem(scheme_and_host: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(scheme_and_host + "/")[0]


def read_bytes(location: str, limit: int) -> bytes:
    """One file's first `limit` + 1 bytes at most (more means too large), from a local path
    or a pyarrow-supported URI."""
    if "://" not in location or location.startswith("file://"):
        with Path(location.removeprefix("file://")).open("rb") as handle:
            return handle.read(limit + 1)
    scheme, rest = location.split("://", 1)
    host, _, key = rest.partition("/")
    filesystem = _filesystem(f"{scheme}://{host}")
    path = f"{host}/{key}" if scheme in ("s3", "gs", "gcs") else f"/{key}"
    with filesystem.open_input_stream(path) as stream:
        return stream.read(limit + 1)


def decode(data: bytes, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 [3, size, size]: RGB, bilinear resize, scaled to [0, 1], normalised."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(pixels, dtype=np.float32) / 255.0
    return ((array - mean) / std).transpose(2, 0, 1)


def load_images(locations: list[str | None], spec: BackboneSpec) -> tuple[np.ndarray, list[str]]:
    """Decoded images of the rows that have one, and every row's status."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    images, statuses = [], []
    for location in locations:
        if location is None or not location.strip():
            statuses.append("no_path")
            continue
        resolved = resolve(location.strip(), spec.image_root)
        if spec.image_root is not None and not inside(resolved, spec.image_root):
            statuses.append("outside_root")
            continue
        try:
            data = read_bytes(resolved, spec.max_image_bytes)
        except FileNotFoundError:
            statuses.append("missing")
            continue
        if len(data) > spec.max_image_bytes:
            statuses.append("too_large")
            continue
        try:
            images.append(decode(data, spec.image_size, mean, std))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            statuses.append("unreadable")  # PIL raises these for corrupt or truncated files
            continue
        statuses.append("ok")
    empty = np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.float32)
    return (np.stack(images) if images else empty), statuses


def _features_column(features: np.ndarray, statuses: list[str]) -> pa.ListArray:
    """list<float32> with a null for every row without an image, from the flat buffer."""
    present = np.asarray([status == "ok" for status in statuses], dtype=bool)
    width = features.shape[1] if len(features) else 0
    offsets = np.concatenate([[0], np.cumsum(present * width)]).astype(np.int32)
    values = pa.array(features.reshape(-1), type=pa.float32())
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=_FEATURES, mask=pa.array(~present)
    )


def _feature_batches(
    batches: Iterator[pa.RecordBatch], spec: BackboneSpec, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    device, size = task_inference(spec.batch_size, spec.gpu_batch_size)

    def featurise(batch: pa.RecordBatch) -> pa.RecordBatch:
        module = _cached_backbone(spec, device)  # a dict lookup after the first batch
        images, statuses = load_images(batch.column(_PATH).to_pylist(), spec)
        features = _features_column(infer(module, images, size, device), statuses)
        out = [features if name == "image_features" else batch.column(name) for name in columns]
        return pa.RecordBatch.from_arrays(
            [*out, pa.array(statuses, pa.string())], names=[*columns, _STATUS]
        )

    yield from faults.named_batches("image_features", batches, featurise)


# ---- the stage ---------------------------------------------------------------------------------


def image_paths(spark: SparkSession, config: Config) -> DataFrame:
    """(product_id, image path) from the source catalog, one row per product id."""
    catalog, column = config.catalog, config.image_features.path_column
    if catalog.columns.product_id is None:
        raise ConfigError(
            "image_features needs catalog.columns.product_id: image paths are "
            "matched to clean products by id"
        )
    source = clean.read_catalog(spark, config)
    if column not in source.columns:
        known = [name for name in source.columns if not name.startswith("_")]
        raise CatalogError(
            f"image_features.path_column '{column}' is not a column of catalog "
            f"'{catalog.name}'; columns are {known}"
        )
    product_id = F.trim(F.col(f"`{catalog.columns.product_id}`").cast("string"))
    # Exact duplicates of a product may differ in an unmapped column: take one, the least.
    return source.groupBy(product_id.alias("product_id")).agg(
        F.min(F.col(f"`{column}`").cast("string")).alias(_PATH)
    )


def featurise_frame(catalog: DataFrame, paths: DataFrame, spec: BackboneSpec) -> DataFrame:
    """The clean columns with `image_features` from the backbone, plus `_image_status`."""
    columns = [field.name for field in CLEAN_SCHEMA.fields]
    joined = catalog.join(paths, on="product_id", how="left").select(*columns, _PATH)
    schema = T.StructType([*CLEAN_SCHEMA.fields, T.StructField(_STATUS, T.StringType())])
    return joined.mapInArrow(lambda batches: _feature_batches(batches, spec, columns), schema)


def _ship(spark: SparkSession, spec: BackboneSpec) -> BackboneSpec:
    """Local mode shares the driver's disk; a cluster gets a copy per executor (addFile)."""
    if (spark.sparkContext.master or "").startswith("local"):
        return spec
    spark.sparkContext.addFile(spec.weights)
    return BackboneSpec(**{**spec.__dict__, "weights": _SHIPPED + Path(spec.weights).name})


def run(spark: SparkSession, config: Config) -> StageResult:
    """Features for every clean product's image into a copy of the clean catalog."""
    settings = config.image_features
    spec = backbone_spec(settings)
    dims = probe_dims(spec)
    if settings.dims is not None and settings.dims != dims:
        raise ConfigError(
            f"image_features.dims={settings.dims} but the backbone "
            f"{spec.weights} produces {dims}-d features"
        )
    clean_path = config.outputs.clean_catalog
    catalog = read_clean(spark, config, featured=False)
    rows_in = catalog.count()
    featured = (
        featurise_frame(catalog, image_paths(spark, config), _ship(spark, spec))
        .withColumn("content_hash", content_hash())
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    target = config.outputs.featured_catalog
    staging = target.with_name(f".catalog-staging-{uuid.uuid4().hex[:8]}")
    try:
        featured.select(*CLEAN_SCHEMA.names).write.parquet(str(staging))
        counts = {row[_STATUS]: row["count"] for row in featured.groupBy(_STATUS).count().collect()}
        rows = {"in": rows_in, **{status: counts.get(status, 0) for status in STATUSES}}
        if sum(counts.values()) != rows_in:
            raise RuntimeError(f"image_features lost rows: {rows} (bug: please report)")
        seal_catalog(staging, rows_in, config)
        (staging / FEATURED_STAMP).write_text(
            json.dumps(
                {
                    "clean_files": clean_files_stamp(clean_path),
                    "dims": dims,
                    "weights": spec.weights,
                    "format": spec.format,
                }
            )
        )
        publish_folder(staging, target)
    finally:
        featured.unpersist()
        shutil.rmtree(staging, ignore_errors=True)  # left only when the stage failed
    log.info("image_features: %s (%d-d from %s)", rows, dims, spec.weights)
    return StageResult(
        rows=rows,
        outputs={"catalog": str(target)},
        metrics={
            "dims": float(dims),
            "null_features": float(rows_in - rows["ok"]),
            "missing_fraction": (rows_in - rows["ok"]) / max(rows_in, 1),
        },
    )
