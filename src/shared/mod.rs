//! The per-state-file shared view: every manager of one process that uses the
//! same state file (with the same settings) shares one in-memory state, one
//! lock descriptor, one backup list and one picture of the ports in use. A
//! thousand managers on one file then cost a thousand small handles, not a
//! thousand copies of the state and of each other's leases.
//!
//! Views belong to the process that made them (see `sys/per_process.rs`): a
//! forked child builds its own from the file on disk.
//!
//! Here: the view and its locks, catching up with the file, the folder's
//! upkeep; `update.rs`: the read-modify-write of the state file. What the
//! view computes without I/O is in `state_view.rs` (inspection uses it too).

mod update;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use crate::config::Config;
use crate::fsutil::{printable, FolderLock, Kind as FileKind, SlotGuard, LOCK_WAIT};
use crate::holder::Holder;
use crate::port_set::PortSet;
use crate::registry::Registry;
use crate::state::State;
use crate::state_view::{adopt, initial_state, owner_prefix, recompute_lists, Leased};
use crate::store::Store;
use crate::sys::PerProcess;

/// The registry's tests name it here.
#[cfg(test)]
pub(crate) use crate::state_view::leased_in;

pub struct SharedFile {
    /// What every lease taken through this state file's managers starts with.
    owner_prefix: String,
    view: Mutex<FileView>,
}

pub struct FileView {
    pub state: State,
    pub store: Store,
    lock: FolderLock,
    /// Ports other programs hold, per the last scan and failed probes.
    pub bound: PortSet,
    /// Ports leased in the range, per the last registry transaction.
    pub leased: PortSet,
    /// Ports never handed out (browser-unsafe, unless `skip_unsafe=False`).
    pub skipped: PortSet,
    /// How the range meets the kernel's ephemeral range (read at start).
    pub ephemeral: Option<crate::state::EphemeralOverlap>,
    /// Loaded (and recovered) once, by the first manager to start.
    pub started: bool,
    /// When the range was last re-scanned for this file (by any manager).
    pub refreshed: Option<Instant>,
    /// Until the range is first scanned in this process (`None` from then
    /// on): the ports the state file said were in use, leases aside, when it
    /// was first read. Nothing here looked at them, so they are shown as the
    /// file said (see `update`).
    pub unscanned: Option<PortSet>,
    /// The first scan changed the lists shown since the last save: the next
    /// update writes them even if it changes nothing itself.
    unsaved: bool,
    /// When the folder was last swept for killed savers' temporary files
    /// whether or not it changed (see `tidy`).
    tidied: Option<Instant>,
    /// What the last pick found in the registry, with the table's version
    /// after it (`LeaseTable::version_after`): while no one has changed the
    /// table since, the next pick starts from it instead of walking every
    /// lease again (thousands, in a crowded range).
    pub leased_memo: Option<(u64, Leased)>,
    /// The processes holding leases in the range as of the last registry
    /// transaction: a read checks them for death (see `Manager::state`).
    pub holders: Vec<(Holder, u16)>,
}

/// Whether a change must be written even if the file would show the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Save {
    Always,
    /// Only if `free_ports`, `used_ports` or the leases changed, or an error
    /// in effect is now over: an idle refresh writes nothing (and so takes no backup:
    /// the backups hold the last `backup_max` distinct states).
    IfChanged,
}

/// When `FileView::tidy` sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// At start: if the folder changed since this process last swept it.
    IfChanged,
    /// An asked-for refresh.
    Asked,
    /// A background refresh: if the folder changed, and regardless once a minute.
    Periodic,
}

/// The views by file and settings, with the size at which the next new view
/// first drops those no manager uses any more: every view made would walk
/// them all otherwise (a process making a thousand managers, a million steps).
#[derive(Default)]
struct Views {
    by_key: HashMap<String, Weak<SharedFile>>,
    prune_at: usize,
}

const TIDY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn views() -> &'static Mutex<Views> {
    static VIEWS: PerProcess<Mutex<Views>> = PerProcess::new();
    VIEWS.get_or_init(Default::default)
}

impl SharedFile {
    /// This process's view of the state file `path` for `config`, made if
    /// there is none yet.
    pub fn open(path: &Path, config: &Config, registry: &Registry) -> Arc<SharedFile> {
        // Managers with other settings keep views of their own: the state's
        // settings and options are theirs.
        let key = format!(
            "{}\0{:?}",
            printable(path.as_os_str()),
            (
                config.start,
                config.end,
                config.history_max,
                config.backup_max,
                config.durable,
                config.refresh_interval,
                registry.dir(),
                &config.json_path,
                &config.service,
            )
        );
        let mut views = views().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(view) = views.by_key.get(&key).and_then(Weak::upgrade) {
            return view;
        }
        if views.by_key.len() >= views.prune_at {
            views.by_key.retain(|_, v| v.strong_count() > 0);
            views.prune_at = (views.by_key.len() * 2).max(64);
        }
        let store = Store::new(path.to_path_buf(), config.backup_max, config.durable);
        let view = Arc::new(SharedFile {
            owner_prefix: owner_prefix(path),
            view: Mutex::new(FileView {
                state: initial_state(config, registry.dir()),
                store,
                lock: FolderLock::default(),
                bound: PortSet::default(),
                leased: PortSet::default(),
                skipped: config
                    .skip_unsafe
                    .then(crate::port_policy::browser_unsafe)
                    .unwrap_or_default(),
                ephemeral: None,
                started: false,
                refreshed: None,
                unscanned: Some(PortSet::default()),
                unsaved: false,
                tidied: None,
                leased_memo: None,
                holders: Vec::new(),
            }),
        });
        views.by_key.insert(key, Arc::downgrade(&view));
        view
    }

    pub fn owner_prefix(&self) -> &str {
        &self.owner_prefix
    }

    pub fn lock(&self) -> MutexGuard<'_, FileView> {
        // A panic elsewhere must not make every later call panic too.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The view if no one holds it now (a caller that must not wait).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, FileView>> {
        match self.view.try_lock() {
            Ok(view) => Some(view),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl FileView {
    /// Takes this state file's slot of the folder lock (making the folder if
    /// needed, "folders are always created"), waiting at most `LOCK_WAIT`.
    /// Callers take it before they change anything else (the registry), so
    /// an `interruptible` wait that Ctrl-C ends leaves nothing half done.
    pub fn lock_slot(&mut self, interruptible: bool) -> std::io::Result<SlotGuard> {
        self.store.revalidate();
        let slot = self.store.counter_offset();
        let folder = self.store.folder(true)?;
        self.lock.acquire(folder, slot, LOCK_WAIT, interruptible)
    }

    /// Takes a scan of the range as what other programs hold.
    pub fn scanned(&mut self, bound: PortSet) {
        self.bound = bound;
        self.unscanned = None;
    }

    /// Takes the range's first scan into the lists shown, without a save:
    /// the file keeps what it said until the next save writes what is known.
    /// Returns the counts of free and used ports before, if they changed.
    pub fn first_scan(
        &mut self,
        range: RangeInclusive<u16>,
        bound: PortSet,
    ) -> Option<(usize, usize)> {
        self.scanned(bound);
        let before = self.state.used_ports.clone();
        let counts = (self.state.free_ports.len(), before.len());
        let FileView {
            state,
            bound,
            leased,
            skipped,
            ..
        } = self;
        recompute_lists(state, range, leased, bound, skipped);
        let changed = before != self.state.used_ports;
        self.unsaved |= changed;
        changed.then_some(counts)
    }

    /// A probe found `port` free: what the file said of it no longer stands.
    pub fn seen_free(&mut self, port: u16) {
        self.bound.remove(port);
        if let Some(unseen) = self.unscanned.as_mut() {
            unseen.remove(port);
        }
    }

    /// Adopts what another process saved since this view last read or wrote
    /// the file, without taking the lock (a read must not wait behind a save,
    /// and saves are atomic renames). Costs a `pread` of the counter and a
    /// `stat` when nothing changed.
    pub fn catch_up(&mut self) {
        let slot = self.store.counter_offset();
        let Ok(folder) = self.store.folder(false) else {
            return;
        };
        let Some(generation) = self.lock.peek_generation(folder, slot) else {
            return;
        };
        if let Some(disk) = self.store.changed_since(generation) {
            adopt(&mut self.state, disk);
        }
    }

    /// Whether `catch_up` would find nothing to adopt, found without reading
    /// the file (false also where `catch_up` could not tell).
    pub fn is_current(&mut self) -> bool {
        let slot = self.store.counter_offset();
        let Ok(folder) = self.store.folder(false) else {
            return false;
        };
        let Some(generation) = self.lock.peek_generation(folder, slot) else {
            return false;
        };
        self.store.is_current(generation)
    }

    /// The uid that owns the folder's lock file, when it is another user's:
    /// that user can hold this file's lock and stall every save.
    pub fn lock_owner_if_foreign(&self) -> Option<u32> {
        self.lock.foreign_owner()
    }

    /// Removes temporary files of killed savers (under no lock: each is named
    /// by a pid that is gone, so no saver is using it). It lists the folder,
    /// which may hold thousands of files, only when the folder changed since
    /// this process last swept it (a look at its times otherwise), except at
    /// an asked-for refresh and once a minute from the background refreshes,
    /// which list it regardless (see `fsutil::watch` for what a change
    /// detection can miss).
    pub fn tidy(&mut self, when: Sweep) {
        let always = match when {
            Sweep::IfChanged => false,
            Sweep::Asked => true,
            Sweep::Periodic => self.tidied.is_none_or(|at| at.elapsed() >= TIDY_EVERY),
        };
        if always || self.tidied.is_none() {
            self.tidied = Some(Instant::now());
        }
        self.store.remove_stale_temporaries(always);
    }

    /// Refuses a state-file path that holds something other than a regular
    /// file or a link: a folder, a FIFO, a socket or a device is never read,
    /// renamed or replaced.
    pub fn check_path(&mut self) -> Result<(), String> {
        match self.store.kind_on_disk() {
            Ok(Some(FileKind::Dir)) => Err("is a folder".into()),
            Ok(Some(FileKind::Other)) => {
                Err("is not a regular file (a FIFO, socket or device)".into())
            }
            _ => Ok(()),
        }
    }
}

/// What went wrong taking a state file's lock, naming the lock file.
pub fn lock_problem(store: &Store, e: &std::io::Error) -> String {
    let what = match e.kind() {
        std::io::ErrorKind::TimedOut => format!(
            "{} stayed locked for {} s (another process holds this file's slot)",
            store.lock_path().display(),
            LOCK_WAIT.as_secs()
        ),
        _ => format!("{}: {e}", store.lock_path().display()),
    };
    format!("cannot lock state file {} ({what})", store.path().display())
}
