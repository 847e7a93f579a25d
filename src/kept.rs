//! Buffers each thread keeps from one use to the next. A save or a socket
//! dump that took a new 32-40 KB buffer each time made the allocator take
//! memory from the kernel and give it back, and the kernel zeroes every page
//! it hands out: that was a sixth of a new manager's start.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` with this thread's kept value of `key`, or with a fresh one if
/// the kept one is in use further up the stack.
pub fn with<T: Default + 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|kept| match kept.try_borrow_mut() {
        Ok(mut kept) => f(&mut kept),
        Err(_) => f(&mut T::default()),
    })
}

/// Buffers past this size are given back after use: a huge state once must
/// not pin its memory for good.
pub const KEPT_MAX: usize = 1 << 20;
