"""Writing files safely: through a temp file beside the target, renamed into place."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def temp_path_beside(path, suffix: str = ".tmp"):
    """Yield a temp file name beside ``path`` for a writer that needs a name (savefig,
    paddle.save); on success it gets plain permissions and is renamed onto ``path``, on any
    error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield temp_name
        give_plain_permissions(temp_name)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


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
