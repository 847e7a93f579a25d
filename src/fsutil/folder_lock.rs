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
use std::time::Duration;

use rustix::io::Errno;

use super::dir::{errno, Dir};
use super::lock::{open_lock_file, read_generation, stale, wait_for, write_generation};
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
    file: File,
    pid: u32,
    id: (u64, u64),
}

/// A state file's slot, locked until dropped.
pub(crate) struct SlotGuard<'a> {
    file: &'a File,
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
    ) -> io::Result<SlotGuard<'_>> {
        if self
            .held
            .as_ref()
            .is_none_or(|h| stale(dir, OsStr::new(FOLDER_LOCK), h.pid, h.id))
        {
            self.held = None;
            // A write lock needs a descriptor open for writing.
            let (file, id) = open_lock_file(dir, OsStr::new(FOLDER_LOCK), false)?;
            self.held = Some(Held {
                file,
                pid: std::process::id(),
                id,
            });
        }
        let file = &self.held.as_ref().expect("opened above").file;
        wait_for(wait, interruptible, || {
            match set_range_lock(file, RangeLock::Write, offset, 8) {
                Ok(()) => Ok(Some(())),
                Err(e) if matches!(errno(&e), Some(Errno::AGAIN | Errno::ACCESS)) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        Ok(SlotGuard { file, offset })
    }
}

impl SlotGuard<'_> {
    /// The file's change counter (0 if never written).
    pub(crate) fn generation(&self) -> u64 {
        read_generation(self.file, self.offset)
    }

    pub(crate) fn set_generation(&self, generation: u64) -> io::Result<()> {
        write_generation(self.file, self.offset, generation)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let _ = set_range_lock(self.file, RangeLock::Unlock, self.offset, 8);
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
