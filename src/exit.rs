//! Whether this process is exiting: once the exit hook has started giving
//! back this process's leases, no thread may take a new one (a pick that was
//! inside the core when the hook ran would otherwise finish after it and
//! leave a lease of an exited process behind).
//!
//! Keyed on the pid: a child forked while the parent exits starts clean.

use std::sync::atomic::{AtomicU32, Ordering};

/// The pid of the process whose exit began (0: none).
static EXITING: AtomicU32 = AtomicU32::new(0);

/// Marks this process as exiting. Every pick checks it inside the registry's
/// lock, so one that commits before the hook's release is released by it,
/// and one after it is refused.
pub fn begin() {
    EXITING.store(crate::sys::process_id(), Ordering::SeqCst);
}

/// Has this process begun to exit?
pub fn begun() -> bool {
    EXITING.load(Ordering::SeqCst) == crate::sys::process_id()
}
