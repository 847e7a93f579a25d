//! The file-system rules of the library, in one place: folders opened once by
//! descriptor with nothing followed through a link (`dir`), lock files with
//! their change counters (`lock`, and `folder_lock` for state files), what is known of a folder's names while it
//! is unchanged (`watch`), atomic replacement and change detection.

mod dir;
mod folder_lock;
mod lock;
mod pieces;
mod watch;

pub(crate) use dir::{errno, read_bounded, Dir, Kind, Open, Stat, MAX_READ};
pub(crate) use folder_lock::{counter_slot, FolderLock, SlotGuard, FOLDER_LOCK};
#[cfg(test)]
pub(crate) use lock::read_generation;
pub(crate) use lock::{with_interrupt_check, with_wait_cap, LockFile, LOCK_WAIT};
pub(crate) use watch::{added, names_where, sweep, OwnChange};

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::ffi::OsStrExt;

use rustix::io::Errno;

/// Enough of a file's metadata to tell "the file I read before" from "a file
/// someone has written since". Every save is a rename of a new inode, so the
/// inode number changes with each write; mtime and size guard inode reuse.
/// Not ctime: taking a backup hard-links the file, which changes its ctime
/// but not its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

impl FileId {
    pub(crate) fn from_stat(st: &Stat) -> FileId {
        FileId {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_ns: st.mtime_ns,
        }
    }
}

pub(crate) use crate::names::printable;

/// Letters (never digits, so that it cannot be read as the pid of the older
/// form) in the random part of a temporary file's name: 12 of 26, 56 bits.
const RANDOM_LEN: usize = 12;

/// How many new names a save tries for its temporary file when the name it
/// drew is taken (by a file planted there, or an astronomical coincidence).
const TEMP_TRIES: usize = 8;

/// The name of a temporary file a save of `name` by process `pid` writes:
/// `.<name>.<pid>.<random>.tmp`, which no other user can guess, so none can
/// plant a FIFO or a link at it beforehand. `random` is `RANDOM_LEN` letters.
pub(crate) fn temp_name(name: &OsStr, pid: u32, random: &str) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{pid}.{random}.tmp"));
    tmp
}

/// `RANDOM_LEN` letters no one else can predict, without a system call per
/// save: SipHash (std's `RandomState`, keyed once per thread from the
/// kernel's randomness) of a per-process counter and the pid. A keyed PRF:
/// names seen in the folder tell another user nothing of the next one. The
/// pid goes in because a forked child inherits the keys and the counter: its
/// names are then still unrelated to its parent's (they differ in their pid
/// part anyway). This replaced a `getrandom` per save.
fn random_letters() -> String {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = [0u8; RANDOM_LEN];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(calls);
        hasher.write_u32(crate::sys::process_id());
        hasher.write_usize(i);
        let hash = hasher.finish().to_le_bytes();
        chunk.copy_from_slice(&hash[..chunk.len()]);
    }
    bytes.iter().map(|b| char::from(b'a' + b % 26)).collect()
}

/// The state file's name and the saver's pid in a temporary file's name, if
/// it is one: `.<name>.<pid>.<random>.tmp` (`temp_name`), or the older
/// `.<name>.<pid>.tmp` that earlier versions wrote.
pub(crate) fn temp_of(candidate: &OsStr) -> Option<(&OsStr, u32)> {
    let rest = candidate.as_bytes().strip_prefix(b".")?;
    let rest = rest.strip_suffix(b".tmp")?;
    fn split(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
        let dot = bytes.iter().rposition(|&b| b == b'.')?;
        Some((&bytes[..dot], &bytes[dot + 1..]))
    }
    let (mut head, mut last) = split(rest)?;
    if last.len() == RANDOM_LEN && last.iter().all(u8::is_ascii_lowercase) {
        (head, last) = split(head)?;
    }
    let (name, pid) = (head, last);
    if name.is_empty() || pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let pid = std::str::from_utf8(pid).ok()?.parse().ok()?;
    Some((OsStr::from_bytes(name), pid))
}

/// A new temporary file for a save of `name` (`temp_name`), made with O_EXCL
/// (never through anything planted at its name); a name that is taken is
/// drawn again, `TEMP_TRIES` times at most.
fn create_temp(dir: &Dir, name: &OsStr) -> io::Result<(OsString, File)> {
    create_temp_drawing(dir, name, random_letters)
}

fn create_temp_drawing(
    dir: &Dir,
    name: &OsStr,
    mut draw: impl FnMut() -> String,
) -> io::Result<(OsString, File)> {
    let pid = crate::sys::process_id();
    let mut tries = 0;
    loop {
        let tmp = temp_name(name, pid, &draw());
        match dir.open_file(&tmp, Open::CreateNew(0o644)) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < TEMP_TRIES => {
                tries += 1
            }
            Err(e) => return Err(e),
        }
    }
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
///
/// `missing`: the caller looked (under the state file's lock) and found no
/// file at `name`. The temporary is then renamed there by a rename that
/// never replaces, one system call, where an exchange would first fail with
/// ENOENT; a file that appeared since is replaced as any other.
///
/// Returns, with whether `reuse` was taken, the written file's metadata as
/// `fstat` gave it after the last write (`None` if that failed): what the
/// name names once the save is done, unless someone replaced it since.
pub(crate) fn write_atomic(
    dir: &Dir,
    name: &OsStr,
    bytes: &[IoSlice<'_>],
    durable: bool,
    reuse: Option<(&Dir, &OsStr)>,
    missing: bool,
) -> io::Result<(Recycled, Option<Stat>)> {
    // A process killed between write and rename leaves its temporary file:
    // its name carries our pid, so a sweep removes it once we are gone.
    let recycled_file = reuse.and_then(|(from, old)| {
        let tmp = temp_name(name, crate::sys::process_id(), &random_letters());
        recycle(from, old, dir, &tmp).map(|file| (tmp, file))
    });
    let (recycled, (tmp, mut file)) = match recycled_file {
        Some(taken) => (Recycled::Yes, taken),
        None => (Recycled::No, create_temp(dir, name)?),
    };
    let result = (|| {
        pieces::write_all(&mut file, bytes)?;
        // A recycled file is cut to size after the write, not emptied before
        // it: freeing all its blocks first made ext4 (with `discard`) wait
        // for the disk, up to milliseconds under load.
        if recycled == Recycled::Yes {
            file.set_len(bytes.iter().map(|b| b.len() as u64).sum())?;
        }
        if durable {
            file.sync_all()?;
        }
        // The identity the caller keeps of what it wrote, from the written
        // descriptor (no look at the name after the exchange): the exchange
        // and the close change neither inode, size nor mtime.
        let written = Stat::of_file(&file).ok();
        drop(file);
        let placed = missing
            && match dir.rename_new(&tmp, dir, name) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
        if !placed {
            put_in_place(dir, &tmp, name)?;
        }
        if durable {
            dir.sync()?;
        }
        Ok(written)
    })();
    if result.is_err() {
        let _ = dir.remove(&tmp);
    }
    result.map(|written| (recycled, written))
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
            Err(e) if errno(&e) == Some(Errno::ISDIR) => {
                let _ = dir.exchange(tmp, name);
                Err(e)
            }
            // Left at `tmp`: swept as a dead saver's once this process is gone.
            _ => Ok(()),
        },
        // Nothing to exchange with (a new file), or a file system that cannot.
        Err(e)
            if matches!(
                errno(&e),
                Some(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
            ) =>
        {
            dir.rename(tmp, dir, name)
        }
        Err(e) => Err(e),
    }
}

/// Whether `write_atomic` took the file offered for reuse (it is gone then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recycled {
    Yes,
    No,
}

/// Moves `old` to `tmp` and opens it, if it is a regular file with a single
/// link; otherwise puts it back (returns None: the caller removes the name
/// as it removes any backup past `backup_max` it did not recycle).
fn recycle(from: &Dir, old: &OsStr, dir: &Dir, tmp: &OsStr) -> Option<File> {
    // Moved out of the backups folder before a byte is written: a reader of
    // the backups (recovery in another process, `read_backup`, a person)
    // then either finds the old backup whole or no longer finds the name
    // (`read_backup` checks that the name still names what it read). Written
    // in place under its backup name, a reader could read the new bytes
    // over the old ones and still find the name naming that file.
    //
    // Not looked at before the move: the open below checks what was moved
    // (a regular file, opened without following a link or blocking on a
    // FIFO, with a single link), and what fails the check goes back to
    // where it was, as if it had not been taken.
    from.rename_new(old, dir, tmp).ok()?;
    match dir.open_file_stat(tmp, Open::Overwrite(0o644)) {
        Ok((f, Some(st))) if st.nlink == 1 => Some(f),
        _ => {
            if dir.rename_new(tmp, from, old).is_err() {
                let _ = dir.remove(tmp);
            }
            None
        }
    }
}

/// This process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"one")],
            false,
            None,
            false,
        )
        .unwrap();
        let first = FileId::of(&path).unwrap();
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"two!")],
            true,
            None,
            false,
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two!");
        assert_ne!(FileId::of(&path).unwrap(), first);
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_said_missing_is_made_and_one_that_appeared_since_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let path = tmp.path().join("a.json");
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"new")],
            false,
            None,
            true,
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        // Made by someone else after the caller looked: replaced all the same.
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"newer")],
            false,
            None,
            true,
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"newer");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        // A folder that appeared there is neither replaced nor entered.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(write_atomic(&dir, n("a.json"), &[IoSlice::new(b"x")], false, None, true).is_err());
        assert!(path.is_dir());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        // At the name earlier versions used, and at one of the current form.
        let pid = std::process::id();
        for planted in [
            format!(".a.json.{pid}.tmp"),
            format!(".a.json.{pid}.abcdefghijkl.tmp"),
        ] {
            std::os::unix::fs::symlink(&victim, tmp.path().join(planted)).unwrap();
        }
        let dir = Dir::open(tmp.path()).unwrap();
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"state")],
            false,
            None,
            false,
        )
        .unwrap();
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
        write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(b"new")],
            false,
            None,
            false,
        )
        .unwrap();
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
        assert!(errno(&err) == Some(Errno::ISDIR), "{err}");
        assert_eq!(fs::read(tmp.path().join("a.json/inside")).unwrap(), b"kept");
        assert_eq!(fs::read(tmp.path().join(".t")).unwrap(), b"new");
    }

    #[test]
    fn temporary_names_carry_their_pid_and_are_recognised_in_both_forms() {
        let name = temp_name(n("s.json"), 4242, "abcdefghijkl");
        assert_eq!(name, ".s.json.4242.abcdefghijkl.tmp");
        assert_eq!(temp_of(&name), Some((n("s.json"), 4242)));
        // The form of earlier versions.
        assert_eq!(temp_of(n(".s.json.4242.tmp")), Some((n("s.json"), 4242)));
        assert_eq!(temp_of(n(".t.json.4242.tmp")), Some((n("t.json"), 4242)));
        // A state file whose name looks like a new-form suffix.
        assert_eq!(
            temp_of(n(".x.1.abcdefghijkl.4242.tmp")),
            Some((n("x.1.abcdefghijkl"), 4242))
        );
        for not_ours in [
            ".s.json.x.tmp",
            ".s.json..tmp",
            "..4242.tmp",
            "s.json.4242.tmp",
            ".s.json.abcdefghijkl.tmp",
            ".s.json.4242.abcdefghijk.tmp",
            ".s.json.4242.ABCDEFGHIJKL.tmp",
            ".4242.abcdefghijkl.tmp",
        ] {
            assert_eq!(temp_of(n(not_ours)), None, "{not_ours}");
        }
    }

    #[test]
    fn temporary_names_differ_between_saves() {
        let names: std::collections::HashSet<String> = (0..100).map(|_| random_letters()).collect();
        assert_eq!(names.len(), 100);
        assert!(names
            .iter()
            .all(|r| r.len() == RANDOM_LEN && r.bytes().all(|b| b.is_ascii_lowercase())));
    }

    #[test]
    fn a_taken_temporary_name_is_drawn_again_a_few_times() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let pid = std::process::id();
        let taken = temp_name(n("a.json"), pid, "aaaaaaaaaaaa");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tmp.path().join(&taken),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut draws = ["aaaaaaaaaaaa", "bbbbbbbbbbbb"].into_iter();
        let draw = || draws.next().unwrap().to_string();
        let (made, _file) = create_temp_drawing(&dir, n("a.json"), draw).unwrap();
        assert_eq!(made, temp_name(n("a.json"), pid, "bbbbbbbbbbbb"));
        let mut draws = 0;
        let always_taken = || {
            draws += 1;
            "aaaaaaaaaaaa".to_string()
        };
        let err = create_temp_drawing(&dir, n("a.json"), always_taken).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(draws, TEMP_TRIES);
        // The FIFO was never opened (that would have blocked) nor removed.
        assert!(fs::symlink_metadata(tmp.path().join(&taken)).is_ok());
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
            &[IoSlice::new(b"new")],
            false,
            Some((&dir, n("old.json"))),
            false,
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
            &[IoSlice::new(b"newer")],
            false,
            Some((&dir, n("twin.json"))),
            false,
        )
        .unwrap();
        assert_eq!(fs::read(&twin).unwrap(), b"new");
        assert_eq!(fs::read(&path).unwrap(), b"newer");
        // A folder or a FIFO at the name is put back where it was, untouched.
        fs::create_dir(tmp.path().join("folder")).unwrap();
        fs::write(tmp.path().join("folder/inside"), b"kept").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tmp.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for (name, content) in [("folder", "newest"), ("fifo", "newest!")] {
            let reuse = Some((&dir, n(name)));
            let taken = write_atomic(
                &dir,
                n("a.json"),
                &[IoSlice::new(content.as_bytes())],
                false,
                reuse,
                false,
            );
            assert_eq!(taken.unwrap().0, Recycled::No, "{name}");
            assert_eq!(fs::read(&path).unwrap(), content.as_bytes());
        }
        assert_eq!(fs::read(tmp.path().join("folder/inside")).unwrap(), b"kept");
        assert!(fs::symlink_metadata(tmp.path().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "fifo", "folder", "twin.json"]);
    }
}
