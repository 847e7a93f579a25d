//! Lock files: never replaced, holding change counters, locked around every
//! read-modify-write of the registry (`flock`, here) and of a state file (a
//! byte range of its folder's lock file, `folder_lock.rs`); bounded and
//! interruptible waits for both.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::dir::{Dir, Open, Stat};
use super::printable;

/// How long a manager waits for a registry or state-file lock that another
/// process holds. Locks are held for microseconds; one held this long belongs
/// to a process that is stopped or stuck, and an error says so instead of a
/// pick that never returns.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(30);

/// How often a lock wait asks whether the caller was interrupted (Ctrl-C).
const INTERRUPT_CHECK: Duration = Duration::from_millis(100);

thread_local! {
    /// Set by the binding around a call from Python: says whether a signal
    /// (SIGINT) is pending, so a lock wait can give up and let it be raised.
    static INTERRUPT: std::cell::Cell<Option<fn() -> bool>> = const { std::cell::Cell::new(None) };
    /// A shorter limit for every lock wait of this thread (interpreter exit).
    static WAIT_CAP: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with interruptible lock waits on this thread polling
/// `interrupted` every 100 ms; a wait it answers `true` for fails with
/// `ErrorKind::Interrupted`.
pub(crate) fn with_interrupt_check<R>(interrupted: fn() -> bool, f: impl FnOnce() -> R) -> R {
    let before = INTERRUPT.with(|c| c.replace(Some(interrupted)));
    let result = f();
    INTERRUPT.with(|c| c.set(before));
    result
}

/// Runs `f` with every lock wait of this thread limited to `cap`.
pub(crate) fn with_wait_cap<R>(cap: Duration, f: impl FnOnce() -> R) -> R {
    let before = WAIT_CAP.with(|c| c.replace(Some(cap)));
    let result = f();
    WAIT_CAP.with(|c| c.set(before));
    result
}

/// The registry's lock held: fd-lock's guard over the lock file, which
/// releases the `flock` when dropped and reads as the file (whose header the
/// holder reads and writes).
pub(crate) type FlockGuard<'a> = fd_lock::RwLockWriteGuard<'a, File>;

/// What a wait for a lock ended with.
pub(super) enum Taken {
    Locked,
    /// The lock is held elsewhere and the name no longer names the file this
    /// descriptor locks: the one to lock now is the new file.
    Replaced,
}

/// Takes `lock` exclusively, waiting at most `wait` (see `wait_for`). While
/// it is held elsewhere, `replaced` is asked whether the name still names
/// the file.
///
/// The wait holds no guard across tries (a guard returned from inside the
/// loop would keep `lock` borrowed for all of them): a try that succeeds
/// keeps its flock and forgets its guard (which owns nothing else); the
/// caller then takes the guard on a lock this descriptor already holds,
/// which succeeds at once (flock belongs to the open file description).
fn lock_within(
    lock: &mut fd_lock::RwLock<File>,
    wait: Duration,
    interruptible: bool,
    replaced: impl Fn() -> bool,
) -> io::Result<Taken> {
    wait_for(wait, interruptible, || match lock.try_write() {
        Ok(guard) => {
            std::mem::forget(guard);
            Ok(Some(Taken::Locked))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && replaced() => Ok(Some(Taken::Replaced)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    })
}

/// Retries `attempt` (`None`: the lock is held elsewhere) until it succeeds,
/// for at most `wait`. Polls with a backoff from 20 us to 1 ms rather than
/// blocking in the kernel, which could not be given up (measured: the same
/// throughput as a blocking flock with 8 processes picking). An
/// `interruptible` wait gives up when the thread's interrupt check says so.
pub(super) fn wait_for<G>(
    wait: Duration,
    interruptible: bool,
    mut attempt: impl FnMut() -> io::Result<Option<G>>,
) -> io::Result<G> {
    let wait = WAIT_CAP
        .with(|cap| cap.get())
        .map_or(wait, |cap| wait.min(cap));
    let started = Instant::now();
    let deadline = started + wait;
    let mut next_check = started + INTERRUPT_CHECK;
    let mut pause = Duration::from_micros(20);
    loop {
        match attempt() {
            Ok(Some(guard)) => return Ok(guard),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + INTERRUPT_CHECK;
            let check = INTERRUPT
                .with(|check| check.get())
                .filter(|_| interruptible);
            if check.is_some_and(|interrupted| interrupted()) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "interrupted while waiting for a lock",
                ));
            }
        }
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "lock held by another process for more than {} s",
                    wait.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// A lock file that stays this process's own. flock belongs to the open file
/// description, which a forked child shares with its parent, so after a fork
/// the child opens its own; and if the name no longer names the file we hold
/// (a /tmp cleaner deleted it), we open the new one, or processes locking the
/// old inode and the new one would not exclude each other. The registry's
/// (state files lock a slot of their folder's, `folder_lock.rs`).
pub(crate) struct LockFile {
    /// Its name in the folder passed to `acquire`.
    name: OsString,
    /// `None` until it could be opened (a read-only folder, say).
    held: Option<HeldLock>,
}

struct HeldLock {
    lock: fd_lock::RwLock<File>,
    pid: u32,
    id: (u64, u64),
}

/// How many times a lock is taken again when the name was replaced by
/// another file while this process waited for (or took) the lock on the old
/// one: a lock on a file nobody else opens any more excludes no one.
pub(super) const REPLACED_RETRIES: u32 = 8;

impl LockFile {
    pub(crate) fn new(name: impl Into<OsString>) -> LockFile {
        LockFile {
            name: name.into(),
            held: None,
        }
    }

    /// Takes the lock (the file `name` in `dir`, created if missing, never
    /// through a link) exclusively within `wait` (see `lock_within`). The flag
    /// says whether the file was (re)opened for this call: whatever was cached
    /// under the old one is not to be trusted. An `interruptible` wait gives
    /// up when the thread's interrupt check says so (see `with_interrupt_check`):
    /// only for waits before anything was changed.
    ///
    /// The name is looked at once, after the lock is taken: a file replaced
    /// before that is found then as surely as before it, and only a lock
    /// taken on the file the name names excludes anyone (a wait for a lock
    /// held elsewhere also looks, so it never waits on a replaced file).
    pub(crate) fn acquire(
        &mut self,
        dir: &Dir,
        wait: Duration,
        interruptible: bool,
    ) -> io::Result<(FlockGuard<'_>, bool)> {
        let deadline = Instant::now() + wait;
        let mut reopened = false;
        let mut locked = false;
        for _ in 0..REPLACED_RETRIES {
            // A forked child shares its parent's descriptor (and flock): its
            // own is opened, without a look at the name (made below).
            if self
                .held
                .as_ref()
                .is_none_or(|h| h.pid != crate::sys::process_id())
            {
                self.held = None;
                let (file, st) = open_lock_file(dir, &self.name, true)?;
                self.held = Some(HeldLock {
                    lock: fd_lock::RwLock::new(file),
                    pid: crate::sys::process_id(),
                    id: (st.dev, st.ino),
                });
                reopened = true;
            }
            let held = self.held.as_mut().expect("opened above");
            let (name, id) = (&self.name, held.id);
            let left = deadline.saturating_duration_since(Instant::now());
            let renamed = || name_moved(dir, name, id);
            if let Taken::Locked = lock_within(&mut held.lock, left, interruptible, renamed)? {
                if !name_moved(dir, name, id) {
                    locked = true;
                    break;
                }
            }
            // Closing the descriptor gives back a flock taken on the old file.
            self.held = None;
        }
        if locked {
            let held = self.held.as_mut().expect("locked above");
            // This descriptor holds the flock already: taken again at once.
            return Ok((held.lock.try_write()?, reopened));
        }
        Err(io::Error::other(format!(
            "{} was replaced by another file {REPLACED_RETRIES} times while it was being \
             locked (something keeps replacing it)",
            printable(&self.name)
        )))
    }
}

/// Whether `name` in `dir` no longer names the file `id` (another file, or
/// none, or it could not be looked at: unknown is not "the same").
pub(super) fn name_moved(dir: &Dir, name: &OsStr, id: (u64, u64)) -> bool {
    dir.stat(name).ok().flatten().map(|m| (m.dev, m.ino)) != Some(id)
}

/// Whether a lock file opened by process `pid` as the file `id` is no longer
/// the one to lock: we are a forked child (the descriptor's locks are shared
/// with the parent), or `name` now names another file (or none).
pub(super) fn stale(dir: &Dir, name: &OsStr, pid: u32, id: (u64, u64)) -> bool {
    pid != crate::sys::process_id() || name_moved(dir, name, id)
}

/// Opens the lock file `name` in `dir` for reading and writing, made if
/// missing (never through a link, only a regular file), with its metadata.
/// With `read_only_will_do`, one this user may not write is opened for
/// reading (flock needs no write access).
pub(super) fn open_lock_file(
    dir: &Dir,
    name: &OsStr,
    read_only_will_do: bool,
) -> io::Result<(File, Stat)> {
    // Opened without O_CREAT first: the file is there but the first time,
    // and a look before the open (whether this process makes it, its own
    // change to the folder) cost a system call at every open. Its `fstat`
    // is the one the open made (`open_file_stat`), not a second.
    let opened = match dir.open_file_stat(name, Open::ReadWrite) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let change = super::OwnChange::begin(dir);
            let made = dir.open_file_stat(name, Open::ReadWriteCreate(0o600));
            change.end(dir, |names| made.is_err() || super::added(name)(names));
            made
        }
        other => other,
    };
    let (file, st) = opened.or_else(|e| match e.kind() {
        io::ErrorKind::PermissionDenied if read_only_will_do => {
            dir.open_file_stat(name, Open::Read)
        }
        _ => Err(e),
    })?;
    // Every open but `CreateNew` (not used here) returns its `fstat`.
    let st = match st {
        Some(st) => st,
        None => Stat::of_file(&file)?,
    };
    Ok((file, st))
}

/// A change counter in a lock file (which is never replaced), 8 bytes at
/// `offset`. Every writer bumps it under the lock before replacing the data
/// file, so "same counter and same `FileId`" means "unchanged" even when the
/// file system reuses an inode within one timestamp tick. A short or
/// unreadable lock file reads as 0: the caller then re-reads, which is safe.
pub(crate) fn read_generation(lock: &File, offset: u64) -> u64 {
    let mut bytes = [0u8; 8];
    match lock.read_exact_at(&mut bytes, offset) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

pub(crate) fn write_generation(lock: &File, offset: u64, generation: u64) -> io::Result<()> {
    lock.write_all_at(&generation.to_le_bytes(), offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_lock_held_elsewhere_times_out_with_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut holder = LockFile::new("x.lock");
        let (_held, _) = holder
            .acquire(&dir, Duration::from_millis(50), false)
            .unwrap();
        let mut waiter = LockFile::new("x.lock");
        let err = waiter
            .acquire(&dir, Duration::from_millis(50), false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("held by another process"), "{err}");
        drop(_held);
        assert!(waiter
            .acquire(&dir, Duration::from_millis(50), false)
            .is_ok());
    }

    #[test]
    fn an_interrupt_ends_an_interruptible_wait_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut holder = LockFile::new("x.lock");
        let (_held, _) = holder
            .acquire(&dir, Duration::from_millis(50), false)
            .unwrap();
        let mut waiter = LockFile::new("x.lock");
        let err = with_interrupt_check(
            || true,
            || waiter.acquire(&dir, Duration::from_secs(5), true).map(drop),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        let err = with_interrupt_check(
            || true,
            || {
                waiter
                    .acquire(&dir, Duration::from_millis(300), false)
                    .map(drop)
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_lock_file_deleted_under_us_is_reopened_so_locks_still_exclude() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut ours = LockFile::new("x.lock");
        assert!(
            ours.acquire(&dir, Duration::from_millis(50), false)
                .unwrap()
                .1
        );
        assert!(
            !ours
                .acquire(&dir, Duration::from_millis(50), false)
                .unwrap()
                .1
        );
        fs::remove_file(tmp.path().join("x.lock")).unwrap(); // a /tmp cleaner
        let mut theirs = LockFile::new("x.lock"); // creates a new file
        let (_held, _) = theirs
            .acquire(&dir, Duration::from_millis(50), false)
            .unwrap();
        // Locking the old, deleted inode would "succeed" and exclude nobody.
        let err = ours
            .acquire(&dir, Duration::from_millis(50), false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_wait_on_a_replaced_lock_file_moves_to_the_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let short = Duration::from_millis(50);
        let mut ours = LockFile::new("x.lock");
        drop(ours.acquire(&dir, short, false).unwrap()); // opened, the old file
        let mut stuck = LockFile::new("x.lock");
        let (_held_on_old, _) = stuck.acquire(&dir, short, false).unwrap();
        fs::remove_file(tmp.path().join("x.lock")).unwrap(); // a /tmp cleaner
                                                             // A wait on the old file (held for good) would end in an error.
        let (_locked, reopened) = ours.acquire(&dir, Duration::from_secs(5), false).unwrap();
        assert!(
            reopened,
            "what was cached under the old file is not trusted"
        );
        let err = LockFile::new("x.lock")
            .acquire(&dir, short, false)
            .map(drop)
            .unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "the new file is the one locked"
        );
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious content").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("x.lock")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let err = LockFile::new("x.lock")
            .acquire(&dir, Duration::from_millis(50), false)
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious content");
    }

    #[test]
    fn generation_round_trips_and_starts_at_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(tmp.path().join("x.lock"))
            .unwrap();
        assert_eq!(read_generation(&file, 0), 0);
        write_generation(&file, 0, 41).unwrap();
        write_generation(&file, 0, 42).unwrap();
        assert_eq!(read_generation(&file, 0), 42);
        assert_eq!(read_generation(&file, 800), 0, "past the end reads 0");
        write_generation(&file, 800, 7).unwrap();
        assert_eq!(read_generation(&file, 800), 7);
        assert_eq!(read_generation(&file, 0), 42, "counters are apart");
    }
}
