"""Writing output files safely.

- Atomic writes: the data goes to a temp file beside the target, named
  ``.<target name>.<pid>.<random><suffix>``, which is renamed onto the target once complete and
  removed on any error (a signal turned into an exception by utils/cli.py included). Its writer
  holds an flock on it while it lives, so a temp file left by a killed run is recognised (its pid
  is not alive here and nobody holds its lock) and removed by the next write to the same target.
- One writer per output folder: ``exclusive_folder`` (an flock on ``<folder>/.padim.lock``, which
  the kernel releases when its process dies, however it dies).
- ``remove_previous_results``: a new model never sits beside the metrics, scores and figures of
  the model it replaces.
- Disk problems (full, read-only, a folder where a file should be) become ``OutputError``: one
  line naming the path and the cause.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".padim.lock"

# The errors of a disk or a path the user can fix, as opposed to a bug.
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EEXIST: "it already exists",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
}


class OutputError(OSError):
    """An output file or folder cannot be written: full or read-only disk, a file where a folder
    should be, a folder busy with another run. The message is the whole story (one line)."""


class FolderBusyError(OutputError):
    """Another process holds the output folder's lock."""


def _file_in_the_way(name) -> Path | None:
    """The nearest existing ancestor of ``name`` (or itself) when it is a file, not a folder."""
    for candidate in (Path(name), *Path(name).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def describe_os_error(exc: OSError, path=None) -> str | None:
    """``"<path>: <cause>"`` for the disk and path errors a user can fix, None for others."""
    cause = _CAUSES.get(exc.errno)
    if cause is None:
        return None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        in_the_way = _file_in_the_way(exc.filename) if exc.filename is not None else None
        cause = f"{in_the_way} is a file, not a folder" if in_the_way is not None else cause
    where = path if path is not None else exc.filename
    return f"{where}: {cause}" if where is not None else cause


def output_error(exc: OSError, path) -> OSError:
    """``exc`` as an ``OutputError`` naming ``path``, when it is a disk or path error."""
    if isinstance(exc, OutputError):
        return exc
    message = describe_os_error(exc, path)
    return OutputError(f"cannot write {message}") if message else exc


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _current_umask()


def give_plain_permissions(path) -> None:
    """mkstemp creates its files private (0600); give a finished temp file the mode a plain
    open() would have (0666 minus the umask) before it is renamed into place."""
    os.chmod(path, 0o666 & ~_UMASK)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name_pattern(path: Path, suffix: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+{re.escape(suffix)}\Z")


def remove_stale_temp_files(path, suffix: str = ".tmp") -> list[Path]:
    """Remove the temp files that dead writers left for ``path``; returns them.

    A temp file is stale when its pid is not alive here and no process holds its flock: the
    second test keeps the temp file of a live writer whose pid is not visible here (another
    container on a shared folder); the first keeps it in the instant between its creation and
    its lock. A recycled pid only delays the removal to a later run."""
    path = Path(path)
    pattern = _temp_name_pattern(path, suffix)
    removed = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        candidate = path.parent / name
        # Best effort: a leftover that cannot be opened or removed must not stop this run's write.
        try:
            handle = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(candidate)
            removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(handle)
    return removed


@contextmanager
def temp_path_beside(path, suffix: str = ".tmp"):
    """Yield a temp file name beside ``path`` for a writer that needs a name (savefig,
    paddle.save); on success it gets plain permissions and is renamed onto ``path``, on any
    error it is removed. Stale temp files of dead writers for ``path`` are removed first.
    Disk and path errors are raised as ``OutputError``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        remove_stale_temp_files(path, suffix)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise output_error(exc, path) from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)   # tells other runs' cleaners that this temp file is live
        yield temp_name
        give_plain_permissions(temp_name)
        os.replace(temp_name, path)
    except OSError as exc:
        raise output_error(exc, path) from exc
    finally:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        os.close(handle)


def write_atomically(path, write) -> Path:
    """Call ``write(binary_stream)`` on a temp file beside ``path``, fsync, rename into place."""
    with temp_path_beside(path) as temp_name:
        with open(temp_name, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def write_text_atomically(path, text: str) -> Path:
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


# The folders this process holds, by real path.
_held_folders: set[str] = set()


def _open_lock_file(folder: Path) -> int:
    lock_path = folder / LOCK_NAME
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        # Created by another user: an flock needs only read access.
        return os.open(lock_path, os.O_RDONLY)


def _holder(handle: int) -> str:
    """'pid N' (and the host, when not this one) of the process that wrote the lock file."""
    fields = os.pread(handle, 300, 0).decode("utf-8", "replace").split()
    if not fields or not fields[0].isdigit():
        return ""
    host = f" on {fields[1]}" if len(fields) > 1 and fields[1] != socket.gethostname() else ""
    return f" (pid {fields[0]}{host})"


@contextmanager
def exclusive_folder(folder, wait_seconds: float = 0.0, create: bool = True):
    """Hold ``folder`` for this process: one writer per output folder. A missing folder is
    created, or with ``create=False`` (a folder to be read first, which the reader reports as
    missing) left missing and not locked.

    Another process holding it makes this raise ``FolderBusyError`` at once, or after
    ``wait_seconds`` of retrying. The lock is an flock on ``<folder>/.padim.lock``: the kernel
    releases it when its holder exits or is killed, so no stale lock outlives a run. The lock
    file stays (removing it would let two runs lock two different files). Nesting in one process
    is allowed (train.py holds the folder while it evaluates)."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(folder)
        handle = None if key in _held_folders else _open_lock_file(folder)
    except OSError as exc:
        raise output_error(exc, folder) from exc
    if handle is None:   # nested: the outer block holds the lock and releases it
        yield folder
        return
    try:
        _lock_or_raise_busy(handle, folder, wait_seconds)
        _held_folders.add(key)
        try:
            yield folder
        finally:
            _held_folders.discard(key)
    finally:
        os.close(handle)


def _lock_or_raise_busy(handle: int, folder: Path, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise FolderBusyError(f"another run{_holder(handle)} is writing {folder}; wait for it "
                                      f"or use another --save_path") from None
            time.sleep(0.1)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass   # a lock file of another user, opened read-only: the lock holds, without our pid


def _result_files(folder: Path, category: str) -> list[Path]:
    figure = re.compile(rf"{re.escape(category)}_\d+\.png\Z")
    found = [folder / name for name in ("metrics.json", "scores.csv", "roc_curve.png")]
    found += [path for path in folder.glob("*.png") if figure.match(path.name)]
    predict = folder / "predict"
    if predict.is_dir():   # predict.py's pictures mirror the input tree
        found += list(predict.rglob("*.png")) + list(predict.rglob("predictions.csv"))
    return [path for path in found if path.is_file()]


def remove_previous_results(folder, category: str) -> list[Path]:
    """Remove what evaluating and predicting with the previous model wrote into its category
    folder: metrics.json, scores.csv, roc_curve.png, the per-image figures ``<category>_<i>.png``
    and the pictures and predictions.csv in predict/. Logs stay. train.py calls this under the
    folder's lock just before it writes a new model, so the new model never sits beside the old
    model's results (they are removed first, not replaced as a set). Returns the removed files."""
    removed = []
    for path in _result_files(Path(folder), category):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise output_error(exc, path) from exc
        removed.append(path)
    return removed
