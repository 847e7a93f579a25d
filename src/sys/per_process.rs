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
//! A slot is keyed on the pid *and* the fork generation (how many forks
//! lie between this process and the one that loaded the library), never on
//! the pid alone: a grandchild that is given its dead grandparent's pid (pid
//! namespaces, a small `pid_max`) must not take the grandparent's identity.
//!
//! The cost on the hot path is one `getpid` (a plain system call) and two
//! atomic loads.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

struct Slot<T> {
    owner: Owner,
    value: T,
}

/// Which process a slot was made in.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: u32,
    generation: u64,
}

/// Forks since the library was loaded, counted in every child by a
/// `pthread_atfork` handler (registered before the first slot is made).
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fork() {
    // Async-signal-safe: one atomic add, nothing else.
    FORKS.fetch_add(1, Ordering::SeqCst);
}

impl Owner {
    fn this_process() -> Owner {
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
}
