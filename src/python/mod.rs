//! The Python binding, the only place that knows Python: argument
//! conversion, GIL release around every call that can wait, and the mapping of
//! core errors to Python exceptions.
//!
//! - `args`: arguments as Python passes them;
//! - `class`: the `DynamicPortManager` class;
//! - `functions`: the module's functions;
//! - `handoff`: `pick_socket`, a bound socket on a leased port;
//! - `logging`: events into `logging` (records made here, with the event's
//!   fields) and the console line.

mod args;
mod class;
mod functions;
mod handoff;
mod logging;

use class::PyManager;
use functions::*;
use logging::PythonOutput;

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

use crate::config::{Args, DEFAULT_JSON_PATH};
use crate::error::Error;
use crate::events::ConsoleLog;
use crate::manager::Manager;

// Named after the package that exports them (not `_core`), so tracebacks say
// `dynamic_port_manager.NoFreePortError` and pickle finds the class again.
create_exception!(
    dynamic_port_manager,
    NoFreePortError,
    PyRuntimeError,
    "Every port of the manager's range is held or in use."
);
create_exception!(
    dynamic_port_manager,
    ManagerStoppedError,
    PyRuntimeError,
    "The manager was stopped and hands out nothing any more."
);
create_exception!(
    dynamic_port_manager,
    RegistryError,
    PyOSError,
    "The host-wide lease registry could not be read or written; no port was handed out."
);

/// The one place core errors become Python exceptions.
fn to_py_err(error: Error) -> PyErr {
    let message = error.to_string();
    match &error {
        Error::InvalidArgument { .. } => PyValueError::new_err(message),
        Error::NoFreePort { .. } => NoFreePortError::new_err(message),
        Error::Stopped(_) => ManagerStoppedError::new_err(message),
        Error::Registry { .. } => RegistryError::new_err(message),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            _ => PyOSError::new_err(message),
        },
    }
}

/// The thread that ran the package's `atexit` hook (`_shutdown`), once it has:
/// from then on the interpreter is finalizing, and any other thread that
/// takes the GIL is ended with `pthread_exit`, whose forced unwinding cannot
/// cross Rust frames (the process would abort). So other threads never enter
/// Python again: calls returning to Python park their thread for good (only
/// daemon threads are left by then, and they die with the process), and
/// events they report are not logged.
static EXIT_THREAD: AtomicU64 = AtomicU64::new(0);

fn this_thread() -> u64 {
    // rustix makes the system call: glibc's wrapper is from 2.30, and the wheel
    // must load on glibc 2.17 (one missing symbol and the module fails to import).
    rustix::thread::gettid().as_raw_nonzero().get() as u64
}

fn may_enter_python() -> bool {
    let exit = EXIT_THREAD.load(Ordering::SeqCst);
    exit == 0 || exit == this_thread()
}

/// `py.detach(f)`, safe at interpreter exit (see `EXIT_THREAD`).
fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| {
        let result = f();
        while !may_enter_python() {
            std::thread::park();
        }
        result
    })
}

thread_local! {
    /// The exception a signal handler raised while this thread was inside a
    /// call of the library (a lock wait polling for it, or Python's logging
    /// handling an event), to be raised once the call has unwound.
    static PENDING: std::cell::RefCell<Option<PyErr>> = const { std::cell::RefCell::new(None) };
}

/// Keeps a signal's exception for the caller (the first one, if several).
fn keep_pending(error: PyErr) {
    PENDING.with(|p| {
        p.borrow_mut().get_or_insert(error);
    });
}

/// Is a signal's exception waiting to be raised on this thread?
fn is_pending() -> bool {
    PENDING.with(|p| p.borrow().is_some())
}

fn take_pending() -> Option<PyErr> {
    PENDING.with(|p| p.borrow_mut().take())
}

/// `result`, unless a signal's exception was kept during the call: then that
/// exception (Ctrl-C wins over the call's own result, as in Python).
fn with_pending<T>(result: PyResult<T>) -> PyResult<T> {
    match take_pending() {
        Some(raised) => Err(raised),
        None => result,
    }
}

/// `detach`, then any signal's exception kept during the call raised.
fn detach_checked<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    with_pending(Ok(detach(py, f)))
}

/// Runs Python's signal handlers (Ctrl-C) from inside a lock wait. Takes the
/// GIL for a moment: no thread holding the GIL ever waits for a lock of the
/// library (every call releases the GIL first), so this cannot deadlock. An
/// exception kept earlier in the call (in a log handler) ends the wait too.
fn python_interrupted() -> bool {
    if is_pending() {
        return true;
    }
    if !may_enter_python() {
        return false;
    }
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            keep_pending(e);
            true
        }
    })
}

/// Runs a core call without the GIL, its lock waits answering Ctrl-C: the
/// wait gives up (before anything was changed) and the signal's exception
/// (KeyboardInterrupt) is raised here.
fn interruptible<T: Send>(
    py: Python<'_>,
    call: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let result = detach(py, || {
        crate::fsutil::with_interrupt_check(python_interrupted, call)
    });
    // A signal's exception kept during the call is raised whatever the
    // call's result (the wait it interrupted, if any, ended before any change).
    with_pending(
        result.map_err(|error| match error.io_error().map(std::io::Error::kind) {
            Some(std::io::ErrorKind::Interrupted) => {
                pyo3::exceptions::PyKeyboardInterrupt::new_err(error.to_string())
            }
            _ => to_py_err(error),
        }),
    )
}

/// CPython's C json decoder builds a large dict faster than item-by-item calls.
fn json_loads(py: Python<'_>, text: String) -> PyResult<Bound<'_, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    crate::events::set_output(Box::new(PythonOutput));
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyManager>()?;
    m.add("NoFreePortError", py.get_type::<NoFreePortError>())?;
    m.add("ManagerStoppedError", py.get_type::<ManagerStoppedError>())?;
    m.add("RegistryError", py.get_type::<RegistryError>())?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(_refresh_thread_running, m)?)?;
    m.add_function(wrap_pyfunction!(release_lease, m)?)?;
    m.add_function(wrap_pyfunction!(list_leases, m)?)?;
    m.add_function(wrap_pyfunction!(service_instances, m)?)?;
    m.add_function(wrap_pyfunction!(read_state, m)?)?;
    m.add_function(wrap_pyfunction!(list_backups, m)?)?;
    m.add_function(wrap_pyfunction!(port_owners, m)?)?;
    Ok(())
}
