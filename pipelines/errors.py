"""Expected failures: each carries a message that names the thing at fault.

The CLI prints these as one line and exits 2; any other exception is a bug and
keeps its traceback.
"""


class ProdvecError(Exception):
    """Base of every failure caused by input, configuration or environment."""


class ConfigError(ProdvecError, ValueError):
    """A configuration file, overlay or override is wrong."""


class CatalogError(ProdvecError):
    """A catalog cannot be read as configured (missing file, column, wrong type)."""


class TableError(ProdvecError):
    """The embedding table refuses a commit (contract, model mix, conflicts) or a request."""


class VectorIndexError(ProdvecError):
    """A nearest-neighbour index or query is unusable (missing index, unknown id, bad k)."""
