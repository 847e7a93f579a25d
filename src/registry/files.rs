//! The registry's files, kept open between transactions: the two slots, the
//! change log, and how a table is read from and written to a slot. A name
//! that no longer names the file held (deleted, moved aside, replaced) is
//! opened again; one that is not a regular file is set aside.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil::{Dir, Open, Stat, MAX_READ};

use super::{add_notice, Lease};

pub(super) const LOCK_FILE: &str = "leases.lock";
pub(super) const LOG_FILE: &str = "leases.log";

/// The version a lease table file carries (`{"version": 1, "leases": [...]}`).
pub(super) const TABLE_VERSION: u32 = 1;

/// A slot's contents: a full table.
#[derive(Serialize, Deserialize)]
pub(super) struct LeaseFile {
    pub(super) version: u32,
    pub(super) leases: Vec<Lease>,
}

/// An open slot or log file, and which file it is (device, inode).
pub(super) struct Slot {
    pub(super) file: File,
    pub(super) id: (u64, u64),
}

/// The open slot file of change number `generation`, (re)opened if the
/// name no longer names the file held (deleted, moved aside, replaced).
pub(super) fn slot<'a>(
    folder: &Dir,
    slots: &'a mut [Option<Slot>; 2],
    generation: u64,
) -> io::Result<&'a Slot> {
    let name = slot_name(generation);
    let on_disk = folder.stat(OsStr::new(&name))?.map(|st| (st.dev, st.ino));
    let held = &mut slots[(generation % 2) as usize];
    if held.as_ref().map(|s| s.id) != on_disk || on_disk.is_none() {
        let file = folder.open_file(OsStr::new(&name), Open::ReadWriteCreate(0o600))?;
        let st = Stat::of_file(&file)?;
        *held = Some(Slot {
            file,
            id: (st.dev, st.ino),
        });
    }
    Ok(held.as_ref().expect("just opened"))
}

/// Moves the slot or log file `name` aside under a name never reused; says
/// what happened.
pub(super) fn set_aside(folder: &Dir, name: &str) -> String {
    let aside = format!("{name}.corrupt-{}", crate::clock::now().compact);
    match folder.rename_new(OsStr::new(name), folder, OsStr::new(&aside)) {
        Ok(()) => format!("moved aside to {aside}"),
        Err(e) => format!("could not move it aside ({e})"),
    }
}

/// Whether a failed read shows damage (read in full and not a table, or not
/// a regular file, or shorter than the header says) rather than a failure
/// to look (EMFILE, EIO, ENOMEM...), which is never acted on as damage.
pub(super) fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// A copy of `e` (its errno, or its kind and text): `io::Error` is not `Clone`.
pub(super) fn clone_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// The open change log (created if missing, never through a link), reopened
/// if the name no longer names the file held. One that is not a regular file
/// (a link, a FIFO) is set aside and a new one made.
pub(super) fn open_log<'a>(
    folder: &Dir,
    held: &'a mut Option<Slot>,
    notice: &mut Option<String>,
) -> io::Result<&'a File> {
    let on_disk = folder
        .stat(OsStr::new(LOG_FILE))?
        .map(|st| (st.dev, st.ino));
    open_log_as(folder, held, notice, on_disk)
}

/// `open_log` when the name was already looked at under the lock in this
/// transaction and named `on_disk` (a log moved aside since then by this
/// transaction is reopened all the same: its id is not `on_disk`'s).
pub(super) fn open_log_as<'a>(
    folder: &Dir,
    held: &'a mut Option<Slot>,
    notice: &mut Option<String>,
    on_disk: Option<(u64, u64)>,
) -> io::Result<&'a File> {
    if held.as_ref().map(|s| s.id) != on_disk || on_disk.is_none() {
        let open = || folder.open_file(OsStr::new(LOG_FILE), Open::ReadWriteCreate(0o600));
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let moved = set_aside(folder, LOG_FILE);
                add_notice(notice, format!("lease registry {e}; {moved}"));
                open()?
            }
            other => other?,
        };
        let st = Stat::of_file(&file)?;
        *held = Some(Slot {
            file,
            id: (st.dev, st.ino),
        });
    }
    Ok(&held.as_ref().expect("just opened").file)
}

pub(super) fn slot_name(generation: u64) -> String {
    format!("leases-{}.json", generation % 2)
}

/// A slot's table (and its size): a regular file, bounded in size, in the
/// slot format.
pub(super) fn read_slot(file: &File, path: &Path) -> io::Result<(Vec<Lease>, u64)> {
    let mut bytes = Vec::new();
    let mut reader = file;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(reader, MAX_READ + 1), &mut bytes)?;
    if bytes.is_empty() {
        // Made (empty) before its first table was written: no leases.
        return Ok((Vec::new(), 0));
    }
    if bytes.len() as u64 > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is too large", path.display()),
        ));
    }
    let file = serde_json::from_slice::<LeaseFile>(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if file.version > TABLE_VERSION {
        // Not damage: a newer build's table, never set aside or rewritten.
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{} has lease table version {} (this build reads {TABLE_VERSION}): written by a \
                 newer dynamic-port-manager",
                path.display(),
                file.version
            ),
        ));
    }
    Ok((file.leases, bytes.len() as u64))
}

/// Overwrites the slot with `bytes` in place: the same inode every time.
/// Only for a slot that is not current, so no reader can see it half-written.
pub(super) fn write_in_place(file: &File, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use crate::holder::Holder;
    use crate::registry::tests::lease;
    use crate::registry::Registry;

    #[test]
    fn slot_and_lock_files_that_are_links_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let reg_dir = dir.path().join("reg");
        fs::create_dir(&reg_dir).unwrap();
        fs::set_permissions(&reg_dir, fs::Permissions::from_mode(0o700)).unwrap();
        for name in ["leases-0.json", "leases-1.json"] {
            std::os::unix::fs::symlink(&victim, reg_dir.join(name)).unwrap();
        }
        let reg = Registry::create(&reg_dir).unwrap();
        // Set aside (links are never ours) and replaced by slots of our own.
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(reg.take_notice().unwrap().contains("moved aside"));
        assert_eq!(reg.snapshot().unwrap().len(), 1);
        fs::remove_file(reg_dir.join("leases.lock")).unwrap();
        std::os::unix::fs::symlink(&victim, reg_dir.join("leases.lock")).unwrap();
        assert!(
            reg.snapshot().is_err(),
            "a lock file that is a link is refused"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&reg_dir, &linked).unwrap();
        let err = Registry::create(&linked).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }
}
