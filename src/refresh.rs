//! The one background thread per process that refreshes every manager of the
//! process: one kernel scan and one dead-lease sweep per tick, shared by all
//! managers that are due, instead of a thread (and a scan) per manager.
//!
//! The schedule and the thread belong to the process (`sys/per_process.rs`): a
//! forked child starts with an empty schedule and no thread, and starts its
//! own thread when one of its managers is first used.
//!
//! The thread never touches Python itself; a manager's refresh emits its events
//! after releasing its own locks, and those may take the GIL to log.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::port_set::PortSet;
use crate::registry::{Lease, Registry};
use crate::scan;
use crate::sys::PerProcess;

/// What the refresh thread needs of a manager (`manager.rs` implements it;
/// this module knows nothing else of managers).
pub trait Refreshed: Send + Sync {
    fn range(&self) -> std::ops::RangeInclusive<u16>;
    fn registry(&self) -> Result<Arc<Registry>>;
    fn path(&self) -> &std::path::Path;
    /// One background refresh: `host` the kernel's view (if read),
    /// `reclaimed` the dead leases just taken back from its registry.
    fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease]);
}

type Manager = dyn Refreshed;

struct Entry {
    id: u64,
    manager: Weak<Manager>,
    interval: Duration,
    due: Instant,
}

#[derive(Default)]
struct Schedule {
    entries: Vec<Entry>,
    stop: bool,
    /// Set at interpreter exit: no thread is started any more (a manager
    /// made during shutdown works, unrefreshed, and delays nothing).
    shut: bool,
    /// Set by the thread itself as it ends, so `shutdown` can wait for it
    /// with a time limit.
    ended: bool,
    /// While the thread waits: until when (`None`: until woken). A new entry
    /// due later needs no wake-up (a thousand managers made in a row woke it
    /// a thousand times, each to find nothing due).
    waiting: Option<Option<Instant>>,
}

#[derive(Default)]
struct Refresher {
    schedule: Mutex<Schedule>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn refresher() -> &'static Arc<Refresher> {
    static REFRESHER: PerProcess<Arc<Refresher>> = PerProcess::new();
    REFRESHER.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts a manager on this process's schedule (first refresh one interval
/// from now; once, however often it is called) and starts the thread if this
/// process has none. The entries stay in id order (ids only grow, so a new one
/// goes at the end): finding one is a binary search, not a walk of them all.
pub fn register(id: u64, manager: Weak<Manager>, interval: Duration) {
    let r = refresher();
    {
        let mut schedule = lock(&r.schedule);
        if let Err(at) = schedule.entries.binary_search_by_key(&id, |e| e.id) {
            let due = Instant::now() + interval;
            schedule.entries.insert(
                at,
                Entry {
                    id,
                    manager,
                    interval,
                    due,
                },
            );
            // The thread is woken only if it would sleep past the new entry's
            // first refresh.
            let wake = match schedule.waiting {
                Some(None) => true,
                Some(Some(until)) => due < until,
                // Not waiting: it looks at the schedule again before it does.
                None => false,
            };
            drop(schedule);
            if wake {
                r.wake.notify_all();
            }
        }
    }
    ensure_thread(r);
}

/// Takes a manager off the schedule (on `stop()`, or when it is dropped).
/// The thread is not woken: an entry gone can only make its next wake-up
/// early (it finds nothing due and sleeps again), and a program that makes
/// and stops managers in a loop would otherwise switch to it and back for
/// every one.
pub fn unregister(id: u64) {
    let r = refresher();
    let mut schedule = lock(&r.schedule);
    if let Ok(at) = schedule.entries.binary_search_by_key(&id, |e| e.id) {
        schedule.entries.remove(at);
    }
}

/// How long interpreter exit waits for a refresh in progress to finish: a
/// refresh takes milliseconds; one stuck on another process's lock is left.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);

/// Stops the thread and waits for it, briefly (interpreter exit). Returns
/// promptly: the thread sleeps on a condition variable, not in a fixed sleep.
pub fn shutdown() {
    let r = refresher();
    let handle = lock(&r.thread).take();
    let mut schedule = lock(&r.schedule);
    schedule.stop = true;
    schedule.shut = true;
    r.wake.notify_all();
    let Some(handle) = handle else {
        return;
    };
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    while !schedule.ended {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return; // leave it: dropping the handle detaches it
        };
        schedule = match r.wake.wait_timeout(schedule, left) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
    drop(schedule);
    let _ = handle.join();
}

/// Is the refresh thread of this process running? (For tests and `repr`.)
pub fn is_running() -> bool {
    let r = refresher();
    let thread = lock(&r.thread);
    matches!(&*thread, Some(h) if !h.is_finished())
}

fn ensure_thread(r: &Arc<Refresher>) {
    let mut thread = lock(&r.thread);
    if matches!(&*thread, Some(h) if !h.is_finished()) {
        return;
    }
    if let Some(finished) = thread.take() {
        let _ = finished.join();
    }
    {
        let mut schedule = lock(&r.schedule);
        if schedule.shut {
            return;
        }
        schedule.stop = false;
        schedule.ended = false;
    }
    let worker = r.clone();
    let spawned = std::thread::Builder::new()
        .name("dynamic-port-manager-refresh".into())
        .spawn(move || run(&worker));
    // If no thread can be started the managers still work; they only go
    // unrefreshed (pick confirms every port with a probe anyway).
    if let Ok(handle) = spawned {
        *thread = Some(handle);
    }
}

fn run(r: &Refresher) {
    refresh_until_stopped(r);
    lock(&r.schedule).ended = true;
    r.wake.notify_all();
}

fn refresh_until_stopped(r: &Refresher) {
    while let Some(due) = next_due(r) {
        // One scan of the kernel tables for every due manager (of the ports
        // from the lowest start to the highest end of their ranges); where
        // there are no tables each manager probes its own range.
        let host = scan::kernel_tables(hull(&due)).ok();
        let mut swept: Vec<(Arc<Registry>, Vec<Lease>)> = Vec::new();
        // Each reclaimed lease is reported once per state file, not once per
        // manager of it.
        let mut told: Vec<(usize, &std::path::Path)> = Vec::new();
        for manager in &due {
            let Ok(registry) = manager.registry() else {
                continue;
            };
            let index = match swept.iter().position(|(r, _)| Arc::ptr_eq(r, &registry)) {
                Some(index) => index,
                None => {
                    let reclaimed = registry.sweep_dead();
                    swept.push((registry, reclaimed));
                    swept.len() - 1
                }
            };
            let first = !told.contains(&(index, manager.path()));
            if first {
                told.push((index, manager.path()));
            }
            let reclaimed: &[Lease] = if first { &swept[index].1 } else { &[] };
            manager.refresh(host.as_ref(), reclaimed);
        }
    }
}

/// The ports from the lowest start to the highest end of the managers' ranges.
fn hull(managers: &[Arc<Manager>]) -> std::ops::RangeInclusive<u16> {
    let start = managers.iter().map(|m| *m.range().start()).min();
    let end = managers.iter().map(|m| *m.range().end()).max();
    start.unwrap_or(0)..=end.unwrap_or(u16::MAX)
}

/// Waits until some manager is due (or the thread is told to stop: `None`),
/// and reschedules the due ones.
fn next_due(r: &Refresher) -> Option<Vec<Arc<Manager>>> {
    let mut schedule = lock(&r.schedule);
    loop {
        if schedule.stop {
            return None;
        }
        schedule.entries.retain(|e| e.manager.strong_count() > 0);
        let now = Instant::now();
        let next = schedule.entries.iter().map(|e| e.due).min();
        if next.is_some_and(|due| due <= now) {
            break;
        }
        schedule.waiting = Some(next);
        schedule = match next {
            Some(due) => r.wake.wait_timeout(schedule, due - now).ok()?.0,
            None => r.wake.wait(schedule).ok()?,
        };
        schedule.waiting = None;
    }
    let now = Instant::now();
    let mut due = Vec::new();
    for entry in schedule.entries.iter_mut().filter(|e| e.due <= now) {
        if let Some(manager) = entry.manager.upgrade() {
            entry.due = now + entry.interval;
            due.push(manager);
        }
    }
    Some(due)
}
