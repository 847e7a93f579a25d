//! Whether lease holders are still running, as cheaply as it can be told:
//! pidfds kept open for holders seen alive, `/proc` for the rest. Only
//! positive evidence makes a holder dead (see `lease::Liveness`).

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;

use crate::holder::{Holder, Liveness};
use crate::lease::{Lease, LeaseTable};

/// Handles on holders seen alive, so a pick does not read `/proc` for each
/// of them every time: a pidfd (Linux 5.3+) becomes readable the moment its
/// process exits, so a death is seen at once, for one `poll` per holder.
#[derive(Default)]
pub struct AliveCache {
    watched: HashMap<Holder, OwnedFd>,
    /// Why holders could not be checked since the last `take_unknown`.
    pub(crate) unknown: Vec<String>,
}

/// At most this many pidfds are kept open (others are checked through /proc).
const WATCHED_MAX: usize = 64;

impl AliveCache {
    /// Whether there is positive evidence that `holder` is gone. A check
    /// that could not be made (no descriptor for a pidfd or /proc, a failed
    /// poll) is not evidence: the holder counts as alive, and why is noted.
    pub fn is_dead(&mut self, holder: Holder) -> bool {
        if let Some(fd) = self.watched.get(&holder) {
            match has_exited(fd) {
                Ok(false) => return false,
                Ok(true) => {
                    self.watched.remove(&holder);
                    return true;
                }
                // Unknown: the handle is dropped and /proc asked below.
                Err(_) => {
                    self.watched.remove(&holder);
                }
            }
        }
        match holder.liveness() {
            Liveness::Dead => return true,
            Liveness::Unknown(why) => {
                self.unknown.push(why);
                return false;
            }
            Liveness::Alive => {}
        }
        if self.watched.len() < WATCHED_MAX {
            // Checked again once the handle is open: the pid could have been
            // reused in between, and then the handle would watch a stranger.
            if let Some(fd) = pidfd_open(holder.pid) {
                if holder.liveness() == Liveness::Alive {
                    self.watched.insert(holder, fd);
                }
            }
        }
        false
    }

    /// Why holders could not be checked since the last call (none: empty).
    pub fn take_unknown(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unknown)
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Whether the process behind a pidfd has exited: readable means exited;
/// an error is no answer.
fn has_exited(fd: &OwnedFd) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&now)) {
            Ok(ready) => {
                let revents = fds[0].revents();
                if revents.intersects(PollFlags::NVAL | PollFlags::ERR) {
                    return Err(io::Error::other("poll on a pidfd failed"));
                }
                return Ok(ready > 0 && revents.contains(PollFlags::IN));
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Taking back the leases of processes that are gone: the lease table's
/// part that looks at processes (the table itself is pure data).
impl LeaseTable {
    /// Removes the leases whose holder process is gone, and returns them.
    /// Only positive evidence counts (see `Holder::liveness`): a holder that
    /// could not be checked keeps its leases, and `unknown` says why.
    pub fn remove_dead(&mut self, seen: &mut AliveCache) -> Vec<Lease> {
        let unknown = &mut seen.unknown;
        let mut dead: HashMap<Holder, bool> = HashMap::new();
        self.remove_where(|l| {
            *dead
                .entry(l.holder())
                .or_insert_with(|| match l.holder().liveness() {
                    Liveness::Dead => true,
                    Liveness::Alive => false,
                    Liveness::Unknown(why) => {
                        unknown.push(why);
                        false
                    }
                })
        })
    }

    /// Removes the leases on ports of `range` below `below` (all of the range
    /// when `None`) whose holder is gone, and returns them. For a pick: the
    /// lowest free port must not stay held by a process that exited.
    /// `holders` are those of the range's leases with their lowest port there
    /// (as `state_view::leased_in` found them in the same transaction): each is
    /// checked once, one seen alive within the last second is not checked
    /// again (`seen`), and the table is only walked again if one is gone.
    /// A holder that could not be checked is kept (`seen` notes why).
    pub fn remove_dead_among(
        &mut self,
        range: &std::ops::RangeInclusive<u16>,
        below: Option<u16>,
        holders: &[(Holder, u16)],
        seen: &mut AliveCache,
    ) -> Vec<Lease> {
        let dead: Vec<Holder> = holders
            .iter()
            .filter(|(_, lowest)| below.is_none_or(|b| *lowest < b))
            .map(|(holder, _)| *holder)
            .filter(|holder| seen.is_dead(*holder))
            .collect();
        if dead.is_empty() {
            return Vec::new();
        }
        let in_scope = |l: &Lease| range.contains(&l.port) && below.is_none_or(|b| l.port < b);
        self.remove_where(|l| in_scope(l) && dead.contains(&l.holder()))
    }
}
