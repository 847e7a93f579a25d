//! Everything the manager reports: one `Event` per happening, turned into a
//! `tracing` record (which the binding routes to Python's `logging`), the
//! original module's coloured console line on stderr, and the JSON line for ELK.
//!
//! Events are collected while the manager's locks are held and emitted only
//! after they are released: emitting may call into Python, which needs the
//! GIL, and a thread holding the GIL may be waiting for those very locks.

use crate::port_list::PortList;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use serde_json::json;

use crate::clock::Stamp;

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

/// Characters that can end a line or steer a terminal: C0 (newline, carriage
/// return, ESC...), DEL, C1 (U+0085 ends a line for `str.splitlines()`) and
/// the Unicode line and paragraph separators.
fn is_hidden(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// `text` with every hidden character written out (`\n`, `\x1b`, `\u2028`), so
/// a file name cannot forge a log line or recolour a terminal.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_hidden(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_hidden(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `value` as one line of JSON that stays one line for every reader:
/// serde_json escapes C0 but writes DEL, C1 (U+0085) and U+2028/U+2029 raw,
/// which `str.splitlines()` and some log shippers take as line ends. They can
/// only occur inside strings, where `\uXXXX` is the same character.
pub fn json_line(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if !text.chars().any(is_hidden) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_hidden(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
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

    /// One ELK-friendly JSON object (ECS field names where one exists).
    pub fn json(&self) -> serde_json::Value {
        json!({
            "@timestamp": self.time.iso,
            "log.level": if self.kind.is_error() { "error" } else { "info" },
            "log.logger": "dynamic_port_manager",
            "event.action": self.kind.name().to_lowercase(),
            "message": self.note,
            "jalali_time": self.time.jalali,
            "active_port": self.active,
            "free_count": self.free.count,
            "used_count": self.used.count,
            "state_file": self.state_file,
        })
    }
}

/// Where console lines are written. The default is the process's stderr;
/// the Python binding installs one that writes through `sys.stderr`, so
/// redirection and capture work and a closed fd 2 is never written to.
pub trait Console: Send + Sync {
    /// Writes one line; `render(colour)` makes it, `colour` being whether the
    /// destination is a terminal (NO_COLOR is applied by the caller).
    fn write_line(&self, render: &dyn Fn(bool) -> String);

    /// Does the host program show log records itself (has it configured its
    /// logging)? Then `ConsoleLog::Auto` leaves the event to the record.
    fn host_shows_records(&self) -> bool {
        false
    }
}

struct ProcessStderr;

impl Console for ProcessStderr {
    fn write_line(&self, render: &dyn Fn(bool) -> String) {
        let stderr = std::io::stderr();
        let line = render(stderr.is_terminal());
        // A closed or full stderr must never take the host program down.
        let _ = writeln!(stderr.lock(), "{line}");
    }
}

static CONSOLE: OnceLock<Box<dyn Console>> = OnceLock::new();

/// Sets where console lines go, once per process (later calls are ignored).
pub fn set_console(console: Box<dyn Console>) {
    let _ = CONSOLE.set(console);
}

fn console() -> &'static dyn Console {
    CONSOLE.get().map_or(&ProcessStderr, |c| c.as_ref())
}

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

/// Where events go.
#[derive(Debug, Clone, Copy)]
pub struct Sink {
    /// When to print the console line on stderr.
    pub console: ConsoleLog,
}

impl Sink {
    pub fn emit(&self, events: &[Event]) {
        for event in events {
            self.emit_one(event);
        }
    }

    fn emit_one(&self, event: &Event) {
        let message = event.log_message();
        if event.kind.is_error() {
            tracing::error!(target: "dynamic_port_manager", "{message}");
        } else if event.kind == Kind::Warning {
            tracing::warn!(target: "dynamic_port_manager", "{message}");
        } else {
            tracing::info!(target: "dynamic_port_manager", "{message}");
        }
        let print = match self.console {
            ConsoleLog::On => true,
            ConsoleLog::Off => false,
            ConsoleLog::Auto => !console().host_shows_records(),
        };
        if print {
            console().write_line(&|terminal| event.console_line(use_colour(terminal)));
        }
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything
/// non-empty (https://no-color.org).
pub fn use_colour(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
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
        let line = json_line(&e.json());
        assert!(!line.chars().any(is_hidden), "{line:?}");
        assert!(line.contains(r"\u2028e\u2029f\u0085g\u007fh"), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["state_file"], e.state_file.as_str());
    }

    #[test]
    fn no_colour_off_a_terminal() {
        assert!(!use_colour(false));
    }

    #[test]
    fn json_has_the_elk_fields() {
        let v = event(Kind::Pick, &[1, 2], &[3000]).json();
        assert_eq!(v["event.action"], "pick");
        assert_eq!(v["log.level"], "info");
        assert_eq!(v["jalali_time"], "1403/05/01 12:10 doshanbe");
        assert_eq!(v["free_count"], 2);
        assert_eq!(v["active_port"], 3000);
        assert!(v["@timestamp"]
            .as_str()
            .unwrap()
            .starts_with("2024-07-22T12:10"));
    }
}
