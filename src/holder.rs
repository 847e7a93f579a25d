//! Who holds a lease: a process, named by its pid *and* its start time, so a
//! recycled pid never keeps a dead process's ports.

pub(crate) use crate::lease::{Holder, Liveness};

impl Holder {
    /// This process.
    pub fn current() -> Holder {
        // Read from /proc once per process (a forked child reads its own).
        static CURRENT: crate::sys::PerProcess<Holder> = crate::sys::PerProcess::new();
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
        if signal_zero(pid) != Some(true) {
            return None;
        }
        Some(Holder {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        })
    }

    /// Is the process this identity names still running? Yes unless there is
    /// positive evidence that it is gone (see `liveness`): a holder that could
    /// not be checked keeps its leases.
    pub fn is_alive(&self) -> bool {
        !matches!(self.liveness(), Liveness::Dead)
    }

    /// What can be known of this process: running, gone (positive evidence
    /// only: no such process, a zombie, or another process under the pid), or
    /// unknown (the look itself failed: out of descriptors or memory, /proc
    /// not readable). Unknown is never acted on as if it were dead.
    pub fn liveness(&self) -> Liveness {
        match proc_stat(self.pid) {
            Ok(Some(stat)) => {
                if matches!(stat.state, 'Z' | 'X')
                    || (self.start_time != 0 && stat.start_time != self.start_time)
                {
                    Liveness::Dead
                } else {
                    Liveness::Alive
                }
            }
            Ok(None) => Liveness::Dead,
            // /proc could not be read: ask the kernel by signal 0, which needs
            // no descriptor. ESRCH is evidence; a process that exists may be
            // another one under a reused pid, so it stays unknown.
            Err(e) => match signal_zero(self.pid) {
                Some(false) => Liveness::Dead,
                _ => Liveness::Unknown(format!("/proc/{}/stat: {e}", self.pid)),
            },
        }
    }
}

pub fn pid_exists(pid: u32) -> bool {
    signal_zero(pid) != Some(false)
}

/// `kill(pid, 0)`: `Some(true)` the process exists, `Some(false)` there is
/// none (ESRCH), `None` no answer (any other error).
fn signal_zero(pid: u32) -> Option<bool> {
    // kill(0, 0) asks about the caller's process group, not a process 0.
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Some(false);
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) | Err(rustix::io::Errno::PERM) => Some(true),
        Err(rustix::io::Errno::SRCH) => Some(false),
        Err(_) => None,
    }
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).ok().flatten().map(|s| s.start_time)
}

struct ProcStat {
    state: char,
    start_time: u64,
}

/// Reads state and start time from `/proc/<pid>/stat`: `Ok(None)` when there
/// is no such process (ENOENT, ESRCH), `Err` when the look failed (EMFILE,
/// ENOMEM, EACCES...). The command name (field 2) may contain spaces and
/// parentheses, so fields are counted after the last ')'.
fn proc_stat(pid: u32) -> std::io::Result<Option<ProcStat>> {
    let text = loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(text) => break text,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    };
    parse_stat(&text).map(Some).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected /proc/<pid>/stat",
        )
    })
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
        // Linux's /proc always gives one (the crate builds only there).
        assert_ne!(me.start_time, 0, "no start time read from /proc/self/stat");
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
