//! `DynamicPortManager`: the Python class over one core `Manager`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::state_json::StateJson;

use super::args::*;
use super::*;

#[pyclass(
    name = "DynamicPortManager",
    module = "dynamic_port_manager",
    frozen,
    subclass
)]
pub(super) struct PyManager {
    manager: Arc<Manager>,
    /// The constructor's `json_path` object (None: the default path).
    json_path: Option<Py<PyAny>>,
    /// `refresh_interval` in seconds, and whether it was given as an int.
    refresh_interval: (f64, bool),
    /// The state's JSON as last serialized, and the bytes object last made of
    /// it (handed out again while the text is the same: touched only with
    /// the GIL held, and never while calling into Python).
    state_json: StateJson,
    state_bytes: Mutex<Option<MadeBytes>>,
}

/// A text of `StateJson` and the bytes object made of it.
type MadeBytes = (Arc<[u8]>, Py<PyBytes>);

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
        skip_unsafe = true,
        service = None
    ))]
    #[pyo3(
        text_signature = "(start=3000, end=9000, json_path=None, refresh_interval=10, \
        history_max=50, *, backup_max=20, durable=False, registry_dir=None, console_log=None, \
        skip_unsafe=True, service=None)"
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
        service: Option<String>,
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
            service,
        };
        let refresh_interval = (args.refresh_interval, interval_int);
        let config = args.check().map_err(to_py_err)?;
        let manager = interruptible(py, || crate::start_manager(config))?;
        Ok(PyManager {
            manager,
            json_path: given_path,
            refresh_interval,
            state_json: StateJson::default(),
            state_bytes: Mutex::new(None),
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
        let report = detach_checked(py, || {
            let registry = manager.registry()?;
            crate::owners_with(&registry, &ports).map(|r| serde_json::to_string(&r))
        })?;
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
        let text = detach_checked(py, || serde_json::to_string(&manager.state()))?;
        let text = text.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        json_loads(py, text)
    }

    /// `get_state()` as compact JSON bytes (UTF-8), serialized again only
    /// when the state changed: the same bytes object while it did not.
    fn state_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let (manager, cache) = (&self.manager, &self.state_json);
        let text = detach_checked(py, || cache.text(|look| manager.with_state(look)))?;
        self.bytes_of(py, text)
    }

    /// `state_json()` for an event loop: None where it would wait (a lock,
    /// a read of what another process saved, a dead holder's port to take back).
    #[pyo3(name = "_state_json_nowait")]
    fn state_json_nowait<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let (manager, cache) = (&self.manager, &self.state_json);
        let text = detach_checked(py, || cache.try_text(|look| manager.try_with_state(look)))?;
        text.map(|text| self.bytes_of(py, text)).transpose()
    }

    /// Writes one ECS JSON line to stdout and returns the record.
    fn log_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let manager = &self.manager;
        let origin = logging::Caller::find(py).origin();
        let record = detach_checked(py, || manager.json_record(&origin))?;
        let line = crate::events::json_line(&record);
        // Through sys.stdout, so Python-level redirection and capture see it.
        let stdout = py.import("sys")?.getattr("stdout")?;
        if !stdout.is_none() {
            // A broken stdout must not break the caller: the record is
            // returned. Ctrl-C while writing is the caller's, as anywhere.
            let written = stdout
                .call_method1("write", (line.clone() + "\n",))
                .and_then(|_| stdout.call_method0("flush"));
            if let Err(error) = written {
                if !error.is_instance_of::<pyo3::exceptions::PyException>(py) {
                    return Err(error);
                }
            }
        }
        // The dict has the line's key order.
        json_loads(py, line)
    }

    /// Re-scans the range now (what the refresh thread does every interval).
    fn refresh(&self, py: Python<'_>) -> PyResult<()> {
        let manager = &self.manager;
        detach_checked(py, || crate::refresh_manager(manager))
    }

    /// Stops refreshing and releases the active port. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let manager = &self.manager;
        detach_checked(py, || crate::stop_manager(manager))
    }

    /// Names of this state file's backups, oldest first.
    fn backups(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let manager = &self.manager;
        detach_checked(py, || {
            manager.backups().into_iter().map(|b| b.name).collect()
        })
    }

    /// The path of backup `name`, or None unless it is one of this state file's backups.
    fn backup_path(&self, py: Python<'_>, name: &str) -> PyResult<Option<PathBuf>> {
        let manager = &self.manager;
        detach_checked(py, || manager.backup_path(name))
    }

    /// The bytes of backup `name`, or None unless it is one of this state
    /// file's backups, a regular file (never read through a link), and
    /// still the file that was read.
    fn read_backup<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        let manager = &self.manager;
        let bytes = detach_checked(py, || manager.read_backup(name))?;
        Ok(bytes.map(|b| pyo3::types::PyBytes::new(py, &b)))
    }

    /// The port this manager holds, or None.
    #[getter]
    fn active_port(&self, py: Python<'_>) -> PyResult<Option<u16>> {
        // The manager's mutex may be held by the refresh thread during a save:
        // wait for it without the GIL.
        let manager = &self.manager;
        detach_checked(py, || manager.active_port())
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
    fn current_port(&self, py: Python<'_>) -> PyResult<Option<u16>> {
        self.active_port(py)
    }

    /// The full state, as `get_state()` returns it.
    #[getter(state)]
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.get_state(py)
    }

    /// The service's name (given, or from the state file's name).
    #[getter]
    fn service(&self) -> String {
        self.manager.config().service.clone()
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
    fn stopped(&self, py: Python<'_>) -> PyResult<bool> {
        let manager = &self.manager;
        detach_checked(py, || manager.is_stopped())
    }

    #[getter]
    fn registry_dir(&self) -> PathBuf {
        self.manager.registry_dir().to_path_buf()
    }

    #[getter]
    fn backup_dir(&self, py: Python<'_>) -> PyResult<PathBuf> {
        let manager = &self.manager;
        detach_checked(py, || manager.backup_dir())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        // Returns None: an exception in the block is never swallowed.
        self.stop(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let m = &self.manager;
        let (active, stopped) = detach_checked(py, || (m.active_port(), m.is_stopped()))?;
        Ok(format!(
            "DynamicPortManager(start={}, end={}, json_path={:?}, active_port={}, stopped={})",
            m.config().start,
            m.config().end,
            m.path().display().to_string(),
            active.map_or_else(|| "None".to_string(), |p| p.to_string()),
            if stopped { "True" } else { "False" }
        ))
    }
}

impl PyManager {
    /// `text` as a bytes object: the one made last time if it is the same text.
    fn bytes_of<'py>(
        &self,
        py: Python<'py>,
        text: serde_json::Result<Arc<[u8]>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let text = text.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let mut made = self.state_bytes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((was, bytes)) = &*made {
            if Arc::ptr_eq(was, &text) {
                return Ok(bytes.bind(py).clone());
            }
        }
        let bytes = PyBytes::new(py, &text);
        *made = Some((text, bytes.clone().unbind()));
        Ok(bytes)
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
