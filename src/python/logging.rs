//! Events into Python: each event a `logging` record made here (the event's
//! fields in the record, the caller's source line as its origin), the
//! console line through `sys.stderr`, and a signal that arrives while
//! Python's logging runs kept for the caller.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyDict, PyString, PyTuple};

use super::*;
use crate::events::{use_colour, Event, Origin, Output, LOGGER};

/// Hands events to Python: see `emit_all`.
pub(super) struct PythonOutput;

impl Output for PythonOutput {
    fn emit(&self, events: &[Event], console: ConsoleLog) {
        // try_attach declines during interpreter shutdown: the events are dropped.
        if !may_enter_python() {
            return;
        }
        Python::try_attach(|py| {
            let callers_error = PyErr::take(py);
            emit_all(py, events, console);
            if let Some(error) = callers_error {
                error.restore(py);
            }
        });
    }
}

/// The package's logger (Python never replaces a named logger; its level and
/// `disabled` flag are read for every event, so changes take effect).
static LOGGER_OBJECT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The path of the package's `__init__.py`: the origin of the background
/// refresh thread's records.
static PACKAGE_FILE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `sys._getframe` and `logging.NullHandler`, looked up once (an import per
/// event was a measurable part of a pick's logging).
static GETFRAME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static NULL_HANDLER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn cached<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<&'static Py<PyAny>> {
    cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import(module)?.getattr(name)?.unbind())
    })
}

/// The function name of the background refresh thread's records.
pub(super) const BACKGROUND: &str = "(background refresh)";

/// The function name of records of the exit hook (`_shutdown`), which Python
/// runs with no frame of the program's.
pub(super) const AT_EXIT: &str = "(atexit)";

fn logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    LOGGER_OBJECT
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("logging")?
                    .call_method1("getLogger", (LOGGER,))?
                    .unbind(),
            )
        })
        .map(|l| l.bind(py))
}

/// Where a record comes from, as Python objects for `makeRecord`.
pub(super) struct Caller<'py> {
    pub(super) pathname: Bound<'py, PyAny>,
    pub(super) lineno: u32,
    pub(super) function: Bound<'py, PyAny>,
    /// A Python caller is waiting for this call (not the background thread):
    /// a signal's exception can be raised to it.
    pub(super) waiting: bool,
}

/// The package's Python subclass of the core's class (see `of_frame`).
const WRAPPER_FILE: &str = "dynamic_port_manager/_manager.py";

impl<'py> Caller<'py> {
    /// The Python frame that called the library (the binding runs no Python
    /// frame of its own, so it is the innermost one); without one, this is
    /// the background refresh thread, told as the package's `__init__.py`.
    pub(super) fn find(py: Python<'py>) -> Caller<'py> {
        match cached(py, &GETFRAME, "sys", "_getframe").and_then(|f| f.call1(py, (0,))) {
            Ok(frame) => Self::of_frame(frame.bind(py)).unwrap_or_else(|_| Self::unknown(py, true)),
            // "call stack is not deep enough": no Python frame on this thread.
            Err(e) if e.is_instance_of::<PyValueError>(py) => Self::background(py),
            Err(_) => Self::unknown(py, true),
        }
    }

    fn of_frame(frame: &Bound<'py, PyAny>) -> PyResult<Caller<'py>> {
        // The package's own Python wrapper of the class (`_manager.py`) is
        // not the caller: the user's line that called it is.
        let mut frame = frame.clone();
        let mut code = frame.getattr("f_code")?;
        while code
            .getattr("co_filename")?
            .extract::<String>()
            .is_ok_and(|f| f.ends_with(WRAPPER_FILE))
        {
            let back = frame.getattr("f_back")?;
            if back.is_none() {
                break;
            }
            frame = back;
            code = frame.getattr("f_code")?;
        }
        Ok(Caller {
            pathname: code.getattr("co_filename")?,
            lineno: frame
                .getattr("f_lineno")?
                .extract::<Option<u32>>()?
                .unwrap_or(0),
            function: code.getattr("co_name")?,
            waiting: true,
        })
    }

    /// The package's `__init__.py`, for a thread with no Python frame.
    fn background(py: Python<'py>) -> Caller<'py> {
        let at_exit = EXIT_THREAD.load(Ordering::SeqCst) == this_thread();
        let file = PACKAGE_FILE.get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("dynamic_port_manager")?
                    .getattr("__file__")?
                    .unbind(),
            )
        });
        match file {
            Ok(file) => Caller {
                pathname: file.bind(py).clone(),
                lineno: 0,
                function: PyString::new(py, if at_exit { AT_EXIT } else { BACKGROUND }).into_any(),
                waiting: at_exit,
            },
            Err(_) => Self::unknown(py, at_exit),
        }
    }

    /// What `logging` itself says when it cannot tell.
    fn unknown(py: Python<'py>, waiting: bool) -> Caller<'py> {
        Caller {
            pathname: PyString::new(py, "(unknown file)").into_any(),
            lineno: 0,
            function: PyString::new(py, "(unknown function)").into_any(),
            waiting,
        }
    }

    /// The origin for `log_json()`: the file's name (no folder), line, function.
    pub(super) fn origin(&self) -> Origin {
        let pathname = self.pathname.to_string();
        let file = std::path::Path::new(&pathname)
            .file_name()
            .map_or_else(|| pathname.clone(), |f| f.to_string_lossy().into_owned());
        Origin {
            file,
            line: self.lineno,
            function: self.function.to_string(),
        }
    }
}

/// Each event a record of the `dynamic_port_manager` logger, and its console
/// line when `console` says so. What Python's logging raises never breaks
/// the call that logged: a signal's exception (KeyboardInterrupt, SystemExit:
/// not an `Exception`) is kept and raised to the caller once the call has
/// unwound (see `with_pending`); any other exception is reported as one
/// Python cannot raise (`sys.unraisablehook`). Once a signal's exception is
/// kept, the call's remaining events are not handed to the handlers (which
/// may be what Ctrl-C interrupted) but written as console lines, so none is
/// lost.
fn emit_all(py: Python<'_>, events: &[Event], console: ConsoleLog) {
    let mut caller: Option<Caller<'_>> = None;
    let mut unconfigured = None;
    let mut lines = Vec::new();
    for event in events {
        let mut print = match console {
            ConsoleLog::On => true,
            ConsoleLog::Off => false,
            ConsoleLog::Auto => *unconfigured.get_or_insert_with(|| {
                // A logging module too broken to ask: print the line, lose nothing.
                !logging_configured(py).unwrap_or(false)
            }),
        };
        if is_pending() {
            print = true;
        } else if let Err(error) = record(py, event, &mut caller) {
            let waiting = caller.get_or_insert_with(|| Caller::find(py)).waiting;
            contain(py, error, waiting);
            // The handler that was interrupted may not have shown it.
            print |= is_pending();
        }
        if print {
            lines.push(event);
        }
    }
    if !lines.is_empty() {
        if let Err(error) = write_lines(py, &lines) {
            let waiting = caller.get_or_insert_with(|| Caller::find(py)).waiting;
            // A broken stderr must never break the call that logged, and is
            // not reported (where would it go?); a signal's exception is kept.
            if waiting && !error.is_instance_of::<PyException>(py) {
                keep_pending(error);
            }
        }
    }
    // A signal that arrived while this thread held the GIL in Rust is handled
    // here, where its exception (whatever its class: it is the signal
    // handler's) can still reach the caller. Only the main thread runs signal
    // handlers: elsewhere this does nothing.
    if let Err(error) = py.check_signals() {
        if caller.get_or_insert_with(|| Caller::find(py)).waiting {
            keep_pending(error);
        } else {
            error.write_unraisable(py, None);
        }
    }
}

/// A signal's exception is kept for a waiting caller; anything else (or with
/// no caller to raise it to) goes to `sys.unraisablehook`.
fn contain(py: Python<'_>, error: PyErr, waiting: bool) {
    if waiting && !error.is_instance_of::<PyException>(py) {
        keep_pending(error);
    } else {
        error.write_unraisable(py, None);
    }
}

/// One event as a record, built as `Logger._log` builds one (`makeRecord`,
/// then `handle`, so the logger's filters and handlers and any record
/// factory apply), with the caller's line as origin and the event's fields
/// as `extra`. A logger found disabled (as `logging.config.dictConfig`
/// leaves every existing logger it is not told about, by default) is
/// enabled again first: the package's events never vanish silently.
fn record<'py>(py: Python<'py>, event: &Event, caller: &mut Option<Caller<'py>>) -> PyResult<()> {
    let logger = logger(py)?;
    if logger.getattr("disabled")?.is_truthy()? {
        logger.setattr("disabled", false)?;
    }
    let level = event.kind.level().number();
    if !logger.call_method1("isEnabledFor", (level,))?.is_truthy()? {
        return Ok(());
    }
    let caller = caller.get_or_insert_with(|| Caller::find(py));
    let extra = PyDict::new(py);
    extra.set_item("event", event.name())?;
    extra.set_item("port", event.port)?;
    extra.set_item("prev", event.prev)?;
    extra.set_item("active_port", event.active)?;
    extra.set_item("pid", event.pid)?;
    extra.set_item("state_file", &event.state_file)?;
    extra.set_item("service", &event.service)?;
    extra.set_item("free_count", event.free.count)?;
    extra.set_item("used_count", event.used.count)?;
    extra.set_item("jalali_time", &event.time.jalali)?;
    let record = logger.call_method(
        "makeRecord",
        (
            LOGGER,
            level,
            &caller.pathname,
            caller.lineno,
            event.log_message(),
            PyTuple::empty(py),
            py.None(),
        ),
        Some(
            &[
                ("func", caller.function.clone()),
                ("extra", extra.into_any()),
            ]
            .into_py_dict(py)?,
        ),
    )?;
    logger.call_method1("handle", (record,))?;
    Ok(())
}

/// Console lines through Python's `sys.stderr`: redirection and capture see
/// them, and a closed or replaced stderr is Python's business, not fd 2's.
fn write_lines(py: Python<'_>, events: &[&Event]) -> PyResult<()> {
    (|| -> PyResult<()> {
        let stderr = py.import("sys")?.getattr("stderr")?;
        if stderr.is_none() {
            return Ok(()); // pythonw, or stderr set to None
        }
        let terminal = stderr
            .call_method0("isatty")
            .and_then(|t| t.is_truthy())
            .unwrap_or(false);
        let colour = use_colour(terminal);
        let mut text = String::new();
        for event in events {
            text += &event.console_line(colour);
            text.push('\n');
        }
        stderr.call_method1("write", (text,))?;
        stderr.call_method0("flush")?;
        Ok(())
    })()
}

/// Has the application configured `logging`? True when the package's logger
/// or one of its ancestors (the root included) has a handler other than a
/// `NullHandler` (the package's own). Asked per call: an app may configure
/// logging after it made its manager.
pub(super) fn logging_configured(py: Python<'_>) -> PyResult<bool> {
    let null_handler = cached(py, &NULL_HANDLER, "logging", "NullHandler")?.bind(py);
    let mut logger = logger(py)?.clone();
    // The chain ends at the root (parent None); the bound only guards a cycle.
    for _ in 0..64 {
        if logger.is_none() {
            break;
        }
        for handler in logger.getattr("handlers")?.try_iter()? {
            if !handler?.is_instance(null_handler)? {
                return Ok(true);
            }
        }
        logger = logger.getattr("parent")?;
    }
    Ok(false)
}
