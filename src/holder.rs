//! Who holds a lease: a process, named by its pid *and* its start time, so a
//! recycled pid never keeps a dead process's ports.

use serde::{Deserialize, Serialize};

/// A process identity that survives pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22);
    /// 0 where the platform does not tell.
    pub start_time: u64,
}

impl Holder {
    /// This process.
    pub fn current() -> Holder {
        // Read from /proc once per process (a forked child reads its own).
        static CURRENT: crate::per_process::PerProcess<Holder> =
            crate::per_process::PerProcess::new();
        *CURRENT.get_or_init(|| {
            let pid = std::process::id();
            Holder {
                pid,
                start_time: start_time(pid).unwrap_or(0),
            }
        })
    }

    /// The live process with this pid, if any.
    pub fn of_pid(pid: u32) -> Option<Holder> {
        if !pid_exists(pid) {
            return None;
        }
        Some(Holder {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        })
    }

    /// Is the process this identity names still running? A zombie counts as
    /// gone: it holds no sockets and will never release a lease itself.
    pub fn is_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some(stat) => {
                !matches!(stat.state, 'Z' | 'X')
                    && (self.start_time == 0 || stat.start_time == self.start_time)
            }
            None => cfg!(not(target_os = "linux")) && pid_exists(self.pid),
        }
    }
}

pub fn pid_exists(pid: u32) -> bool {
    // kill(0, 0) asks about the caller's process group, not a process 0.
    let Ok(pid @ 1..) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

struct ProcStat {
    state: char,
    start_time: u64,
}

/// Reads state and start time from `/proc/<pid>/stat`. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after the last ')'.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace();
    // Fields after comm start at field 3 (state); starttime is field 22.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        let me = Holder::current();
        assert!(me.is_alive());
        assert_eq!(Holder::of_pid(me.pid), Some(me));
    }

    #[test]
    fn pid_0_and_pids_beyond_pid_t_name_no_process() {
        // kill() would read 0 as "my process group" and -1 as "every process".
        assert_eq!(Holder::of_pid(0), None);
        assert_eq!(Holder::of_pid(u32::MAX), None);
        assert_eq!(Holder::of_pid(1 << 31), None);
    }

    #[test]
    fn a_recycled_pid_is_not_the_same_holder() {
        let mut me = Holder::current();
        if me.start_time == 0 {
            return; // platform without start times
        }
        me.start_time += 1;
        assert!(!me.is_alive());
    }

    #[test]
    fn an_exited_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let holder = Holder { pid, start_time: 1 };
        assert!(!holder.is_alive());
    }

    #[test]
    fn parses_a_comm_with_spaces_and_parens() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        let parsed = parse_stat(stat).unwrap();
        assert_eq!(parsed.state, 'S');
        assert_eq!(parsed.start_time, 123456);
    }
}
