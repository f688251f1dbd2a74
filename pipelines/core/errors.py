"""Every expected failure of prodvec, in one hierarchy under `ProdvecError`.

Each carries a message that names the thing at fault. The CLI prints a `ProdvecError` as one
`prodvec: error:` line (exit 2; `TaskError`, an executor-side batch failure, exits 1); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "CatalogError",
    "ConfigError",
    "CorpusError",
    "CrossLocaleError",
    "EmbedError",
    "EmptyVocabularyError",
    "EvaluateError",
    "ImageFeaturesError",
    "InjectedFault",
    "MassChangeError",
    "ProdvecError",
    "ShardError",
    "StaleCatalogError",
    "TableError",
    "TableRaceError",
    "TableVerifyError",
    "TaskError",
    "TrainingError",
    "VectorIndexError",
    "VocabularyError",
]


class ProdvecError(Exception):
    """Base of every failure caused by input, configuration or environment."""


class ConfigError(ProdvecError, ValueError):
    """A configuration file, overlay or override is wrong."""


class CatalogError(ProdvecError):
    """A catalog cannot be read as configured (missing file, column, wrong type)."""


class CorpusError(ProdvecError):
    """The corpus stage's outputs (vocabulary, word vectors) are missing or are not the ones
    it published."""


class VocabularyError(ProdvecError, ValueError):
    """A vocabulary built from inconsistent input (repeated words, misaligned counts)."""


class EmptyVocabularyError(VocabularyError):
    """No word of the corpus reaches `word2vec.min_count`: there is nothing to train."""


class ShardError(ProdvecError):
    """Shards are missing, empty, inconsistent with their manifest, or cannot be built."""


class TrainingError(ProdvecError):
    """Training cannot start or went wrong (no GPU where one was required, a diverged loss)."""


class EmbedError(ProdvecError):
    """The model cannot be resolved, loaded or run as the embed stage needs."""


class TableError(ProdvecError):
    """The embedding table refuses a commit (contract, model mix, conflicts) or a request."""


class TableRaceError(TableError):
    """Another writer changed the table between our read and our commit: plan again."""


class MassChangeError(TableError):
    """A refresh would remove or replace more of the table than `embed.max_removed_fraction`
    / `embed.min_carried_fraction` allow: likely a truncated catalog, so nothing is written."""


class StaleCatalogError(TableError):
    """The table's last commit was made from a newer clean catalog than this run read."""


class TableVerifyError(TableError):
    """A data file of a table version fails verification (checksums, schema, ids, counts)."""


class VectorIndexError(ProdvecError):
    """A nearest-neighbour index or query is unusable (missing index, unknown id, bad k)."""


class EvaluateError(ProdvecError):
    """The evaluate stage has nothing to evaluate (no table, no version) or a bad request."""


class ImageFeaturesError(ProdvecError):
    """The image backbone cannot be loaded, vetted or run as configured."""


class CrossLocaleError(ProdvecError):
    """The cross-locale stage cannot pair the two locales' products as configured (no
    embedding table of the current catalog, too few pairs, a pairs file without the locales'
    columns)."""


class AnnotationError(ProdvecError):
    """An annotation request is inconsistent (labels outside the catalog, too few classes)."""


class TaskError(ProdvecError):
    """A Python step on an executor failed; the message names stage, partition and batch."""


class InjectedFault(RuntimeError):
    """A failure injected on purpose (`PRODVEC_INJECT_FAULT`) to test retries: deliberately
    not a ProdvecError, so it looks to Spark and the CLI like a real crash."""
