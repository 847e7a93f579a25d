//! The host-wide lease registry: the one place every manager of this user, in
//! every process, records which port it holds. This is what makes two managers
//! with different state files still never hand out the same port.
//!
//! Layout of the registry folder (mode 0700, owned by the user):
//! - `leases.lock`: never replaced; `flock`ed around every read-modify-write,
//!   and holding the change counter (`fsutil::read_generation`).
//! - `leases-0.json`, `leases-1.json`: `{"version": 1, "leases": [...]}`, two
//!   slots; the counter's parity names the current one. A change writes the
//!   other slot in place and only then bumps the counter, so a crash mid-write
//!   leaves the current table untouched, as a rename would, but without
//!   creating and freeing an inode per pick (which ext4 makes slow when it
//!   happens thousands of times a second).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{Dir, FileId, LockFile, Open, Stat, LOCK_WAIT, MAX_READ};
use crate::holder::Holder;
use crate::lease_log::{self, Header, Layout, FORMAT};
use crate::sys::PerProcess;

pub use crate::lease::{note_holder, Lease, LeaseTable};
pub use crate::liveness::AliveCache;
use crate::registry_dir::open_private;
pub use crate::registry_dir::{fallback_notice, resolve_dir};

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

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

struct Slot {
    file: File,
    id: (u64, u64),
}

/// A table this process has read or written, and the position it matches:
/// while the full table and the log are the same files, only the log's lines
/// past `log_pos` are new.
struct Cached {
    /// Names these leases: a number of this process's, new whenever the
    /// table is read afresh or changed, kept while it is unchanged. What a
    /// caller derived from a table of the same version still holds.
    version: u64,
    base: u64,
    slot_id: Option<FileId>,
    log_id: Option<(u64, u64)>,
    log_pos: u64,
    /// The size of the full table, for when to write it again (compaction).
    table_len: u64,
    leases: Vec<Lease>,
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

    /// Is any of `holders` known to be gone (positive evidence only, the same
    /// check a pick makes)? For a read that must not report a dead holder's
    /// port as used. One `poll` of a cached pidfd per holder.
    pub fn any_dead(&self, holders: &[(Holder, u16)]) -> bool {
        if holders.is_empty() {
            return false;
        }
        let mut inner = lock(&self.inner);
        holders.iter().any(|(h, _)| inner.alive.is_dead(*h))
    }

    /// `any_dead` for a caller that must not wait: None while another thread
    /// holds the registry (in a transaction).
    pub fn try_any_dead(&self, holders: &[(Holder, u16)]) -> Option<bool> {
        if holders.is_empty() {
            return Some(false);
        }
        let mut inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(holders.iter().any(|(h, _)| inner.alive.is_dead(*h)))
    }

    /// Removes dead holders' leases from the whole registry (the refresher's
    /// sweep), returning them.
    pub fn sweep_dead(&self) -> Vec<Lease> {
        self.transact_seeing(LeaseTable::remove_dead)
            .unwrap_or_default()
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

    /// The error for a registry this build must not use (another format).
    fn refusal(&self, why: String) -> Error {
        Error::registry(
            &self.dir,
            io::Error::new(io::ErrorKind::Unsupported, format!("not used: {why}")),
        )
    }

    /// Reads the registry once: an error says it cannot be used as it is
    /// (another build's format, an unreadable table).
    pub fn check(&self) -> Result<()> {
        self.transact(|_| ())
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
        if make == Make::No
            && !inner.folder.still_at_path()
            && std::fs::symlink_metadata(&self.dir)
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
        {
            return Ok(f(&mut LeaseTable::default(), &mut inner.alive));
        }
        if !inner.folder.still_at_path() {
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
        if let Layout::Newer(format) = header.layout {
            return Err(self.refusal(format!(
                "it was written by a newer dynamic-port-manager (registry format {format}; this \
                 build reads format {FORMAT}), whose leases this build cannot read. Upgrade this \
                 service to the same version, or give it a registry of its own (DPM_REGISTRY_DIR)"
            )));
        }
        let mut loaded = self.load(folder, slots, log, cache, notice, header)?;
        if header.layout == Layout::CounterOnly {
            // An older build (no change log) writes here, or wrote last.
            // Its live holders' leases are in a table that build alone keeps
            // up to date: sharing the registry would hand out ports twice.
            let mut live: Vec<u32> = loaded
                .leases
                .iter()
                .filter(|l| !alive.is_dead(l.holder()))
                .map(|l| l.pid)
                .collect();
            let _ = alive.take_unknown();
            live.sort_unstable();
            live.dedup();
            if !live.is_empty() {
                *cache = None;
                return Err(self.refusal(format!(
                    "it is in use by an older dynamic-port-manager (the registry layout without \
                     a format version or change log; live holders: pid {}), which would not see \
                     this build's leases. Stop or upgrade those services first, or give this one \
                     a registry of its own (DPM_REGISTRY_DIR)",
                    live.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            // Nobody of the older build is left: the table moves to this layout.
            loaded.repaired = true;
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
            let file = open_log(folder, log, notice).map_err(|e| Error::registry(&path, e))?;
            file.write_all_at(&lines, header.log_len)
                .map_err(|e| Error::registry(&path, e))?;
            let log_id = log.as_ref().map(|l| l.id);
            let next = Header {
                generation: header.generation.wrapping_add(1),
                base: header.base,
                log_len,
                layout: Layout::Current,
            };
            Cached {
                log_id,
                log_pos: log_len,
                leases: table.leases,
                ..position
            }
            .with_header(next)
        };
        let mut next = next;
        next.1.version = table_version;
        // The change is on disk in full; now make it the current one.
        next.0
            .write(&guard)
            .map_err(|e| Error::registry(&self.dir, e))?;
        if next.0.log_len == 0 {
            // The log's lines are in the new full table: start it afresh
            // (lines past the header's length are ignored anyway).
            if let Some(l) = log.as_ref() {
                let _ = l.file.set_len(0);
            }
        }
        *cache = Some(next.1);
        Ok(result)
    }

    /// Writes the whole table to the spare slot, which becomes the full
    /// table with an empty log once the header says so.
    fn write_table(
        &self,
        folder: &Dir,
        slots: &mut [Option<Slot>; 2],
        notice: &mut Option<String>,
        header: Header,
        leases: Vec<Lease>,
    ) -> Result<(Header, Cached)> {
        let file = LeaseFile {
            version: TABLE_VERSION,
            leases,
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| Error::registry(&self.dir, io::Error::other(e)))?;
        let base = header.base.wrapping_add(1);
        let path = self.dir.join(slot_name(base));
        let slot = match slot(folder, slots, base) {
            // Not a regular file (a link, a FIFO: never ours): it holds no
            // table, so it is set aside and a new slot made in its place.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let moved = set_aside(folder, &slot_name(base));
                add_notice(notice, format!("lease registry {e}; {moved}"));
                slot(folder, slots, base)
            }
            other => other,
        }
        .map_err(|e| Error::registry(&path, e))?;
        write_in_place(&slot.file, &bytes).map_err(|e| Error::registry(&path, e))?;
        let slot_id = Stat::of_file(&slot.file)
            .map(|st| FileId::from_stat(&st))
            .map_err(|e| Error::registry(&path, e))?;
        let next = Header {
            generation: header.generation.wrapping_add(1),
            base,
            log_len: 0,
            layout: Layout::Current,
        };
        let log_id = folder
            .stat(OsStr::new(LOG_FILE))
            .ok()
            .flatten()
            .map(|st| (st.dev, st.ino));
        Ok((
            next,
            Cached {
                version: fresh_version(),
                base,
                slot_id: Some(slot_id),
                log_id,
                log_pos: 0,
                table_len: bytes.len() as u64,
                leases: file.leases,
            },
        ))
    }

    /// A copy of the current leases (taken under the lock).
    pub fn snapshot(&self) -> Result<Vec<Lease>> {
        self.transact(|t| t.leases.clone())
    }

    /// A problem met while reading the registry since the last call, if any.
    pub fn take_notice(&self) -> Option<String> {
        lock(&self.inner).notice.take()
    }

    /// The current table: the full table in the slot the header names, plus
    /// the log's lines, or (when this process's cache is still that table)
    /// the cached table plus only the lines written since. A damaged full
    /// table falls back to the other slot (an older table), a damaged log to
    /// the full table alone; either way the whole table is written back at
    /// once, and live holders re-record their own leases at their next call
    /// or refresh, while bind probes still protect every port already bound.
    fn load(
        &self,
        folder: &Dir,
        slots: &mut [Option<Slot>; 2],
        log: &mut Option<Slot>,
        cache: &mut Option<Cached>,
        notice: &mut Option<String>,
        header: Header,
    ) -> Result<Loaded> {
        let cached = cache.take();
        let name = slot_name(header.base);
        let path = self.dir.join(&name);
        let slot_id = folder
            .stat(OsStr::new(&name))
            .map_err(|e| Error::registry(&path, e))?
            .map(|st| FileId::from_stat(&st));
        let log_path = self.dir.join(LOG_FILE);
        let log_id = folder
            .stat(OsStr::new(LOG_FILE))
            .map_err(|e| Error::registry(&log_path, e))?
            .map(|st| (st.dev, st.ino));
        let position = |table_len: u64, log_pos: u64| Cached {
            version: fresh_version(),
            base: header.base,
            slot_id,
            log_id,
            log_pos,
            table_len,
            leases: Vec::new(),
        };
        if let Some(c) = cached {
            let same = c.base == header.base
                && c.slot_id == slot_id
                && (c.log_id == log_id || c.log_pos == 0)
                && c.log_pos <= header.log_len;
            if same {
                let mut leases = c.leases;
                if c.log_pos < header.log_len {
                    let lines = open_log(folder, log, notice)
                        .and_then(|f| lease_log::read(f, c.log_pos, header.log_len));
                    match lines {
                        Ok(changes) => lease_log::apply(&mut leases, changes),
                        // Read afresh, where damage is handled.
                        Err(e) if is_damage(&e) => {
                            return self.load(folder, slots, log, &mut None, notice, header)
                        }
                        Err(e) => return Err(Error::registry(&log_path, e)),
                    }
                }
                // Nothing new in the log: the very leases of the last look.
                let version = if c.log_pos == header.log_len {
                    c.version
                } else {
                    fresh_version()
                };
                return Ok(Loaded {
                    leases,
                    position: Cached {
                        version,
                        ..position(c.table_len, header.log_len)
                    },
                    repaired: false,
                });
            }
        }
        let (mut leases, table_len, mut repaired) = match slot_id {
            // No full table yet (a new registry, or an emptied folder).
            None => (Vec::new(), 0, false),
            Some(_) => match slot(folder, slots, header.base)
                .and_then(|s| read_slot(&s.file, &path))
            {
                Ok((leases, len)) => (leases, len, false),
                // Could not be read (out of descriptors, EIO): that says
                // nothing of the table, which stays as it is.
                Err(e) if !is_damage(&e) => return Err(Error::registry(&path, e)),
                Err(e) => {
                    // Keep the evidence; the next write makes a new slot file.
                    let moved = set_aside(folder, &name);
                    slots[(header.base % 2) as usize] = None;
                    let other = header.base.wrapping_sub(1);
                    let other_name = slot_name(other);
                    let fallback = match folder.stat(OsStr::new(&other_name)) {
                        Ok(Some(_)) => slot(folder, slots, other)
                            .and_then(|slot| read_slot(&slot.file, &self.dir.join(&other_name)))
                            .map(Some),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = &fallback {
                        if !is_damage(e) {
                            return Err(Error::registry(
                                self.dir.join(&other_name),
                                clone_error(e),
                            ));
                        }
                    }
                    add_notice(
                        notice,
                        format!(
                            "lease registry {} was unreadable ({e}); {moved}; {}",
                            path.display(),
                            match &fallback {
                                Ok(Some(_)) =>
                                    format!("using the table before it, from {other_name}"),
                                Ok(None) => "no table before it; starting empty".into(),
                                Err(_) =>
                                    "the table before it is unreadable too; starting empty".into(),
                            }
                        ),
                    );
                    let leases = fallback.ok().flatten().map(|(l, _)| l).unwrap_or_default();
                    (leases, 0, true)
                }
            },
        };
        // The log's lines apply on top of whichever table was read: after a
        // damaged table they still hold the latest changes.
        if header.log_len > 0 {
            let lines =
                open_log(folder, log, notice).and_then(|f| lease_log::read(f, 0, header.log_len));
            match lines {
                Ok(changes) => lease_log::apply(&mut leases, changes),
                Err(e) if !is_damage(&e) => return Err(Error::registry(&log_path, e)),
                Err(e) => {
                    // Keep the evidence; the next change starts a new log.
                    let moved = set_aside(folder, LOG_FILE);
                    *log = None;
                    add_notice(
                        notice,
                        format!(
                            "lease registry change log {} was unreadable ({e}); {moved}; using \
                             the full table before it",
                            log_path.display()
                        ),
                    );
                    repaired = true;
                }
            }
        }
        Ok(Loaded {
            leases,
            position: position(table_len, header.log_len),
            repaired,
        })
    }

    /// Removes every lease `holder` (this process) has, waiting at most `wait`
    /// for the locks (interpreter exit: the process is going, and its ports
    /// with it; a busy thread must not hold the exit up).
    pub fn release_process(&self, holder: Holder, wait: std::time::Duration) -> Result<usize> {
        let deadline = std::time::Instant::now() + wait;
        let mut inner = loop {
            match self.inner.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::registry(
                            &self.dir,
                            io::Error::new(io::ErrorKind::TimedOut, "busy at exit"),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        crate::fsutil::with_wait_cap(left, || {
            self.transact_in(&mut inner, Make::No, |t, _| {
                t.remove_where(|l| l.holder() == holder).len()
            })
        })
    }
}

/// The open slot file of change number `generation`, (re)opened if the
/// name no longer names the file held (deleted, moved aside, replaced).
fn slot<'a>(
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

/// Opens (creating) the registry folder, refusing one that is a link, that
/// another user owns, or that others can write: such a user could plant
/// leases, or delete ours and take our ports. The checks are made on the
/// descriptor every later access goes through.
/// Whether a transaction makes the registry's folder again if it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Make {
    Yes,
    No,
}

/// Moves the slot file `name` aside under a name never reused; says what happened.
fn set_aside(folder: &Dir, name: &str) -> String {
    let aside = format!("{name}.corrupt-{}", crate::clock::now().compact);
    match folder.rename_new(OsStr::new(name), folder, OsStr::new(&aside)) {
        Ok(()) => format!("moved aside to {aside}"),
        Err(e) => format!("could not move it aside ({e})"),
    }
}

/// Whether a failed read shows damage (read in full and not a table, or not
/// a regular file, or shorter than the header says) rather than a failure
/// to look (EMFILE, EIO, ENOMEM...), which is never acted on as damage.
fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

fn clone_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Adds a problem to those not yet reported (one transaction can meet two).
fn add_notice(notice: &mut Option<String>, message: String) {
    *notice = Some(match notice.take() {
        Some(earlier) => format!("{earlier}; then {message}"),
        None => message,
    });
}

/// What `load` found: the table, the position it matches, and whether it
/// had to be repaired (then the whole table is written back).
struct Loaded {
    leases: Vec<Lease>,
    position: Cached,
    repaired: bool,
}

/// A version number never given out before in this process.
fn fresh_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Cached {
    fn with_header(self, header: Header) -> (Header, Cached) {
        (header, self)
    }
}

const LOG_FILE: &str = "leases.log";

/// The open change log (created if missing, never through a link), reopened
/// if the name no longer names the file held. One that is not a regular file
/// (a link, a FIFO) is set aside and a new one made.
fn open_log<'a>(
    folder: &Dir,
    held: &'a mut Option<Slot>,
    notice: &mut Option<String>,
) -> io::Result<&'a File> {
    let on_disk = folder
        .stat(OsStr::new(LOG_FILE))?
        .map(|st| (st.dev, st.ino));
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

fn slot_name(generation: u64) -> String {
    format!("leases-{}.json", generation % 2)
}

/// A slot's table (and its size): a regular file, bounded in size, in the
/// slot format.
fn read_slot(file: &File, path: &Path) -> io::Result<(Vec<Lease>, u64)> {
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
fn write_in_place(file: &File, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)
}

const LOCK_FILE: &str = "leases.lock";

/// The version a lease table file carries (`{"version": 1, "leases": [...]}`).
const TABLE_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File};
    use std::os::unix::fs::PermissionsExt;

    fn lease(port: u16, holder: Holder, owner: &str) -> Lease {
        Lease {
            port,
            pid: holder.pid,
            start_time: holder.start_time,
            owner: owner.into(),
            since: "now".into(),
            service: String::new(),
        }
    }

    #[test]
    fn giving_back_leases_never_makes_a_deleted_registry_folder_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reg");
        let reg = Registry::open(&dir).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let removed = reg
            .transact_removing(|t| t.remove_where(|l| l.port == 3000).len())
            .unwrap();
        assert_eq!(removed, 0);
        reg.release_process(Holder::current(), std::time::Duration::from_secs(1))
            .unwrap();
        assert!(!dir.exists(), "made again only to be empty");
        // Taking a lease makes it again, as ever.
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        assert!(dir.join("leases.lock").exists());
    }

    #[test]
    fn leases_persist_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        // A second handle (as another process would have) sees the lease.
        let other = Registry::create(dir.path()).unwrap();
        let leases = other.snapshot().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].port, 3000);
        assert_eq!(leases[0].owner, "a");
    }

    #[test]
    fn another_handle_reads_only_the_new_lines_and_follows_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Registry::create(dir.path()).unwrap();
        let reader = Registry::create(dir.path()).unwrap();
        writer
            .transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        assert_eq!(reader.snapshot().unwrap().len(), 1); // cached now
        writer
            .transact(|t| {
                t.insert(lease(3001, Holder::current(), "a"));
                t.remove_where(|l| l.port == 3000);
            })
            .unwrap();
        let ports = |r: &Registry| -> Vec<u16> {
            let mut p: Vec<u16> = r.snapshot().unwrap().iter().map(|l| l.port).collect();
            p.sort();
            p
        };
        assert_eq!(ports(&reader), [3001]);
        // A change writes a line of the log, not the whole table.
        let slot_len = |name: &str| fs::metadata(dir.path().join(name)).unwrap().len();
        assert_eq!(slot_len("leases-1.json"), 0, "made, never written yet");
        let log_len = fs::metadata(dir.path().join("leases.log")).unwrap().len();
        assert!(log_len < 1024, "{log_len}");
        // Past 64 KiB of log the whole table is written to the spare slot
        // and the log starts again; every handle follows.
        fill_past_a_compaction(&writer);
        assert!(slot_len("leases-0.json") + slot_len("leases-1.json") > 32 * 1024);
        let expected: Vec<u16> = std::iter::once(3001).chain(4000..4400).collect();
        assert_eq!(ports(&reader), expected);
        assert_eq!(ports(&Registry::create(dir.path()).unwrap()), expected);
        assert!(fs::metadata(dir.path().join("leases.log")).unwrap().len() < 64 * 1024);
    }

    #[test]
    fn a_handle_replaying_the_log_keeps_the_writers_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Registry::create(dir.path()).unwrap();
        let reader = Registry::create(dir.path()).unwrap();
        writer
            .transact(|t| {
                for port in 3000..3010 {
                    t.insert(lease(port, Holder::current(), "a"));
                }
            })
            .unwrap();
        reader.snapshot().unwrap(); // cached at this point of the log
        writer
            .transact(|t| t.remove_where(|l| l.port % 3 == 0))
            .unwrap();
        let order =
            |r: &Registry| -> Vec<u16> { r.snapshot().unwrap().iter().map(|l| l.port).collect() };
        assert_eq!(order(&reader), order(&writer));
        assert_eq!(
            order(&Registry::create(dir.path()).unwrap()),
            order(&writer)
        );
    }

    #[test]
    fn lines_past_the_headers_length_are_never_read() {
        // A writer killed between its append and the header update.
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        let log = File::options()
            .append(true)
            .open(dir.path().join("leases.log"))
            .unwrap();
        std::io::Write::write_all(&mut &log, b"{\"add\":{\"port\":3001,\"pid\":1,\"start").unwrap();
        let fresh = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = fresh.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, [3000]);
        // The next change overwrites the torn line.
        fresh
            .transact(|t| t.insert(lease(3002, Holder::current(), "b")))
            .unwrap();
        let again = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = again.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, [3000, 3002]);
        assert!(again.take_notice().is_none());
    }

    #[test]
    fn a_deleted_lock_file_is_replaced_not_kept_locked_alone() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        // A /tmp cleaner empties the folder.
        for entry in fs::read_dir(dir.path()).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        // A newcomer locks the same (new) lock file and sees the same table.
        let newcomer = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = newcomer
            .snapshot()
            .unwrap()
            .iter()
            .map(|l| l.port)
            .collect();
        assert_eq!(ports, vec![3001]);
        // ...and the two go on sharing one table: both lock the new file.
        newcomer
            .transact(|t| t.insert(lease(3002, Holder::current(), "b")))
            .unwrap();
        let ports: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![3001, 3002]);
    }

    #[test]
    fn a_deleted_registry_folder_is_made_again_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("reg");
        let reg = Registry::create(&reg_dir).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        fs::remove_dir_all(&reg_dir).unwrap(); // a /tmp cleaner
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        let newcomer = Registry::create(&reg_dir).unwrap();
        let ports: Vec<u16> = newcomer
            .snapshot()
            .unwrap()
            .iter()
            .map(|l| l.port)
            .collect();
        assert_eq!(
            ports,
            vec![3001],
            "both work in the folder the path names now"
        );
    }

    /// Leases on 4000-4399 with long owners: over 64 KiB of log, so the
    /// table is folded into a slot (once, then part of it into the log).
    fn fill_past_a_compaction(reg: &Registry) {
        let owner = "x".repeat(200);
        for port in 4000..4400 {
            reg.transact(|t| t.insert(lease(port, Holder::current(), &owner)))
                .unwrap();
        }
    }

    /// A holder whose process has exited.
    fn dead_holder() -> Holder {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        Holder { pid, start_time: 1 }
    }

    #[test]
    fn dead_holders_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let dead = dead_holder();
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
        })
        .unwrap();
        let removed = reg.transact_seeing(|t, seen| t.remove_dead(seen)).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].port, 3000);
        let left = reg.snapshot().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].port, 3001);
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_previous_table_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        // Enough leases for a full table in slot 1, then one more in the log.
        fill_past_a_compaction(&reg);
        assert!(
            fs::metadata(dir.path().join("leases-1.json"))
                .unwrap()
                .len()
                > 0
        );
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        fs::write(dir.path().join("leases-1.json"), b"{not json").unwrap();
        let fresh = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = fresh.snapshot().unwrap().iter().map(|l| l.port).collect();
        // The table before it (none here) plus what the log says since: the
        // leases only the damaged table held are gone until re-recorded.
        assert!(ports.contains(&3001) && ports.contains(&4399), "{ports:?}");
        assert!(!ports.contains(&4000), "{ports:?}");
        let count = ports.len();
        let notice = fresh.take_notice().unwrap();
        assert!(notice.contains("unreadable"), "{notice}");
        assert!(notice.contains("leases-1.json"), "{notice}");
        // Written back whole at once: every process reads the same table.
        let other = Registry::create(dir.path()).unwrap();
        assert_eq!(other.snapshot().unwrap().len(), count);
        assert!(other.take_notice().is_none());
    }

    #[test]
    fn dead_holders_below_a_port_are_reclaimed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let dead = dead_holder();
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
            t.insert(lease(3005, dead, "gone"));
        })
        .unwrap();
        let range = 3000..=3010;
        let removed = reg
            .transact_seeing(|t, seen| {
                let holders = crate::shared::leased_in(t, &range, "me#").holders;
                t.remove_dead_among(&range, Some(3002), &holders, seen)
            })
            .unwrap();
        assert_eq!(removed.iter().map(|l| l.port).collect::<Vec<_>>(), [3000]);
        let mut left: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
        left.sort();
        assert_eq!(left, [3001, 3005]);
    }

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

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("shared");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Registry::create(&open).unwrap_err().to_string();
        assert!(err.contains("writable by other users"), "{err}");
    }

    #[test]
    fn new_folders_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("reg");
        Registry::create(&reg_dir).unwrap();
        let mode = fs::metadata(&reg_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
