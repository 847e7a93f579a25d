//! Events into Python: `logging` records and the console line.

use pyo3::prelude::*;

use super::*;

/// Routes `log`/`tracing` records to Python's `logging` (through pyo3-log),
/// so that a failing handler or filter can never break the call that logged:
/// pyo3-log leaves such an exception set on the thread, where it would turn
/// the caller's successful result into a SystemError. Here it is reported
/// like any exception Python cannot raise (`sys.unraisablehook`) and cleared.
pub(super) struct ContainedLogger(pub(super) pyo3_log::Logger);

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
pub(super) struct PythonStderr;

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
pub(super) fn logging_configured(py: Python<'_>) -> PyResult<bool> {
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
