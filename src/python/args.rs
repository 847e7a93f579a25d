//! Arguments as Python passes them: wide integers, seconds and paths, each
//! refused with an error that names the argument.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::*;

/// An integer argument as wide as Python allows. One that does not fit an i64
/// is out of every range the core accepts, so it is reported as the core
/// reports any bad value (ValueError naming the argument) instead of pyo3's
/// OverflowError; a non-int gets a TypeError naming the argument.
#[derive(Clone)]
pub(super) enum WideInt {
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
    pub(super) fn get(self, name: &'static str) -> PyResult<i64> {
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
pub(super) enum Seconds {
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
    pub(super) fn get(self, name: &'static str) -> PyResult<f64> {
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
pub(super) enum PathArg {
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
    pub(super) fn get(self, name: &'static str) -> PyResult<PathBuf> {
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

    pub(super) fn get_opt(arg: Option<PathArg>, name: &'static str) -> PyResult<Option<PathBuf>> {
        arg.map(|a| a.get(name)).transpose()
    }
}

/// `json_path` with the object the caller gave (the original kept that
/// object as its `json_path` attribute).
pub(super) struct GivenPath {
    pub(super) arg: PathArg,
    pub(super) given: Py<PyAny>,
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
pub(super) struct Interval {
    pub(super) seconds: Seconds,
    pub(super) int: bool,
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
