//! Which ports of the host are taken right now, for a whole range at once.
//!
//! On Linux the kernel's own socket tables answer this for every port at once,
//! instead of 6,000 bind probes: first the `sock_diag` netlink dump of
//! listening sockets (microseconds, see `sockdiag/`), else `/proc/net/tcp`
//! and `/proc/net/tcp6` (every socket but TIME_WAIT ones, which servers bind
//! over with `SO_REUSEADDR`; milliseconds on a large host), else one probe per
//! port. The answer is a snapshot: a pick still confirms its candidate with a
//! real bind probe, which also catches sockets that are bound but not listening.

use std::fs;
use std::io;
use std::ops::RangeInclusive;

use crate::probe::{probe_port, Probe};

pub use crate::port_set::PortSet;

/// The ports in use on this host. Reads the kernel tables where they exist and
/// falls back to probing every port of `range` one by one elsewhere.
pub fn ports_in_use(range: RangeInclusive<u16>) -> PortSet {
    match kernel_tables(range.clone()) {
        Ok(set) => set,
        Err(_) => probe_range(range),
    }
}

/// The kernel's view of the ports in `range` (at least; the /proc tables give
/// every port): netlink where it answers, else the /proc tables. Netlink asks
/// the kernel for that range only, so the sockets of the host outside it cost
/// next to nothing.
pub fn kernel_tables(range: RangeInclusive<u16>) -> io::Result<PortSet> {
    #[cfg(target_os = "linux")]
    if let Ok(set) = crate::sockdiag::listening_ports(range) {
        return Ok(set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = range;
    proc_tables()
}

/// Reads `/proc/net/tcp` and `/proc/net/tcp6`. Fails only when neither exists.
pub fn proc_tables() -> io::Result<PortSet> {
    let mut set = PortSet::default();
    let mut read_any = false;
    let mut last_error = None;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match fs::read_to_string(table) {
            Ok(text) => {
                parse_table(&text, &mut set);
                read_any = true;
            }
            // tcp6 is absent on hosts without IPv6; that is not an error.
            Err(e) => last_error = Some(e),
        }
    }
    if read_any {
        Ok(set)
    } else {
        Err(last_error.unwrap_or_else(|| io::Error::other("no socket table")))
    }
}

/// TIME_WAIT in the kernel's state numbering (include/net/tcp_states.h).
const TCP_TIME_WAIT: u8 = 0x06;

/// Adds the local port of every non-TIME_WAIT socket in one table to `set`.
/// Line shape: `  0: 0100007F:0BB8 00000000:0000 0A ...` (sl, local, remote, state).
fn parse_table(text: &str, set: &mut PortSet) {
    for line in text.lines().skip(1) {
        let mut fields = line.split_ascii_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some((_, port_hex)) = local.rsplit_once(':') else {
            continue;
        };
        let (Ok(port), Ok(state)) = (
            u16::from_str_radix(port_hex, 16),
            u8::from_str_radix(state, 16),
        ) else {
            continue;
        };
        if state != TCP_TIME_WAIT && port != 0 {
            set.insert(port);
        }
    }
}

/// The portable fallback: one bind probe per port.
fn probe_range(range: RangeInclusive<u16>) -> PortSet {
    range.filter(|p| probe_port(*p) != Probe::Free).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_listeners_and_skips_time_wait() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:0BB9 0100007F:D431 06 00000000:00000000 03:00001585 00000000     0        0 0 3 0\n\
   2: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 01 0 0\n\
   garbage line\n";
        let mut set = PortSet::default();
        parse_table(table, &mut set);
        assert!(set.contains(3000), "LISTEN counts");
        assert!(!set.contains(3001), "TIME_WAIT does not");
        assert!(set.contains(8080), "IPv6 ESTABLISHED counts");
        assert_eq!(set.iter().count(), 2);
    }

    #[test]
    fn a_real_listener_shows_up_in_the_kernel_tables() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(ports_in_use(port..=port).contains(port));
        assert!(proc_tables().unwrap().contains(port));
        assert!(probe_range(port..=port).contains(port));
    }
}
