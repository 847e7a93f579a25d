//! The module's functions: inspection without a manager, lease tools, exit.

use std::path::PathBuf;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use super::args::*;
use super::*;

/// Stops the refresh thread (a thread that logs while the interpreter tears
/// down can crash it) and gives back every lease of this process, waiting on
/// busy threads a moment at most. Registered with `atexit` by the package.
#[pyfunction]
pub(super) fn _shutdown(py: Python<'_>) -> PyResult<()> {
    EXIT_THREAD.store(this_thread(), Ordering::SeqCst);
    detach_checked(py, || {
        crate::release_at_exit(std::time::Duration::from_secs(1))
    })
}

/// Is this process's refresh thread running?
#[pyfunction]
pub(super) fn _refresh_thread_running() -> bool {
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
pub(super) fn read_state(
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
pub(super) fn list_backups(py: Python<'_>, json_path: Option<PathArg>) -> PyResult<Vec<String>> {
    let path = PathArg::get_opt(json_path, "json_path")?
        .unwrap_or_else(|| PathBuf::from(DEFAULT_JSON_PATH));
    detach(py, || crate::inspect::list_backups(&path))
        .map(|backups| backups.into_iter().map(|b| b.name).collect())
        .map_err(to_py_err)
}

/// Removes the lease on `port` from the registry; True if there was one.
#[pyfunction]
#[pyo3(signature = (port, *, registry_dir = None))]
pub(super) fn release_lease(
    py: Python<'_>,
    port: WideInt,
    registry_dir: Option<PathArg>,
) -> PyResult<bool> {
    let port = crate::config::port("port", port.get("port")?).map_err(to_py_err)?;
    let registry_dir = PathArg::get_opt(registry_dir, "registry_dir")?;
    detach(py, || crate::release_lease(registry_dir.as_deref(), port))
        .map(|removed| !removed.is_empty())
        .map_err(to_py_err)
}

/// Every lease in the registry, as dicts (port, pid, start_time, owner, since, alive).
#[pyfunction]
#[pyo3(signature = (*, registry_dir = None))]
pub(super) fn list_leases(
    py: Python<'_>,
    registry_dir: Option<PathArg>,
) -> PyResult<Bound<'_, PyAny>> {
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

/// The live holders of the service `name` (None: of every named service) on
/// this host, from the registry alone: service, port, pid, command,
/// state_file, since; by service and port.
#[pyfunction]
#[pyo3(signature = (name = None, *, registry_dir = None))]
pub(super) fn service_instances<'py>(
    py: Python<'py>,
    name: Option<String>,
    registry_dir: Option<PathArg>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some(name) = &name {
        crate::config::service_name("name", name).map_err(to_py_err)?;
    }
    let registry_dir = PathArg::get_opt(registry_dir, "registry_dir")?;
    let found = detach(py, || {
        crate::lookup::find(registry_dir.as_deref(), name.as_deref())
            .map(|found| serde_json::to_string(&found))
    })
    .map_err(to_py_err)?
    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    json_loads(py, found)
}

/// `ports` as a set: each 1..=65535, else ValueError naming `ports`.
pub(super) fn port_set(ports: Vec<WideInt>) -> PyResult<crate::scan::PortSet> {
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
pub(super) fn port_owners(
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
