//! The one background thread per process that refreshes every manager of the
//! process: one kernel scan and one dead-lease sweep per tick, shared by all
//! managers that are due, instead of a thread (and a scan) per manager.
//!
//! The thread never touches Python itself; a manager's refresh emits its events
//! after releasing its own locks, and those may take the GIL to log.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::manager::Manager;
use crate::registry::{Lease, LeaseTable, Registry};
use crate::scan;

struct Entry {
    id: u64,
    manager: Weak<Manager>,
    due: Instant,
}

#[derive(Default)]
struct Schedule {
    entries: Vec<Entry>,
    stop: bool,
    /// Set by the thread itself as it ends, so `shutdown` can wait for it
    /// with a time limit.
    ended: bool,
}

struct Refresher {
    schedule: Mutex<Schedule>,
    wake: Condvar,
    /// The running thread and the pid that started it: after a fork the child
    /// has the handle but not the thread, and must start its own.
    thread: Mutex<Option<(u32, JoinHandle<()>)>>,
}

fn refresher() -> &'static Arc<Refresher> {
    static REFRESHER: OnceLock<Arc<Refresher>> = OnceLock::new();
    REFRESHER.get_or_init(|| {
        Arc::new(Refresher {
            schedule: Mutex::new(Schedule::default()),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        })
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds `manager` to the schedule (first refresh one interval from now) and
/// starts the thread if this process has none.
pub fn register(manager: &Arc<Manager>) {
    let r = refresher();
    {
        let mut schedule = lock(&r.schedule);
        schedule.stop = false;
        schedule.entries.push(Entry {
            id: manager.id(),
            manager: Arc::downgrade(manager),
            due: Instant::now() + manager.config().refresh_interval,
        });
    }
    ensure_thread(r);
    r.wake.notify_all();
}

/// Takes a manager off the schedule (on `stop()`).
pub fn unregister(id: u64) {
    let r = refresher();
    lock(&r.schedule).entries.retain(|e| e.id != id);
    r.wake.notify_all();
}

/// How long interpreter exit waits for a refresh in progress to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Stops the thread and waits for it (interpreter exit). Returns promptly: the
/// thread sleeps on a condition variable, not in a fixed sleep. A refresh
/// stuck on a lock another process holds does not hang the exit: after
/// `SHUTDOWN_WAIT` the thread is left behind.
pub fn shutdown() {
    let r = refresher();
    let handle = lock(&r.thread).take();
    let mut schedule = lock(&r.schedule);
    schedule.stop = true;
    r.wake.notify_all();
    let Some((pid, handle)) = handle else {
        return;
    };
    if pid != std::process::id() {
        forget_inherited(handle);
        return;
    }
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

/// A handle inherited through fork names a thread of the parent. Dropping it
/// would pthread_detach that pthread_t, which glibc may already have reused
/// for one of the child's own threads (the refresh thread the child starts),
/// making it unjoinable; so it is leaked instead.
fn forget_inherited(handle: JoinHandle<()>) {
    std::mem::forget(handle);
}

/// Is the refresh thread of this process running? (For tests and `repr`.)
pub fn is_running() -> bool {
    let r = refresher();
    let thread = lock(&r.thread);
    matches!(&*thread, Some((pid, h)) if *pid == std::process::id() && !h.is_finished())
}

fn ensure_thread(r: &Arc<Refresher>) {
    let mut thread = lock(&r.thread);
    let alive =
        matches!(&*thread, Some((pid, h)) if *pid == std::process::id() && !h.is_finished());
    if alive {
        return;
    }
    match thread.take() {
        Some((pid, handle)) if pid == std::process::id() => {
            let _ = handle.join(); // it has finished: reap it
        }
        Some((_, inherited)) => forget_inherited(inherited),
        None => {}
    }
    lock(&r.schedule).ended = false;
    let worker = r.clone();
    let spawned = std::thread::Builder::new()
        .name("dynamic-port-manager-refresh".into())
        .spawn(move || run(&worker));
    // If no thread can be started the managers still work; they only go
    // unrefreshed (pick confirms every port with a probe anyway).
    if let Ok(handle) = spawned {
        *thread = Some((std::process::id(), handle));
    }
}

fn run(r: &Refresher) {
    refresh_until_stopped(r);
    lock(&r.schedule).ended = true;
    r.wake.notify_all();
}

fn refresh_until_stopped(r: &Refresher) {
    while let Some(due) = next_due(r) {
        // One scan of the kernel tables for every due manager; where there are
        // no tables each manager probes its own range.
        let host = scan::kernel_tables().ok();
        let mut swept: Vec<(Arc<Registry>, Vec<Lease>)> = Vec::new();
        for manager in &due {
            let registry = manager.registry();
            if !swept.iter().any(|(r, _)| Arc::ptr_eq(r, registry)) {
                let reclaimed = registry
                    .transact(LeaseTable::remove_dead)
                    .unwrap_or_default();
                swept.push((registry.clone(), reclaimed));
            }
            let reclaimed = swept
                .iter()
                .find(|(r, _)| Arc::ptr_eq(r, registry))
                .map(|(_, l)| l.as_slice())
                .unwrap_or(&[]);
            manager.refresh(host.as_ref(), reclaimed);
        }
    }
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
        match schedule.entries.iter().map(|e| e.due).min() {
            Some(due) if due <= now => break,
            Some(due) => schedule = r.wake.wait_timeout(schedule, due - now).ok()?.0,
            None => schedule = r.wake.wait(schedule).ok()?,
        }
    }
    let now = Instant::now();
    let mut due = Vec::new();
    for entry in schedule.entries.iter_mut().filter(|e| e.due <= now) {
        if let Some(manager) = entry.manager.upgrade() {
            entry.due = now + manager.config().refresh_interval;
            due.push(manager);
        }
    }
    Some(due)
}
