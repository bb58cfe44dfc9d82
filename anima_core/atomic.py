"""Crash-safe writes: a temporary file in the same folder, flushed, fsynced, then renamed over the target.

A process killed at any moment leaves either the old file or the new one, never a torn one. Leftover
temporary files carry the TEMP_MARK so a later start can find and report them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from anima_core.errors import AnimaError

TEMP_MARK = ".anima-tmp-"


class DiskWriteError(AnimaError):
    """Writing failed (disk full, permissions); the previous file is intact."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_MARK + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DiskWriteError(
            f"could not write {target}: {exc.strerror or exc}. The previous file (if any) is intact; free disk space or fix permissions and retry."
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


@contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary folder; on success it is renamed to ``target``, so ``target`` is complete or absent."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_MARK + target.name + ".", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskWriteError(
            f"could not write {target}: {exc.strerror or exc}. Earlier states are intact; free disk space and retry."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes left behind in ``folder`` (recursively); return what was removed."""
    folder = Path(folder)
    if not folder.exists():
        return []
    removed = sorted(p for p in folder.rglob(TEMP_MARK + "*"))
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
