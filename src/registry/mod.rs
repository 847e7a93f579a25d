//! The host-wide lease registry: the one place every manager of this user, in
//! every process, records which port it holds. This is what makes two managers
//! with different state files still never hand out the same port.
//!
//! Layout of the registry folder (mode 0700, owned by the user):
//! - `leases.lock`: never replaced; `flock`ed around every read-modify-write,
//!   and holding the header (`lease_log::Header`): the change counter
//!   (`fsutil::read_generation`), which slot holds the full table, and how
//!   many bytes of the log are valid.
//! - `leases-0.json`, `leases-1.json`: `{"version": 1, "leases": [...]}`, two
//!   slots for the full table; the header names the current one. A new full
//!   table is written to the other slot in place and only then named in the
//!   header, so a crash mid-write leaves the current table untouched, as a
//!   rename would, but without creating and freeing an inode per pick (which
//!   ext4 makes slow when it happens thousands of times a second).
//! - `leases.log`: the changes since the full table, one line each
//!   (`lease_log`); most changes only append here.
//!
//! This module: the `Registry` handle and its transaction. `files`: the slot
//! and log files kept open; `table`: the table as last read, brought up to
//! date and written back; `format`: other builds' layouts refused or taken
//! over; `sweep`: dead holders' leases, and this process's given back at exit.

mod files;
mod format;
mod sweep;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::fsutil::{Dir, LockFile, LOCK_WAIT};
use crate::lease_log::{self, Header, Layout};
use crate::sys::PerProcess;

pub use crate::lease::{note_holder, Lease, LeaseTable};
pub use crate::liveness::AliveCache;
use crate::registry_dir::open_private;
pub use crate::registry_dir::{fallback_notice, resolve_dir};
use files::{open_log, open_log_as, slot, Slot, LOCK_FILE, LOG_FILE};
use table::Cached;

struct Inner {
    /// The folder, opened (never through a link) and checked private; opened
    /// again, and checked again, if the path stops naming it (a /tmp cleaner).
    folder: Dir,
    lock: LockFile,
    /// The two slot files, kept open: a release must not need a new
    /// descriptor (a process out of descriptors still gives its ports back).
    slots: [Option<Slot>; 2],
    /// Holders seen alive lately (see `LeaseTable::remove_dead_among`).
    alive: AliveCache,
    /// The change log, kept open like the slots.
    log: Option<Slot>,
    /// The table as last read or written, and where it was read up to.
    cache: Option<Cached>,
    /// A problem found while reading, for the caller to report once no lock
    /// is held (reporting may call into Python logging).
    notice: Option<String>,
}

/// The log is folded into a full table once it is longer than the table
/// (and this many bytes): a pick then writes a few hundred bytes, whatever
/// the registry holds, and reading the log stays cheaper than the table.
const COMPACT_AT: u64 = 64 * 1024;

pub struct Registry {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type OpenRegistries = Mutex<HashMap<PathBuf, Arc<Registry>>>;

/// This process's open registries (a forked child opens its own).
fn open_registries() -> &'static OpenRegistries {
    static OPEN: PerProcess<OpenRegistries> = PerProcess::new();
    OPEN.get_or_init(Default::default)
}

impl Registry {
    /// The registry in `dir`, shared by every manager of this process that uses
    /// the same folder (one in-process mutex, one cache, one lock descriptor).
    /// A forked child gets registries of its own (see `sys/per_process.rs`).
    pub fn open(dir: &Path) -> Result<Arc<Registry>> {
        let dir = std::path::absolute(dir).map_err(|e| Error::registry(dir, e))?;
        let mut open = lock(open_registries());
        if let Some(reg) = open.get(&dir) {
            return Ok(reg.clone());
        }
        let reg = Arc::new(Registry::create(&dir)?);
        open.insert(dir, reg.clone());
        Ok(reg)
    }

    /// Every registry this process has opened.
    pub fn all_open() -> Vec<Arc<Registry>> {
        lock(open_registries()).values().cloned().collect()
    }

    /// Opens the folder (creating it private), refusing one that is a link,
    /// that another user owns, or that others can write: such a user could
    /// plant leases, or delete ours and take our ports. The checks are made
    /// on the descriptor every later access goes through, so swapping a link
    /// in afterwards changes nothing.
    fn create(dir: &Path) -> Result<Registry> {
        let folder = open_private(dir)?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                folder,
                lock: LockFile::new(LOCK_FILE),
                slots: [None, None],
                log: None,
                alive: AliveCache::default(),
                cache: None,
                notice: None,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the current leases with the registry locked against every
    /// other thread and process, then writes the table back if `f` changed it.
    /// If the write fails, the error is returned and nothing `f` decided holds.
    pub fn transact<R>(&self, f: impl FnOnce(&mut LeaseTable) -> R) -> Result<R> {
        self.transact_seeing(|table, _| f(table))
    }

    /// `transact`, with the cache of holders seen alive (for a pick that
    /// reclaims dead holders' ports on its way).
    pub fn transact_seeing<R>(
        &self,
        f: impl FnOnce(&mut LeaseTable, &mut AliveCache) -> R,
    ) -> Result<R> {
        self.transact_in(&mut lock(&self.inner), Make::Yes, f)
    }

    /// `transact` for a change that only removes leases: if the registry's
    /// folder is gone (a temporary folder cleaned up, say), there is nothing
    /// to remove, and it is not made again just to be empty (`f` then sees an
    /// empty table).
    pub fn transact_removing<R>(&self, f: impl FnOnce(&mut LeaseTable) -> R) -> Result<R> {
        self.transact_in(&mut lock(&self.inner), Make::No, |t, _| f(t))
    }

    fn transact_in<R>(
        &self,
        inner: &mut Inner,
        make: Make,
        f: impl FnOnce(&mut LeaseTable, &mut AliveCache) -> R,
    ) -> Result<R> {
        // Looked at once per transaction (a second look, as there was for a
        // removal, would answer the same).
        let moved = !inner.folder.still_at_path();
        if make == Make::No
            && moved
            && std::fs::symlink_metadata(&self.dir)
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
        {
            return Ok(f(&mut LeaseTable::default(), &mut inner.alive));
        }
        if moved {
            // Deleted or replaced: every process must meet in the folder the
            // path names now, so open (or make) that one, checked afresh.
            inner.folder = open_private(&self.dir)?;
            inner.slots = [None, None];
            inner.log = None;
            inner.cache = None;
            inner.lock = LockFile::new(LOCK_FILE);
        }
        let Inner {
            folder,
            lock,
            slots,
            log,
            alive,
            cache,
            notice,
        } = inner;
        // Interruptible: nothing has been changed yet if the wait gives up.
        let (guard, reopened) = lock
            .acquire(folder, LOCK_WAIT, true)
            .map_err(|e| Error::registry(self.dir.join(LOCK_FILE), e))?;
        if reopened {
            *cache = None;
        }
        // Every file a change may write is opened now, while descriptors can
        // be had: a process that runs out of them later still gives its
        // ports back (a missing one is tried again at its next use).
        if log.is_none() {
            let _ = open_log(folder, log, notice);
        }
        for parity in 0..2 {
            if slots[parity as usize].is_none() {
                let _ = slot(folder, slots, parity);
            }
        }
        let header =
            Header::read(&guard).map_err(|e| Error::registry(self.dir.join(LOCK_FILE), e))?;
        self.refuse_newer(header)?;
        let mut loaded = self.load(folder, slots, log, cache, notice, header)?;
        if header.layout == Layout::CounterOnly {
            self.adopt_counter_only(&mut loaded, alive, cache)?;
        }
        let mut table = LeaseTable {
            leases: loaded.leases,
            changes: Vec::new(),
            rewrite: loaded.repaired,
            version: loaded.position.version,
            next_version: fresh_version(),
        };
        let result = f(&mut table, alive);
        let unknown = alive.take_unknown();
        if !unknown.is_empty() {
            add_notice(
                notice,
                format!(
                    "could not tell whether {} lease holder(s) are alive, so their leases are \
                     kept: {}",
                    unknown.len(),
                    unknown.join("; ")
                ),
            );
        }
        if !table.dirty() {
            // Unchanged: keep the table as the cache of where it came from.
            *cache = Some(Cached {
                leases: table.leases,
                ..loaded.position
            });
            return Ok(result);
        }
        // Forget the cache first: if the write fails we must re-read.
        *cache = None;
        let table_version = table.next_version;
        let position = loaded.position;
        let lines = lease_log::encode(&table.changes);
        let log_len = header.log_len + lines.len() as u64;
        let next = if table.rewrite || log_len > COMPACT_AT.max(position.table_len) {
            self.write_table(folder, slots, notice, header, table.leases)?
        } else {
            let path = self.dir.join(LOG_FILE);
            // `load` looked at the log's name under this lock: not again.
            let file = open_log_as(folder, log, notice, position.log_id)
                .map_err(|e| Error::registry(&path, e))?;
            file.write_all_at(&lines, header.log_len)
                .map_err(|e| Error::registry(&path, e))?;
            let log_id = log.as_ref().map(|l| l.id);
            let next = Header {
                generation: header.generation.wrapping_add(1),
                base: header.base,
                log_len,
                layout: Layout::Current,
            };
            let cached = Cached {
                log_id,
                log_pos: log_len,
                leases: table.leases,
                ..position
            };
            (next, cached)
        };
        let (next, mut cached) = next;
        cached.version = table_version;
        // The change is on disk in full; now make it the current one.
        next.write(&guard)
            .map_err(|e| Error::registry(&self.dir, e))?;
        if next.log_len == 0 {
            // The log's lines are in the new full table: start it afresh
            // (lines past the header's length are ignored anyway).
            if let Some(l) = log.as_ref() {
                let _ = l.file.set_len(0);
            }
        }
        *cache = Some(cached);
        Ok(result)
    }

    /// A copy of the current leases (taken under the lock).
    pub fn snapshot(&self) -> Result<Vec<Lease>> {
        self.transact(|t| t.leases.clone())
    }

    /// A problem met while reading the registry since the last call, if any.
    pub fn take_notice(&self) -> Option<String> {
        lock(&self.inner).notice.take()
    }
}

/// Whether a transaction makes the registry's folder again if it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Make {
    Yes,
    No,
}

/// Adds a problem to those not yet reported (one transaction can meet two).
fn add_notice(notice: &mut Option<String>, message: String) {
    *notice = Some(match notice.take() {
        Some(earlier) => format!("{earlier}; then {message}"),
        None => message,
    });
}

/// A version number never given out before in this process.
fn fresh_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
