//! Linux `sock_diag` netlink: the kernel's list of TCP sockets, for IPv4 and
//! IPv6, in one request each: the listening ports (for the scan), or every
//! socket with its inode and uid (for `owners.rs`).
//!
//! Why not `/proc/net/tcp`: reading it walks the kernel's whole established-
//! connection hash table, whose size follows the machine's memory, not its
//! socket count (measured here: 3.4 ms per table on a 24 GiB host with one
//! socket). A netlink dump restricted to LISTEN never touches that table and
//! answers in microseconds. Sockets that are only bound or connected are not
//! listed by either; the bind probe at pick time is what catches those.
//!
//! The scan asks only for the ports of its range: the request carries a
//! bytecode filter (`INET_DIAG_REQ_BYTECODE`, source port >= first and <=
//! last) that the kernel runs on each socket before it builds a message, so a
//! host with tens of thousands of sockets outside the range costs the scan a
//! walk of the kernel's table, not a message per socket. And both families
//! come from one request (`TCPDIAG_GETSOCK`, whose dump leaves the family
//! open) where the kernel takes it: each dump walks every listener of the
//! host, whatever its family, so two requests walked them twice.
//!
//! What it costs: the kernel answers a dump by walking every bucket of its
//! listener hash and every listener of the host in them, running the filter
//! on each (`tcp_diag_dump` in net/ipv4/tcp_diag.c, Linux 6.x: `for (i = s_i;
//! i <= hashinfo->lhash2_mask; i++)`, then `sk_nulls_for_each` over the
//! bucket): about 40 ns per listener of the host, in the range or not. No
//! request walks only the listeners of some ports: an exact request (one
//! socket, no `NLM_F_DUMP`) is a hash lookup (`tcp_diag_find_one_icsk`, then
//! `inet_lookup`), but it finds only a listener bound to the address it
//! names or to the wildcard (`compute_score` in net/ipv4/inet_hashtables.c
//! rejects one with another `sk_rcv_saddr` or bound to a device), and each
//! free port costs an error message to build and read (1.7-2.8 µs a lookup
//! measured here, against 40 ns a listener for the dump). A listener
//! on 127.0.1.5, on another address of the host or bound to a device holds
//! its port against a server all the same, and no list of addresses covers
//! 127.0.0.0/8. So the scan stays a dump, and a new manager takes none on its
//! way (its pick's bind probe decides; see `manager.rs`).

use std::io;
use std::ops::RangeInclusive;

use crate::port_set::PortSet;
use crate::probe::Fd;

mod reply;
mod request;

pub use reply::SockInfo;
use request::{send_dump, Family, TCP_LISTEN, TCP_TIME_WAIT};

/// Every TCP state (1..=12 in the kernel's numbering) but TIME_WAIT, which
/// holds no port against a server and belongs to no process.
pub const HOLDING_STATES: u32 = 0x1ffe & !(1 << TCP_TIME_WAIT);

/// The local ports inside `range` of every listening TCP socket (IPv4 and
/// IPv6) in this network namespace. Fails where netlink sock_diag is
/// unavailable.
pub fn listening_ports(range: RangeInclusive<u16>) -> io::Result<PortSet> {
    let mut set = PortSet::default();
    let filter = (range != (0..=u16::MAX)).then_some(range);
    match dump_both(1 << TCP_LISTEN, filter.as_ref(), &mut |s| {
        set.insert(s.port)
    }) {
        // A kernel that refuses the filter is asked for every socket.
        Err(e) if filter.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
            set.clear();
            dump_both(1 << TCP_LISTEN, None, &mut |s| set.insert(s.port))?;
        }
        other => other?,
    }
    // The kernel compares; this keeps the answer to the range whatever it did.
    if let Some(range) = filter {
        for port in set
            .iter()
            .filter(|p| !range.contains(p))
            .collect::<Vec<_>>()
        {
            set.remove(port);
        }
    }
    Ok(set)
}

/// Every TCP socket (IPv4 and IPv6) in one of `states` (a bit per state).
pub fn sockets(states: u32) -> io::Result<Vec<SockInfo>> {
    let mut found = Vec::new();
    dump_both(states, None, &mut |s| found.push(s))?;
    Ok(found)
}

fn dump_both(
    states: u32,
    filter: Option<&RangeInclusive<u16>>,
    each: &mut dyn FnMut(SockInfo),
) -> io::Result<()> {
    // One request for both families where the kernel takes it; what it
    // reports is passed on only once the dump ended well, so a kernel that
    // refuses it half-way is asked again below without double counting.
    let fd = diag_socket()?;
    let mut found = Vec::new();
    if dump(&fd, Family::Both, states, filter, &mut |s| found.push(s)).is_ok() {
        found.into_iter().for_each(each);
        return Ok(());
    }
    // One request per family, on a new socket (the failed dump may have left
    // messages on the old one). A dump ends with NLMSG_DONE, after which the
    // socket takes the next request.
    let fd = diag_socket()?;
    dump(&fd, Family::One(libc::AF_INET as u8), states, filter, each)?;
    match dump(&fd, Family::One(libc::AF_INET6 as u8), states, filter, each) {
        // A kernel without IPv6 has no IPv6 sockets to report.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn diag_socket() -> io::Result<Fd> {
    // Never wait long for the kernel: a refresh must not hang on a scan.
    crate::sys::netlink_diag_socket(std::time::Duration::from_secs(1))
}

fn dump(
    fd: &Fd,
    family: Family,
    states: u32,
    filter: Option<&RangeInclusive<u16>>,
    each: &mut dyn FnMut(SockInfo),
) -> io::Result<()> {
    send_dump(fd, family, states, filter)?;
    reply::receive_dump(fd, each)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn lists_ipv4_and_ipv6_listeners() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v4_port = v4.local_addr().unwrap().port();
        let set = listening_ports(ALL).unwrap();
        assert!(set.contains(v4_port));
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let v6_port = v6.local_addr().unwrap().port();
            assert!(listening_ports(ALL).unwrap().contains(v6_port));
            assert!(listening_ports(v6_port..=v6_port)
                .unwrap()
                .contains(v6_port));
        }
        drop(v4);
        assert!(!listening_ports(ALL).unwrap().contains(v4_port));
    }

    #[test]
    fn sockets_carry_the_inode_of_the_socket_file() {
        use std::os::unix::fs::MetadataExt;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let found: Vec<SockInfo> = sockets(HOLDING_STATES)
            .unwrap()
            .into_iter()
            .filter(|s| s.port == port)
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].listening());
        assert_eq!(found[0].inode, inode);
        assert_eq!(found[0].uid, crate::fsutil::effective_uid());
    }

    #[test]
    fn a_connected_client_port_is_not_a_listener() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert!(!listening_ports(ALL).unwrap().contains(client_port));
    }

    const ALL: RangeInclusive<u16> = 0..=u16::MAX;

    #[test]
    fn a_range_lists_the_listeners_inside_it_and_no_other() {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        ports.sort_unstable();
        let (low, middle, high) = (ports[0], ports[1], ports[2]);
        // Both ends of the range are inside it.
        let set = listening_ports(low..=middle).unwrap();
        assert!(set.contains(low) && set.contains(middle), "{set:?}");
        assert!(!set.contains(high), "{set:?}");
        assert!(set.iter().all(|p| (low..=middle).contains(&p)), "{set:?}");
        let one = listening_ports(high..=high).unwrap();
        assert_eq!(one.iter().collect::<Vec<_>>(), [high]);
        // The kernel itself filtered: nothing outside the range came back.
        let mut outside = Vec::new();
        dump_both(1 << TCP_LISTEN, Some(&(low..=middle)), &mut |s| {
            if !(low..=middle).contains(&s.port) {
                outside.push(s.port);
            }
        })
        .unwrap();
        assert!(outside.is_empty(), "{outside:?}");
        // What the whole-host dump shows inside a range, the filtered one shows.
        let whole = listening_ports(ALL).unwrap();
        for port in ports {
            assert!(whole.contains(port));
        }
    }

    #[test]
    fn one_request_reports_both_families() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = TcpListener::bind(("::1", port)).ok();
        let mut seen = Vec::new();
        let fd = diag_socket().unwrap();
        dump(
            &fd,
            Family::Both,
            1 << TCP_LISTEN,
            Some(&(port..=port)),
            &mut |s| seen.push(s.port),
        )
        .unwrap();
        let expected = if v6.is_some() { 2 } else { 1 };
        // Other programs may listen on this port at other addresses.
        assert!(seen.len() >= expected, "{seen:?}");
        assert!(seen.iter().all(|p| *p == port), "{seen:?}");
        let mut per_family = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let fd = diag_socket().unwrap();
            let _ = dump(
                &fd,
                Family::One(family as u8),
                1 << TCP_LISTEN,
                Some(&(port..=port)),
                &mut |s| per_family.push(s.port),
            );
        }
        assert!(per_family.len() >= expected, "{per_family:?}");
    }
}
