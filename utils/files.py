"""File helpers shared by the writers that go through a temp file and a rename."""
from __future__ import annotations

import os


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
