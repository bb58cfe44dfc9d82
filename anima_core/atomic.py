"""Crash-safe writes: a temporary file in the same folder, flushed, fsynced, then renamed over the target.

A process killed at any moment leaves either the old file or the new one, never a torn one. Everything
written here is readable by its owner only (files 0600, folders 0700), whatever the umask. Temporary
names are ``TEMP_MARK<pid>.<target name>.<random>`` so a later start can find the leftovers of a killed
process and leave alone the writes of a run that is still alive beside it.
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


def _temp_prefix(target: Path) -> str:
    return f"{TEMP_MARK}{os.getpid()}.{target.name}."


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(target: str | Path, *, sync_folder: bool = True):
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    ``sync_folder=False`` leaves the folder's fsync to the caller (``fsync_folders`` once for many files):
    the file's own data is still fsynced before the rename, so it is complete or absent, never torn.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        if sync_folder:
            _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DiskWriteError(
            f"could not write {target}: {exc.strerror or exc}. The previous file (if any) is intact; "
            "free disk space or fix permissions and retry."
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_folders(folders) -> None:
    """Make the renames of earlier ``atomic_path(..., sync_folder=False)`` writes durable: one fsync per folder."""
    for folder in set(folders):
        _fsync_dir(Path(folder))


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def open_owner_only(path: str | Path, *, binary: bool = False):
    """``path`` opened for appending, created (or, when it exists, set) readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding="utf-8")


def make_owner_only_dirs(path: str | Path) -> Path:
    """Create ``path`` and its missing parents as owner-only folders (0700 whatever the umask); folders
    that already exist keep their mode."""
    target = Path(path)
    missing, folder = [], target
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    return target


@contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary folder; on success it is renamed to ``target``, so ``target`` is complete or absent.

    An existing ``target`` is first renamed aside (a folder cannot be renamed over a non-empty one), so
    it is gone only for the instant between two renames, never while files are being deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o600)  # written by the caller under the process umask
                _fsync_file(path)
            elif path.is_dir():
                os.chmod(path, 0o700)
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target) + "old.", dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskWriteError(
            f"could not write {target}: {exc.strerror or exc}. Earlier states are intact; free disk space and retry."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temporary name still runs (then its write is in progress)."""
    pid = name[len(TEMP_MARK):].split(".", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a killed process its parent has not reaped yet is a zombie, and writes nothing more
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes left in ``folder`` (recursively); return what was removed.

    Other runs may write and prune in the same folder meanwhile: folders that vanish are skipped.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        removed += [Path(root) / name for name in dirs + files if name.startswith(TEMP_MARK) and not _writer_alive(name)]
        dirs[:] = [name for name in dirs if not name.startswith(TEMP_MARK)]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return sorted(removed)
