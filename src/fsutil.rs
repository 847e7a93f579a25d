//! Small file-system helpers shared by the registry and the state store:
//! private directories, atomic replacement, and change detection.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    pub fn of(path: &Path) -> io::Result<FileId> {
        let m = fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        })
    }
}

/// How long a manager waits for a registry or state-file lock that another
/// process holds. Locks are held for microseconds; one held this long belongs
/// to a process that is stopped or stuck, and an error says so instead of a
/// pick that never returns.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Takes `lock` exclusively, waiting at most `wait`. Polls with a backoff from
/// 20 us to 1 ms rather than blocking in flock, which could not be given up
/// (measured: the same throughput as a blocking flock with 8 processes picking).
pub fn lock_within(
    lock: &mut fd_lock::RwLock<File>,
    wait: Duration,
) -> io::Result<fd_lock::RwLockWriteGuard<'_, File>> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_micros(20);
    let lock: *mut fd_lock::RwLock<File> = lock;
    loop {
        // SAFETY: each iteration's borrow ends before the next one starts; the
        // pointer only works around the borrow checker's conditional-return
        // limitation (a returned guard keeps the borrow, others end at once).
        match unsafe { &mut *lock }.try_write() {
            Ok(guard) => return Ok(guard),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "lock held by another process for more than {} s",
                    wait.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// A lock file that stays this process's own. flock belongs to the open file
/// description, which a forked child shares with its parent, so after a fork
/// the child opens its own; and if the path no longer names the file we hold
/// (a /tmp cleaner deleted it), we open the new one, or processes locking the
/// old inode and the new one would not exclude each other. Used by the
/// registry and by every state file.
pub struct LockFile {
    path: PathBuf,
    /// `None` until it could be opened (a read-only folder, say).
    held: Option<HeldLock>,
}

struct HeldLock {
    lock: fd_lock::RwLock<File>,
    pid: u32,
    id: (u64, u64),
}

impl LockFile {
    /// Opens (creating) `path` now if it can; `acquire` retries otherwise.
    pub fn new(path: PathBuf) -> LockFile {
        let mut lock = LockFile { path, held: None };
        let _ = lock.reopen_if_stale();
        lock
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock exclusively within `wait` (see `lock_within`). The flag
    /// says whether the file was (re)opened for this call: whatever was cached
    /// under the old one is not to be trusted.
    pub fn acquire(
        &mut self,
        wait: Duration,
    ) -> io::Result<(fd_lock::RwLockWriteGuard<'_, File>, bool)> {
        let reopened = self.reopen_if_stale()?;
        let held = self.held.as_mut().expect("reopen_if_stale opened it");
        Ok((lock_within(&mut held.lock, wait)?, reopened))
    }

    fn reopen_if_stale(&mut self) -> io::Result<bool> {
        let on_disk = fs::metadata(&self.path).map(|m| (m.dev(), m.ino())).ok();
        if let Some(held) = &self.held {
            if held.pid == std::process::id() && on_disk == Some(held.id) {
                return Ok(false);
            }
        }
        self.held = None;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            // An existing lock file we may not write still locks (flock
            // needs no write access); only the change counter stays at 0.
            .or_else(|_| File::open(&self.path))?;
        let meta = file.metadata()?;
        self.held = Some(HeldLock {
            lock: fd_lock::RwLock::new(file),
            pid: std::process::id(),
            id: (meta.dev(), meta.ino()),
        });
        Ok(true)
    }
}

/// The change counter kept in the first 8 bytes of a lock file (which is
/// never replaced). Every writer bumps it under the lock before replacing the
/// data file, so "same counter and same `FileId`" means "unchanged" even when
/// the file system reuses an inode within one timestamp tick. A short or
/// unreadable lock file reads as 0: the caller then re-reads, which is safe.
pub fn read_generation(lock: &File) -> u64 {
    let mut bytes = [0u8; 8];
    match lock.read_exact_at(&mut bytes, 0) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

pub fn write_generation(lock: &File, generation: u64) -> io::Result<()> {
    lock.write_all_at(&generation.to_le_bytes(), 0)
}

/// Creates `dir` (and parents) if missing, new folders with `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Replaces `path` with `bytes` so that no reader ever sees a partial file: the
/// bytes go to a temporary file in the same folder, which is renamed over
/// `path`. With `durable`, the file and then the folder are fsynced, so the
/// new content survives a power cut as well as a crash.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    write_atomic_reusing(path, bytes, durable, None)
}

/// `write_atomic`, recycling the file `reuse` (a backup about to be deleted)
/// as the temporary file when it can: its inode is overwritten instead of one
/// being freed and another allocated. A save then creates and frees no inode
/// at all, which matters on ext4, where allocating an inode slows down with
/// every inode freed in the last seconds. `reuse` is only taken if it has no
/// other link: it must not be, say, the live state file under another name.
pub fn write_atomic_reusing(
    path: &Path,
    bytes: &[u8],
    durable: bool,
    reuse: Option<&Path>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // One writer at a time holds the lock, but a process that crashed between
    // write and rename may have left its temporary file: make ours unique.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = match reuse.and_then(|old| recycle(old, &tmp)) {
            Some(file) => file,
            None => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?,
        };
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Moves `old` to `tmp` and opens it emptied, if it is a regular file with a
/// single link; otherwise leaves things as they were (returns None) or, if
/// the move happened but the file is unsuitable, deletes it.
fn recycle(old: &Path, tmp: &Path) -> Option<File> {
    let meta = fs::symlink_metadata(old).ok()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return None;
    }
    fs::rename(old, tmp).ok()?;
    let file = OpenOptions::new().write(true).open(tmp).ok();
    match file {
        // Checked again on the open file: the name could have been swapped.
        Some(f) if f.metadata().is_ok_and(|m| m.nlink() == 1 && m.is_file()) => {
            f.set_len(0).ok()?;
            Some(f)
        }
        _ => {
            let _ = fs::remove_file(tmp);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", false).unwrap();
        let first = FileId::of(&path).unwrap();
        write_atomic(&path, b"two!", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two!");
        assert_ne!(FileId::of(&path).unwrap(), first);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_lock_held_elsewhere_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let open = || {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let mut holder = fd_lock::RwLock::new(open());
        let _held = holder.write().unwrap();
        let mut waiter = fd_lock::RwLock::new(open());
        let err = lock_within(&mut waiter, Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("held by another process"), "{err}");
        drop(_held);
        assert!(lock_within(&mut waiter, Duration::from_millis(50)).is_ok());
    }

    #[test]
    fn a_lock_file_deleted_under_us_is_reopened_so_locks_still_exclude() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let mut ours = LockFile::new(path.clone());
        assert!(!ours.acquire(Duration::from_millis(50)).unwrap().1);
        fs::remove_file(&path).unwrap(); // a /tmp cleaner
        let mut theirs = LockFile::new(path.clone()); // creates a new file
        let (_held, _) = theirs.acquire(Duration::from_millis(50)).unwrap();
        // Locking the old, deleted inode would "succeed" and exclude nobody.
        let err = ours.acquire(Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn generation_round_trips_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("x.lock"))
            .unwrap();
        assert_eq!(read_generation(&file), 0);
        write_generation(&file, 41).unwrap();
        write_generation(&file, 42).unwrap();
        assert_eq!(read_generation(&file), 42);
    }

    #[test]
    fn a_recycled_file_keeps_its_inode_and_a_linked_one_is_never_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let old = dir.path().join("old.json");
        fs::write(&old, b"a much longer old content").unwrap();
        let inode = fs::metadata(&old).unwrap().ino();
        write_atomic_reusing(&path, b"new", false, Some(&old)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        assert!(!old.exists());
        // A file with a second link (the live file under another name) stays.
        let twin = dir.path().join("twin.json");
        fs::hard_link(&path, &twin).unwrap();
        write_atomic_reusing(&path, b"newer", false, Some(&twin)).unwrap();
        assert_eq!(fs::read(&twin).unwrap(), b"new");
        assert_eq!(fs::read(&path).unwrap(), b"newer");
    }

    #[test]
    fn ensure_dir_creates_parents() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        ensure_dir(&deep, 0o700).unwrap();
        assert!(deep.is_dir());
        ensure_dir(&deep, 0o700).unwrap();
    }
}
