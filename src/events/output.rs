//! Where events go: the process's `Output` (set once; the Python binding's, or
//! the console line on stderr), and the manager's `Sink`.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use super::{ConsoleLog, Event};

/// Where events go: the host's logging, and the console line. The default
/// (a program without Python) prints the console line on the process's
/// stderr; the Python binding installs one that makes each event a `logging`
/// record and writes the line through `sys.stderr`, so redirection and
/// capture work and a closed fd 2 is never written to.
pub trait Output: Send + Sync {
    /// Reports `events` (in order); `console` says when their console lines
    /// are printed (`render(event, colour)` makes one, `colour` being whether
    /// the destination is a terminal, NO_COLOR applied).
    fn emit(&self, events: &[Event], console: ConsoleLog);
}

struct ProcessStderr;

impl Output for ProcessStderr {
    fn emit(&self, events: &[Event], console: ConsoleLog) {
        if console == ConsoleLog::Off {
            return;
        }
        let stderr = std::io::stderr();
        let colour = use_colour(stderr.is_terminal());
        let mut out = stderr.lock();
        for event in events {
            // A closed or full stderr must never take the host program down.
            let _ = writeln!(out, "{}", event.console_line(colour));
        }
    }
}

static OUTPUT: OnceLock<Box<dyn Output>> = OnceLock::new();

/// Sets where events go, once per process (later calls are ignored).
pub fn set_output(output: Box<dyn Output>) {
    let _ = OUTPUT.set(output);
}

fn output() -> &'static dyn Output {
    OUTPUT.get().map_or(&ProcessStderr, |c| c.as_ref())
}

/// Where events go.
#[derive(Debug, Clone, Copy)]
pub struct Sink {
    /// When to print the console line on stderr.
    pub console: ConsoleLog,
}

impl Sink {
    pub fn emit(&self, events: &[Event]) {
        if !events.is_empty() {
            output().emit(events, self.console);
        }
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything
/// non-empty (https://no-color.org).
pub fn use_colour(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
