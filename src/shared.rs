//! The per-state-file shared view: every manager of one process that uses the
//! same state file (with the same settings) shares one in-memory state, one
//! lock descriptor, one backup list and one picture of the ports in use. A
//! thousand managers on one file then cost a thousand small handles, not a
//! thousand copies of the state and of each other's leases.
//!
//! Views belong to the process that made them (see `sys/per_process.rs`): a
//! forked child builds its own from the file on disk.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use crate::clock::Stamp;
use crate::config::Config;
use crate::events::Kind;
use crate::fsutil::{printable, FolderLock, Kind as FileKind, SlotGuard, LOCK_WAIT};
use crate::holder::Holder;
use crate::port_set::{words_of, PortSet};
use crate::registry::{note_holder, LeaseTable, Registry};
use crate::state::{LeaseView, Options, Settings, State};
use crate::store::{Loaded, Store};
use crate::sys::PerProcess;

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
                state: initial_state(config, registry),
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

    /// The uid that owns the folder's lock file, when it is another user's:
    /// that user can hold this file's lock and stall every save.
    pub fn lock_owner_if_foreign(&self) -> Option<u32> {
        self.lock.foreign_owner()
    }

    /// The read-modify-write of the state file, under its lock: adopt what
    /// another process wrote, apply `change`, recompute the free and used
    /// lists, save (with a backup). `problems` found before (and those found
    /// here) become `last_error` after the file's own state is adopted, and
    /// are returned for the caller's events; none is raised, the state lives
    /// on in memory.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        held: std::io::Result<SlotGuard>,
        range: RangeInclusive<u16>,
        stamp: &Stamp,
        leases: Option<Leased>,
        save: Save,
        mut problems: Vec<(Kind, String)>,
        change: impl FnOnce(&mut State),
    ) -> Vec<(Kind, String)> {
        let FileView {
            state,
            store,
            bound,
            leased,
            skipped,
            ephemeral,
            holders,
            started,
            unscanned,
            unsaved,
            ..
        } = self;
        // A lock not taken is an error, never a skip: without it nothing is
        // read (the counter that says what changed is the lock's) and nothing
        // is written; the change lives on in memory, saved at the next update
        // that holds the lock.
        let guard = match held {
            Ok(guard) => guard,
            Err(e) => {
                let problem = format!(
                    "{}; not written, the state lives on in memory",
                    lock_problem(store, &e)
                );
                problems.push((Kind::Error, problem));
                change(state);
                for (_, message) in &problems {
                    state.record_error(&stamp.jalali, message.clone());
                }
                return problems;
            }
        };
        let generation = guard.generation();
        let fresh = state.change_count == 0 && state.last_checked.is_none();
        let mut must_write = save == Save::Always || std::mem::take(unsaved);
        let mut may_write = true;
        match store.load(generation) {
            Loaded::Unchanged => {}
            Loaded::Missing => {
                must_write = true;
                // At start-up (memory empty) the best valid backup wins.
                if fresh {
                    if let Some(source) = restore(state, store) {
                        problems.push((
                            Kind::Recover,
                            format!(
                                "state file {} was missing; {source}",
                                store.path().display()
                            ),
                        ));
                    }
                }
            }
            Loaded::Vanished => {
                must_write = true;
                problems.push((
                    Kind::Recover,
                    format!(
                        "state file {} was deleted; rewritten from memory",
                        store.path().display()
                    ),
                ));
            }
            Loaded::Valid(disk) => adopt(state, *disk),
            Loaded::Corrupt { reason, moved_to } => {
                must_write = true;
                let aside = moved_to.map_or("it could not be moved aside".to_string(), |p| {
                    format!("moved aside to {}", p.display())
                });
                // Memory is newer than any backup once we are running.
                let source = if fresh {
                    restore(state, store).unwrap_or_else(|| "no valid backup; started fresh".into())
                } else {
                    "rewritten from memory".to_string()
                };
                problems.push((
                    Kind::Recover,
                    format!(
                        "state file {} was damaged ({reason}); {aside}; {source}",
                        store.path().display()
                    ),
                ));
            }
            // Unreadable is not damaged: a file that could not be opened or
            // read in full (EINTR, EMFILE, EIO) may be intact. It is neither
            // restored from a backup nor written over until it reads again.
            Loaded::Unreadable(e) => {
                may_write = false;
                problems.push((
                    Kind::Error,
                    format!(
                        "cannot read state file {} ({e}); left as it is, the state lives on \
                         in memory",
                        store.path().display()
                    ),
                ));
            }
        }
        let before = (
            std::mem::take(&mut state.free_ports),
            std::mem::take(&mut state.used_ports),
            state.leases.clone(),
            state.current_port,
        );
        change(state);
        if let Some(leases) = leases {
            state.leases = leases.mine;
            *leased = leases.ports;
            *holders = leases.holders;
        }
        match unscanned {
            None => recompute_lists(state, range, leased, bound, skipped),
            // No scan yet: the ports the file said were in use stay so (only
            // a probe or a scan says otherwise).
            Some(unseen) => {
                // What the file said other programs hold: its used ports
                // but the leases (the registry speaks for those, its own
                // listed beside them included).
                if !*started {
                    let its_lease = |p: u16| before.2.iter().any(|l| l.port == p);
                    *unseen = before
                        .1
                        .iter()
                        .filter(|&p| !leased.contains(p) && !bound.contains(p) && !its_lease(p))
                        .collect();
                }
                let mut shown = bound.clone();
                for (start, bits) in unseen.iter_words() {
                    shown.or_word(start, bits);
                }
                recompute_lists(state, range, leased, &shown, skipped);
            }
        }
        state.ephemeral_overlap = ephemeral.clone();
        state.last_checked = Some(stamp.jalali.clone());
        state.last_checked_unix = Some(stamp.unix);
        let unchanged = before.0 == state.free_ports
            && before.1 == state.used_ports
            && before.2 == state.leases
            && before.3 == state.current_port;
        // An error in effect is cleared by the next clean save; one that
        // merely goes on (the same message again) is logged, not re-saved,
        // or every refresh would take a backup while it lasts.
        let clean_again = state.error_active && problems.is_empty();
        let same_again = state.error_active
            && problems
                .iter()
                .all(|(_, m)| state.last_error.as_deref() == Some(m.as_str()));
        if !must_write && unchanged && !clean_again && (problems.is_empty() || same_again) {
            return problems;
        }
        if problems.is_empty() {
            state.error_active = false;
        }
        for (_, message) in &problems {
            state.record_error(&stamp.jalali, message.clone());
        }
        if !may_write {
            return problems;
        }
        // Bump the file's counter in the lock file before replacing the state
        // file, so a reader never pairs the new file with the old counter.
        let generation = guard
            .set_generation(generation.wrapping_add(1))
            .map_or(generation, |()| generation.wrapping_add(1));
        match store.save(state, generation) {
            Ok(None) => {}
            Ok(Some(backup_problem)) => {
                state.record_error(&stamp.jalali, backup_problem.clone());
                problems.push((Kind::Error, backup_problem));
            }
            Err(e) => {
                let message = format!(
                    "cannot write state file {} ({e}); keeping the state in memory",
                    store.path().display()
                );
                state.record_error(&stamp.jalali, message.clone());
                problems.push((Kind::Error, message));
            }
        }
        drop(guard);
        problems
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

/// What every lease taken through the state file `path` has as its owner's
/// start: the path, with bytes that are not UTF-8 escaped (two files whose
/// names differ only there must not count each other's leases as theirs).
pub(crate) fn owner_prefix(path: &Path) -> String {
    format!("{}#", printable(path.as_os_str()))
}

/// Restores the best valid backup into `state`, saying what was done.
fn restore(state: &mut State, store: &mut Store) -> Option<String> {
    match store.best_backup() {
        Ok(Some((backup, recovered))) => {
            let count = recovered.change_count;
            adopt(state, recovered);
            Some(format!(
                "restored from backup {} (change_count {count})",
                backup.name
            ))
        }
        Ok(None) => None,
        Err(e) => Some(format!("backups not used: {e}")),
    }
}

/// The state before anything is read: this configuration's settings and options.
pub(crate) fn initial_state(config: &Config, registry: &Registry) -> State {
    let settings = Settings {
        port_range: [config.start, config.end],
        json_path: config.json_path.to_string_lossy().into_owned(),
        history_max: config.history_max,
        service: config.service.clone(),
    };
    let options = Options {
        refresh_interval: config.refresh_interval.as_secs_f64(),
        backup_max: config.backup_max,
        durable: config.durable,
        registry_dir: registry.dir().to_string_lossy().into_owned(),
    };
    State::fresh(settings, options)
}

/// Takes another manager's saved state as ours, keeping our own settings.
pub(crate) fn adopt(state: &mut State, mut disk: State) {
    disk.settings = state.settings.clone();
    disk.options = state.options.clone();
    disk.schema_version = state.schema_version;
    disk.trim_history();
    *state = disk;
}

/// What one registry transaction tells the state: the ports leased in the
/// range (by anyone) and the leases taken through this state file.
#[derive(Clone)]
pub struct Leased {
    pub ports: PortSet,
    pub mine: Vec<LeaseView>,
    /// The processes holding leases in the range, each with its lowest port
    /// there: what a pick checks for dead holders without another pass.
    pub holders: Vec<(Holder, u16)>,
}

pub(crate) fn leased_in(table: &LeaseTable, range: &RangeInclusive<u16>, prefix: &str) -> Leased {
    let mut ports = PortSet::default();
    let mut mine = Vec::new();
    let mut holders: Vec<(Holder, u16)> = Vec::new();
    for lease in table.iter().filter(|l| range.contains(&l.port)) {
        ports.insert(lease.port);
        if owned_through(&lease.owner, prefix) {
            mine.push(LeaseView::of(lease));
        }
        note_holder(&mut holders, lease.holder(), lease.port);
    }
    mine.sort_by_key(|v| v.port);
    Leased {
        ports,
        mine,
        holders,
    }
}

/// Is `owner` a lease taken through the state file whose owners start with
/// `prefix` (`<state file>#`)? The byte where the prefix's `#` would stand is
/// looked at first: in a registry of thousands of leases through other state
/// files, nearly all differ there, and a full compare of each long path was
/// a tenth of a pick. The rest after the prefix (`<pid>.<instance>` or
/// `pid`) never holds a `#`: that tells `a.json#x.json#12.1` (a lease through
/// the file `a.json#x.json`) from a lease through `a.json`, with the owners
/// every earlier build wrote.
pub(crate) fn owned_through(owner: &str, prefix: &str) -> bool {
    let (owner, prefix) = (owner.as_bytes(), prefix.as_bytes());
    owner.len() >= prefix.len()
        && prefix
            .last()
            .is_none_or(|last| owner[prefix.len() - 1] == *last)
        && owner.starts_with(prefix)
        && !owner[prefix.len()..].contains(&b'#')
}

/// used = leased or bound; skipped = the rest that is never handed out;
/// free = what a pick would hand out. Worked 64 ports at a time on the sets'
/// bits (a 6,001-port range is 95 words, not 18,000 look-ups).
pub(crate) fn recompute_lists(
    state: &mut State,
    range: RangeInclusive<u16>,
    leased: &PortSet,
    bound: &PortSet,
    skipped: &PortSet,
) {
    state.free_ports.clear();
    state.used_ports.clear();
    state.skipped_ports.clear();
    for (start, inside) in words_of(&range) {
        let used = (leased.word(start) | bound.word(start)) & inside;
        let never = skipped.word(start) & inside & !used;
        state.used_ports.add_word(start, used);
        state.skipped_ports.add_word(start, never);
        state.free_ports.add_word(start, inside & !used & !never);
    }
}

#[cfg(test)]
mod tests {
    use super::owned_through;

    #[test]
    fn an_owner_belongs_to_one_state_file_whatever_its_name_holds() {
        // `a.json#x.json` is a file name of its own, not `a.json`'s lease.
        assert!(owned_through("/d/a.json#12.1", "/d/a.json#"));
        assert!(owned_through("/d/a.json#pid", "/d/a.json#"));
        assert!(!owned_through("/d/a.json#x.json#12.1", "/d/a.json#"));
        assert!(owned_through("/d/a.json#x.json#12.1", "/d/a.json#x.json#"));
        assert!(!owned_through("/d/a.json#12.1", "/d/a.json#x.json#"));
    }

    #[test]
    fn the_lists_split_the_range_port_by_port() {
        use super::recompute_lists;
        use crate::scan::PortSet;
        use crate::state::{Options, Settings, State};
        let settings = Settings {
            port_range: [0, 0],
            json_path: String::new(),
            history_max: 1,
            service: String::new(),
        };
        let leased: PortSet = [63, 64, 200, 65535].into_iter().collect();
        let bound: PortSet = [64, 130, 65534].into_iter().collect();
        let skipped: PortSet = [65, 130, 131, 65533].into_iter().collect();
        for range in [60..=200, 0..=65535, 64..=64, 127..=129, 65530..=65535] {
            let mut state = State::fresh(settings.clone(), Options::default());
            recompute_lists(&mut state, range.clone(), &leased, &bound, &skipped);
            let mut used = Vec::new();
            let mut never = Vec::new();
            let mut free = Vec::new();
            for port in range {
                if leased.contains(port) || bound.contains(port) {
                    used.push(port);
                } else if skipped.contains(port) {
                    never.push(port);
                } else {
                    free.push(port);
                }
            }
            assert_eq!(state.used_ports.iter().collect::<Vec<_>>(), used);
            assert_eq!(state.skipped_ports.iter().collect::<Vec<_>>(), never);
            assert_eq!(state.free_ports.iter().collect::<Vec<_>>(), free);
            assert_eq!(state.free_ports.len(), free.len());
        }
    }

    #[test]
    fn owners_are_matched_by_their_whole_prefix() {
        let prefix = "/srv/state/s.json#";
        assert!(owned_through("/srv/state/s.json#41.1", prefix));
        assert!(owned_through("/srv/state/s.json#pid", prefix));
        assert!(!owned_through("/srv/state/f12.json#41.1", prefix));
        assert!(!owned_through("/srv/state/t.json#41.1", prefix));
        assert!(!owned_through("/srv/state/s.json", prefix));
        assert!(!owned_through("/srv/other/s.json#41.1", prefix));
    }
}
