//! Everything the manager reports: one `Event` per happening, handed to the
//! process's `Output` (the Python binding makes each a `logging` record with
//! the event's fields), the original module's coloured console line on
//! stderr, and the ECS JSON line of `log_json()`.
//!
//! Here: the event, its kinds and levels, its console line and its ECS
//! document. `text.rs`: hidden characters written out, the one-line JSON;
//! `output.rs`: where events go; `build.rs`: the events of a manager's
//! operations.
//!
//! Events are collected while the manager's locks are held and emitted only
//! after they are released: emitting may call into Python, which needs the
//! GIL, and a thread holding the GIL may be waiting for those very locks.

mod build;
mod output;
mod text;

/// The setting lives with the other settings (`config.rs`); events obey it.
pub use crate::config::ConsoleLog;
pub(crate) use build::{registry_notice, snapshot, Scene};
pub use output::{set_output, use_colour, Output, Sink};
pub use text::{escape_controls, json_line};

use serde_json::json;

use crate::clock::Stamp;
use crate::port_list::PortList;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Start,
    Pick,
    Release,
    Refresh,
    Reclaim,
    Recover,
    Error,
    Warning,
    Stop,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Start => "START",
            Kind::Pick => "PICK",
            Kind::Release => "RELEASE",
            Kind::Refresh => "REFRESH",
            Kind::Reclaim => "RECLAIM",
            Kind::Recover => "RECOVER",
            Kind::Error => "ERROR",
            Kind::Warning => "WARNING",
            Kind::Stop => "STOP",
        }
    }

    /// Logged at ERROR level: failures, and recoveries from damage (which
    /// mean something outside went wrong).
    pub fn is_error(self) -> bool {
        matches!(self, Kind::Error | Kind::Recover)
    }

    /// The level of the event's log record.
    pub fn level(self) -> Level {
        match self {
            k if k.is_error() => Level::Error,
            Kind::Warning => Level::Warning,
            _ => Level::Info,
        }
    }

    /// ANSI colour of the event name on a terminal.
    fn colour(self) -> &'static str {
        match self {
            Kind::Start | Kind::Stop => "\x1b[36m",      // cyan
            Kind::Pick => "\x1b[32m",                    // green
            Kind::Release => "\x1b[33m",                 // yellow
            Kind::Refresh => "\x1b[34m",                 // blue
            Kind::Reclaim | Kind::Recover => "\x1b[35m", // magenta
            Kind::Error => "\x1b[1;31m",                 // bold red
            Kind::Warning => "\x1b[1;33m",               // bold yellow
        }
    }
}

/// The level of an event's log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    /// The number Python's `logging` (and syslog-like tools) use.
    pub fn number(self) -> u8 {
        match self {
            Level::Info => 20,
            Level::Warning => 30,
            Level::Error => 40,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// The ECS version `log_json()` follows.
pub const ECS_VERSION: &str = "8.11.0";

/// One happening, with the numbers the console line shows.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub time: Stamp,
    pub active: Option<u16>,
    pub free: PortSummary,
    pub used: PortSummary,
    pub note: String,
    pub state_file: String,
    /// The service the manager serves (`service=`, or the state file's name).
    pub service: String,
    /// The port the event is about: picked, released, reclaimed, given back
    /// at stop (None for the others).
    pub port: Option<u16>,
    /// For a pick that moved the active port: the port it replaced.
    pub prev: Option<u16>,
    /// The process the event is about: the lease's holder for a pick or a
    /// reclaim, this process otherwise.
    pub pid: u32,
}

/// Where a log line comes from: the caller's source line (`log.origin.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: u32,
    pub function: String,
}

/// A list of ports as the console line shows it: `[8001...8020](20)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSummary {
    pub first: Option<u16>,
    pub last: Option<u16>,
    pub count: usize,
    /// The ports themselves when there are few (so `Used:[3000]` reads well).
    pub few: Vec<u16>,
}

/// Up to this many ports are listed one by one.
const LISTED: usize = 5;

impl PortSummary {
    pub fn of(list: &PortList) -> PortSummary {
        PortSummary {
            first: list.first(),
            last: list.last(),
            count: list.len(),
            few: if list.len() <= LISTED {
                list.iter().collect()
            } else {
                Vec::new()
            },
        }
    }

    /// `[3000]`, `[3000, 3001]` for a few ports; `[8001...8020](20)` for many.
    pub fn render(&self) -> String {
        match (self.first, self.last) {
            (Some(first), Some(last)) if self.count > LISTED => {
                format!("[{first}...{last}]({})", self.count)
            }
            _ => {
                let list: Vec<String> = self.few.iter().map(u16::to_string).collect();
                format!("[{}]", list.join(", "))
            }
        }
    }
}

fn active_text(active: Option<u16>) -> String {
    active.map_or_else(|| "None".to_string(), |p| p.to_string())
}

impl Event {
    /// The original module's console line, optionally with the event coloured:
    /// `[1403/05/01 12:10 doshanbe] | PICK       | Active:3000 | Free:[8001...8020](20)   | Used:[3000]             | Note:...`
    pub fn console_line(&self, colour: bool) -> String {
        let name = format!("{:<10}", self.kind.name());
        let name = if colour {
            format!("{}{name}\x1b[0m", self.kind.colour())
        } else {
            name
        };
        format!(
            "[{}] | {name} | Active:{} | {:<24} | {:<23} | Note:{}",
            self.time.jalali,
            active_text(self.active),
            format!("Free:{}", self.free.render()),
            format!("Used:{}", self.used.render()),
            escape_controls(&self.note)
        )
    }

    /// The message of the `logging` record: the console line without the time
    /// and padding (logging adds its own time).
    pub fn log_message(&self) -> String {
        format!(
            "{} | Active:{} | Free:{} | Used:{} | Note:{}",
            self.kind.name(),
            active_text(self.active),
            self.free.count,
            self.used.count,
            escape_controls(&self.note)
        )
    }

    /// The port the event is about (see `Event::port`).
    pub fn with_port(mut self, port: Option<u16>) -> Event {
        self.port = port;
        self
    }

    /// The port a pick replaced (see `Event::prev`).
    pub fn with_prev(mut self, prev: Option<u16>) -> Event {
        self.prev = prev;
        self
    }

    /// The process the event is about (see `Event::pid`).
    pub fn with_pid(mut self, pid: u32) -> Event {
        self.pid = pid;
        self
    }

    /// The event's name in fields: `pick`, `release`, ...
    pub fn name(&self) -> String {
        self.kind.name().to_ascii_lowercase()
    }

    /// One ECS document (flat, dotted keys): ECS fields at the top level,
    /// the package's own under `dpm.`. `origin` is the caller's source line.
    pub fn json(&self, origin: &Origin) -> serde_json::Value {
        json!({
            "@timestamp": self.time.iso,
            "log.level": self.kind.level().name(),
            "message": self.note,
            "ecs.version": ECS_VERSION,
            "log.logger": LOGGER,
            "log.origin.file.name": origin.file,
            "log.origin.file.line": origin.line,
            "log.origin.function": origin.function,
            "process.pid": std::process::id(),
            "event.action": self.name(),
            "dpm.event": self.name(),
            "dpm.port": self.port,
            "dpm.prev": self.prev,
            "dpm.pid": self.pid,
            "dpm.jalali_time": self.time.jalali,
            "dpm.active_port": self.active,
            "dpm.free_count": self.free.count,
            "dpm.used_count": self.used.count,
            "dpm.state_file": self.state_file,
            "dpm.service": self.service,
        })
    }
}

/// The name of the `logging` logger (and `log.logger`) of every event.
pub const LOGGER: &str = "dynamic_port_manager";

#[cfg(test)]
mod tests {
    use super::text::is_hidden;
    use super::*;
    use crate::clock;
    use chrono::NaiveDate;

    fn event(kind: Kind, free: &[u16], used: &[u16]) -> Event {
        let t = NaiveDate::from_ymd_opt(2024, 7, 22)
            .unwrap()
            .and_hms_opt(12, 10, 0)
            .unwrap();
        Event {
            kind,
            time: Stamp {
                jalali: clock::jalali(&t),
                iso: "2024-07-22T12:10:00.000+00:00".into(),
                compact: "20240722_121000".into(),
                unix: 1_721_650_200.0,
            },
            active: Some(3000),
            free: PortSummary::of(&free.iter().copied().collect()),
            used: PortSummary::of(&used.iter().copied().collect()),
            note: "DynamicPortManager started.".into(),
            state_file: "s.json".into(),
            service: "s".into(),
            port: None,
            prev: None,
            pid: 7,
        }
    }

    fn origin() -> Origin {
        Origin {
            file: "app.py".into(),
            line: 12,
            function: "main".into(),
        }
    }

    #[test]
    fn the_console_line_matches_the_original_format() {
        let free: Vec<u16> = (8001..=8020).collect();
        let line = event(Kind::Pick, &free, &[3000]).console_line(false);
        assert_eq!(
            line,
            "[1403/05/01 12:10 doshanbe] | PICK       | Active:3000 | Free:[8001...8020](20)   | Used:[3000]             | Note:DynamicPortManager started."
        );
    }

    #[test]
    fn colour_wraps_only_the_event_name() {
        let line = event(Kind::Error, &[], &[]).console_line(true);
        assert!(line.contains("\x1b[1;31mERROR     \x1b[0m"), "{line:?}");
        assert!(!event(Kind::Error, &[], &[])
            .console_line(false)
            .contains('\x1b'));
    }

    #[test]
    fn control_characters_in_a_note_are_written_out() {
        let mut e = event(Kind::Error, &[], &[]);
        e.note = "cannot read /tmp/a\nb\rc\x1b[31md\u{2028}e\u{2029}f\u{85}g\u{7f}h\ti.json".into();
        let expected = r"cannot read /tmp/a\nb\rc\x1b[31md\u2028e\u2029f\x85g\x7fh\ti.json";
        for text in [e.console_line(false), e.console_line(true), e.log_message()] {
            assert!(text.ends_with(&format!("Note:{expected}")), "{text:?}");
            assert_eq!(text.lines().count(), 1);
        }
        // Only the colour of the event name is an escape sequence.
        assert_eq!(e.console_line(true).matches('\x1b').count(), 2);
        assert_eq!(escape_controls("plain ünïcode ✓"), "plain ünïcode ✓");
    }

    #[test]
    fn a_json_line_has_no_character_that_ends_a_line() {
        let mut e = event(Kind::Pick, &[], &[]);
        e.state_file = "/tmp/a\nb\rc\x1b[31md\u{2028}e\u{2029}f\u{85}g\u{7f}h.json".into();
        let line = json_line(&e.json(&origin()));
        assert!(!line.chars().any(is_hidden), "{line:?}");
        assert!(line.contains(r"\u2028e\u2029f\u0085g\u007fh"), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["dpm.state_file"], e.state_file.as_str());
        assert_eq!(back, e.json(&origin()));
        assert!(
            line.starts_with(
                r#"{"@timestamp":"2024-07-22T12:10:00.000+00:00","log.level":"info","message":"#
            ),
            "{line}"
        );
    }

    #[test]
    fn no_colour_off_a_terminal() {
        assert!(!use_colour(false));
    }

    #[test]
    fn json_is_ecs_with_the_packages_fields_under_dpm() {
        let e = event(Kind::Pick, &[1, 2], &[3000])
            .with_port(Some(3000))
            .with_prev(Some(2999))
            .with_pid(42);
        let v = e.json(&origin());
        assert_eq!(v["ecs.version"], ECS_VERSION);
        assert_eq!(v["event.action"], "pick");
        assert_eq!(v["log.level"], "info");
        assert_eq!(v["log.logger"], LOGGER);
        assert_eq!(v["log.origin.file.name"], "app.py");
        assert_eq!(v["log.origin.file.line"], 12);
        assert_eq!(v["log.origin.function"], "main");
        assert_eq!(v["process.pid"], std::process::id());
        assert_eq!(v["message"], "DynamicPortManager started.");
        assert_eq!(v["dpm.event"], "pick");
        assert_eq!(v["dpm.port"], 3000);
        assert_eq!(v["dpm.prev"], 2999);
        assert_eq!(v["dpm.pid"], 42);
        assert_eq!(v["dpm.jalali_time"], "1403/05/01 12:10 doshanbe");
        assert_eq!(v["dpm.free_count"], 2);
        assert_eq!(v["dpm.active_port"], 3000);
        assert!(v["@timestamp"]
            .as_str()
            .unwrap()
            .starts_with("2024-07-22T12:10"));
        let ecs = [
            "@timestamp",
            "message",
            "ecs.version",
            "event.action",
            "log.level",
            "log.logger",
            "log.origin.file.name",
            "log.origin.file.line",
            "log.origin.function",
            "process.pid",
        ];
        for key in v.as_object().unwrap().keys() {
            assert!(
                ecs.contains(&key.as_str()) || key.starts_with("dpm."),
                "{key}"
            );
        }
    }

    #[test]
    fn levels_are_pythons_numbers() {
        assert_eq!(Kind::Pick.level().number(), 20);
        assert_eq!(Kind::Warning.level().number(), 30);
        assert_eq!(Kind::Error.level().number(), 40);
        assert_eq!(Kind::Recover.level(), Level::Error);
    }
}
