//! Values that belong to one process, so that `fork` is safe at any moment.
//!
//! A forked child has a copy of the parent's memory but only the thread that
//! called `fork`. Any mutex another thread held at that instant stays locked
//! for ever in the child, and whatever it guarded may be half-updated. Rather
//! than taking every lock of the library around `fork` (`pthread_atfork`
//! `prepare`, which would stall a fork behind a 30 s lock wait and, taken
//! while the forking thread holds the GIL, could deadlock against a thread
//! that needs it), everything that holds a lock, a descriptor or a process
//! identity lives in a `PerProcess` slot: the first use in a new process
//! builds a fresh value, and the parent's copy is never touched again (it is
//! leaked, never dropped: it may be torn). No lock is ever inherited.
//!
//! A slot is keyed on the process's identity (`Owner`), which changes at
//! every fork, whatever made it:
//!
//! - Where the kernel can (Linux 4.14 and later), a word in a page marked
//!   `MADV_WIPEONFORK`: the kernel hands a child of any fork (`fork`,
//!   `os.fork`, `multiprocessing`, `subprocess` with `preexec_fn`, and a raw
//!   `clone` or glibc's `_Fork`, which run no `pthread_atfork` handler) that
//!   page filled with zeroes. The first use in a process finds it zero and
//!   writes a token there that no ancestor of the process had (a counter in
//!   ordinary memory, which the child inherits, gives it out: it only grows
//!   down a line of forks). The hot path is one atomic load, no system call.
//!   A `vfork` or `posix_spawn` child shares the parent's memory and may only
//!   `exec` or `_exit` (what Python's `subprocess` does there): it never runs
//!   this code.
//! - Elsewhere (an older kernel, or the page could not be made): the pid
//!   *and* the fork generation (forks since the library was loaded, counted
//!   in every child by a `pthread_atfork` handler), never the pid alone: a
//!   grandchild that is given its dead grandparent's pid (pid namespaces, a
//!   small `pid_max`) must not take the grandparent's identity. One `getpid`
//!   per use.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Once;

struct Slot<T> {
    owner: Owner,
    value: T,
}

/// Which process a slot was made in.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: u32,
    /// The token of `Marker`, or (without one) the fork generation.
    generation: u64,
}

/// Forks since the library was loaded, counted in every child by a
/// `pthread_atfork` handler (registered before the first slot is made), where
/// there is no `Marker`.
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fork() {
    // Async-signal-safe: one atomic add, nothing else.
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// What this process wrote in its wiped-on-fork page: zeroes until the
/// first use in the process (and again in every forked child).
#[repr(C)]
struct Marker {
    token: AtomicU64,
    pid: AtomicU32,
}

/// The last token given out in this line of processes (inherited by a forked
/// child, so a child's token is larger than any of its ancestors').
static TOKENS: AtomicU64 = AtomicU64::new(0);

/// The process's `Marker`, if the kernel wipes its page in a forked child.
/// Made on first use without a lock (no `Once`: a fork while another thread
/// held one would leave it held for ever in the child); threads that race
/// each make a page, one is kept and the others are never used.
fn marker() -> Option<&'static Marker> {
    static MARKER: AtomicPtr<Marker> = AtomicPtr::new(std::ptr::null_mut());
    static NONE: AtomicBool = AtomicBool::new(false);
    let mut page = MARKER.load(Ordering::Acquire);
    if page.is_null() {
        if NONE.load(Ordering::Relaxed) {
            return None;
        }
        let Some(made) = super::wiped_on_fork_page(std::mem::size_of::<Marker>()) else {
            NONE.store(true, Ordering::Relaxed);
            return None;
        };
        let made = made.cast::<Marker>();
        page = match MARKER.compare_exchange(
            std::ptr::null_mut(),
            made,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => made,
            Err(kept) => kept,
        };
    }
    // SAFETY: a zero-filled, page-aligned mapping at least
    // `size_of::<Marker>()` long that is never unmapped (a forked child has
    // it too, zeroed); all zeroes is a valid `Marker` (two atomics).
    Some(unsafe { &*page })
}

impl Owner {
    fn this_process() -> Owner {
        if let Some(marker) = marker() {
            let token = marker.token.load(Ordering::Acquire);
            if token != 0 {
                return Owner {
                    pid: marker.pid.load(Ordering::Relaxed),
                    generation: token,
                };
            }
            // The first use in this process: threads that race here store
            // the same pid, and one token wins.
            let pid = std::process::id();
            marker.pid.store(pid, Ordering::Relaxed);
            let fresh = TOKENS.fetch_add(1, Ordering::Relaxed) + 1;
            let token =
                match marker
                    .token
                    .compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => fresh,
                    Err(won) => won,
                };
            return Owner {
                pid,
                generation: token,
            };
        }
        static REGISTER: Once = Once::new();
        REGISTER.call_once(|| {
            // If registration fails (ENOMEM) the generation stays 0 and the
            // pid alone keys the slots.
            super::on_fork_in_child(count_fork);
        });
        Owner {
            pid: std::process::id(),
            generation: FORKS.load(Ordering::SeqCst),
        }
    }
}

/// This process's id: read once per process where the kernel wipes a page
/// in a forked child (see the module's text), else `getpid`.
pub(crate) fn process_id() -> u32 {
    Owner::this_process().pid
}

pub struct PerProcess<T> {
    slot: AtomicPtr<Slot<T>>,
}

impl<T> Default for PerProcess<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PerProcess<T> {
    pub const fn new() -> Self {
        PerProcess {
            slot: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// This process's value, if it has made one.
    pub fn current(&self) -> Option<&T> {
        let slot = self.slot.load(Ordering::Acquire);
        // SAFETY: a slot, once published, is never freed while `self` lives
        // (see `get_or_init` and `Drop`).
        let slot = unsafe { slot.as_ref()? };
        (slot.owner == Owner::this_process()).then_some(&slot.value)
    }

    /// This process's value, made by `init` on first use in this process.
    /// `init` may run more than once if threads race; one result is kept.
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        match self.get_or_try_init(|| Ok::<T, std::convert::Infallible>(init())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// `get_or_init` for a value whose making can fail: a failure is
    /// returned and nothing is kept, so the next call tries again (a
    /// transient error must not break a forked child for its whole life).
    pub fn get_or_try_init<E>(&self, init: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        let owner = Owner::this_process();
        let seen = self.slot.load(Ordering::Acquire);
        // SAFETY: as in `current`.
        if let Some(slot) = unsafe { seen.as_ref() } {
            if slot.owner == owner {
                return Ok(&slot.value);
            }
        }
        let fresh = Box::into_raw(Box::new(Slot {
            owner,
            value: init()?,
        }));
        match self
            .slot
            .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            // The slot replaced (an inherited one) is leaked on purpose.
            // SAFETY: `fresh` was just published and is never freed before `self`.
            Ok(_) => Ok(unsafe { &(*fresh).value }),
            Err(winner) => {
                // Another thread of this process published first: use theirs.
                // SAFETY: `fresh` was never published; `winner` is live.
                unsafe {
                    drop(Box::from_raw(fresh));
                    Ok(&(*winner).value)
                }
            }
        }
    }
}

impl<T> Drop for PerProcess<T> {
    fn drop(&mut self) {
        let slot = *self.slot.get_mut();
        if slot.is_null() {
            return;
        }
        // SAFETY: we own the slot now (`&mut self`). Only this process's own
        // value is dropped; an inherited one may be torn and is leaked.
        unsafe {
            if (*slot).owner == Owner::this_process() {
                drop(Box::from_raw(slot));
            }
        }
    }
}

// SAFETY: the slot is only reached through `&T` (shared), like an `Arc<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
unsafe impl<T: Send + Sync> Send for PerProcess<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn made_once_per_process() {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let cell: PerProcess<u32> = PerProcess::new();
        assert!(cell.current().is_none());
        let make = || {
            MADE.fetch_add(1, Ordering::SeqCst);
            7
        };
        assert_eq!(*cell.get_or_init(make), 7);
        assert_eq!(*cell.get_or_init(|| 8), 7);
        assert_eq!(cell.current(), Some(&7));
        assert_eq!(MADE.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn racing_threads_share_one_value() {
        let cell: PerProcess<std::sync::Mutex<u32>> = PerProcess::new();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| *cell.get_or_init(Default::default).lock().unwrap() += 1);
            }
        });
        assert_eq!(*cell.current().unwrap().lock().unwrap(), 8);
    }

    /// What a child of `fork` (`raw`: a `clone` system call, which runs no
    /// `pthread_atfork` handler) finds: no slot of the parent, another
    /// identity, its own pid. The child calls nothing that allocates or
    /// locks (other test threads may hold the allocator's locks) and
    /// reports through its exit code.
    fn child_sees_its_own_process(raw: bool) {
        let cell: PerProcess<u32> = PerProcess::new();
        cell.get_or_init(|| 7);
        let parent = Owner::this_process();
        assert_eq!(process_id(), std::process::id());
        // SAFETY: the child only reads atomics, calls getpid and `_exit`s.
        let pid = unsafe {
            if raw {
                libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) as libc::pid_t
            } else {
                libc::fork()
            }
        };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let own = Owner::this_process();
            let code = if cell.current().is_some() {
                1
            } else if own == parent {
                2
            } else if process_id() != std::process::id() {
                3
            } else if Owner::this_process() != own {
                4
            } else {
                0
            };
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just made.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "child status {status}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "raw clone: {raw}");
        assert_eq!(cell.current(), Some(&7), "the parent keeps its own");
    }

    #[test]
    fn a_forked_child_has_a_new_identity_and_none_of_the_parents_slots() {
        child_sees_its_own_process(false);
    }

    #[test]
    fn so_does_a_child_of_a_raw_clone_that_runs_no_atfork_handler() {
        // Where the kernel has no MADV_WIPEONFORK (before 4.14) only a pid
        // check is left for this fork path, which this test also passes.
        child_sees_its_own_process(true);
    }
}
