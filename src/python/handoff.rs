//! `pick_socket`: a pick, then a socket bound and listening on the port, made
//! with Python's `socket` module so the caller gets a plain `socket.socket`.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyModule;

use super::{detach, interruptible, with_pending};
use crate::manager::Manager;

/// A pick can lose its port to a program that binds it without asking the
/// manager (between the scan and the bind); a few more picks find another.
pub(super) const BIND_ATTEMPTS: usize = 8;

pub(super) fn pick_socket<'py>(
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
        let port = match interruptible(py, || manager.pick_port(pid)) {
            Ok(port) => port,
            Err(e) => {
                outcome = Some(Err(e));
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
    // A signal's exception kept while the ports given back were logged
    // wins; the socket, if any, is closed when it is dropped.
    with_pending(outcome.unwrap_or_else(|| {
        let message =
            format!("ports {lost:?} were each taken by another program before they could be bound");
        Err(PyOSError::new_err((libc::EADDRINUSE, message)))
    }))
}

/// Returns ports that were picked but never bound. Without `pid` each later
/// pick moved the active port off them already; only a last one is held.
pub(super) fn give_back(manager: &Manager, pid: Option<u32>, lost: &[u16]) {
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
                let _ = registry.transact_removing(|t| {
                    t.remove_where(|l| l.pid == pid && lost.contains(&l.port))
                });
            }
        }
    }
}

pub(super) fn errno(py: Python<'_>, error: &PyErr) -> Option<i32> {
    error.value(py).getattr("errno").ok()?.extract().ok()
}

/// A listening socket on `port`: dual-stack `[::]` where the host has IPv6,
/// else `0.0.0.0`; with `host`, its first passive address.
pub(super) fn listen_on<'py>(
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

pub(super) fn bind_listen<'py>(
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
        // Connections accepted from it inherit this (Linux). A server handed
        // a descriptor (uvicorn --fd) takes it for a Unix socket and never
        // sets it: each keep-alive answer then waited ~40 ms for the
        // client's delayed ACK (175 instead of 3,600 requests a second).
        set("IPPROTO_TCP", "TCP_NODELAY", 1)?;
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
