"""Every write t2r makes goes through here: a temporary sibling renamed into place, so readers see the old file or
directory or the new one, whole, and a failed or interrupted command leaves nothing half-written.

Temporary names carry the writing process's id (``.NAME.t2r-tmp-PID-XXXX``); one left behind by a process that
was killed outright (SIGKILL, power loss) is swept by the next command that writes beside it. SIGTERM and SIGINT
unwind normally (``exit_on_signals``), so their temporaries are removed on the way out.

``--force`` replaces only a directory t2r wrote (it holds ``OUTPUT_MARKER``), never a run directory, and never a
directory the command reads from.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from t2r.errors import T2RError, first_line

TEMP_TAG = ".t2r-tmp-"
OUTPUT_MARKER = ".t2r-output"  # in every directory convert and export write: what --force may replace
_TEMP = re.compile(r"^\..+" + re.escape(TEMP_TAG) + r"(\d+)-")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temps(parent: str | Path) -> list[Path]:
    """Remove temporaries in PARENT whose writing process no longer exists; returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_permissions(root: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give what t2r publishes the usual umask permissions."""
    mask = _umask()
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _prepare_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(final.parent)
    except OSError as e:
        raise T2RError(f"cannot write {final}: {e.strerror or e}") from None


def _new_temp(final: Path, directory: bool) -> Path:
    prefix = f".{final.name}{TEMP_TAG}{os.getpid()}-"
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)  # O_EXCL: never through a planted link
        os.close(fd)
        return Path(name)
    except OSError as e:
        raise T2RError(f"cannot write in {final.parent}: {e.strerror or e}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """A fresh temporary file (or empty directory) beside FINAL; on success renamed onto FINAL (an existing
    directory is moved aside and removed after), on any failure removed."""
    final = Path(final).absolute()
    _prepare_parent(final)
    tmp = _new_temp(final, directory)
    try:
        yield tmp
        publish_permissions(tmp)
        if directory and final.exists():
            old = _new_temp(final, directory=True)
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON file that must hold an object (config.json, indexes, records), or a one-line error."""
    import json

    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise T2RError(f"{what}: {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise T2RError(f"{what}: {path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise T2RError(f"{what}: {path} holds a JSON {type(value).__name__}, not an object")
    return value


def confined(root: str | Path, relative: str | Path, what: str) -> Path:
    """ROOT / RELATIVE, refusing anything that resolves outside ROOT (``..``, absolute paths, links out)."""
    root = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise T2RError(f"{what}: {relative} is an absolute path; only files inside {root} are read")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise T2RError(f"{what}: {relative} points outside {root}")
    return path


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_destination(out: str | Path, force: bool, reads: Iterable[str | Path] = ()) -> Path:
    """Fail before any work when OUT may not be written: it exists (without --force), it is not a directory t2r
    wrote, it is a run directory, or it overlaps a directory the command reads (``reads``)."""
    out = Path(out)
    resolved = out.resolve()
    for src in reads:
        if _overlaps(resolved, Path(src).resolve()):
            raise T2RError(f"output {out} overlaps {src}, which this command reads; choose another directory")
    if str(resolved).startswith(("/proc/", "/sys/", "/dev/")) or str(resolved) in ("/proc", "/sys", "/dev"):
        raise T2RError(f"output {out} is under a system directory (/proc, /sys, /dev)")
    if not out.exists():
        return out
    if not force:
        raise T2RError(f"output {out} already exists (use --force to replace it)")
    if not out.is_dir():
        raise T2RError(f"output {out} exists and is not a directory; --force replaces only directories t2r wrote")
    if (out / "run.json").is_file():
        raise T2RError(f"output {out} is a finetuning run; --force never replaces a run")
    if not (out / OUTPUT_MARKER).is_file() and any(out.iterdir()):
        raise T2RError(f"output {out} was not written by t2r (no {OUTPUT_MARKER}); --force will not delete it")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool = False, reads: Iterable[str | Path] = ()) -> Iterator[Path]:
    """The output directory of convert or export: checked (``check_destination``), written in a temporary
    sibling, marked as t2r's, then renamed onto OUT."""
    reads = list(reads)
    check_destination(out, force, reads)
    with atomic_path(out, directory=True) as tmp:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by t2r; t2r convert/export --force may replace this directory\n")


def exit_on_signals() -> None:
    """SIGTERM (and SIGHUP) end the process like Ctrl-C does, through every ``finally``: temporaries go away."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):  # not the main thread: leave the default
                signal.signal(sig, stop)
