//! The lock of a folder's state files: one file beside them,
//! `.dynamic_port_manager.lock`, never replaced, in which each state file has
//! an 8-byte slot (found by hashing its name) that is both its lock (a
//! byte-range lock of the slot) and its change counter.
//!
//! One file per folder, not one per state file: a new state file then makes
//! no lock file (an inode, on ext4 tens to hundreds of microseconds, and a
//! page of memory). A lock per slot, not on the whole file: services with
//! state files in one folder (the original's layout) save at the same time
//! without waiting for each other (a whole-file lock doubled the median pick
//! of 8 processes picking at once, `bench/bench_concurrent.py`).
//!
//! The slot locks are Linux's open-file-description locks (`F_OFD_SETLK`):
//! like `flock`, they belong to the descriptor, so two managers of one
//! process exclude each other, and a forked child opens its own.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::dir::{errno, Dir};
use super::lock::{
    name_moved, open_lock_file, read_generation, stale, wait_for, write_generation, Taken,
    REPLACED_RETRIES,
};
use crate::sys::{set_range_lock, RangeLock};

/// The lock file's name in a state folder.
pub(crate) const FOLDER_LOCK: &str = ".dynamic_port_manager.lock";

/// Slots in `FOLDER_LOCK`. Two names sharing a slot share its lock and
/// counter: their saves take turns, and each makes the other's managers
/// re-read their file once more. Neither can miss a change.
const SLOTS: u64 = 4096;

/// The slot of the state file `name` in `FOLDER_LOCK`, as a byte offset
/// (FNV-1a of the name: the same in every process, version and build).
pub(crate) fn counter_slot(name: &OsStr) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let hash = name
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % SLOTS) * 8
}

/// This process's descriptor of a folder's lock file, reopened after a fork
/// or when the name no longer names it (as `LockFile`).
#[derive(Default)]
pub(crate) struct FolderLock {
    held: Option<Held>,
}

struct Held {
    file: Arc<File>,
    pid: u32,
    id: (u64, u64),
    /// Who owns the lock file: another user who can write the folder can
    /// also hold its slots (reported by the caller, see `foreign_owner`).
    uid: u32,
}

/// A state file's slot, locked until dropped. It shares the descriptor (not
/// a borrow of the `FolderLock`), so a caller can take the lock before it
/// changes anything else and keep it while it does.
/// (`pub` only because `FileView`'s public methods name it.)
pub struct SlotGuard {
    file: Arc<File>,
    offset: u64,
}

impl FolderLock {
    /// Locks the slot at `offset` (`counter_slot`) of the lock file in `dir`
    /// (made if missing, never through a link), waiting at most `wait`; an
    /// `interruptible` wait gives up when the thread's interrupt check says
    /// so (see `lock::with_interrupt_check`).
    pub(crate) fn acquire(
        &mut self,
        dir: &Dir,
        offset: u64,
        wait: Duration,
        interruptible: bool,
    ) -> io::Result<SlotGuard> {
        let deadline = Instant::now() + wait;
        for _ in 0..REPLACED_RETRIES {
            // The name is looked at once, after the lock is taken (the look
            // that matters: a file replaced before it is found as surely), and
            // while a lock held elsewhere is waited for, so that no wait is
            // for a file no one opens any more.
            let (file, id) = self.open_unlooked(dir)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let name = OsStr::new(FOLDER_LOCK);
            let taken = wait_for(left, interruptible, || {
                match set_range_lock(&*file, RangeLock::Write, offset, 8) {
                    Ok(()) => Ok(Some(Taken::Locked)),
                    Err(e) if matches!(errno(&e), Some(Errno::AGAIN | Errno::ACCESS)) => {
                        Ok(name_moved(dir, name, id).then_some(Taken::Replaced))
                    }
                    Err(e) => Err(e),
                }
            })?;
            if let Taken::Locked = taken {
                let guard = SlotGuard { file, offset };
                // The name must still name the file locked, or the lock is on
                // a file no other process will ever open: dropped, and the
                // new one opened.
                if !name_moved(dir, name, id) {
                    return Ok(guard);
                }
                drop(guard);
            }
            self.held = None;
        }
        Err(io::Error::other(format!(
            "{FOLDER_LOCK} was replaced by another file {REPLACED_RETRIES} times while it was \
             being locked (something keeps replacing it)"
        )))
    }

    /// The change counter of the slot at `offset`, read without the lock (for
    /// a reader: a writer bumps it before it replaces the state file, so a
    /// counter and file identity that both match what was last read mean
    /// nothing changed). `None` when the lock file cannot be opened.
    pub fn peek_generation(&mut self, dir: &Dir, offset: u64) -> Option<u64> {
        let file = self.open(dir).ok()?;
        Some(read_generation(&file, offset))
    }

    /// The uid that owns the lock file, when it is not this process's user.
    pub(crate) fn foreign_owner(&self) -> Option<u32> {
        let uid = self.held.as_ref()?.uid;
        (uid != crate::fsutil::effective_uid()).then_some(uid)
    }

    fn is_stale(&self, dir: &Dir) -> bool {
        self.held
            .as_ref()
            .is_none_or(|h| stale(dir, OsStr::new(FOLDER_LOCK), h.pid, h.id))
    }

    /// The descriptor of the lock file the name names now (opened again
    /// after a fork or a replacement).
    fn open(&mut self, dir: &Dir) -> io::Result<Arc<File>> {
        if self.is_stale(dir) {
            self.held = None;
        }
        Ok(self.open_unlooked(dir)?.0)
    }

    /// The descriptor this process opened (opened now if there is none, or
    /// it is a parent's, after a fork) and the file's identity, without a
    /// look at what the name names now: for `acquire`, which looks after
    /// taking the lock.
    fn open_unlooked(&mut self, dir: &Dir) -> io::Result<(Arc<File>, (u64, u64))> {
        if self
            .held
            .as_ref()
            .is_none_or(|h| h.pid != crate::sys::process_id())
        {
            self.held = None;
            // A write lock needs a descriptor open for writing.
            let (file, st) = open_lock_file(dir, OsStr::new(FOLDER_LOCK), false)?;
            self.held = Some(Held {
                file: Arc::new(file),
                pid: crate::sys::process_id(),
                id: (st.dev, st.ino),
                uid: st.uid,
            });
        }
        let held = self.held.as_ref().expect("opened above");
        Ok((Arc::clone(&held.file), held.id))
    }
}

impl SlotGuard {
    /// The file's change counter (0 if never written).
    pub(crate) fn generation(&self) -> u64 {
        read_generation(&self.file, self.offset)
    }

    pub(crate) fn set_generation(&self, generation: u64) -> io::Result<()> {
        write_generation(&self.file, self.offset, generation)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let _ = set_range_lock(&*self.file, RangeLock::Unlock, self.offset, 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_are_stable_and_spread() {
        // The slot is part of the on-disk format: processes of other builds
        // must find the same one.
        assert_eq!(
            counter_slot(OsStr::new("")),
            (0xcbf2_9ce4_8422_2325 % SLOTS) * 8
        );
        let slots: std::collections::HashSet<u64> = (0..1000)
            .map(|i| counter_slot(OsStr::new(&format!("new{i}.json"))))
            .collect();
        assert!(slots.len() > 850, "{} distinct slots of 1000", slots.len());
        assert!(slots.iter().all(|s| s % 8 == 0 && *s < SLOTS * 8));
    }

    #[test]
    fn slots_lock_apart_and_exclude_other_descriptors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let (mut a, mut b) = (FolderLock::default(), FolderLock::default());
        let short = Duration::from_millis(50);
        let held = a.acquire(&dir, 8, short, false).unwrap();
        held.set_generation(5).unwrap();
        // Another slot: free. The same slot through another descriptor (another
        // manager of this process, or another process): held.
        assert!(b.acquire(&dir, 16, short, false).is_ok());
        let err = b.acquire(&dir, 8, short, false).map(drop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(held);
        let again = b.acquire(&dir, 8, short, false).unwrap();
        assert_eq!(again.generation(), 5);
    }

    #[test]
    fn a_replaced_lock_file_is_found_after_locking_and_while_waiting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let (mut stuck, mut ours) = (FolderLock::default(), FolderLock::default());
        let short = Duration::from_millis(50);
        drop(ours.acquire(&dir, 8, short, false).unwrap()); // opened, the old file
        let held_on_old = stuck.acquire(&dir, 8, short, false).unwrap();
        // Replaced (a /tmp cleaner, then another process made it again).
        std::fs::remove_file(tmp.path().join(FOLDER_LOCK)).unwrap();
        let mut theirs = FolderLock::default();
        let held_on_new = theirs.acquire(&dir, 8, short, false).unwrap();
        // Waiting on the old file (held for good) would time out; on the new
        // one too, as long as its holder holds it.
        let err = ours.acquire(&dir, 8, short, false).map(drop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(held_on_new);
        // A wait on the old file (held for good) would end in an error.
        let again = ours
            .acquire(&dir, 8, Duration::from_secs(5), false)
            .unwrap();
        // Locked on the new file: a process opening it now is excluded.
        let err = FolderLock::default()
            .acquire(&dir, 8, short, false)
            .map(drop)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop((again, held_on_old));
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious content").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join(FOLDER_LOCK)).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let err = FolderLock::default()
            .acquire(&dir, 0, Duration::from_millis(50), false)
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious content");
    }
}
