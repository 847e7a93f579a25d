"""Reading one backup for download, and nothing else: the core's
``read_backup`` (a name the core lists as this state file's backup, opened
relative to the backup folder without following a link, read only if a
regular file, and only if the name still names what was read).
"""

from __future__ import annotations

from urllib.parse import quote

from dynamic_port_manager import DynamicPortManager

#: What a backup name looks like: a plain ``*.json`` file name, no folder part.
NAME_PATTERN = r"^[^/\\]+\.json$"
NAME_MAX = 255


def read_backup(manager: DynamicPortManager, name: str) -> bytes | None:
    """The bytes of backup ``name`` of ``manager``'s state file, or None."""
    if "/" in name or "\\" in name or "\0" in name or name in ("", ".", ".."):
        return None
    return manager.read_backup(name)


def attachment_header(name: str) -> str:
    """``Content-Disposition`` for ``name``, safe for any characters it holds."""
    quoted = quote(name, safe="")
    if quoted == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename*=utf-8''{quoted}"
