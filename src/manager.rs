//! The manager: picks, releases and refreshes, composing the registry (who holds
//! which port, host-wide), the probe and scan (what the kernel says), and the
//! state file's shared view (`shared.rs`).
//!
//! A manager belongs to the process that uses it: everything that names this
//! process (the lease owner, the active port) or holds a lock lives in a
//! per-process part, so a forked child's manager holds no port of the parent,
//! never touches the parent's leases, and inherits no lock.
//!
//! Locking order, always: the manager's mutex, then the file view's, then the
//! registry's, and never the registry lock and a state-file lock at once.
//! Events are emitted only after every lock is released (see `events.rs`).

use std::io::ErrorKind;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::clock::{self, Stamp};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{Event, Kind, Origin, PortSummary, Sink};
use crate::holder::Holder;
use crate::probe::{probe_port, Probe};
use crate::registry::{self, Lease, Registry};
use crate::scan::{self, words_of, PortSet};
use crate::shared::{
    leased_in, lock_problem, owned_through, FileView, Leased, Save, SharedFile, Sweep,
};
use crate::state::{LeaseView, State};
use crate::store::Backup;
use crate::sys::PerProcess;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Manager {
    id: u64,
    me: Weak<Manager>,
    config: Config,
    /// The state file, absolute (fixed at construction, whatever `chdir` follows).
    path: PathBuf,
    registry_dir: PathBuf,
    stopped: AtomicBool,
    /// Made on first successful use in each process (a failed registry open
    /// is tried again at the next call, not kept).
    local: PerProcess<Local>,
}

/// The manager as one process sees it.
struct Local {
    holder: Holder,
    /// This manager's name in the registry: state file, pid, instance number.
    owner: String,
    registry: Arc<Registry>,
    file: Arc<SharedFile>,
    mine: Mutex<Mine>,
}

struct Mine {
    /// The port this manager holds a lease on, in this process.
    active: Option<u16>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("range", &(self.config.start, self.config.end))
            .field("path", &self.path)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not make every later call panic too.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Opens (or creates) the state file and joins the host registry. Emits START.
    pub fn new(config: Config) -> Result<Arc<Manager>> {
        let path = std::path::absolute(&config.json_path)
            .map_err(|e| Error::io(format!("json_path {:?}", config.json_path), e))?;
        let registry_dir =
            std::path::absolute(registry::resolve_dir(config.registry_dir.as_deref()))
                .map_err(|e| Error::io("registry_dir", e))?;
        let manager = Arc::new_cyclic(|me| Manager {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            me: me.clone(),
            config,
            path,
            registry_dir,
            stopped: AtomicBool::new(false),
            local: PerProcess::new(),
        });
        let local = manager.local()?;
        // A registry of another build's format is refused here, with the
        // version and what to do: a manager that started anyway would not
        // see that build's leases (or it ours) and hand out their ports.
        if let Err(e) = local.registry.check() {
            if e.io_error().map(std::io::Error::kind) == Some(ErrorKind::Unsupported) {
                return Err(e);
            }
        }
        if let Err(what) = local.file.lock().check_path() {
            return Err(Error::invalid(
                "json_path",
                format!(
                    "{} {what}; only a regular file can be a state file",
                    manager.path.display()
                ),
            ));
        }
        manager.start(local)?;
        Ok(manager)
    }

    /// This process's part, made on first use in each process (a forked
    /// child's manager starts with no port, under the child's own name).
    fn local(&self) -> Result<&Local> {
        self.local.get_or_try_init(|| {
            let registry = Registry::open(&self.registry_dir)?;
            let holder = Holder::current();
            let file = SharedFile::open(&self.path, &self.config, &registry);
            // Refreshed in every process that uses it (a forked child's
            // schedule starts empty).
            if !self.is_stopped() {
                let me: Weak<dyn crate::refresh::Refreshed> = self.me.clone();
                crate::refresh::register(self.id, me, self.config.refresh_interval);
            }
            Ok(Local {
                owner: format!("{}{}.{}", file.owner_prefix(), holder.pid, self.id),
                holder,
                registry,
                file,
                mine: Mutex::new(Mine { active: None }),
            })
        })
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

    pub fn registry_dir(&self) -> &Path {
        &self.registry_dir
    }

    /// This process's registry handle.
    pub fn registry(&self) -> Result<Arc<Registry>> {
        Ok(self.local()?.registry.clone())
    }

    pub fn active_port(&self) -> Option<u16> {
        self.local.current().and_then(|l| lock(&l.mine).active)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The state as last computed (what `get_state()` returns), with this
    /// manager's own active port as `current_port`.
    /// The state as fresh as the file: what any process saved since is read
    /// first (nothing is re-read when nothing changed), and a port whose only
    /// holder has died is taken back before the state is shown (used means
    /// held; a holder that cannot be checked stays).
    pub fn state(&self) -> State {
        match self.local() {
            Ok(local) => {
                let (any_dead, unscanned) = {
                    let mut file = local.file.lock();
                    file.catch_up();
                    let any_dead = !self.is_stopped() && local.registry.any_dead(&file.holders);
                    (any_dead, file.unscanned.is_some())
                };
                if any_dead {
                    let reclaimed = local.registry.sweep_dead();
                    self.refresh(None, &reclaimed, true);
                } else if unscanned && !self.is_stopped() {
                    self.first_scan(local);
                }
                let mine = lock(&local.mine);
                let mut state = local.file.lock().state.clone();
                state.current_port = mine.active;
                state
            }
            Err(_) => {
                let settings = crate::state::Settings {
                    port_range: [self.config.start, self.config.end],
                    json_path: self.config.json_path.to_string_lossy().into_owned(),
                    history_max: self.config.history_max,
                    service: self.config.service.clone(),
                };
                State::fresh(settings, Default::default())
            }
        }
    }

    /// A read shows what the kernel says, not only what the file said: the
    /// range's first scan, if none ran yet (taken outside the locks; written
    /// with the next save, reported now if it changed the lists).
    fn first_scan(&self, local: &Local) {
        let bound = scan::ports_in_use(self.range());
        let mut events = Vec::new();
        {
            let mine = lock(&local.mine);
            let mut file = local.file.lock();
            if file.unscanned.is_none() {
                return;
            }
            if let Some(before) = file.first_scan(self.range(), bound) {
                let after = (file.state.free_ports.len(), file.state.used_ports.len());
                let note = format!(
                    "free {} -> {}, used {} -> {}",
                    before.0, after.0, before.1, after.1
                );
                events.push(self.event(&mine, &file, Kind::Refresh, &clock::now(), note));
            }
        }
        self.sink().emit(&events);
    }

    fn range(&self) -> RangeInclusive<u16> {
        self.config.start..=self.config.end
    }

    fn sink(&self) -> Sink {
        Sink {
            console: self.config.console_log,
        }
    }

    /// Loads or recovers the state (once per file view), saves. Emits START.
    /// No scan of the host on the way: a pick needs none (its bind probe
    /// decides), and until the first scan (a read, a refresh, or a pick that
    /// finds the range full) the state keeps what the file said of the ports
    /// nothing looked at.
    fn start(&self, local: &Local) -> Result<()> {
        let stamp = clock::now();
        let mut events = Vec::new();
        {
            let mine = lock(&local.mine);
            let mut file = local.file.lock();
            let first = !file.started;
            let mut warnings = Vec::new();
            if first {
                file.tidy(Sweep::IfChanged);
                file.ephemeral = ephemeral_warning(self.range(), &mut warnings);
            }
            let held = match file.lock_slot(true) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    return Err(Error::io(lock_problem(&file.store, &e), e));
                }
                held => held,
            };
            if let Some(why) = registry::fallback_notice(&self.registry_dir) {
                warnings.push((Kind::Warning, why));
            }
            if let Some(uid) = file.lock_owner_if_foreign() {
                warnings.push((
                    Kind::Warning,
                    format!(
                        "{} belongs to uid {uid}, another user, who can hold this state \
                         file's lock and stall every save; keep state files in a folder \
                         only their user can write",
                        file.store.lock_path().display()
                    ),
                ));
            }
            let (leases, problems) = self.leases_in_range(local, &mine, &stamp);
            // A current_port left by a manager that is gone is no one's port.
            let live: Vec<u16> = leases
                .iter()
                .flat_map(|l| l.mine.iter().map(|v| v.port))
                .collect();
            // A start that finds the file as it would write it writes nothing
            // (a missing or damaged file is always written).
            let problems = file.update(
                held,
                self.range(),
                &stamp,
                leases,
                Save::IfChanged,
                problems,
                |s| {
                    if s.current_port.is_some_and(|p| !live.contains(&p)) {
                        s.current_port = None;
                    }
                },
            );
            if first {
                file.store.prime_backup_cache();
                file.started = true;
            }
            self.push_problems(&mut events, &mine, &file, &stamp, warnings);
            self.push_problems(&mut events, &mine, &file, &stamp, problems);
            let note = "DynamicPortManager started.".to_string();
            events.push(self.event(&mine, &file, Kind::Start, &stamp, note));
        }
        self.sink().emit(&events);
        Ok(())
    }

    /// Picks the lowest free port of the range and makes it the active port
    /// (releasing the previous one). With `for_pid`, the lease is held by that
    /// process until it exits, and this manager's active port is unchanged.
    pub fn pick_port(&self, for_pid: Option<u32>) -> Result<u16> {
        let mut events = Vec::new();
        let result = self.pick_locked(for_pid, &mut events);
        self.sink().emit(&events);
        result
    }

    fn pick_locked(&self, for_pid: Option<u32>, events: &mut Vec<Event>) -> Result<u16> {
        if self.is_stopped() {
            return Err(Error::Stopped(self.path.clone()));
        }
        let local = self.local()?;
        let mut mine = lock(&local.mine);
        let holder = match for_pid {
            None => local.holder,
            Some(pid) => Holder::of_pid(pid).ok_or_else(|| {
                Error::invalid("pid", format!("no running process has pid {pid}"))
            })?,
        };
        let mut file = local.file.lock();
        // The state file's lock first, before the registry changes: a wait
        // that Ctrl-C or the time limit ends leaves nothing half done. A lock
        // file that cannot be used at all (a read-only folder) leaves the
        // pick to go on, recorded in memory.
        let held = match file.lock_slot(true) {
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::TimedOut) => {
                let problem = lock_problem(&file.store, &e);
                return Err(Error::io(format!("{problem}; nothing was changed"), e));
            }
            held => held,
        };
        let stamp = clock::now();
        let prev = mine.active;
        let moving = for_pid.is_none();
        let owner = if moving {
            local.owner.clone()
        } else {
            format!("{}pid", local.file.owner_prefix())
        };
        let lease = |port| Lease {
            port,
            pid: holder.pid,
            start_time: holder.start_time,
            owner: owner.clone(),
            since: stamp.iso.clone(),
            service: self.config.service.clone(),
        };
        let replacing = moving.then_some(prev).flatten();
        let mut picked = self.try_pick(local, &mut file, replacing, &lease)?;
        if picked.0.is_none() {
            // Exhausted as far as we knew: look at the kernel afresh.
            file.scanned(scan::ports_in_use(self.range()));
            let again = self.try_pick(local, &mut file, replacing, &lease)?;
            picked.0 = again.0;
            picked.1.extend(again.1);
        }
        let (found, reclaimed) = picked;
        let mut problems = self.registry_notice(local);
        let reclaimed_here = self.reclaim_events(local, &mine, &file, &reclaimed, &stamp, events);
        let Some((port, leases)) = found else {
            let leased = file.leased.count_in(self.range());
            let err = Error::NoFreePort {
                start: self.config.start,
                end: self.config.end,
                leased,
                bound: file.bound.count_in(self.range()),
            };
            problems.push((Kind::Error, err.to_string()));
            let problems = file.update(
                held,
                self.range(),
                &stamp,
                None,
                Save::Always,
                problems,
                |s| {
                    for port in reclaimed_here {
                        s.record_reclaim(&stamp.jalali, port);
                    }
                },
            );
            self.push_problems(events, &mine, &file, &stamp, problems);
            return Err(err);
        };
        if moving {
            mine.active = Some(port);
        }
        // Every pick is recorded. A pick on behalf of another pid is not a
        // change of this manager's active port: its entry has no `prev`.
        let problems = file.update(
            held,
            self.range(),
            &stamp,
            Some(leases),
            Save::Always,
            problems,
            |s| {
                for old in reclaimed_here {
                    s.record_reclaim(&stamp.jalali, old);
                }
                if moving {
                    s.record_change(&stamp.jalali, prev, Some(port));
                } else {
                    s.record_handout(&stamp.jalali, port);
                }
                s.stats.picks += 1;
            },
        );
        self.push_problems(events, &mine, &file, &stamp, problems);
        let note = match (moving, prev) {
            (false, _) => format!("picked {port} for pid {}", holder.pid),
            (true, Some(old)) => format!("moved from {old} to {port}"),
            (true, None) => format!("picked {port}"),
        };
        let event = self.event(&mine, &file, Kind::Pick, &stamp, note);
        events.push(
            event
                .with_port(Some(port))
                .with_prev(prev.filter(|_| moving))
                .with_pid(holder.pid),
        );
        Ok(port)
    }

    /// One pass over the range under the registry lock: the lowest port that
    /// no live holder's lease names, no scan saw in use, and a bind probe
    /// confirms. Leases of dead holders below it are taken back on the way
    /// (returned), so the lowest free port is never kept by a process that
    /// exited. Records the lease (and drops `replacing`'s) in the same
    /// transaction.
    fn try_pick(
        &self,
        local: &Local,
        file: &mut FileView,
        replacing: Option<u16>,
        lease: &dyn Fn(u16) -> Lease,
    ) -> Result<Picked> {
        let mut memo = file.leased_memo.take();
        let bound = &mut file.bound;
        let skipped = &file.skipped;
        let range = self.range();
        let owner = &local.owner;
        let prefix = local.file.owner_prefix();
        let picked = local.registry.transact_seeing(|table, seen| {
            let mut reclaimed = Vec::new();
            // Checked under the registry's lock: the exit hook's release of
            // this process's leases comes after this pick or sees its lease.
            if crate::exit::begun() {
                return Err((None, reclaimed));
            }
            // One pass over the table for both the search and the state's
            // view (none if the table is as the last pick left it); it is
            // kept up to date below rather than built again.
            let (port, mut leased) = loop {
                let leased = match memo.take() {
                    Some((version, leased)) if version == table.version() && version != 0 => leased,
                    _ => leased_in(table, &range, prefix),
                };
                let found = match lowest_free(range.clone(), &leased.ports, bound, skipped) {
                    Ok(found) => found,
                    // Nothing was learnt: no holder is checked, nothing taken.
                    Err(e) => return Err((Some(e), reclaimed)),
                };
                let dead = table.remove_dead_among(&range, found, &leased.holders, seen);
                if dead.is_empty() {
                    break (found, leased);
                }
                reclaimed.extend(dead);
            };
            let Some(port) = port else {
                return Ok((None, reclaimed, None));
            };
            let new = lease(port);
            leased.ports.insert(port);
            crate::registry::note_holder(&mut leased.holders, new.holder(), port);
            if crate::shared::owned_through(&new.owner, prefix) {
                leased.mine.push(LeaseView::of(&new));
                leased.mine.sort_by_key(|v| v.port);
            }
            table.insert(new);
            if let Some(old) = replacing {
                let gone = table.remove_where(|l| l.port == old && &l.owner == owner);
                if !gone.is_empty() {
                    leased
                        .mine
                        .retain(|v| !(v.port == old && &v.owner == owner));
                    if table.holder_of(old).is_none() {
                        leased.ports.remove(old);
                    }
                }
            }
            // A holder's lowest port may now be one it gave up: too low is
            // safe (it is only checked for being alive once more).
            let memo = (table.version_after(), leased.clone());
            Ok((Some((port, leased)), reclaimed, Some(memo)))
        })?;
        let (picked, reclaimed, memo) = match picked {
            Ok(picked) => picked,
            Err((None, _)) => return Err(Error::Stopped(self.path.clone())),
            Err((Some(e), _)) => {
                return Err(Error::io(
                    format!(
                        "cannot look for a free port in {}-{} (a bind probe failed)",
                        self.config.start, self.config.end
                    ),
                    e,
                ))
            }
        };
        file.leased_memo = memo;
        Ok((picked, reclaimed))
    }

    /// Frees the active port. `Ok(false)` when there was none.
    pub fn release_port(&self) -> Result<bool> {
        let mut events = Vec::new();
        let result = (|| {
            if self.is_stopped() {
                return Err(Error::Stopped(self.path.clone()));
            }
            let local = self.local()?;
            let mut mine = lock(&local.mine);
            let Some(port) = mine.active else {
                return Ok(false);
            };
            let mut file = local.file.lock();
            // As a pick: the lock first, so a release is never half done.
            let held = match file.lock_slot(true) {
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::TimedOut) => {
                    let problem = lock_problem(&file.store, &e);
                    return Err(Error::io(format!("{problem}; {port} is still held"), e));
                }
                held => held,
            };
            let stamp = clock::now();
            let leases = self.drop_lease(local, port)?;
            mine.active = None;
            // The holder has usually closed its listener by now: look again,
            // so the state shows the port free at once (or still in use).
            match probe_port(port) {
                Probe::Free => file.seen_free(port),
                Probe::InUse | Probe::Unusable => file.bound.insert(port),
                // No answer: what was known of the port stays as it was.
                Probe::Unknown(_) => {}
            }
            let problems = self.registry_notice(local);
            let problems = file.update(
                held,
                self.range(),
                &stamp,
                Some(leases),
                Save::Always,
                problems,
                |s| {
                    s.record_change(&stamp.jalali, Some(port), None);
                    s.stats.releases += 1;
                },
            );
            self.push_problems(&mut events, &mine, &file, &stamp, problems);
            let note = format!("released {port}");
            let event = self.event(&mine, &file, Kind::Release, &stamp, note);
            events.push(event.with_port(Some(port)));
            Ok(true)
        })();
        self.sink().emit(&events);
        result
    }

    fn drop_lease(&self, local: &Local, port: u16) -> Result<Leased> {
        let range = self.range();
        local.registry.transact_removing(|table| {
            table.remove_where(|l| l.port == port && l.owner == local.owner);
            leased_in(table, &range, local.file.owner_prefix())
        })
    }

    /// Stops the manager: releases the active port and emits STOP. Idempotent.
    /// Needs no new file descriptor to give the port back.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::refresh::unregister(self.id);
        // In a process that never used this manager there is nothing of it here.
        let Some(local) = self.local.current() else {
            return;
        };
        let mut events = Vec::new();
        {
            let mut mine = lock(&local.mine);
            let mut file = local.file.lock();
            // Stopping always gives the port back; only the record waits.
            let held = file.lock_slot(false);
            let stamp = clock::now();
            let released_port = mine.active.take();
            let (leases, mut problems, note) = match released_port {
                Some(port) => match self.drop_lease(local, port) {
                    Ok(leases) => (
                        Some(leases),
                        Vec::new(),
                        format!("DynamicPortManager stopped; released {port}."),
                    ),
                    Err(e) => (
                        None,
                        // The registry is unreachable: the lease stays until
                        // this process exits, and is reclaimed then.
                        vec![(Kind::Error, format!("stop could not release {port}: {e}"))],
                        format!("DynamicPortManager stopped; {port} left to be reclaimed."),
                    ),
                },
                None => (None, Vec::new(), "DynamicPortManager stopped.".into()),
            };
            let released = leases.as_ref().and(released_port);
            problems.extend(self.registry_notice(local));
            let save = if released.is_some() {
                Save::Always
            } else {
                Save::IfChanged
            };
            let problems = file.update(held, self.range(), &stamp, leases, save, problems, |s| {
                if let Some(port) = released {
                    s.record_change(&stamp.jalali, Some(port), None);
                    s.stats.releases += 1;
                }
            });
            self.push_problems(&mut events, &mine, &file, &stamp, problems);
            let event = self.event(&mine, &file, Kind::Stop, &stamp, note);
            events.push(event.with_port(released_port));
        }
        self.sink().emit(&events);
    }

    /// One refresh: this manager's lease re-asserted, and (once per file and
    /// interval, whichever manager of the file comes first) the kernel's view
    /// of the range, with the state saved if what it shows changed. `host` is
    /// a whole-host scan from the refresher (`None` where there is none);
    /// `reclaimed` are dead leases the refresher just removed.
    /// `asked`: called for by the user (`refresh()`), not the background
    /// thread: the folder is swept for stale temporary files every time.
    pub fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease], asked: bool) {
        if self.is_stopped() {
            return;
        }
        let Ok(local) = self.local() else {
            return;
        };
        let mut events = Vec::new();
        {
            let mine = lock(&local.mine);
            let mut file = local.file.lock();
            let stamp = clock::now();
            // An asked-for refresh always looks at the kernel and the registry
            // afresh; the background one once per file and half an interval.
            let due = asked
                || file
                    .refreshed
                    .is_none_or(|at| at.elapsed() >= self.config.refresh_interval / 2);
            // Between the file's scans, a manager only makes sure its own
            // lease is still recorded (cheap: a thousand managers idle at a
            // fraction of a percent of one core).
            let (_, quick_problems, reinserted) = self.reassert(local, &mine, &stamp, false);
            let reclaimed_here =
                self.reclaim_events(local, &mine, &file, reclaimed, &stamp, &mut events);
            if !due && quick_problems.is_empty() && !reinserted && reclaimed_here.is_empty() {
                drop((mine, file));
                self.sink().emit(&events);
                return;
            }
            let (leases, mut problems) = self.leases_in_range(local, &mine, &stamp);
            for problem in quick_problems {
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
            file.refreshed = Some(std::time::Instant::now());
            file.scanned(match host {
                Some(set) => set.clone(),
                None => scan::ports_in_use(self.range()),
            });
            file.tidy(if asked { Sweep::Asked } else { Sweep::Periodic });
            let held = file.lock_slot(false);
            let before = (file.state.free_ports.len(), file.state.used_ports.len());
            let problems = file.update(
                held,
                self.range(),
                &stamp,
                leases,
                Save::IfChanged,
                problems,
                |s| {
                    for port in reclaimed_here {
                        s.record_reclaim(&stamp.jalali, port);
                    }
                },
            );
            self.push_problems(&mut events, &mine, &file, &stamp, problems);
            let after = (file.state.free_ports.len(), file.state.used_ports.len());
            if before != after {
                let note = format!(
                    "free {} -> {}, used {} -> {}",
                    before.0, after.0, before.1, after.1
                );
                events.push(self.event(&mine, &file, Kind::Refresh, &stamp, note));
            }
        }
        self.sink().emit(&events);
    }

    /// The leases in range, re-asserting this manager's own lease if the
    /// registry lost it (file deleted or damaged): a port handed out stays
    /// held. A problem is returned for `last_error`, not recorded here (it
    /// must outlive the adoption of the file's state).
    fn leases_in_range(
        &self,
        local: &Local,
        mine: &Mine,
        stamp: &Stamp,
    ) -> (Option<Leased>, Vec<(Kind, String)>) {
        let (leased, problems, _) = self.reassert(local, mine, stamp, true);
        (leased, problems)
    }

    /// Re-records this manager's lease if the registry lost it, and (with
    /// `view`) reads the leases in range. The flag says whether the lease had
    /// to be re-recorded. Cheap without `view`: no copy of the table.
    fn reassert(
        &self,
        local: &Local,
        mine: &Mine,
        stamp: &Stamp,
        view: bool,
    ) -> (Option<Leased>, Vec<(Kind, String)>, bool) {
        let range = self.range();
        let mut reinserted = false;
        let result = local.registry.transact(|table| {
            let mut conflict = None;
            if let Some(port) = mine.active {
                match table.holder_of(port) {
                    None => {
                        reinserted = true;
                        table.insert(Lease {
                            port,
                            pid: local.holder.pid,
                            start_time: local.holder.start_time,
                            owner: local.owner.clone(),
                            since: stamp.iso.clone(),
                            service: self.config.service.clone(),
                        })
                    }
                    Some(l) if l.owner != local.owner => conflict = Some(l.clone()),
                    Some(_) => {}
                }
            }
            let views = view.then(|| leased_in(table, &range, local.file.owner_prefix()));
            (views, conflict)
        });
        let mut problems = self.registry_notice(local);
        match result {
            Ok((views, conflict)) => {
                if let Some(other) = conflict {
                    problems.push((
                        Kind::Error,
                        format!(
                            "port {} held by this manager was leased to {} (pid {}) meanwhile",
                            other.port, other.owner, other.pid
                        ),
                    ));
                }
                (views, problems, reinserted)
            }
            Err(e) => {
                problems.push((Kind::Error, e.to_string()));
                (None, problems, reinserted)
            }
        }
    }

    fn registry_notice(&self, local: &Local) -> Vec<(Kind, String)> {
        local
            .registry
            .take_notice()
            .map(|notice| (Kind::Error, notice))
            .into_iter()
            .collect()
    }

    /// RECLAIM events for the dead holders' leases in this range; returns
    /// the ports that were this state file's (their history records it).
    fn reclaim_events(
        &self,
        local: &Local,
        mine: &Mine,
        file: &FileView,
        reclaimed: &[Lease],
        stamp: &Stamp,
        events: &mut Vec<Event>,
    ) -> Vec<u16> {
        let mut here = Vec::new();
        for lease in reclaimed.iter().filter(|l| self.range().contains(&l.port)) {
            let note = format!(
                "reclaimed {} from {} (pid {} is gone)",
                lease.port, lease.owner, lease.pid
            );
            let event = self.event(mine, file, Kind::Reclaim, stamp, note);
            events.push(event.with_port(Some(lease.port)).with_pid(lease.pid));
            if owned_through(&lease.owner, local.file.owner_prefix()) {
                here.push(lease.port);
            }
        }
        here
    }

    fn push_problems(
        &self,
        events: &mut Vec<Event>,
        mine: &Mine,
        file: &FileView,
        stamp: &Stamp,
        problems: Vec<(Kind, String)>,
    ) {
        for (kind, message) in problems {
            events.push(self.event(mine, file, kind, stamp, message));
        }
    }

    fn event(
        &self,
        mine: &Mine,
        file: &FileView,
        kind: Kind,
        stamp: &Stamp,
        note: String,
    ) -> Event {
        Event {
            kind,
            time: stamp.clone(),
            active: mine.active,
            free: PortSummary::of(&file.state.free_ports),
            used: PortSummary::of(&file.state.used_ports),
            note,
            state_file: self.path.display().to_string(),
            service: self.config.service.clone(),
            port: None,
            prev: None,
            pid: std::process::id(),
        }
    }

    /// The ECS record of the current state (`log_json()`), from `origin`.
    pub fn json_record(&self, origin: &Origin) -> serde_json::Value {
        let state = self.state();
        let stamp = clock::now();
        let event = Event {
            kind: Kind::Refresh,
            time: stamp,
            active: state.current_port,
            free: PortSummary::of(&state.free_ports),
            used: PortSummary::of(&state.used_ports),
            note: "state snapshot".into(),
            state_file: self.path.display().to_string(),
            service: self.config.service.clone(),
            port: state.current_port,
            prev: None,
            pid: std::process::id(),
        };
        let mut record = event.json(origin);
        record["event.action"] = "log_json".into();
        record["dpm.event"] = "log_json".into();
        record["dpm.current_port"] = state.current_port.into();
        record["dpm.change_count"] = state.change_count.into();
        record["dpm.last_error"] = state.last_error.clone().into();
        record["dpm.error_active"] = state.error_active.into();
        record
    }

    /// The backups of this manager's state file, oldest first (none when the
    /// backups folder is not to be trusted).
    pub fn backups(&self) -> Vec<Backup> {
        match self.local() {
            Ok(local) => local.file.lock().store.backups().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The path of the backup called `name`, only if it is one of this state
    /// file's backups; nothing else on disk is ever named by what a caller sends.
    pub fn backup_path(&self, name: &str) -> Option<PathBuf> {
        self.backups()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.path)
    }

    /// The content of backup `name`, if it is one of this state file's
    /// backups and still the file that was read (see `Store::read_backup`).
    pub fn read_backup(&self, name: &str) -> Option<Vec<u8>> {
        let local = self.local().ok()?;
        let mut file = local.file.lock();
        file.store.read_backup(name)
    }

    pub fn backup_dir(&self) -> PathBuf {
        self.path.parent().unwrap_or(Path::new("/")).join("backups")
    }

    /// Gives the lease back when the last handle goes away without `stop()`,
    /// quietly: this may run during interpreter shutdown, when logging is no
    /// longer safe. The state file keeps the last saved state.
    pub fn abandon(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::refresh::unregister(self.id);
        let Some(local) = self.local.current() else {
            return;
        };
        if let Some(port) = lock(&local.mine).active.take() {
            let _ = local.registry.transact_removing(|t| {
                t.remove_where(|l| l.port == port && l.owner == local.owner)
            });
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Says (a WARNING) where the range overlaps the kernel's ephemeral range.
fn ephemeral_warning(
    range: RangeInclusive<u16>,
    warnings: &mut Vec<(Kind, String)>,
) -> Option<crate::state::EphemeralOverlap> {
    let o = crate::port_policy::ephemeral_overlap(range)?;
    warnings.push((
        Kind::Warning,
        format!(
            "{} ports of the range ({}-{}) lie in the kernel's ephemeral port range {}-{}: \
             any outgoing connection may take one without asking. Reserve them with \
             `sysctl -w net.ipv4.ip_local_reserved_ports={}-{}` (keep any already \
             reserved), or choose a range outside {}-{}.",
            o.count,
            o.first,
            o.last,
            o.ephemeral[0],
            o.ephemeral[1],
            o.first,
            o.last,
            o.ephemeral[0],
            o.ephemeral[1]
        ),
    ));
    Some(crate::state::EphemeralOverlap {
        ephemeral_range: o.ephemeral,
        first: o.first,
        last: o.last,
        count: o.count,
    })
}

/// What one pass found: the port with the leases after it was recorded (none
/// if the range is full), and the dead holders' leases taken back on the way.
type Picked = (Option<(u16, Leased)>, Vec<Lease>);

/// The lowest port of `range` that is neither leased nor known bound and
/// that a bind probe finds free (ports found in use are added to `bound`).
/// The lowest port of `range` that no lease names, no scan saw in use and a
/// bind probe confirms free. `Err` when a probe could not be made (this
/// process is out of descriptors, say): the search stops there, since what
/// lies above says nothing of the ports it could not look at.
fn lowest_free(
    range: RangeInclusive<u16>,
    leased: &PortSet,
    bound: &mut PortSet,
    skipped: &PortSet,
) -> std::result::Result<Option<u16>, std::io::Error> {
    // 64 ports at a time: in a range that is nearly all leased, the search
    // skips whole words instead of looking up each port three times.
    for (start, inside) in words_of(&range) {
        let mut open = inside & !(leased.word(start) | bound.word(start) | skipped.word(start));
        while open != 0 {
            let port = start + open.trailing_zeros() as u16;
            open &= open - 1;
            match probe_port(port) {
                Probe::Free => return Ok(Some(port)),
                Probe::InUse | Probe::Unusable => bound.insert(port),
                Probe::Unknown(errno) => {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
            }
        }
    }
    Ok(None)
}

impl crate::refresh::Refreshed for Manager {
    fn range(&self) -> RangeInclusive<u16> {
        Manager::range(self)
    }

    fn registry(&self) -> Result<Arc<Registry>> {
        Manager::registry(self)
    }

    fn path(&self) -> &Path {
        Manager::path(self)
    }

    fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease]) {
        Manager::refresh(self, host, reclaimed, false);
    }
}
