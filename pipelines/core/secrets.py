"""Redaction: values that came from the environment, values under keys that look like
credentials and the user-info of URIs never leave the process in printed configuration, logs,
error lines or MLflow params and artifacts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "RedactingFilter", "credential_key", "redact_text", "redact_tree"]

MASK = "***"
# The last words of a key: `fs.s3a.secret.key`, `spark.hadoop.fs.azure.account.key.x`,
# `password`, `api_token`, `sas_token`, `private_key_id`...
_CREDENTIAL = re.compile(
    r"(secret|passw(or)?d|token|credential|api[._-]?key|access[._-]?key|account[._-]?key|"
    r"private[._-]?key|sas\b|signature)",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SHORTEST_SECRET = 4  # shorter values (a port, "yes") would mask half of every line


def credential_key(key: str) -> bool:
    """True for a setting name that holds a credential."""
    return bool(_CREDENTIAL.search(key))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known secret value and every URI's user-info masked."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _SHORTEST_SECRET:
            text = text.replace(secret, MASK)
    return _USERINFO.sub(f"{MASK}@", text)


def redact_tree(tree: Any, secrets: Iterable[str], key: str = "") -> Any:
    """A copy of a JSON-like tree: strings under credential keys masked whole, other strings
    through `redact_text`."""
    secrets = frozenset(secrets)
    if isinstance(tree, dict):
        return {k: redact_tree(v, secrets, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v, secrets, key) for v in tree]
    if isinstance(tree, str):
        return MASK if tree and credential_key(key) else redact_text(tree, secrets)
    return tree


class RedactingFilter(logging.Filter):
    """Masks the secrets in every record a handler emits (message and traceback alike)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = frozenset(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info:
            record.exc_text = redact_text(
                logging.Formatter().formatException(record.exc_info), self.secrets
            )
            record.exc_info = None
        return True
