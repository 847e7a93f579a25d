//! The constructor's arguments, checked once, with errors that name the argument.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// When the console line is printed. Each event also becomes a log record;
/// the line is for a host that shows no records, so an event reaches a
/// terminal once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleLog {
    /// Decided per event: only while the host shows no log records.
    Auto,
    /// Always (even beside the host's own log handlers).
    On,
    /// Never.
    Off,
}

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
    pub console_log: ConsoleLog,
    /// Never hand out the ports web browsers refuse to open.
    pub skip_unsafe: bool,
    /// The name clients look the service up by (see `service_name`).
    pub service: String,
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
    pub console_log: ConsoleLog,
    pub skip_unsafe: bool,
    /// None: derived from the state file's name (`service_of_path`).
    pub service: Option<String>,
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
            console_log: ConsoleLog::Auto,
            skip_unsafe: true,
            service: None,
        }
    }
}

/// The shortest refresh interval. Below it the refresh thread would do little
/// but re-scan and save (1e-9 s made 2,000 saves in 3 s).
pub const MIN_REFRESH_INTERVAL: f64 = 0.05;
const MAX_REFRESH_INTERVAL: f64 = 86_400.0 * 365.0;

/// A TCP port, 1..=65535.
pub fn port(argument: &'static str, value: i64) -> Result<u16> {
    match u16::try_from(value) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(Error::invalid(
            argument,
            format!("must be a TCP port between 1 and 65535, got {value}"),
        )),
    }
}

/// A process id that can name one process: 1 up to the kernel's limit. 0 and
/// negative numbers name process groups (or every process) to `kill(2)`, so
/// "is pid 0 running?" would say yes and the lease would never end.
pub fn pid(value: i64) -> Result<u32> {
    let max = max_pid();
    match u32::try_from(value) {
        Ok(p) if (1..=max).contains(&p) => Ok(p),
        _ => Err(Error::invalid(
            "pid",
            format!("must be a process id between 1 and {max}, got {value}"),
        )),
    }
}

/// The largest pid this system hands out (`pid_max` is one more), or the
/// largest `pid_t` where the kernel does not say.
fn max_pid() -> u32 {
    let fallback = i32::MAX as u32;
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .and_then(|limit| limit.checked_sub(1))
        .filter(|&max| max >= 1)
        .map_or(fallback, |max| max.min(fallback))
}

/// A path the operating system can take: a NUL byte would end it early in
/// every system call (Rust refuses such a path at the first call, so a state
/// file with one would never be saved).
pub fn path(argument: &'static str, path: PathBuf) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(Error::invalid(
            argument,
            format!("must not contain a NUL byte, got {path:?}"),
        ));
    }
    Ok(path)
}

/// The longest service name (a DNS label's length).
pub const MAX_SERVICE_LEN: usize = 63;

fn service_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A service name: 1 to 63 of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit (so it is one path segment of a key or URL, never `..` or hidden).
pub fn service_name(argument: &'static str, name: &str) -> Result<String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(service_char) || name.len() > MAX_SERVICE_LEN {
        return Err(Error::invalid(
            argument,
            format!(
                "must be 1 to {MAX_SERVICE_LEN} characters of A-Z, a-z, 0-9, '.', '_' and '-', \
                 starting with a letter or digit, got {name:?}"
            ),
        ));
    }
    Ok(name.to_string())
}

/// The service name a state file implies, as the original named its files:
/// `dynamic_ports_orders.json` is `orders`, any other file its stem. Characters
/// a name may not have become `_`, leading `.`/`_`/`-` are dropped, and it is
/// cut to 63 characters; `dynamic_ports` where nothing is left.
pub fn service_of_path(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match stem.strip_prefix("dynamic_ports_") {
        Some(rest) if !rest.is_empty() => rest.to_string(),
        _ => stem,
    };
    let cleaned: String = stem
        .chars()
        .map(|c| if service_char(c) { c } else { '_' })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(MAX_SERVICE_LEN)
        .collect();
    if cleaned.is_empty() {
        "dynamic_ports".to_string()
    } else {
        cleaned
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
        // A tiny interval would spin; NaN fails both comparisons.
        let interval = self.refresh_interval;
        if !(MIN_REFRESH_INTERVAL..=MAX_REFRESH_INTERVAL).contains(&interval) {
            return Err(Error::invalid(
                "refresh_interval",
                format!(
                    "must be a number of seconds from {MIN_REFRESH_INTERVAL} to a year \
                     ({MAX_REFRESH_INTERVAL}), got {interval}"
                ),
            ));
        }
        let json_path = path("json_path", self.json_path)?;
        let registry_dir = self
            .registry_dir
            .map(|dir| path("registry_dir", dir))
            .transpose()?;
        if json_path.as_os_str().is_empty() || json_path.file_name().is_none() {
            return Err(Error::invalid(
                "json_path",
                format!("must name a file, got {json_path:?}"),
            ));
        }
        let service = match &self.service {
            Some(name) => service_name("service", name)?,
            None => service_of_path(&json_path),
        };
        Ok(Config {
            start,
            end,
            json_path,
            refresh_interval: Duration::from_secs_f64(self.refresh_interval),
            history_max: count("history_max", self.history_max)?,
            backup_max: count("backup_max", self.backup_max)?,
            durable: self.durable,
            registry_dir,
            console_log: self.console_log,
            skip_unsafe: self.skip_unsafe,
            service,
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
    fn the_refresh_interval_has_a_floor_and_a_ceiling() {
        for bad in [0.049, 1e-9, -1.0, f64::INFINITY, f64::NEG_INFINITY, 1e300] {
            let message = err(Args {
                refresh_interval: bad,
                ..Args::default()
            });
            assert!(message.starts_with("refresh_interval:"), "{message}");
            assert!(message.contains("0.05"), "{message}");
        }
        for fine in [0.05, 86_400.0 * 365.0] {
            Args {
                refresh_interval: fine,
                ..Args::default()
            }
            .check()
            .unwrap();
        }
    }

    #[test]
    fn a_nul_byte_in_a_path_is_refused_by_name() {
        let message = err(Args {
            json_path: "a\0b.json".into(),
            ..Args::default()
        });
        assert!(message.starts_with("json_path:"), "{message}");
        let message = err(Args {
            registry_dir: Some("/tmp/x\0y".into()),
            ..Args::default()
        });
        assert!(message.starts_with("registry_dir:"), "{message}");
    }

    #[test]
    fn non_utf8_paths_are_kept_byte_for_byte() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let raw = OsStr::from_bytes(b"dir/\xff\xfe.json");
        let c = Args {
            json_path: raw.into(),
            ..Args::default()
        }
        .check()
        .unwrap();
        assert_eq!(c.json_path.as_os_str().as_bytes(), b"dir/\xff\xfe.json");
    }

    #[test]
    fn a_pid_names_one_process() {
        assert_eq!(pid(1).unwrap(), 1);
        assert_eq!(
            pid(i64::from(std::process::id())).unwrap(),
            std::process::id()
        );
        for bad in [0, -1, i64::from(u32::MAX), 1 << 32, i64::MAX, i64::MIN] {
            assert!(
                pid(bad).unwrap_err().to_string().starts_with("pid:"),
                "{bad}"
            );
        }
        // Beyond pid_max no process can exist.
        assert!(pid(i64::from(max_pid()) + 1).is_err());
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(port("port", 65535).unwrap(), 65535);
        for bad in [0, -1, 65536, 70000, 1 << 32] {
            assert!(port("port", bad)
                .unwrap_err()
                .to_string()
                .starts_with("port:"));
        }
    }

    #[test]
    fn the_service_name_is_given_or_comes_from_the_state_file() {
        let named = |path: &str| service_of_path(std::path::Path::new(path));
        assert_eq!(
            named("utils/port_state/dynamic_ports_orders.json"),
            "orders"
        );
        assert_eq!(
            named("utils/port_state/dynamic_ports.json"),
            "dynamic_ports"
        );
        assert_eq!(named("/srv/billing.json"), "billing");
        assert_eq!(named("/srv/.my ports!.json"), "my_ports_");
        assert_eq!(named("/srv/....json"), "dynamic_ports");
        assert_eq!(named(&format!("{}.json", "x".repeat(100))).len(), 63);
        let c = Args {
            service: Some("orders-v2.eu_1".into()),
            ..Args::default()
        }
        .check()
        .unwrap();
        assert_eq!(c.service, "orders-v2.eu_1");
        for bad in ["", "-x", ".x", "a/b", "a b", "ä", &"x".repeat(64)] {
            let message = err(Args {
                service: Some(bad.into()),
                ..Args::default()
            });
            assert!(message.starts_with("service:"), "{message}");
            assert!(message.contains("A-Z, a-z, 0-9"), "{message}");
        }
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
