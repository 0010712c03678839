"""Atomic output directories: a command either leaves a complete OUT or nothing at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from t2r.errors import T2RError


def check_destination(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) when OUT exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not force:
        raise T2RError(f"output {out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise T2RError(f"output {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside OUT; on success it is renamed to OUT, on any failure removed."""
    out = check_destination(out, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers see the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only entries; give the result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
