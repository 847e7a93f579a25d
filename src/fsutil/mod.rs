//! The file-system rules of the library, in one place: folders opened once by
//! descriptor with nothing followed through a link (`dir`), lock files with
//! their change counters (`lock`, and `folder_lock` for state files), what is known of a folder's names while it
//! is unchanged (`watch`), atomic replacement and change detection.

mod dir;
mod folder_lock;
mod lock;
mod watch;

pub use dir::{read_bounded, Dir, Kind, Open, Stat, MAX_READ};
pub use folder_lock::{counter_slot, FolderLock, SlotGuard, FOLDER_LOCK};
pub use lock::{
    lock_within, read_generation, with_interrupt_check, with_wait_cap, write_generation, LockFile,
    LOCK_WAIT,
};
pub use watch::{added, names_where, sweep, OwnChange};

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;

/// Enough of a file's metadata to tell "the file I read before" from "a file
/// someone has written since". Every save is a rename of a new inode, so the
/// inode number changes with each write; mtime and size guard inode reuse.
/// Not ctime: taking a backup hard-links the file, which changes its ctime
/// but not its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

impl FileId {
    pub fn from_stat(st: &Stat) -> FileId {
        FileId {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_ns: st.mtime_ns,
        }
    }
}

/// `name` as text, losing nothing: UTF-8 as it is, and if it is not all
/// UTF-8, each other byte as `%XX` and `%` as `%25`. Names that differ only in
/// such bytes stay different (where `to_string_lossy` would make both `\u{FFFD}`).
pub fn printable(name: &OsStr) -> String {
    match name.to_str() {
        Some(text) => text.to_string(),
        None => {
            let mut out = String::new();
            for chunk in name.as_bytes().utf8_chunks() {
                out.push_str(&chunk.valid().replace('%', "%25"));
                for byte in chunk.invalid() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            out
        }
    }
}

/// The name of the temporary file a save of `name` by process `pid` writes.
pub fn temp_name(name: &OsStr, pid: u32) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{pid}.tmp"));
    tmp
}

/// The state file's name and the saver's pid in a temporary file's name (see
/// `temp_name`), if it is one.
pub fn temp_of(candidate: &OsStr) -> Option<(&OsStr, u32)> {
    let rest = candidate.as_bytes().strip_prefix(b".")?;
    let rest = rest.strip_suffix(b".tmp")?;
    let dot = rest.iter().rposition(|&b| b == b'.')?;
    let (name, pid) = (&rest[..dot], &rest[dot + 1..]);
    if name.is_empty() || pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let pid = std::str::from_utf8(pid).ok()?.parse().ok()?;
    Some((OsStr::from_bytes(name), pid))
}

/// Replaces `name` in `dir` with `bytes` so that no reader ever sees a
/// partial file: the bytes go to a temporary file in the same folder, created
/// new (O_EXCL, so a link planted at its name is never written through),
/// which then takes `name`'s place (`put_in_place`). With `durable`, the file and then the folder
/// are fsynced, so the new content survives a power cut as well as a crash.
///
/// `reuse` (a backup about to be deleted, in its folder) is recycled as the
/// temporary file when it can be: its inode is overwritten instead of one
/// being freed and another allocated. A save then creates and frees no inode
/// at all, which matters on ext4, where allocating an inode slows down with
/// every inode freed in the last seconds. `reuse` is only taken if it is a
/// regular file with no other link: it must not be the live state file under
/// another name.
pub fn write_atomic(
    dir: &Dir,
    name: &OsStr,
    bytes: &[u8],
    durable: bool,
    reuse: Option<(&Dir, &OsStr)>,
) -> io::Result<Recycled> {
    // One writer at a time holds the lock, but a process killed between
    // write and rename leaves its temporary file: ours is named by our pid.
    let tmp = temp_name(name, std::process::id());
    let mut recycled = Recycled::No;
    let result = (|| {
        let mut file = match reuse.and_then(|(from, old)| recycle(from, old, dir, &tmp)) {
            Some(file) => {
                recycled = Recycled::Yes;
                file
            }
            None => create_new(dir, &tmp)?,
        };
        file.write_all(bytes)?;
        // A recycled file is cut to size after the write, not emptied before
        // it: freeing all its blocks first made ext4 (with `discard`) wait
        // for the disk, up to milliseconds under load.
        if recycled == Recycled::Yes {
            file.set_len(bytes.len() as u64)?;
        }
        if durable {
            file.sync_all()?;
        }
        drop(file);
        put_in_place(dir, &tmp, name)?;
        if durable {
            dir.sync()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = dir.remove(&tmp);
    }
    result.map(|()| recycled)
}

/// Puts the file `tmp` in place of `name`, in one step for any reader of
/// `name`. Over an existing file the two are exchanged and the old one is then
/// removed from under `tmp`, rather than `tmp` renamed over it: ext4 writes a
/// file renamed over another out to disk at once (`auto_da_alloc`, its guard
/// for programs that never fsync), which cost 20 us of each save here and
/// bought nothing: `durable=True` fsyncs, and a file left empty by a power
/// cut is restored from its backups. A saver killed between the two steps
/// leaves the old version under its temporary name, removed like any other
/// temporary of a dead saver.
fn put_in_place(dir: &Dir, tmp: &OsStr, name: &OsStr) -> io::Result<()> {
    match dir.exchange(tmp, name) {
        // The old file is now at `tmp` (its backup is a link of its own).
        Ok(()) => match dir.remove(tmp) {
            // A folder put at `name` since the caller looked: it goes back,
            // as a rename over it would have been refused.
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                let _ = dir.exchange(tmp, name);
                Err(e)
            }
            // Left at `tmp`: this pid's next save removes it first.
            _ => Ok(()),
        },
        // Nothing to exchange with (a new file), or a file system that cannot.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) =>
        {
            dir.rename(tmp, dir, name)
        }
        Err(e) => Err(e),
    }
}

/// Whether `write_atomic` took the file offered for reuse (it is gone then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycled {
    Yes,
    No,
}

/// A new file `name`; a leftover of that name (our pid's, from a process
/// that had it before; or anything planted there) is removed, not followed.
fn create_new(dir: &Dir, name: &OsStr) -> io::Result<File> {
    match dir.open_file(name, Open::CreateNew(0o644)) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            dir.remove(name)?;
            dir.open_file(name, Open::CreateNew(0o644))
        }
        other => other,
    }
}

/// Moves `old` to `tmp` and opens it emptied, if it is a regular file with a
/// single link; otherwise leaves things as they were (returns None) or, if
/// the move happened but the file is unsuitable, deletes it.
fn recycle(from: &Dir, old: &OsStr, dir: &Dir, tmp: &OsStr) -> Option<File> {
    let st = from.stat(old).ok()??;
    if st.kind != Kind::File || st.nlink != 1 {
        return None;
    }
    from.rename_new(old, dir, tmp).ok()?;
    // Checked again on the open file: the name could have been swapped.
    match dir.open_file(tmp, Open::ReadWriteCreate(0o644)) {
        Ok(f) if Stat::of_file(&f).is_ok_and(|st| st.nlink == 1) => Some(f),
        _ => {
            let _ = dir.remove(tmp);
            None
        }
    }
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    impl FileId {
        fn of(path: &Path) -> io::Result<FileId> {
            let m = fs::metadata(path)?;
            Ok(FileId {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            })
        }
    }

    fn n(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let path = tmp.path().join("a.json");
        write_atomic(&dir, n("a.json"), b"one", false, None).unwrap();
        let first = FileId::of(&path).unwrap();
        write_atomic(&dir, n("a.json"), b"two!", true, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two!");
        assert_ne!(FileId::of(&path).unwrap(), first);
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let planted = temp_name(n("a.json"), std::process::id());
        std::os::unix::fs::symlink(&victim, tmp.path().join(&planted)).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        write_atomic(&dir, n("a.json"), b"state", false, None).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(tmp.path().join("a.json")).unwrap(), b"state");
    }

    #[test]
    fn a_replaced_file_leaves_nothing_behind_and_keeps_its_other_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let path = tmp.path().join("a.json");
        fs::write(&path, b"old").unwrap();
        let backup = tmp.path().join("a_backup.json");
        fs::hard_link(&path, &backup).unwrap();
        write_atomic(&dir, n("a.json"), b"new", false, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read(&backup).unwrap(), b"old");
        assert_eq!(fs::metadata(&backup).unwrap().nlink(), 1);
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "a_backup.json"]);
    }

    #[test]
    fn a_folder_swapped_in_at_the_name_is_put_back_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        fs::create_dir(tmp.path().join("a.json")).unwrap();
        fs::write(tmp.path().join("a.json/inside"), b"kept").unwrap();
        fs::write(tmp.path().join(".t"), b"new").unwrap();
        let err = put_in_place(&dir, n(".t"), n("a.json")).unwrap_err();
        assert!(err.raw_os_error() == Some(libc::EISDIR), "{err}");
        assert_eq!(fs::read(tmp.path().join("a.json/inside")).unwrap(), b"kept");
        assert_eq!(fs::read(tmp.path().join(".t")).unwrap(), b"new");
    }

    #[test]
    fn temporary_names_carry_their_pid() {
        let name = temp_name(n("s.json"), 4242);
        assert_eq!(name, ".s.json.4242.tmp");
        assert_eq!(temp_of(&name), Some((n("s.json"), 4242)));
        assert_eq!(temp_of(n(".t.json.4242.tmp")), Some((n("t.json"), 4242)));
        assert_eq!(temp_of(n(".s.json.x.tmp")), None);
        assert_eq!(temp_of(n(".s.json..tmp")), None);
        assert_eq!(temp_of(n("..4242.tmp")), None);
        assert_eq!(temp_of(n("s.json.4242.tmp")), None);
    }

    #[test]
    fn a_recycled_file_keeps_its_inode_and_a_linked_one_is_never_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let path = tmp.path().join("a.json");
        let old = tmp.path().join("old.json");
        fs::write(&old, b"a much longer old content").unwrap();
        let inode = fs::metadata(&old).unwrap().ino();
        write_atomic(
            &dir,
            n("a.json"),
            b"new",
            false,
            Some((&dir, n("old.json"))),
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        assert!(!old.exists());
        // A file with a second link (the live file under another name) stays.
        let twin = tmp.path().join("twin.json");
        fs::hard_link(&path, &twin).unwrap();
        write_atomic(
            &dir,
            n("a.json"),
            b"newer",
            false,
            Some((&dir, n("twin.json"))),
        )
        .unwrap();
        assert_eq!(fs::read(&twin).unwrap(), b"new");
        assert_eq!(fs::read(&path).unwrap(), b"newer");
    }
}
