//! "Can a server bind this port right now?", answered the way a server would ask
//! it, without disturbing anyone: a bind (never a listen, so no connection can
//! land on the probe) with `SO_REUSEADDR` as servers set it, on the IPv4 and the
//! IPv6 wildcard addresses, closed at once.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use rustix::io::Errno;
use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

/// What a bind probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Bindable on every address family this host has.
    Free,
    /// Some socket holds it (a listener, a bound or connected socket).
    InUse,
    /// The host refuses it to us (privileged port, policy): never hand it out.
    Unusable,
    /// The probe could not be made (out of descriptors, buffers or memory):
    /// says nothing of the port. Never recorded as an answer.
    Unknown(i32),
}

/// Probes `port` on `0.0.0.0` and `[::]`. A family this host lacks is skipped.
pub fn probe_port(port: u16) -> Probe {
    match (
        probe_family(port, Family::V4),
        probe_family(port, Family::V6),
    ) {
        (Probe::Free, Probe::Free) => Probe::Free,
        (Probe::InUse, _) | (_, Probe::InUse) => Probe::InUse,
        (unknown @ Probe::Unknown(_), _) | (_, unknown @ Probe::Unknown(_)) => unknown,
        _ => Probe::Unusable,
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// For `sockdiag/`, until its socket is an `OwnedFd` too.
pub(crate) use crate::sys::Fd;

fn probe_family(port: u16, family: Family) -> Probe {
    match bind_once(port, family) {
        Ok(()) => Probe::Free,
        Err(e) => classify(&e),
    }
}

/// The meaning of a failed bind, per errno.
fn classify(error: &io::Error) -> Probe {
    let Some(errno) = Errno::from_io_error(error) else {
        return Probe::Unusable;
    };
    match errno {
        Errno::ADDRINUSE => Probe::InUse,
        // The host has no such address family (IPv6 disabled, say): nothing
        // there can conflict, so it does not count against the port.
        Errno::AFNOSUPPORT | Errno::ADDRNOTAVAIL | Errno::PROTONOSUPPORT => Probe::Free,
        // This process is out of something: the port was never looked at.
        Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM | Errno::INTR | Errno::AGAIN => {
            Probe::Unknown(errno.raw_os_error())
        }
        // EACCES (privileged port) and anything unexpected: not usable.
        _ => Probe::Unusable,
    }
}

/// One bind of `port` on the family's wildcard address, with `SO_REUSEADDR`
/// as servers set it; the socket is closed when it goes out of scope.
fn bind_once(port: u16, family: Family) -> io::Result<()> {
    let domain = match family {
        Family::V4 => AddressFamily::INET,
        Family::V6 => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(domain, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    match family {
        Family::V4 => {
            rustix::net::bind(&fd, &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        }
        Family::V6 => {
            // Without V6ONLY, [::] would also claim the IPv4 port and the two
            // probes would measure the same thing twice.
            sockopt::set_ipv6_v6only(&fd, true)?;
            rustix::net::bind(&fd, &SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_listener_makes_its_port_in_use() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(probe_port(port), Probe::InUse);
        drop(listener);
        assert_eq!(probe_port(port), Probe::Free);
    }

    #[test]
    fn an_ipv6_listener_makes_its_port_in_use() {
        // A host without IPv6 must say so: this test never passes unseen.
        let listener = match TcpListener::bind("[::1]:0") {
            Ok(listener) => listener,
            Err(e) if std::env::var_os("DPM_TEST_NO_IPV6").is_some() => {
                eprintln!("no IPv6 here ({e}); DPM_TEST_NO_IPV6 is set: not tested");
                return;
            }
            Err(e) => {
                panic!("[::1] cannot be bound ({e}); set DPM_TEST_NO_IPV6=1 on a host without IPv6")
            }
        };
        let port = listener.local_addr().unwrap().port();
        assert_eq!(probe_port(port), Probe::InUse);
    }

    #[test]
    fn time_wait_does_not_block_a_server() {
        // The side that closes first keeps the TIME_WAIT socket; make that the
        // accepted connection on the server port, as after a server restart.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        drop(server_side);
        drop(client);
        drop(listener);
        assert_eq!(probe_port(port), Probe::Free);
    }

    #[test]
    fn probing_does_not_listen() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert_eq!(probe_port(port), Probe::Free);
        // Nothing is left listening after the probe.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
