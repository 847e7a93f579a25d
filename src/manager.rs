//! The manager: picks, releases and refreshes, composing the registry (who holds
//! which port, host-wide), the probe and scan (what the kernel says), and the
//! store (the state file with its history).
//!
//! Locking order, always: the manager's mutex, then the registry lock, and
//! never both the registry lock and the state-file lock at once. Events are
//! emitted only after the manager's mutex is released (see `events.rs`).

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::{self, Stamp};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{Event, Kind, PortSummary, Sink};
use crate::fsutil::{read_generation, write_generation, LockFile, LOCK_WAIT};
use crate::holder::Holder;
use crate::probe::{probe_port, Probe};
use crate::registry::{self, Lease, LeaseTable, Registry};
use crate::scan::{self, PortSet};
use crate::state::{LeaseView, Options, Settings, State};
use crate::store::{Backup, Loaded, Store};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Manager {
    id: u64,
    config: Config,
    /// The state file, absolute (fixed at construction, whatever `chdir` follows).
    path: PathBuf,
    /// This manager's name in the registry: state file + instance number.
    owner: String,
    /// What every lease taken through this state file's managers starts with.
    owner_prefix: String,
    holder: Holder,
    registry: Arc<Registry>,
    sink: Sink,
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    /// The port this manager holds a lease on.
    active: Option<u16>,
    store: Store,
    /// The state file's lock file. While it cannot be opened (read-only
    /// folder), the manager works unlocked from memory.
    lock: LockFile,
    /// Ports other programs hold, per the last scan and failed probes.
    bound: PortSet,
    /// Ports leased in the range, per the last registry transaction.
    leased: PortSet,
    stopped: bool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("range", &(self.config.start, self.config.end))
            .field("path", &self.path)
            .finish()
    }
}

impl Manager {
    /// Opens (or creates) the state file and joins the host registry. Emits START.
    pub fn new(config: Config) -> Result<Arc<Manager>> {
        let path = std::path::absolute(&config.json_path)
            .map_err(|e| Error::io(format!("json_path {:?}", config.json_path), e))?;
        let registry_dir = registry::resolve_dir(config.registry_dir.as_deref());
        let registry = Registry::open(&registry_dir)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let holder = Holder::current();
        let owner_prefix = format!("{}#", path.display());
        let owner = format!("{owner_prefix}{}.{id}", holder.pid);
        let store = Store::new(path.clone(), config.backup_max, config.durable);
        // The folder is made now so the lock can be; a failure shows at the first save.
        if let Some(dir) = path.parent() {
            let _ = crate::fsutil::ensure_dir(dir, 0o755);
        }
        let lock = LockFile::new(store.lock_path());
        let state = initial_state(&config, &registry);
        let manager = Arc::new(Manager {
            id,
            sink: Sink {
                console: config.console_log,
            },
            config,
            path,
            owner,
            owner_prefix,
            holder,
            registry,
            inner: Mutex::new(Inner {
                state,
                active: None,
                store,
                lock,
                bound: PortSet::default(),
                leased: PortSet::default(),
                stopped: false,
            }),
        });
        manager.start();
        Ok(manager)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn active_port(&self) -> Option<u16> {
        self.lock_inner().active
    }

    pub fn is_stopped(&self) -> bool {
        self.lock_inner().stopped
    }

    /// A copy of the state as last computed (what `get_state()` returns).
    pub fn state(&self) -> State {
        self.lock_inner().state.clone()
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not make every later call panic too.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self) -> std::ops::RangeInclusive<u16> {
        self.config.start..=self.config.end
    }

    /// Loads or recovers the state, takes a first scan, saves. Emits START.
    fn start(&self) {
        let stamp = clock::now();
        let mut events = Vec::new();
        {
            let mut guard = self.lock_inner();
            let inner = &mut *guard;
            inner.bound = scan::ports_in_use(self.range());
            let leases = self.leases_in_range(inner, &stamp, &mut events);
            // A current_port left by a manager that is gone is no one's port.
            let live: Vec<u16> = leases
                .iter()
                .flat_map(|l| l.mine.iter().map(|v| v.port))
                .collect();
            self.update_state(inner, &stamp, leases, &mut events, |state| {
                if state.current_port.is_some_and(|p| !live.contains(&p)) {
                    state.current_port = None;
                }
            });
            inner.store.prime_backup_cache();
            events.push(self.event(
                inner,
                Kind::Start,
                &stamp,
                "DynamicPortManager started.".into(),
            ));
        }
        self.sink.emit(&events);
    }

    /// Picks the lowest free port of the range and makes it the active port
    /// (releasing the previous one). With `for_pid`, the lease is held by that
    /// process until it exits, and this manager's active port is unchanged.
    pub fn pick_port(&self, for_pid: Option<u32>) -> Result<u16> {
        let mut events = Vec::new();
        let result = self.pick_locked(for_pid, &mut events);
        self.sink.emit(&events);
        result
    }

    fn pick_locked(&self, for_pid: Option<u32>, events: &mut Vec<Event>) -> Result<u16> {
        let mut guard = self.lock_inner();
        let inner = &mut *guard;
        if inner.stopped {
            return Err(Error::Stopped(self.path.clone()));
        }
        let holder = match for_pid {
            // In a forked child the manager's port must be the child's lease.
            None if self.holder.pid != std::process::id() => Holder::current(),
            None => self.holder,
            Some(pid) => Holder::of_pid(pid).ok_or_else(|| {
                Error::invalid("pid", format!("no running process has pid {pid}"))
            })?,
        };
        let stamp = clock::now();
        let prev = inner.active;
        let moving = for_pid.is_none();
        let lease_for = |port| Lease {
            port,
            pid: holder.pid,
            start_time: holder.start_time,
            owner: if moving {
                self.owner.clone()
            } else {
                format!("{}#pid", self.path.display())
            },
            since: stamp.iso.clone(),
        };
        let mut picked = self.try_pick(inner, moving.then_some(prev).flatten(), &lease_for)?;
        if picked.is_none() {
            // Exhausted as far as we knew: reclaim leases of dead processes and
            // look at the kernel afresh before giving up.
            let reclaimed = self.registry.transact(LeaseTable::remove_dead)?;
            inner.bound = scan::ports_in_use(self.range());
            self.reclaim_events(inner, &reclaimed, &stamp, events);
            picked = self.try_pick(inner, moving.then_some(prev).flatten(), &lease_for)?;
        }
        self.take_registry_notice(inner, &stamp, events);
        let Some((port, leases)) = picked else {
            let leases = self.registry.snapshot()?;
            let leased = leases
                .iter()
                .filter(|l| self.range().contains(&l.port))
                .count();
            let err = Error::NoFreePort {
                start: self.config.start,
                end: self.config.end,
                leased,
                bound: inner.bound.count_in(self.range()),
            };
            let message = err.to_string();
            inner.state.record_error(&stamp.jalali, message.clone());
            events.push(self.event(inner, Kind::Error, &stamp, message));
            return Err(err);
        };
        let new_active = if moving { Some(port) } else { prev };
        inner.active = new_active;
        // Every pick is recorded. A pick on behalf of another pid is not a
        // change of this manager's active port: its entry has no `prev` and
        // `current_port` stays this manager's.
        self.update_state(inner, &stamp, Some(leases), events, |state| {
            if moving {
                state.record_change(&stamp.jalali, prev, Some(port));
            } else {
                state.record_handout(&stamp.jalali, port);
            }
            state.stats.picks += 1;
        });
        let note = match (moving, prev) {
            (false, _) => format!("picked {port} for pid {}", holder.pid),
            (true, Some(old)) => format!("moved from {old} to {port}"),
            (true, None) => format!("picked {port}"),
        };
        events.push(self.event(inner, Kind::Pick, &stamp, note));
        Ok(port)
    }

    /// One pass over the range under the registry lock: the lowest port that
    /// no lease names, no scan saw in use, and a bind probe confirms. Records
    /// the lease (and drops `replacing`'s) in the same transaction.
    fn try_pick(
        &self,
        inner: &mut Inner,
        replacing: Option<u16>,
        lease_for: &dyn Fn(u16) -> Lease,
    ) -> Result<Option<(u16, Leased)>> {
        let bound = &mut inner.bound;
        let range = self.range();
        self.registry.transact(|table| {
            let leased: PortSet = table.iter().map(|l| l.port).collect();
            let port = range.clone().find(|&port| {
                if leased.contains(port) || bound.contains(port) {
                    return false;
                }
                match probe_port(port) {
                    Probe::Free => true,
                    Probe::InUse | Probe::Unusable => {
                        bound.insert(port);
                        false
                    }
                }
            })?;
            table.insert(lease_for(port));
            if let Some(old) = replacing {
                table.remove_where(|l| l.port == old && l.owner == self.owner);
            }
            Some((port, leased_in(table, &range, &self.owner_prefix)))
        })
    }

    /// Frees the active port. `Ok(false)` when there was none.
    pub fn release_port(&self) -> Result<bool> {
        let mut events = Vec::new();
        let result = (|| {
            let mut guard = self.lock_inner();
            let inner = &mut *guard;
            if inner.stopped {
                return Err(Error::Stopped(self.path.clone()));
            }
            let Some(port) = inner.active else {
                return Ok(false);
            };
            let stamp = clock::now();
            let leases = self.drop_lease(port)?;
            inner.active = None;
            self.update_state(inner, &stamp, Some(leases), &mut events, |state| {
                state.record_change(&stamp.jalali, Some(port), None);
                state.stats.releases += 1;
            });
            events.push(self.event(inner, Kind::Release, &stamp, format!("released {port}")));
            Ok(true)
        })();
        self.sink.emit(&events);
        result
    }

    fn drop_lease(&self, port: u16) -> Result<Leased> {
        let range = self.range();
        self.registry.transact(|table| {
            table.remove_where(|l| l.port == port && l.owner == self.owner);
            leased_in(table, &range, &self.owner_prefix)
        })
    }

    /// Stops the manager: releases the active port and emits STOP. Idempotent.
    pub fn stop(&self) {
        let mut events = Vec::new();
        {
            let mut guard = self.lock_inner();
            let inner = &mut *guard;
            if inner.stopped {
                return;
            }
            inner.stopped = true;
            let stamp = clock::now();
            let note = match inner.active.take() {
                Some(port) => match self.drop_lease(port) {
                    Ok(leases) => {
                        self.update_state(inner, &stamp, Some(leases), &mut events, |state| {
                            state.record_change(&stamp.jalali, Some(port), None);
                            state.stats.releases += 1;
                        });
                        format!("DynamicPortManager stopped; released {port}.")
                    }
                    Err(e) => {
                        // The registry is unreachable: the lease stays until
                        // this process exits, when the next refresh reclaims it.
                        let message = format!("stop could not release {port}: {e}");
                        inner.state.record_error(&stamp.jalali, message.clone());
                        events.push(self.event(inner, Kind::Error, &stamp, message));
                        format!("DynamicPortManager stopped; {port} left to be reclaimed.")
                    }
                },
                None => {
                    self.save_only(inner, &stamp, &mut events);
                    "DynamicPortManager stopped.".into()
                }
            };
            events.push(self.event(inner, Kind::Stop, &stamp, note));
        }
        self.sink.emit(&events);
    }

    /// One refresh: the kernel's view of the range (`host` is a whole-host scan
    /// from the refresher, `None` where there is none), leases re-asserted,
    /// state saved. `reclaimed` are dead leases the refresher just removed.
    pub fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease]) {
        let mut events = Vec::new();
        {
            let mut guard = self.lock_inner();
            let inner = &mut *guard;
            if inner.stopped {
                return;
            }
            let stamp = clock::now();
            inner.bound = match host {
                Some(set) => set.clone(),
                None => scan::ports_in_use(self.range()),
            };
            self.reclaim_events(inner, reclaimed, &stamp, &mut events);
            let leases = self.leases_in_range(inner, &stamp, &mut events);
            let before = (
                inner.state.free_ports.clone(),
                inner.state.used_ports.clone(),
            );
            self.update_state(inner, &stamp, leases, &mut events, |_| {});
            if before.0 != inner.state.free_ports || before.1 != inner.state.used_ports {
                let note = format!(
                    "free {} -> {}, used {} -> {}",
                    before.0.len(),
                    inner.state.free_ports.len(),
                    before.1.len(),
                    inner.state.used_ports.len()
                );
                events.push(self.event(inner, Kind::Refresh, &stamp, note));
            }
        }
        self.sink.emit(&events);
    }

    /// The leases in range, re-asserting this manager's own lease if the
    /// registry lost it (file deleted or damaged): a port handed out stays held.
    fn leases_in_range(
        &self,
        inner: &mut Inner,
        stamp: &Stamp,
        events: &mut Vec<Event>,
    ) -> Option<Leased> {
        let range = self.range();
        let active = inner.active;
        let result = self.registry.transact(|table| {
            let mut conflict = None;
            if let Some(port) = active {
                match table.holder_of(port) {
                    None => table.insert(Lease {
                        port,
                        pid: self.holder.pid,
                        start_time: self.holder.start_time,
                        owner: self.owner.clone(),
                        since: stamp.iso.clone(),
                    }),
                    Some(l) if l.owner != self.owner => conflict = Some(l.clone()),
                    Some(_) => {}
                }
            }
            (leased_in(table, &range, &self.owner_prefix), conflict)
        });
        self.take_registry_notice(inner, stamp, events);
        match result {
            Ok((views, conflict)) => {
                if let Some(other) = conflict {
                    let message = format!(
                        "port {} held by this manager was leased to {} (pid {}) meanwhile",
                        other.port, other.owner, other.pid
                    );
                    inner.state.record_error(&stamp.jalali, message.clone());
                    events.push(self.event(inner, Kind::Error, stamp, message));
                }
                Some(views)
            }
            Err(e) => {
                let message = e.to_string();
                inner.state.record_error(&stamp.jalali, message.clone());
                events.push(self.event(inner, Kind::Error, stamp, message));
                None
            }
        }
    }

    fn take_registry_notice(&self, inner: &mut Inner, stamp: &Stamp, events: &mut Vec<Event>) {
        if let Some(notice) = self.registry.take_notice() {
            inner.state.record_error(&stamp.jalali, notice.clone());
            events.push(self.event(inner, Kind::Error, stamp, notice));
        }
    }

    fn reclaim_events(
        &self,
        inner: &Inner,
        reclaimed: &[Lease],
        stamp: &Stamp,
        events: &mut Vec<Event>,
    ) {
        for lease in reclaimed.iter().filter(|l| self.range().contains(&l.port)) {
            let note = format!(
                "reclaimed {} from {} (pid {} is gone)",
                lease.port, lease.owner, lease.pid
            );
            events.push(self.event(inner, Kind::Reclaim, stamp, note));
        }
    }

    /// Saves with no change but the refreshed lists (used by `stop`).
    fn save_only(&self, inner: &mut Inner, stamp: &Stamp, events: &mut Vec<Event>) {
        let leases = self.leases_in_range(inner, stamp, events);
        self.update_state(inner, stamp, leases, events, |_| {});
    }

    /// The read-modify-write of the state file, under its lock: adopt what
    /// another manager of the same file wrote, apply `change`, recompute the
    /// free and used lists, save (with a backup). Problems become `last_error`
    /// and ERROR/RECOVER events; none is raised, the state lives on in memory.
    fn update_state(
        &self,
        inner: &mut Inner,
        stamp: &Stamp,
        leases: Option<Leased>,
        events: &mut Vec<Event>,
        change: impl FnOnce(&mut State),
    ) {
        let Inner {
            state,
            store,
            lock,
            bound,
            leased,
            ..
        } = inner;
        let mut problems: Vec<(Kind, String)> = Vec::new();
        let guard = match lock.acquire(LOCK_WAIT) {
            Ok((guard, _)) => Some(guard),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                problems.push((
                    Kind::Error,
                    format!("cannot lock {}: {e}", store.lock_path().display()),
                ));
                None
            }
            // No lock file can be made (read-only folder): the save reports it.
            Err(_) => None,
        };
        let generation = guard.as_ref().map_or(0, |g| read_generation(g));
        match store.load(generation) {
            Loaded::Missing | Loaded::Unchanged => {}
            Loaded::Valid(disk) => adopt(state, *disk),
            Loaded::Corrupt { reason, moved_to } => {
                let aside = moved_to.map_or("it could not be moved aside".to_string(), |p| {
                    format!("moved aside to {}", p.display())
                });
                // Memory is newer than any backup once we are running; at
                // start-up memory is empty and the newest valid backup wins.
                let source = if state.change_count == 0 && state.last_checked.is_none() {
                    match store.newest_valid_backup() {
                        Some((backup, recovered)) => {
                            adopt(state, recovered);
                            format!("restored from backup {}", backup.name)
                        }
                        None => "no valid backup; started fresh".to_string(),
                    }
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
            Loaded::Unreadable(e) => problems.push((
                Kind::Error,
                format!("cannot read state file {}: {e}", store.path().display()),
            )),
        }
        change(state);
        if let Some(leases) = leases {
            state.leases = leases.mine;
            *leased = leases.ports;
        }
        recompute_lists(state, self.range(), leased, bound);
        state.last_checked = Some(stamp.jalali.clone());
        state.last_checked_unix = Some(stamp.unix);
        for (_, message) in &problems {
            state.record_error(&stamp.jalali, message.clone());
        }
        // Bump the lock file's counter before replacing the state file, so a
        // reader never pairs the new file with the old counter.
        let generation = match &guard {
            Some(g) => write_generation(g, generation.wrapping_add(1))
                .map_or(generation, |()| generation.wrapping_add(1)),
            None => generation,
        };
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
        for (kind, message) in problems {
            let event = self.event(inner, kind, stamp, message);
            events.push(event);
        }
    }

    fn event(&self, inner: &Inner, kind: Kind, stamp: &Stamp, note: String) -> Event {
        Event {
            kind,
            time: stamp.clone(),
            active: inner.active,
            free: PortSummary::of(&inner.state.free_ports),
            used: PortSummary::of(&inner.state.used_ports),
            note,
            state_file: self.path.display().to_string(),
        }
    }

    /// The ELK record of the current state (`log_json()`).
    pub fn json_record(&self) -> serde_json::Value {
        let inner = self.lock_inner();
        let note = "state snapshot".to_string();
        let mut record = self
            .event(&inner, Kind::Refresh, &clock::now(), note)
            .json();
        record["event.action"] = "log_json".into();
        record["current_port"] = inner.state.current_port.into();
        record["change_count"] = inner.state.change_count.into();
        record["last_error"] = inner.state.last_error.clone().into();
        record
    }

    /// The backups of this manager's state file, oldest first.
    pub fn backups(&self) -> Vec<Backup> {
        self.lock_inner().store.backups()
    }

    /// The path of the backup called `name`, only if it is one of this state
    /// file's backups; nothing else on disk is ever named by what a caller sends.
    pub fn backup_path(&self, name: &str) -> Option<PathBuf> {
        self.backups()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.path)
    }

    pub fn backup_dir(&self) -> PathBuf {
        self.lock_inner().store.backup_dir().to_path_buf()
    }
}

impl Manager {
    /// Gives the lease back when the last handle goes away without `stop()`,
    /// quietly: this may run during interpreter shutdown, when logging is no
    /// longer safe. The state file keeps the last saved state.
    pub fn abandon(&self) {
        let mut inner = self.lock_inner();
        if let (false, Some(port)) = (inner.stopped, inner.active.take()) {
            let owner = &self.owner;
            let _ = self
                .registry
                .transact(|t| t.remove_where(|l| l.port == port && &l.owner == owner));
        }
        inner.stopped = true;
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// The state before anything is read: this configuration's settings and options.
pub(crate) fn initial_state(config: &Config, registry: &Registry) -> State {
    let settings = Settings {
        port_range: [config.start, config.end],
        json_path: config.json_path.to_string_lossy().into_owned(),
        history_max: config.history_max,
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
pub(crate) struct Leased {
    pub(crate) ports: PortSet,
    pub(crate) mine: Vec<LeaseView>,
}

pub(crate) fn leased_in(table: &LeaseTable, range: &RangeInclusive<u16>, prefix: &str) -> Leased {
    let mut ports = PortSet::default();
    let mut mine = Vec::new();
    for lease in table.iter().filter(|l| range.contains(&l.port)) {
        ports.insert(lease.port);
        if lease.owner.starts_with(prefix) {
            mine.push(LeaseView {
                port: lease.port,
                pid: lease.pid,
                owner: lease.owner.clone(),
                since: lease.since.clone(),
            });
        }
    }
    mine.sort_by_key(|v| v.port);
    Leased { ports, mine }
}

/// used = leased or bound; free = the rest of the range.
pub(crate) fn recompute_lists(
    state: &mut State,
    range: RangeInclusive<u16>,
    leased: &PortSet,
    bound: &PortSet,
) {
    state.free_ports.clear();
    state.used_ports.clear();
    for port in range {
        if leased.contains(port) || bound.contains(port) {
            state.used_ports.push(port);
        } else {
            state.free_ports.push(port);
        }
    }
}
