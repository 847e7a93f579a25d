//! The Python binding, and the only file that knows Python: argument
//! conversion, GIL release around every call that can wait, and the mapping of
//! core errors to Python exceptions.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() as u64 }
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
    /// The exception a signal handler raised while a lock wait polled for it
    /// (`python_interrupted`), to be raised once the call has unwound.
    static PENDING: std::cell::RefCell<Option<PyErr>> = const { std::cell::RefCell::new(None) };
}

/// Runs Python's signal handlers (Ctrl-C) from inside a lock wait. Takes the
/// GIL for a moment: no thread holding the GIL ever waits for a lock of the
/// library (every call releases the GIL first), so this cannot deadlock.
fn python_interrupted() -> bool {
    if !may_enter_python() {
        return false;
    }
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            PENDING.with(|p| *p.borrow_mut() = Some(e));
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
    result.map_err(|error| {
        let pending = PENDING.with(|p| p.borrow_mut().take());
        match (error.io_error().map(std::io::Error::kind), pending) {
            (Some(std::io::ErrorKind::Interrupted), Some(raised)) => raised,
            (Some(std::io::ErrorKind::Interrupted), None) => {
                pyo3::exceptions::PyKeyboardInterrupt::new_err(error.to_string())
            }
            _ => to_py_err(error),
        }
    })
}

/// CPython's C json decoder builds a large dict faster than item-by-item calls.
fn json_loads(py: Python<'_>, text: String) -> PyResult<Bound<'_, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// An integer argument as wide as Python allows. One that does not fit an i64
/// is out of every range the core accepts, so it is reported as the core
/// reports any bad value (ValueError naming the argument) instead of pyo3's
/// OverflowError; a non-int gets a TypeError naming the argument.
#[derive(Clone)]
enum WideInt {
    Fits(i64),
    TooBig,
    NotInt(String),
}

impl<'a, 'py> FromPyObject<'a, 'py> for WideInt {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        // bool is an int subclass, but `start=True` is a mistake, not port 1.
        if obj.is_instance_of::<pyo3::types::PyBool>()
            || !obj.is_instance_of::<pyo3::types::PyInt>()
        {
            return Ok(WideInt::NotInt(obj.get_type().name()?.to_string()));
        }
        Ok(obj.extract::<i64>().map_or(WideInt::TooBig, WideInt::Fits))
    }
}

impl WideInt {
    fn get(self, name: &'static str) -> PyResult<i64> {
        match self {
            WideInt::Fits(value) => Ok(value),
            WideInt::TooBig => Err(to_py_err(Error::invalid(
                name,
                "must fit in 64 bits (far out of range)",
            ))),
            WideInt::NotInt(type_name) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{name}: must be an int, got {type_name}"
            ))),
        }
    }
}

/// A number of seconds: an int or a float (or any object with `__float__`),
/// never a bool. An int too large for a float is a ValueError naming the
/// argument, like any other out-of-range value, not pyo3's OverflowError.
#[derive(Clone)]
enum Seconds {
    Value(f64),
    TooBig,
    NotNumber(String),
    /// `__float__` refused with a ValueError (e.g. a signaling NaN Decimal).
    NoFloat(String),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Seconds {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let py = obj.py();
        let type_name = || obj.get_type().name().map(|n| n.to_string());
        if obj.is_instance_of::<pyo3::types::PyBool>() {
            return Ok(Seconds::NotNumber(type_name()?));
        }
        match obj.extract::<f64>() {
            Ok(value) => Ok(Seconds::Value(value)),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(py) => {
                Ok(Seconds::TooBig)
            }
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                Ok(Seconds::NotNumber(type_name()?))
            }
            Err(e) if e.is_instance_of::<PyValueError>(py) => {
                Ok(Seconds::NoFloat(e.value(py).to_string()))
            }
            Err(e) => Err(e), // raised by the object's own __float__
        }
    }
}

impl Seconds {
    fn get(self, name: &'static str) -> PyResult<f64> {
        match self {
            Seconds::Value(value) => Ok(value),
            Seconds::TooBig => Err(to_py_err(Error::invalid(
                name,
                "must be at most a year, got a number too large for a float",
            ))),
            Seconds::NoFloat(why) => Err(to_py_err(Error::invalid(
                name,
                format!("must be a number of seconds, got one without a float value ({why})"),
            ))),
            Seconds::NotNumber(type_name) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{name}: must be a number of seconds (int or float), got {type_name}"
            ))),
        }
    }
}

/// A file-system path taken as `os.fsdecode` takes one: str, bytes, or an
/// `os.PathLike` giving either. Bytes are kept byte for byte (a non-UTF-8 name
/// stays that name); a str is encoded as Python encodes file names. Problems
/// wait for `get`, which knows the argument's name.
enum PathArg {
    Path(PathBuf),
    NotPath(String),
    Unencodable(String),
}

impl<'a, 'py> FromPyObject<'a, 'py> for PathArg {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        use pyo3::types::{PyBytes, PyString};
        use std::os::unix::ffi::OsStringExt;
        let py = obj.py();
        let value = if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
            obj.to_owned()
        } else {
            match py.import("os")?.call_method1("fspath", (&*obj,)) {
                Ok(value) => value,
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                    return Ok(PathArg::NotPath(obj.get_type().name()?.to_string()));
                }
                Err(e) => return Err(e), // raised by the object's own __fspath__
            }
        };
        if let Ok(bytes) = value.cast::<PyBytes>() {
            let raw = std::ffi::OsString::from_vec(bytes.as_bytes().to_vec());
            return Ok(PathArg::Path(raw.into()));
        }
        // A str: lone surrogates that surrogateescape cannot map fail here.
        Ok(match value.extract::<std::ffi::OsString>() {
            Ok(text) => PathArg::Path(text.into()),
            Err(e) => PathArg::Unencodable(e.value(py).to_string()),
        })
    }
}

impl PathArg {
    fn get(self, name: &'static str) -> PyResult<PathBuf> {
        match self {
            PathArg::Path(path) => crate::config::path(name, path).map_err(to_py_err),
            PathArg::NotPath(type_name) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{name}: must be a path (str, bytes or os.PathLike), got {type_name}"
            ))),
            PathArg::Unencodable(why) => Err(to_py_err(Error::invalid(
                name,
                format!("cannot be encoded as a file name: {why}"),
            ))),
        }
    }

    fn get_opt(arg: Option<PathArg>, name: &'static str) -> PyResult<Option<PathBuf>> {
        arg.map(|a| a.get(name)).transpose()
    }
}

/// `json_path` with the object the caller gave (the original kept that
/// object as its `json_path` attribute).
struct GivenPath {
    arg: PathArg,
    given: Py<PyAny>,
}

impl<'a, 'py> FromPyObject<'a, 'py> for GivenPath {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(GivenPath {
            given: obj.to_owned().unbind(),
            arg: PathArg::extract(obj)?,
        })
    }
}

/// `refresh_interval`, remembering whether it was given as an int (the
/// original's attribute keeps the caller's type: `10` stays `10`).
struct Interval {
    seconds: Seconds,
    int: bool,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Interval {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Interval {
            int: obj.is_instance_of::<pyo3::types::PyInt>()
                && !obj.is_instance_of::<pyo3::types::PyBool>(),
            seconds: Seconds::extract(obj)?,
        })
    }
}

#[pyclass(
    name = "DynamicPortManager",
    module = "dynamic_port_manager",
    frozen,
    subclass
)]
struct PyManager {
    manager: Arc<Manager>,
    /// The constructor's `json_path` object (None: the default path).
    json_path: Option<Py<PyAny>>,
    /// `refresh_interval` in seconds, and whether it was given as an int.
    refresh_interval: (f64, bool),
}

#[pymethods]
impl PyManager {
    #[new]
    #[pyo3(signature = (
        start = WideInt::Fits(3000),
        end = WideInt::Fits(9000),
        json_path = None,
        refresh_interval = Interval { seconds: Seconds::Value(10.0), int: true },
        history_max = WideInt::Fits(50),
        *,
        backup_max = WideInt::Fits(20),
        durable = false,
        registry_dir = None,
        console_log = None,
        skip_unsafe = true
    ))]
    #[pyo3(
        text_signature = "(start=3000, end=9000, json_path=None, refresh_interval=10, \
        history_max=50, *, backup_max=20, durable=False, registry_dir=None, console_log=None, \
        skip_unsafe=True)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        start: WideInt,
        end: WideInt,
        json_path: Option<GivenPath>,
        refresh_interval: Interval,
        history_max: WideInt,
        backup_max: WideInt,
        durable: bool,
        registry_dir: Option<PathArg>,
        console_log: Option<bool>,
        skip_unsafe: bool,
    ) -> PyResult<Self> {
        let (json_path, given_path) = match json_path {
            Some(GivenPath { arg, given }) => (Some(arg), Some(given)),
            None => (None, None),
        };
        let interval_int = refresh_interval.int;
        let args = Args {
            start: start.get("start")?,
            end: end.get("end")?,
            json_path: PathArg::get_opt(json_path, "json_path")?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_JSON_PATH)),
            refresh_interval: refresh_interval.seconds.get("refresh_interval")?,
            history_max: history_max.get("history_max")?,
            backup_max: backup_max.get("backup_max")?,
            durable,
            registry_dir: PathArg::get_opt(registry_dir, "registry_dir")?,
            console_log: match console_log {
                None => ConsoleLog::Auto,
                Some(true) => ConsoleLog::On,
                Some(false) => ConsoleLog::Off,
            },
            skip_unsafe,
        };
        let refresh_interval = (args.refresh_interval, interval_int);
        let config = args.check().map_err(to_py_err)?;
        let manager = detach(py, || crate::start_manager(config)).map_err(to_py_err)?;
        Ok(PyManager {
            manager,
            json_path: given_path,
            refresh_interval,
        })
    }

    /// Picks the lowest free port and makes it the active port.
    #[pyo3(signature = (*, pid = None))]
    fn pick_port(&self, py: Python<'_>, pid: Option<WideInt>) -> PyResult<u16> {
        let pid = pid
            .map(|p| crate::config::pid(p.get("pid")?).map_err(to_py_err))
            .transpose()?;
        let manager = &self.manager;
        interruptible(py, || manager.pick_port(pid))
    }

    /// Picks as `pick_port` does and returns a listening `socket.socket`
    /// bound to the port, so no program can take it between pick and use.
    #[pyo3(signature = (*, pid = None, host = None, backlog = None, reuse_port = false))]
    fn pick_socket<'py>(
        &self,
        py: Python<'py>,
        pid: Option<WideInt>,
        host: Option<String>,
        backlog: Option<i32>,
        reuse_port: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let pid = pid
            .map(|p| crate::config::pid(p.get("pid")?).map_err(to_py_err))
            .transpose()?;
        handoff::pick_socket(py, &self.manager, pid, host.as_deref(), backlog, reuse_port)
    }

    /// Who holds each used port of the range (or of `ports`): processes and lease.
    #[pyo3(signature = (ports = None))]
    fn owners<'py>(
        &self,
        py: Python<'py>,
        ports: Option<Vec<WideInt>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let config = self.manager.config();
        let ports = match ports {
            Some(ports) => port_set(ports)?,
            None => (config.start..=config.end).collect(),
        };
        let manager = &self.manager;
        let report = detach(py, || {
            let registry = manager.registry()?;
            crate::owners_with(&registry, &ports).map(|r| serde_json::to_string(&r))
        });
        json_loads(
            py,
            report
                .map_err(to_py_err)?
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
        )
    }

    /// Frees the active port; True if there was one.
    fn release_port(&self, py: Python<'_>) -> PyResult<bool> {
        let manager = &self.manager;
        interruptible(py, || manager.release_port())
    }

    /// The full state, as the state file holds it.
    fn get_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let manager = &self.manager;
        // Serialized from the struct (not a Value) so keys keep the file's order.
        let text = detach(py, || serde_json::to_string(&manager.state()));
        let text = text.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        json_loads(py, text)
    }

    /// Writes one JSON line for ELK to stdout and returns the record.
    fn log_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let manager = &self.manager;
        let record = detach(py, || manager.json_record());
        // Through sys.stdout, so Python-level redirection and capture see it.
        let stdout = py.import("sys")?.getattr("stdout")?;
        if !stdout.is_none() {
            // A broken stdout must not break the caller: the record is returned.
            let _ = stdout
                .call_method1("write", (crate::events::json_line(&record) + "\n",))
                .and_then(|_| stdout.call_method0("flush"));
        }
        json_loads(py, record.to_string())
    }

    /// Re-scans the range now (what the refresh thread does every interval).
    fn refresh(&self, py: Python<'_>) {
        let manager = &self.manager;
        detach(py, || crate::refresh_manager(manager));
    }

    /// Stops refreshing and releases the active port. Idempotent.
    fn stop(&self, py: Python<'_>) {
        let manager = &self.manager;
        detach(py, || crate::stop_manager(manager));
    }

    /// Names of this state file's backups, oldest first.
    fn backups(&self, py: Python<'_>) -> Vec<String> {
        let manager = &self.manager;
        detach(py, || {
            manager.backups().into_iter().map(|b| b.name).collect()
        })
    }

    /// The path of backup `name`, or None unless it is one of this state file's backups.
    fn backup_path(&self, py: Python<'_>, name: &str) -> Option<PathBuf> {
        let manager = &self.manager;
        detach(py, || manager.backup_path(name))
    }

    /// The port this manager holds, or None.
    #[getter]
    fn active_port(&self, py: Python<'_>) -> Option<u16> {
        // The manager's mutex may be held by the refresh thread during a save:
        // wait for it without the GIL.
        let manager = &self.manager;
        detach(py, || manager.active_port())
    }

    /// The state file as the constructor was given it (the original's attribute).
    #[getter]
    fn json_path<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        match &self.json_path {
            Some(given) => given.bind(py).clone(),
            None => pyo3::types::PyString::new(py, DEFAULT_JSON_PATH).into_any(),
        }
    }

    /// The absolute path of the state file.
    #[getter]
    fn state_path(&self) -> PathBuf {
        self.manager.path().to_path_buf()
    }

    /// Seconds between refreshes, int or float as given.
    #[getter]
    fn refresh_interval<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (value, int) = self.refresh_interval;
        // An int interval passed the core's check (at most a year): exact in an f64.
        Ok(if int {
            (value as i64).into_pyobject(py)?.into_any()
        } else {
            value.into_pyobject(py)?.into_any()
        })
    }

    #[getter]
    fn history_max(&self) -> usize {
        self.manager.config().history_max
    }

    /// The active port (the state's `current_port`), or None.
    #[getter]
    fn current_port(&self, py: Python<'_>) -> Option<u16> {
        self.active_port(py)
    }

    /// The full state, as `get_state()` returns it.
    #[getter(state)]
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.get_state(py)
    }

    #[getter]
    fn start(&self) -> u16 {
        self.manager.config().start
    }

    #[getter]
    fn end(&self) -> u16 {
        self.manager.config().end
    }

    #[getter]
    fn stopped(&self, py: Python<'_>) -> bool {
        let manager = &self.manager;
        detach(py, || manager.is_stopped())
    }

    #[getter]
    fn registry_dir(&self) -> PathBuf {
        self.manager.registry_dir().to_path_buf()
    }

    #[getter]
    fn backup_dir(&self, py: Python<'_>) -> PathBuf {
        let manager = &self.manager;
        detach(py, || manager.backup_dir())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        // Returns None: an exception in the block is never swallowed.
        self.stop(py);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let m = &self.manager;
        let (active, stopped) = detach(py, || (m.active_port(), m.is_stopped()));
        format!(
            "DynamicPortManager(start={}, end={}, json_path={:?}, active_port={}, stopped={})",
            m.config().start,
            m.config().end,
            m.path().display().to_string(),
            active.map_or_else(|| "None".to_string(), |p| p.to_string()),
            if stopped { "True" } else { "False" }
        )
    }
}

impl Drop for PyManager {
    /// A manager garbage-collected without `stop()` gives its port back. The
    /// registry lock may be busy, so wait for it without the GIL when the
    /// interpreter is still running (during shutdown, `try_attach` declines
    /// and the lease is released with no GIL to give up).
    fn drop(&mut self) {
        let manager = &self.manager;
        let give_back = || manager.abandon();
        if Python::try_attach(|py| py.detach(give_back)).is_none() {
            give_back();
        }
    }
}

/// Stops the refresh thread (a thread that logs while the interpreter tears
/// down can crash it) and gives back every lease of this process, waiting on
/// busy threads a moment at most. Registered with `atexit` by the package.
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    EXIT_THREAD.store(this_thread(), Ordering::SeqCst);
    detach(py, || {
        crate::release_at_exit(std::time::Duration::from_secs(1))
    });
}

/// Is this process's refresh thread running?
#[pyfunction]
fn _refresh_thread_running() -> bool {
    crate::refresh::is_running()
}

/// The state a manager with these settings would show now, without writing
/// anything (no lease, no save, no backup).
#[pyfunction]
#[pyo3(signature = (
    start = WideInt::Fits(3000),
    end = WideInt::Fits(9000),
    json_path = None,
    history_max = WideInt::Fits(50),
    *,
    registry_dir = None
))]
#[pyo3(
    text_signature = "(start=3000, end=9000, json_path=None, history_max=50, *, registry_dir=None)"
)]
fn read_state(
    py: Python<'_>,
    start: WideInt,
    end: WideInt,
    json_path: Option<PathArg>,
    history_max: WideInt,
    registry_dir: Option<PathArg>,
) -> PyResult<Bound<'_, PyAny>> {
    let config = Args {
        start: start.get("start")?,
        end: end.get("end")?,
        json_path: PathArg::get_opt(json_path, "json_path")?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JSON_PATH)),
        history_max: history_max.get("history_max")?,
        registry_dir: PathArg::get_opt(registry_dir, "registry_dir")?,
        ..Args::default()
    }
    .check()
    .map_err(to_py_err)?;
    let text = detach(py, || {
        crate::inspect::read_state(&config).map(|s| serde_json::to_string(&s))
    })
    .map_err(to_py_err)?
    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    json_loads(py, text)
}

/// Names of the backups of the state file `json_path`, oldest first.
#[pyfunction]
#[pyo3(signature = (json_path = None))]
fn list_backups(py: Python<'_>, json_path: Option<PathArg>) -> PyResult<Vec<String>> {
    let path = PathArg::get_opt(json_path, "json_path")?
        .unwrap_or_else(|| PathBuf::from(DEFAULT_JSON_PATH));
    detach(py, || crate::inspect::list_backups(&path))
        .map(|backups| backups.into_iter().map(|b| b.name).collect())
        .map_err(to_py_err)
}

/// Removes the lease on `port` from the registry; True if there was one.
#[pyfunction]
#[pyo3(signature = (port, *, registry_dir = None))]
fn release_lease(py: Python<'_>, port: WideInt, registry_dir: Option<PathArg>) -> PyResult<bool> {
    let port = crate::config::port("port", port.get("port")?).map_err(to_py_err)?;
    let registry_dir = PathArg::get_opt(registry_dir, "registry_dir")?;
    detach(py, || crate::release_lease(registry_dir.as_deref(), port))
        .map(|removed| !removed.is_empty())
        .map_err(to_py_err)
}

/// Every lease in the registry, as dicts (port, pid, start_time, owner, since, alive).
#[pyfunction]
#[pyo3(signature = (*, registry_dir = None))]
fn list_leases(py: Python<'_>, registry_dir: Option<PathArg>) -> PyResult<Bound<'_, PyAny>> {
    let registry_dir = PathArg::get_opt(registry_dir, "registry_dir")?;
    let leases = detach(py, || crate::list_leases(registry_dir.as_deref())).map_err(to_py_err)?;
    let records: Vec<serde_json::Value> = leases
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(l).unwrap_or_default();
            v["alive"] = l.holder().is_alive().into();
            v
        })
        .collect();
    json_loads(py, serde_json::Value::from(records).to_string())
}

/// `ports` as a set: each 1..=65535, else ValueError naming `ports`.
fn port_set(ports: Vec<WideInt>) -> PyResult<crate::scan::PortSet> {
    ports
        .into_iter()
        .map(|p| {
            let p = p.get("ports")?;
            u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| {
                to_py_err(Error::invalid(
                    "ports",
                    format!("{p} is not a TCP port (1-65535)"),
                ))
            })
        })
        .collect()
}

/// Who holds each used port of `ports`, without a manager (for `who`).
#[pyfunction]
#[pyo3(signature = (ports, *, registry_dir = None))]
fn port_owners(
    py: Python<'_>,
    ports: Vec<WideInt>,
    registry_dir: Option<PathArg>,
) -> PyResult<Bound<'_, PyAny>> {
    let ports = port_set(ports)?;
    let registry_dir = PathArg::get_opt(registry_dir, "registry_dir")?;
    let report = detach(py, || {
        crate::port_owners(registry_dir.as_deref(), &ports).map(|r| serde_json::to_string(&r))
    });
    json_loads(
        py,
        report
            .map_err(to_py_err)?
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
    )
}

/// `pick_socket`: a pick, then a socket bound and listening on the port, made
/// with Python's `socket` module so the caller gets a plain `socket.socket`.
mod handoff {
    use pyo3::exceptions::PyOSError;
    use pyo3::prelude::*;
    use pyo3::types::PyModule;

    use super::{detach, to_py_err};
    use crate::manager::Manager;

    /// A pick can lose its port to a program that binds it without asking the
    /// manager (between the scan and the bind); a few more picks find another.
    const BIND_ATTEMPTS: usize = 8;

    pub fn pick_socket<'py>(
        py: Python<'py>,
        manager: &Manager,
        pid: Option<u32>,
        host: Option<&str>,
        backlog: Option<i32>,
        reuse_port: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let socket = py.import("socket")?;
        let backlog = match backlog {
            Some(b) => b,
            None => socket.getattr("SOMAXCONN")?.extract()?,
        };
        // Ports picked but not bound. They stay leased until the loop ends, so
        // the next pick cannot hand the same port out again.
        let mut lost = Vec::new();
        let mut outcome = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = match detach(py, || manager.pick_port(pid)) {
                Ok(port) => port,
                Err(e) => {
                    outcome = Some(Err(to_py_err(e)));
                    break;
                }
            };
            match listen_on(&socket, host, port, backlog, reuse_port) {
                Ok(sock) => {
                    outcome = Some(Ok(sock));
                    break;
                }
                Err(e) => {
                    lost.push(port);
                    if errno(py, &e) != Some(libc::EADDRINUSE) {
                        outcome = Some(Err(e));
                        break;
                    }
                }
            }
        }
        detach(py, || give_back(manager, pid, &lost));
        outcome.unwrap_or_else(|| {
            let message = format!(
                "ports {lost:?} were each taken by another program before they could be bound"
            );
            Err(PyOSError::new_err((libc::EADDRINUSE, message)))
        })
    }

    /// Returns ports that were picked but never bound. Without `pid` each later
    /// pick moved the active port off them already; only a last one is held.
    fn give_back(manager: &Manager, pid: Option<u32>, lost: &[u16]) {
        match pid {
            None => {
                if lost
                    .last()
                    .is_some_and(|&last| manager.active_port() == Some(last))
                {
                    let _ = manager.release_port();
                }
            }
            Some(pid) => {
                if let Ok(registry) = manager.registry() {
                    let _ = registry
                        .transact(|t| t.remove_where(|l| l.pid == pid && lost.contains(&l.port)));
                }
            }
        }
    }

    fn errno(py: Python<'_>, error: &PyErr) -> Option<i32> {
        error.value(py).getattr("errno").ok()?.extract().ok()
    }

    /// A listening socket on `port`: dual-stack `[::]` where the host has IPv6,
    /// else `0.0.0.0`; with `host`, its first passive address.
    fn listen_on<'py>(
        socket: &Bound<'py, PyModule>,
        host: Option<&str>,
        port: u16,
        backlog: i32,
        reuse_port: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = socket.py();
        let stream = socket.getattr("SOCK_STREAM")?;
        if let Some(host) = host {
            let flags = socket.getattr("AI_PASSIVE")?;
            let infos = socket.call_method1("getaddrinfo", (host, port, 0, &stream, 0, flags))?;
            let first = infos.get_item(0)?;
            let family = first.get_item(0)?;
            return bind_listen(
                socket,
                family,
                first.get_item(4)?,
                None,
                backlog,
                reuse_port,
            );
        }
        let v6 = socket.getattr("AF_INET6")?;
        match bind_listen(
            socket,
            v6,
            ("::", port).into_pyobject(py)?.into_any(),
            Some(0),
            backlog,
            reuse_port,
        ) {
            Err(e)
                if matches!(
                    errno(py, &e),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
                ) =>
            {
                let v4 = socket.getattr("AF_INET")?;
                let any = ("0.0.0.0", port).into_pyobject(py)?.into_any();
                bind_listen(socket, v4, any, None, backlog, reuse_port)
            }
            other => other,
        }
    }

    fn bind_listen<'py>(
        socket: &Bound<'py, PyModule>,
        family: Bound<'py, PyAny>,
        address: Bound<'py, PyAny>,
        v6only: Option<i32>,
        backlog: i32,
        reuse_port: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let sock = socket.call_method1("socket", (family, socket.getattr("SOCK_STREAM")?))?;
        let set = |level: &str, name: &str, value: i32| {
            sock.call_method1(
                "setsockopt",
                (socket.getattr(level)?, socket.getattr(name)?, value),
            )
        };
        let ready = (|| {
            // As servers do: a port whose last connections linger in TIME_WAIT binds.
            set("SOL_SOCKET", "SO_REUSEADDR", 1)?;
            if reuse_port {
                set("SOL_SOCKET", "SO_REUSEPORT", 1)?;
            }
            if let Some(value) = v6only {
                set("IPPROTO_IPV6", "IPV6_V6ONLY", value)?;
            }
            sock.call_method1("bind", (address,))?;
            sock.call_method1("listen", (backlog,))
        })();
        match ready {
            Ok(_) => Ok(sock),
            Err(e) => {
                let _ = sock.call_method0("close");
                Err(e)
            }
        }
    }
}

/// Routes `log`/`tracing` records to Python's `logging` (through pyo3-log),
/// so that a failing handler or filter can never break the call that logged:
/// pyo3-log leaves such an exception set on the thread, where it would turn
/// the caller's successful result into a SystemError. Here it is reported
/// like any exception Python cannot raise (`sys.unraisablehook`) and cleared.
struct ContainedLogger(pyo3_log::Logger);

impl log::Log for ContainedLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        // try_attach declines during interpreter shutdown: the record is dropped.
        if !may_enter_python() {
            return;
        }
        Python::try_attach(|py| {
            let callers_error = PyErr::take(py);
            self.0.log(record);
            if let Some(logging_error) = PyErr::take(py) {
                logging_error.write_unraisable(py, None);
            }
            if let Some(error) = callers_error {
                error.restore(py);
            }
        });
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Console lines through Python's `sys.stderr`: redirection and capture see
/// them, and a closed or replaced stderr is Python's business, not fd 2's.
struct PythonStderr;

impl crate::events::Console for PythonStderr {
    fn write_line(&self, render: &dyn Fn(bool) -> String) {
        if !may_enter_python() {
            return;
        }
        Python::try_attach(|py| {
            let callers_error = PyErr::take(py);
            let written = (|| -> PyResult<()> {
                let stderr = py.import("sys")?.getattr("stderr")?;
                if stderr.is_none() {
                    return Ok(()); // pythonw, or stderr set to None
                }
                let terminal = stderr
                    .call_method0("isatty")
                    .and_then(|t| t.is_truthy())
                    .unwrap_or(false);
                stderr.call_method1("write", (render(terminal) + "\n",))?;
                stderr.call_method0("flush")?;
                Ok(())
            })();
            // A broken stderr must never break the call that logged.
            drop(written);
            if let Some(error) = callers_error {
                error.restore(py);
            }
        });
    }

    fn host_shows_records(&self) -> bool {
        if !may_enter_python() {
            return false;
        }
        Python::try_attach(|py| {
            let callers_error = PyErr::take(py);
            // A logging module too broken to ask: print the line, lose nothing.
            let shown = logging_configured(py).unwrap_or(false);
            if let Some(error) = callers_error {
                error.restore(py);
            }
            shown
        })
        .unwrap_or(false)
    }
}

/// Has the application configured `logging`? True when the package's logger
/// or one of its ancestors (the root included) has a handler other than a
/// `NullHandler` (the package's own). Asked per event: an app may configure
/// logging after it made its manager.
fn logging_configured(py: Python<'_>) -> PyResult<bool> {
    let logging = py.import("logging")?;
    let null_handler = logging.getattr("NullHandler")?;
    let mut logger = logging.call_method1("getLogger", ("dynamic_port_manager",))?;
    // The chain ends at the root (parent None); the bound only guards a cycle.
    for _ in 0..64 {
        if logger.is_none() {
            break;
        }
        for handler in logger.getattr("handlers")?.try_iter()? {
            if !handler?.is_instance(&null_handler)? {
                return Ok(true);
            }
        }
        logger = logger.getattr("parent")?;
    }
    Ok(false)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // No caching of logger levels: a level set after import must take effect
    // (the cost is one `isEnabledFor` call per event, a few per pick).
    let py = m.py();
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::Nothing)?;
    if log::set_boxed_logger(Box::new(ContainedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    crate::events::set_console(Box::new(PythonStderr));
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyManager>()?;
    m.add("NoFreePortError", py.get_type::<NoFreePortError>())?;
    m.add("ManagerStoppedError", py.get_type::<ManagerStoppedError>())?;
    m.add("RegistryError", py.get_type::<RegistryError>())?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(_refresh_thread_running, m)?)?;
    m.add_function(wrap_pyfunction!(release_lease, m)?)?;
    m.add_function(wrap_pyfunction!(list_leases, m)?)?;
    m.add_function(wrap_pyfunction!(read_state, m)?)?;
    m.add_function(wrap_pyfunction!(list_backups, m)?)?;
    m.add_function(wrap_pyfunction!(port_owners, m)?)?;
    Ok(())
}
