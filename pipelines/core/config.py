"""Layered YAML configuration validated into typed, frozen objects.

`conf/base.yaml` is always loaded first, then each overlay in order (kedro-style
base + environment), then `key.sub=value` overrides from the command line. Every
unknown key is an error that names it, so a typo never silently falls back to a
default. Where stages may read (`paths`) is set by files alone: an override cannot widen it.
Values taken from the environment are remembered so that printed, logged and tracked
configuration masks them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.core.errors import ConfigError
from pipelines.core.outputs import Outputs
from pipelines.core.secrets import redact_text, redact_tree
from pipelines.model_types.kinds import names as model_type_names
from pipelines.tasks.contract import TaskSpec, kind_names, kind_of

__all__ = [
    "BackboneConfig",
    "CatalogConfig",
    "CleanConfig",
    "ColumnMap",
    "Config",
    "ContrastiveConfig",
    "CrossLocaleConfig",
    "EmbedConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "GroupAutoencoderConfig",
    "ImageFeaturesConfig",
    "IndexConfig",
    "Lookup",
    "PathsConfig",
    "ProductNetConfig",
    "ShardConfig",
    "SparkConfig",
    "SplitConfig",
    "Strict",
    "SubwordConfig",
    "SyntheticConfig",
    "TextField",
    "TrackingConfig",
    "TrainConfig",
    "Word2VecConfig",
    "conf_dir",
    "confine",
    "confine_paths",
    "inside",
    "load_config",
    "merge",
    "parse_override",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(Strict):
    """Local-mode defaults; under spark-submit the submit settings win."""

    master: str = "local[*]"
    app_name: str = "prodvec"
    shuffle_partitions: int = Field(8, ge=1)
    driver_memory: str = "4g"
    conf: dict[str, str] = Field(default_factory=dict)


class TrackingConfig(Strict):
    """MLflow: sqlite + local artifacts by default, a tracking server on clusters."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "prodvec"


class SyntheticConfig(Strict):
    """The embedded default catalog: generated, deterministic by seed."""

    rows: int = Field(20_000, ge=10)
    seed: int = 7
    # Each product listed a second time in this locale, its texts word by word in a generated
    # language (brands and numbers kept), sharing a `global_id` column: a two-locale catalog.
    translated_locale: str | None = None
    dirty_fraction: float = Field(0.03, ge=0.0, le=0.5)


class ColumnMap(Strict):
    """Canonical column -> source column. Only product_id and title are required."""

    product_id: str | None = None
    title: str
    description: str | None = None
    bullets: str | None = None
    brand: str | None = None
    # ProductNet's keyword fields: one column (a list, split like bullets) or one per keyword
    # type (the paper has three), each type an item of the clean catalog's `keywords`
    keywords: str | list[str] | None = None
    category_path: str | list[str] | None = None  # one path column, or one column per level
    price: str | None = None
    currency: str | None = None
    product_group: str | None = None
    locale: str | None = None
    image_features: str | None = None


class Lookup(Strict):
    """A small table left-joined onto the catalog by a unique key (e.g. Instacart aisles)."""

    path: str
    key: str
    format: Literal["csv", "json", "parquet"] = "csv"


class CatalogConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    format: Literal["csv", "json", "parquet"] = "csv"
    path: str | None = None
    synthetic: SyntheticConfig | None = None
    options: dict[str, str] = Field(default_factory=dict)
    columns: ColumnMap
    attributes: dict[str, str] = Field(default_factory=dict)
    lookups: list[Lookup] = Field(default_factory=list)
    category_separator: str = ">>"
    bullet_separator: str = "|"
    currency: str = "USD"
    locale: str = "en_US"

    @model_validator(mode="after")
    def _source_given(self) -> CatalogConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("catalog needs exactly one of 'path' or 'synthetic'")
        return self


class CleanConfig(Strict):
    max_title_chars: int = Field(400, ge=10)
    max_description_chars: int = Field(5000, ge=0)
    max_category_levels: int = Field(3, ge=1)
    max_price: float = Field(1e8, gt=0)
    # Normalise only source rows that are new or changed since the last run (by row hash) and
    # carry the rest; false: a full run. Outputs are the same either way.
    incremental: bool = True


class Word2VecConfig(Strict):
    """Corpus + gensim word2vec. The MRNet paper: 128-d, min_count 10, over 143M titles and
    descriptions. min_count is 5 here: in a 20k-product catalog a brand or product noun seen
    5-9 times is still a real word worth a vector; 10 epochs because small corpora need more
    passes than the usual 5. Large catalogs raise min_count and lower epochs."""

    fields: list[CorpusField] = Field(
        default_factory=lambda: list[CorpusField](["title", "description"]), min_length=1
    )
    min_count: int = Field(5, ge=1)
    max_vocab: int = Field(2_000_000, ge=1)  # bounds driver memory: ~(8 * dims + 500) B/word
    dims: int = Field(128, ge=1)
    window: int = Field(5, ge=1)
    negative: int = Field(5, ge=1)
    algorithm: Literal["cbow", "skipgram"] = "cbow"
    epochs: int = Field(10, ge=1)
    sample: float = Field(1e-3, ge=0.0)
    workers: int = Field(0, ge=0)  # 0: every core of the driver
    seed: int | None = None  # None: the top-level seed
    probe_words: list[str] = Field(default_factory=list)  # nearest-neighbour sanity table
    neighbours: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _fields_unique(self) -> Word2VecConfig:
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"fields repeat: {self.fields}")
        return self


TextField = Literal["title", "description", "bullets", "brand", "keywords"]
CorpusField = Literal["title", "description", "bullets", "brand"]


class SplitConfig(Strict):
    """Train/validation/test fractions; products with the same normalised title stay together."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    stratify_by: str | None = None  # a multiclass, binary or multilabel task's name
    seed: int | None = None  # None: the top-level seed

    @model_validator(mode="after")
    def _train_left(self) -> SplitConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave rows for train")
        return self


class SubwordConfig(Strict):
    """Hashed character n-grams of each title token (`pipelines.data.subwords`), so rare words
    and model numbers carry signal; the subword bag encoder reads them."""

    enabled: bool = True
    buckets: int = Field(1 << 18, ge=2)  # a power of two (Spark's pmod(xxhash64) agrees then)
    n_min: int = Field(3, ge=1)
    n_max: int = Field(5, ge=1)
    per_word: int = Field(32, ge=1)  # ids kept per token: "<token>" itself, then its n-grams
    width: int = Field(384, ge=1)  # ids kept per title (a title of 32 tokens uses ~150-350)

    @model_validator(mode="after")
    def _sizes(self) -> SubwordConfig:
        if self.buckets & (self.buckets - 1):
            raise ValueError(f"buckets must be a power of two, got {self.buckets}")
        if self.n_min > self.n_max:
            raise ValueError(f"n_min {self.n_min} is above n_max {self.n_max}")
        return self


class ShardConfig(Strict):
    """Shard stage: token ids, task labels, split, Parquet shards for the training loader."""

    tasks: list[TaskSpec] = Field(default_factory=list)
    text_fields: dict[TextField, int] = Field(
        default_factory=lambda: dict[TextField, int]({"title": 32})
    )  # field -> ids per product
    subwords: SubwordConfig = SubwordConfig()  # of the title
    split: SplitConfig = SplitConfig()
    per_group: bool = False  # one shard set per product group (train.model: mrnet_per_group)
    min_group_rows: int = Field(100, ge=1)  # per_group: smaller groups get no shard set
    row_group_rows: int = Field(2048, ge=1)  # the loader's unit of work and of shuffling
    rows_per_file: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ShardConfig:
        if "title" not in self.text_fields:
            raise ValueError("text_fields must include title")
        if any(length < 1 for length in self.text_fields.values()):
            raise ValueError(f"text_fields lengths must be >= 1, got {self.text_fields}")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        reserved = {
            "row_id",
            "product_id",
            "image_features",
            "image_missing",
            "embedding",
            "title_subwords",
        }
        reserved |= {f"{field}_{part}" for field in self.text_fields for part in ("ids", "len")}
        clashes = [name for name in names if name in reserved or name.endswith("_mask")]
        if clashes:
            raise ValueError(
                f"task names {clashes} clash with batch keys {sorted(reserved)} or end in _mask"
            )
        if self.split.stratify_by is not None:
            kinds = {task.name: kind_of(task.kind) for task in self.tasks}
            by = kinds.get(self.split.stratify_by)
            if by is None or not by.stratifies:
                able = [name for name, kind in kinds.items() if kind.stratifies]
                raise ValueError(
                    f"split.stratify_by '{self.split.stratify_by}' must name a "
                    f"task whose kind stratifies (of these tasks: {able})"
                )
        return self


class GroupAutoencoderConfig(Strict):
    """The sparse autoencoder that maps per-group MRNet embeddings to one group-agnostic
    space (MRNet section 3.2); trained in one process after the group models."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=2)  # the KL sparsity term averages over the batch
    lr: float = Field(1e-3, gt=0)
    rho: float = Field(0.05, gt=0, lt=1)  # target mean activation of a hidden unit
    beta: float = Field(3.0, ge=0)  # weight of the sparsity penalty
    max_rows_per_group: int = Field(500_000, ge=1)  # embeddings per group and split (paper)


class FinetuneConfig(Strict):
    """Products-10K's recipe, after normal training: fine-tune on a class-balanced subset of
    the train split (at most `per_class` rows a class of `task`) with the accuracy loss
    1 - mean(softmax probability of the true class)."""

    epochs: int = Field(0, ge=0)  # 0: no fine-tuning (the paper: 2-3)
    per_class: int = Field(5, ge=1)  # K: the paper samples at most 5 images per SKU
    lr: float = Field(1e-4, gt=0)
    task: str | None = None  # the multiclass task balanced on; None: the first multiclass one


class ProductNetConfig(Strict):
    """The master model's sizes (models/productnet.py); the embedding is train.embedding_size."""

    field_size: int = Field(128, ge=2, multiple_of=2)  # each field encoder's output
    hidden_size: int = Field(512, ge=1)  # the first fully connected layer
    image_size: int = Field(256, ge=1)  # the image branch's output
    bigram_buckets: int = Field(100_000, ge=1)  # fastText hashed word bigrams (brand)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class ContrastiveConfig(Strict):
    """Self-supervised contrastive learning on the catalog itself (SimCSE / Sudowoodo style,
    `pipelines.training.contrastive`): two augmented views of every product in a batch,
    in-batch negatives, symmetric InfoNCE at `temperature`, added to the task heads' losses
    with `weight`. It makes the embedding a similarity space. The defaults are the choices
    measured on the WDC matching pairs (README, "Finding the same product")."""

    weight: float = Field(1.0, ge=0.0)  # 0: off (the task heads alone)
    temperature: float = Field(0.15, gt=0.0)
    subword_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # each subword id of a view dropped
    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # each word id (its subwords stay)
    seed: int | None = None  # None: the training seed


class TrainConfig(Strict):
    """Train stage: MRNet or the ProductNet master model with data-parallel PyTorch launched
    from Spark (TorchDistributor), or in the driver for debugging (`distributed: false` or
    `num_processes: 1`)."""

    model: str = "mrnet"  # a model type (pipelines/model_types/kinds/)
    # mrnet's title encoder: bag (IDF-weighted word + subword vectors, needs shard.subwords) or
    # bilstm (the paper's BiLSTM over word2vec vectors)
    encoder: Literal["bag", "bilstm"] = "bag"
    contrastive: ContrastiveConfig = ContrastiveConfig()

    # The contrastive objective's measured recipe (README, "Finding the same product"): large
    # batches (more in-batch negatives), Adam at 1e-3, 20 epochs; early stopping ends a run
    # sooner when the validation loss stops falling. Clusters raise num_processes.
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(512, ge=2)  # per process: the global batch is this x processes
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)  # max gradient norm; None: no clipping
    embedding_size: int = Field(256, ge=2, multiple_of=2)  # the paper: 128 (per group), 256
    freeze_embeddings: bool = False  # keep the word2vec vectors fixed
    optimisation: Literal["joint", "alternating"] = "joint"
    tasks: list[str] = Field(default_factory=list)  # shard tasks to train on; empty: all
    distributed: bool = True  # false: the single-process path, in the driver
    num_processes: int = Field(2, ge=1)  # one per GPU on GPU machines
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the processes see one
    mixed_precision: bool = True  # autocast on CUDA (bf16, else fp16 + loss scaling)
    threads_per_process: int = Field(0, ge=0)  # 0: cores / processes (cluster: spark.task.cpus)
    loader_workers: int = Field(0, ge=0)  # DataLoader worker processes per training process
    # The validation figure that picks the kept epoch and drives early stopping: val_loss or
    # any figure of an epoch's validation row (val_<task>_accuracy: top-1, val_<task>_macro_f1).
    # Names ending in "loss" are minimised, the others maximised. A classifier's loss can
    # rise while its top-1 still climbs (README, "The master model").
    select_by: str = Field("val_loss", pattern=r"^val_\w+$")
    patience: int = Field(2, ge=1)  # early stopping: epochs without a better select_by
    min_delta: float = Field(0.0, ge=0)  # the smallest improvement that counts as better
    max_steps_per_epoch: int | None = Field(None, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: a checkpoint at each epoch end only
    calibration_batches: int = Field(20, ge=1)  # train batches that set the loss normaliser
    resume: bool = True  # continue from the last checkpoint of the same training setup
    seed: int | None = None  # None: the top-level seed
    registered_model_name: str | None = None  # None: prodvec-mrnet[-pg]-<catalog>
    finetune: FinetuneConfig = FinetuneConfig()
    group_autoencoder: GroupAutoencoderConfig = GroupAutoencoderConfig()
    productnet: ProductNetConfig = ProductNetConfig()

    @model_validator(mode="after")
    def _views_differ(self) -> TrainConfig:
        views = self.contrastive
        if views.weight and self.encoder == "bilstm" and not views.word_dropout:
            raise ValueError(
                "train.encoder bilstm reads no subword ids, so contrastive views "
                "differ only by train.contrastive.word_dropout: set it above 0 "
                "(or contrastive.weight: 0)"
            )
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in model_type_names():
            raise ValueError(
                f"unknown model type {name!r}; model types are {', '.join(model_type_names())}"
            )
        return name


class EmbedConfig(Strict):
    """The embedding table (pipelines/table): where it lives, which writer commits it,
    how big its files get, how long vacuum keeps unreferenced files, and how much one
    refresh may change before it needs an explicit override."""

    table_path: str | None = None  # None: <workdir>/<catalog>/embed/table
    writer: Literal["deltalake", "delta-spark"] = "deltalake"  # delta-spark: needs its jar
    rows_per_file: int = Field(400_000, ge=1)  # ~450 MB at 256-d float32
    vacuum_retention_hours: int = Field(168, ge=0)  # must exceed the longest embed job
    # vacuum refuses a shorter retention without --force: a running embed's written but
    # uncommitted files are younger than the job, and vacuum cannot tell them from a crash's.
    vacuum_min_retention_hours: int = Field(24, ge=0)
    # The model: null means the train stage's registered model (train.model's registered name,
    # e.g. prodvec-mrnet-<catalog>) at alias @candidate.
    model_uri: str | None = None
    batch_size: int = Field(1024, ge=1)  # rows per forward pass on a CPU task
    gpu_batch_size: int = Field(8192, ge=1)  # rows per forward pass on a task's GPU
    app_id: str | None = None  # idempotency key of the commit; null: the MLflow run id
    # The refresh guard: an embed that would remove more than this share of the table's
    # products (absent from the catalog) stops before writing, naming the counts. A truncated
    # clean output looks like mass deletion; a real catalog rarely loses 5% in one run. Set
    # 1.0 for a run that must remove more (the one way to allow it; it is in the config hash).
    max_removed_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # An incremental embed that would keep (carry) less than this share of the table's rows,
    # the rest removed or re-embedded, stops too: below half it costs about what a full
    # refresh does, and a change that wide (every content_hash rewritten, ids re-keyed) is
    # more often broken input than real. Set 0.0 to allow it. A full refresh (new model)
    # re-embeds every row by design and is held to max_removed_fraction only.
    min_carried_fraction: float = Field(0.5, ge=0.0, le=1.0)


class IndexConfig(Strict):
    """The index stage (pipelines/index.py): a faiss index per embedding-table version, its
    kind chosen by row count, its search knob tuned at build time to `target_recall`."""

    version: int | None = Field(None, ge=0)  # table version to index; None: the latest
    kind: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"  # auto: by the thresholds below
    exact_max_rows: int = Field(100_000, ge=1)  # auto: exact IndexFlatIP up to this many rows
    hnsw_max_rows: int = Field(10_000_000, ge=1)  # auto: HNSW up to this, IVF-PQ beyond
    hnsw_m: int = Field(32, ge=2)  # graph neighbours per node
    hnsw_ef_construction: int = Field(40, ge=1)  # faiss's default
    hnsw_ef_search: int = Field(16, ge=1)  # starting value (faiss's); doubled to target_recall
    ivf_lists: int | None = Field(None, ge=1)  # None: 4 * sqrt(rows), at least 39 rows a list
    pq_subquantizers: int | None = Field(None, ge=1)  # must divide dims; None: ~dims / 4
    ivf_probe: int = Field(16, ge=1)  # starting nprobe; doubled until target_recall
    rerank_factor: int = Field(4, ge=1)  # IVF-PQ: exact re-rank of this x k PQ candidates
    train_rows: int = Field(100_000, ge=1)  # IVF-PQ: uniform sample the quantizers learn from
    recall_queries: int = Field(1000, ge=1)  # table rows whose recall@10 is measured
    target_recall: float = Field(0.95, ge=0.0, le=1.0)  # recall@10 the search knob must reach
    batch_rows: int = Field(65_536, ge=1)  # Arrow batch streamed from the table's files
    gpu: bool = True  # exact searches on GPUs when faiss sees any


class EvaluateConfig(Strict):
    """The evaluate stage (pipelines/evaluate.py): downstream probes against TF-IDF, reports
    of the trained heads, pictures, and drift between embedding-table versions."""

    version: int | None = Field(None, ge=0)  # table version to evaluate; None: the latest
    probes: list[TaskSpec] = Field(default_factory=list)  # multiclass or binary, not trained on
    folds: int = Field(5, ge=2)  # k-fold cross-validation; fewer when a class is smaller
    small_train_rows: int = Field(1500, ge=10)  # the small-training-set variant's labels
    max_rows: int = Field(20_000, ge=10)  # products collected to the driver for probes/pictures
    tfidf_max_features: int = Field(50_000, ge=1)
    forest_trees: int = Field(100, ge=1)
    head_batch_size: int = Field(1024, ge=1)
    top_k: list[int] = Field(default_factory=lambda: [1, 3, 5])
    retrieval_queries: int = Field(200, ge=0)  # diverse queries for MAR@k; 0: no retrieval
    retrieval_k: int = Field(10, ge=1)
    # The matching report (pipelines.analysis.matching): perturbed copies of this many sampled
    # products' titles search the table, embeddings against TF-IDF; 0: no report.
    matching_queries: int = Field(500, ge=0)
    matching_word_dropout: float = Field(0.15, ge=0.0, lt=1.0)
    matching_char_noise: float = Field(0.2, ge=0.0, le=1.0)
    anisotropy_rows: int = Field(2000, ge=0)  # sample pairs for the mean cosine; 0: none
    tsne_rows: int = Field(2000, ge=0)  # 0: no t-SNE picture
    neighbour_queries: int = Field(20, ge=0)  # sample products in the neighbour table
    neighbours: int = Field(10, ge=1)
    drift_k: int = Field(10, ge=1)  # neighbour overlap@k between two versions
    drift_max_rows: int = Field(20_000, ge=10)  # shared products compared (a hash sample)

    @model_validator(mode="after")
    def _probe_kinds(self) -> EvaluateConfig:
        wrong = [task.name for task in self.probes if not kind_of(task.kind).probes]
        if wrong:
            kinds = [name for name in kind_names() if kind_of(name).probes]
            raise ValueError(f"evaluate.probes {wrong}: probes are tasks of kinds {kinds}")
        if any(k < 1 for k in self.top_k):
            raise ValueError(f"evaluate.top_k must be >= 1, got {self.top_k}")
        return self


class BackboneConfig(Strict):
    """The image model. `export`: a torch.export archive (architecture in the file; executors
    need only torch). `torchvision`: `torchvision.models.get_model(arch)` plus a state dict
    read with `torch.load(weights_only=True)`; torchvision must import on every executor."""

    format: Literal["export", "torchvision"] = "export"
    weights: str | None = None  # a local file; required to run, never downloaded
    arch: str | None = None  # torchvision: a `torchvision.models` name, e.g. resnet50
    drop_head: bool = (
        True  # torchvision: the classifier (fc / classifier / head / heads) -> Identity
    )

    @model_validator(mode="after")
    def _arch_for_torchvision(self) -> BackboneConfig:
        if (self.format == "torchvision") != (self.arch is not None):
            raise ValueError(
                "backbone.arch names the torchvision model: required with format "
                "torchvision, not taken with format export"
            )
        return self


class ImageFeaturesConfig(Strict):
    """The optional image_features stage (pipelines/image_features.py): a backbone over each
    product's image fills the clean catalog's `image_features`. Off unless `enabled`."""

    enabled: bool = False  # false: `prodvec run` skips the stage and later stages read clean
    path_column: str | None = None  # source catalog column with image paths or URIs
    image_root: str | None = None  # relative paths resolve against it (a folder or a URI)
    backbone: BackboneConfig = BackboneConfig()
    image_size: int = Field(224, ge=8)  # images are resized to image_size x image_size RGB
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per channel, after / 255
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dims: int | None = Field(None, ge=1)  # expected feature length; None: what the model gives
    batch_size: int = Field(32, ge=1)  # images per forward pass on a CPU task (one thread)
    gpu_batch_size: int = Field(256, ge=1)  # images per forward pass on the task's GPU
    # A larger file is not read (status too_large): a catalog row cannot make a task read
    # /dev/zero or a huge file into memory.
    max_image_bytes: int = Field(20 << 20, ge=1)

    @model_validator(mode="after")
    def _std_positive(self) -> ImageFeaturesConfig:
        if any(value <= 0 for value in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        return self


class CrossLocaleConfig(Strict):
    """The optional cross_locale stage (MRNet section 5): an autoencoder trained on products
    listed in two locales maps both locales' embeddings into one space, written as a table of
    its own. Off unless `enabled`. The same product in both locales is known from a mapping
    file (`pairs`) or an attribute both listings share (`pair_attribute`)."""

    enabled: bool = False  # false: `prodvec run` skips the stage
    locales: tuple[str, str] | None = None  # the two clean-catalog `locale` values
    # CSV with a header naming the two locales, one pair of product ids per row
    pairs: str | None = None
    pair_attribute: str | None = None  # a clean-catalog attributes key, e.g. global_id
    holdout: float = Field(0.1, gt=0.0, lt=0.5)  # pairs kept out of training for the report
    max_pairs: int = Field(500_000, ge=10)  # a seeded sample of pairs trains beyond this
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)  # the paper's
    lr: float = Field(0.001, gt=0)
    seed: int | None = None  # None: the top-level seed

    @model_validator(mode="after")
    def _pairing_given(self) -> CrossLocaleConfig:
        if not self.enabled:
            return self
        if self.locales is None or self.locales[0] == self.locales[1]:
            raise ValueError(
                "cross_locale.locales names two different locales, e.g. [en_GB, fr_FR]"
            )
        if (self.pairs is None) == (self.pair_attribute is None):
            raise ValueError("cross_locale needs exactly one of 'pairs' or 'pair_attribute'")
        return self


class PathsConfig(Strict):
    """Where configured files may live. Empty (the laptop default): anywhere. A cluster lists
    its roots (conf/cluster.yaml), so a typo or a hostile overlay cannot point a stage at
    files outside them; the workdir the config files give is always allowed (`Config.roots`)."""

    allowed_roots: list[str] = Field(default_factory=list)  # local paths or URI prefixes


class Config(Strict):
    workdir: Path = Path("work")
    seed: int = 42
    paths: PathsConfig = PathsConfig()
    spark: SparkConfig = SparkConfig()
    tracking: TrackingConfig = TrackingConfig()
    catalog: CatalogConfig
    clean: CleanConfig = CleanConfig()
    image_features: ImageFeaturesConfig = ImageFeaturesConfig()
    word2vec: Word2VecConfig = Word2VecConfig()
    shard: ShardConfig = ShardConfig()
    embed: EmbedConfig = EmbedConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cross_locale: CrossLocaleConfig = CrossLocaleConfig()
    _secrets: frozenset[str] = PrivateAttr(default_factory=frozenset)
    _workdir_from_files: Path | None = PrivateAttr(None)

    @field_validator("workdir", mode="before")
    @classmethod
    def _local_workdir(cls, value: object) -> object:
        return local_workdir(value) if isinstance(value, str) else value

    @property
    def outputs(self) -> Outputs:
        """Where this catalog's stage outputs live (several catalogs can share a workdir)."""
        return Outputs(self.workdir / self.catalog.name, self.embed.table_path)

    @property
    def roots(self) -> list[str]:
        """Where configured files may lie when `paths.allowed_roots` is set: those roots and
        the workdir the config files give. A workdir moved by a command-line override is
        where outputs go, never a root, so `workdir=/` cannot switch confinement off."""
        return [str(self._workdir_from_files or self.workdir), *self.paths.allowed_roots]

    @property
    def secrets(self) -> frozenset[str]:
        """The values this config took from environment variables."""
        return self._secrets

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-like data with secrets masked: what may be printed, logged or
        tracked."""
        return redact_tree(self.model_dump(mode="json"), self._secrets)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    def digest(self) -> str:
        """Short stable hash of the resolved config, stamped on outputs."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, taken: set[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in strings (secrets come only from the environment);
    every value taken from the environment is added to `taken`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                taken.add(os.environ[name])
                return os.environ[name]
            if default is None:
                raise ConfigError(f"environment variable {name} is not set")
            return default

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, taken) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, taken) for v in value]
    return value


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overlay into base. A `catalog` block that names a catalog replaces
    the base catalog whole, so one catalog's column map never leaks into another's."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        replaces_catalog = key == "catalog" and isinstance(value, dict) and "name" in value
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not replaces_catalog:
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a few nested `*alias` lines expand tenfold a level (a 442-byte
    file took 7 s and 489 MB), and configuration never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


MAX_CONFIG_BYTES = 1 << 20  # a configuration file is a few KB; anything larger is a mistake


def _parse_yaml(text: str, source: str) -> Any:
    loader = _NoAliasLoader(text)  # a SafeLoader: plain data only
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    value: Any = _parse_yaml(raw, f"override {text!r}") if raw.strip() else None
    for key in reversed(keys):
        value = {key: value}
    return value


def conf_dir() -> Path:
    """Where named overlays live: $PRODVEC_CONF_DIR, ./conf, or the repo's conf/."""
    if "PRODVEC_CONF_DIR" in os.environ:
        return Path(os.environ["PRODVEC_CONF_DIR"])
    local = Path.cwd() / "conf"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def _read_yaml(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, more than a config file's {MAX_CONFIG_BYTES:,}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    loaded = _parse_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _overlay_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    named = conf_dir() / f"{name_or_path}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in conf_dir().glob("*.yaml"))
        raise ConfigError(f"no overlay named {name_or_path!r} in {conf_dir()} (known: {known})")
    return named


def _format_validation(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<root>"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {problem['msg']} (got {problem.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


def load_config(overlays: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve base + overlays + overrides into a validated Config."""
    raw = _read_yaml(conf_dir() / "base.yaml")
    for overlay in overlays or []:
        raw = merge(raw, _read_yaml(_overlay_path(overlay)))
    from_files = raw
    for override in overrides or []:
        parsed = parse_override(override)
        if "paths" in parsed:
            raise ConfigError(
                f"override {override!r}: paths.* is set in config files (--conf) only, so a "
                "command line cannot widen where stages read and write"
            )
        raw = merge(raw, parsed)
    taken: set[str] = set()
    try:
        config = Config.model_validate(_expand_env(raw, taken))
    except ValidationError as err:
        raise ConfigError(redact_text(_format_validation(err), taken)) from None
    config = config.model_copy(update={"workdir": config.workdir.expanduser().resolve()})
    config._secrets = frozenset(taken)
    workdir_from_files = local_workdir(_expand_env(from_files.get("workdir", "work"), set()))
    config._workdir_from_files = workdir_from_files.expanduser().resolve()
    try:
        confine_paths(config)
    except ConfigError as err:
        raise ConfigError(redact_text(str(err), taken)) from None
    return config


def local_workdir(location: str) -> Path:
    """The workdir as a path: a plain path or a file:// URI (a cluster's shared mount). Stage
    outputs other than the table are local files, so an object-store URI is refused here
    rather than turned into a folder named `s3a:` under the current directory."""
    if location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    if "://" in location:
        raise ValueError(
            f"workdir {location} is an object-store URI; the workdir is a local or mounted "
            "path (or file://). Put the embedding table on the object store with "
            "embed.table_path"
        )
    return Path(location)


def inside(location: str, root: str) -> bool:
    """`location` is `root` or below it: local paths after resolving '..' and symlinks, URIs
    (s3a://, hdfs://) by prefix. file: URIs count as local paths."""
    location, root = (text.removeprefix("file://") for text in (location, root))
    if "://" in location or "://" in root:
        if ".." in location.split("/"):
            return False  # no resolving on object stores: a '..' segment is never inside
        return location.rstrip("/") == root.rstrip("/") or location.startswith(
            root.rstrip("/") + "/"
        )
    return Path(location).expanduser().resolve().is_relative_to(Path(root).expanduser().resolve())


def confine(config: Config, key: str, location: str) -> None:
    """`location` (named `key` in the error) lies under `Config.roots`; without
    `paths.allowed_roots` (the laptop default) anything goes."""
    if config.paths.allowed_roots and not any(inside(location, root) for root in config.roots):
        raise ConfigError(
            f"{key}={location} is outside the allowed roots {config.roots} "
            "(paths.allowed_roots and the workdir the config files give)"
        )


def confine_paths(config: Config) -> None:
    """Every configured file location lies under `Config.roots`."""
    if not config.paths.allowed_roots:
        return
    located = {
        "catalog.path": config.catalog.path,
        "embed.table_path": config.embed.table_path,
        "tracking.artifact_location": config.tracking.artifact_location,
        "image_features.backbone.weights": config.image_features.backbone.weights,
        "image_features.image_root": config.image_features.image_root,
        "cross_locale.pairs": config.cross_locale.pairs,
        **{
            f"catalog.lookups[{i}].path": lookup.path
            for i, lookup in enumerate(config.catalog.lookups)
        },
    }
    model = config.embed.model_uri
    if model and not model.startswith(("models:/", "runs:/")):
        located["embed.model_uri"] = model  # a model folder
    for key, location in located.items():
        if location is not None:
            confine(config, key, location)
