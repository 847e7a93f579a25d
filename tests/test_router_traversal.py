"""`backup/download` serves this state file's backups and never a byte of anything else."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import api_ports
import pytest
from dynamic_port_manager import DynamicPortManager
from fastapi.testclient import TestClient
from router_helpers import app_with, port_block

SECRET = b"TOP-SECRET-OUTSIDE"
OTHER = b"OTHER-SERVICE-SECRET"
NOTES = b"NOTES-IN-THE-FOLDER"
URL = "/api/v1/port/backup/download"


class Folder:
    """A manager with real backups, and a backup folder with planted traps."""

    def __init__(self, manager: DynamicPortManager, tmp_path: Path) -> None:
        self.manager = manager
        manager.pick_port()
        manager.release_port()
        self.backups = manager.backups()
        assert self.backups, "the manager made no backup to compare with"
        folder = manager.backup_dir
        stem = manager.state_path.stem
        self.secret = tmp_path / "secret.json"
        self.secret.write_bytes(SECRET)
        # Named exactly like backups of this state file, but not regular files.
        self.symlink = f"{stem}_20990101_000000.json"
        (folder / self.symlink).symlink_to(self.secret)
        self.directory = f"{stem}_20980101_000000.json"
        (folder / self.directory).mkdir()
        (folder / self.directory / "x").write_bytes(SECRET)
        # Other files in the same folder.
        self.other = "other_service_20240101_000000.json"
        (folder / self.other).write_bytes(OTHER)
        self.notes = "notes.json"
        (folder / self.notes).write_bytes(NOTES)


@pytest.fixture
def folder(state_path: Path, tmp_path: Path) -> Iterator[Folder]:
    manager = DynamicPortManager(*port_block(), state_path, console_log=False)
    try:
        yield Folder(manager, tmp_path)
    finally:
        manager.stop()


def _refused(client: TestClient, raw_query: str) -> None:
    response = client.get(f"{URL}?filename={raw_query}")
    assert response.status_code in (400, 404, 422), (raw_query, response.status_code)
    for secret in (SECRET, OTHER, NOTES):
        assert secret not in response.content
    assert "detail" in response.json()


@pytest.mark.parametrize(
    "raw_query",
    [
        "../secret.json",
        "../../secret.json",
        "..%2Fsecret.json",
        "..%2F..%2Fsecret.json",
        "%2e%2e%2fsecret.json",
        "%252e%252e%252fsecret.json",  # double-encoded: decoded once, then no such name
        "..%5Csecret.json",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "backups%2F..%2F..%2Fsecret.json",
        "%00.json",
        "..",
        "",
    ],
)
def test_paths_and_encoded_traversal_are_refused(folder: Folder, raw_query: str) -> None:
    client = TestClient(app_with(api_ports.create_router(folder.manager)))
    _refused(client, raw_query)


def test_absolute_paths_to_real_files_are_refused(folder: Folder) -> None:
    client = TestClient(app_with(api_ports.create_router(folder.manager)))
    for path in (
        folder.secret,
        folder.manager.state_path,
        folder.manager.backup_dir / folder.notes,
    ):
        response = client.get(URL, params={"filename": str(path)})
        assert response.status_code == 422
        assert SECRET not in response.content and NOTES not in response.content


def test_symlinks_folders_and_other_files_in_the_folder_are_refused(folder: Folder) -> None:
    client = TestClient(app_with(api_ports.create_router(folder.manager)))
    for name in (folder.symlink, folder.directory, folder.other, folder.notes):
        response = client.get(URL, params={"filename": name})
        assert response.status_code == 404, name
        assert "no backup named" in response.json()["detail"]
        assert SECRET not in response.content and OTHER not in response.content
    # The state file itself and its lock are not backups either.
    for name in (folder.manager.state_path.name, ".dynamic_port_manager.lock"):
        assert client.get(URL, params={"filename": name}).status_code in (404, 422)
    # And the real backups still download: the refusals above are not blanket ones.
    response = client.get(URL, params={"filename": folder.backups[0]})
    assert response.status_code == 200
    assert response.content == (folder.manager.backup_dir / folder.backups[0]).read_bytes()


class UnfilteredBackupPath(DynamicPortManager):
    """A core that answers for any name, as if a backup were swapped for a
    symlink or folder between listing and reading: the router's own checks
    must then still refuse it."""

    def backup_path(self, name: str) -> Path | None:
        return self.backup_dir / name


def test_a_backup_swapped_for_a_symlink_after_listing_is_not_followed(
    state_path: Path, tmp_path: Path
) -> None:
    manager = UnfilteredBackupPath(*port_block(), state_path, console_log=False)
    try:
        folder = Folder(manager, tmp_path)
        client = TestClient(app_with(api_ports.create_router(manager)))
        for name in (folder.symlink, folder.directory):
            response = client.get(URL, params={"filename": name})
            assert response.status_code == 404, name
            assert SECRET not in response.content
        # Swap a real, listed backup for a symlink to the secret.
        assert len(folder.backups) >= 2
        victim = manager.backup_dir / folder.backups[-1]
        os.replace(manager.backup_dir / folder.symlink, victim)
        response = client.get(URL, params={"filename": victim.name})
        assert response.status_code == 404
        assert SECRET not in response.content
        assert client.get(URL, params={"filename": folder.backups[0]}).status_code == 200
    finally:
        manager.stop()
