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
mod tests;
