"""Publishing a stage's finished output folder: built beside the live one, then swapped in,
so a reader (or the next stage) sees the old folder or the new one, never half of one."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


def publish_folder(staging: Path, target: Path) -> None:
    """Swap `staging` in as `target`; the old target is removed only after the swap."""
    retired = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
