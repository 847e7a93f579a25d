//! The constructor's arguments, checked once, with errors that name the argument.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// The state file the original module used when none was given.
pub const DEFAULT_JSON_PATH: &str = "utils/port_state/dynamic_ports.json";
pub const DEFAULT_BACKUP_MAX: usize = 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub start: u16,
    pub end: u16,
    /// As the caller gave it (it is what `settings.json_path` shows).
    pub json_path: PathBuf,
    pub refresh_interval: Duration,
    pub history_max: usize,
    pub backup_max: usize,
    pub durable: bool,
    pub registry_dir: Option<PathBuf>,
    pub console_log: bool,
    /// Never hand out the ports web browsers refuse to open.
    pub skip_unsafe: bool,
}

/// The raw arguments, as wide as any caller may pass them, before checking.
#[derive(Debug, Clone)]
pub struct Args {
    pub start: i64,
    pub end: i64,
    pub json_path: PathBuf,
    pub refresh_interval: f64,
    pub history_max: i64,
    pub backup_max: i64,
    pub durable: bool,
    pub registry_dir: Option<PathBuf>,
    pub console_log: bool,
    pub skip_unsafe: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            start: 3000,
            end: 9000,
            json_path: PathBuf::from(DEFAULT_JSON_PATH),
            refresh_interval: 10.0,
            history_max: 50,
            backup_max: DEFAULT_BACKUP_MAX as i64,
            durable: false,
            registry_dir: None,
            console_log: true,
            skip_unsafe: true,
        }
    }
}

fn port(argument: &'static str, value: i64) -> Result<u16> {
    match u16::try_from(value) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(Error::invalid(
            argument,
            format!("must be a TCP port between 1 and 65535, got {value}"),
        )),
    }
}

fn count(argument: &'static str, value: i64) -> Result<usize> {
    usize::try_from(value)
        .map_err(|_| Error::invalid(argument, format!("must be 0 or more, got {value}")))
}

impl Args {
    pub fn check(self) -> Result<Config> {
        let start = port("start", self.start)?;
        let end = port("end", self.end)?;
        if start > end {
            return Err(Error::invalid(
                "start",
                format!("start ({start}) must not be greater than end ({end})"),
            ));
        }
        // A zero or negative interval would spin; NaN and infinity are no interval.
        if !(self.refresh_interval.is_finite() && self.refresh_interval > 0.0) {
            return Err(Error::invalid(
                "refresh_interval",
                format!(
                    "must be a positive number of seconds, got {}",
                    self.refresh_interval
                ),
            ));
        }
        if self.refresh_interval > 86_400.0 * 365.0 {
            return Err(Error::invalid(
                "refresh_interval",
                format!("must be at most a year, got {}", self.refresh_interval),
            ));
        }
        if self.json_path.as_os_str().is_empty() || self.json_path.file_name().is_none() {
            return Err(Error::invalid(
                "json_path",
                format!("must name a file, got {:?}", self.json_path),
            ));
        }
        Ok(Config {
            start,
            end,
            json_path: self.json_path,
            refresh_interval: Duration::from_secs_f64(self.refresh_interval),
            history_max: count("history_max", self.history_max)?,
            backup_max: count("backup_max", self.backup_max)?,
            durable: self.durable,
            registry_dir: self.registry_dir,
            console_log: self.console_log,
            skip_unsafe: self.skip_unsafe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: Args) -> String {
        args.check().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_originals() {
        let c = Args::default().check().unwrap();
        assert_eq!((c.start, c.end, c.history_max), (3000, 9000, 50));
        assert_eq!(c.refresh_interval, Duration::from_secs(10));
    }

    #[test]
    fn bad_arguments_name_themselves() {
        let a = Args::default;
        assert!(err(Args { start: 0, ..a() }).starts_with("start:"));
        assert!(err(Args { end: 65536, ..a() }).starts_with("end:"));
        assert!(err(Args {
            start: 10,
            end: 5,
            ..a()
        })
        .contains("greater than end"));
        assert!(err(Args {
            refresh_interval: 0.0,
            ..a()
        })
        .starts_with("refresh_interval:"));
        assert!(err(Args {
            refresh_interval: f64::NAN,
            ..a()
        })
        .starts_with("refresh_interval:"));
        assert!(err(Args {
            history_max: -1,
            ..a()
        })
        .starts_with("history_max:"));
        assert!(err(Args {
            backup_max: -1,
            ..a()
        })
        .starts_with("backup_max:"));
        assert!(err(Args {
            json_path: "".into(),
            ..a()
        })
        .starts_with("json_path:"));
    }

    #[test]
    fn a_single_port_range_and_fractional_interval_are_fine() {
        let c = Args {
            start: 5000,
            end: 5000,
            refresh_interval: 0.25,
            ..Args::default()
        }
        .check()
        .unwrap();
        assert_eq!(c.refresh_interval, Duration::from_millis(250));
    }
}
