"""Reading one backup for download, and nothing else.

The name must be one the core lists as this state file's backup
(``backup_path``), and is then opened relative to the backup folder's own
descriptor without following a symlink, and read only if it is a regular
file: a name swapped for a symlink, a FIFO or a folder after it was listed
is refused rather than followed.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import quote

from dynamic_port_manager import DynamicPortManager

#: What a backup name looks like: a plain ``*.json`` file name, no folder part.
NAME_PATTERN = r"^[^/\\]+\.json$"
NAME_MAX = 255


def read_backup(manager: DynamicPortManager, name: str) -> bytes | None:
    """The bytes of backup ``name`` of ``manager``'s state file, or None."""
    if "/" in name or "\\" in name or "\0" in name or name in ("", ".", ".."):
        return None
    path = manager.backup_path(name)
    if path is None or path.name != name:
        return None
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang the request.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=folder)
    except OSError:
        os.close(folder)
        return None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return None  # a folder or FIFO: not even opened as a file object
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read()
        # The core recycles the backup it prunes as its next temporary file:
        # if this one was pruned while we read, what we read may be torn.
        try:
            still = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except OSError:
            return None
        return data if still.st_ino == opened.st_ino else None
    finally:
        os.close(fd)
        os.close(folder)


def attachment_header(name: str) -> str:
    """``Content-Disposition`` for ``name``, safe for any characters it holds."""
    quoted = quote(name, safe="")
    if quoted == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename*=utf-8''{quoted}"
