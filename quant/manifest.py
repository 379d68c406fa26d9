"""What both artifact formats share on disk: the manifest's name inside a model file, checksums, temporary names."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST_NAME = "dqrm_manifest.json"


def tmp_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place (``torch.export.save`` wants the ``.pt2`` suffix)."""
    path = Path(path)
    return path.with_name(path.stem + ".tmp" + path.suffix) if path.suffix == ".pt2" else \
        path.with_name(path.name + ".tmp")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
