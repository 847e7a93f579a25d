//! "Can a server bind this port right now?", answered the way a server would ask
//! it, without disturbing anyone: a bind (never a listen, so no connection can
//! land on the probe) with `SO_REUSEADDR` as servers set it, closed at once.
//!
//! One socket asks for both address families: an IPv6 socket with
//! `IPV6_V6ONLY` off bound to `[::]` conflicts with every IPv4 and IPv6 socket
//! on the port just as the two sockets (`0.0.0.0` and `[::]` with
//! `IPV6_V6ONLY`) it stands for would, in five system calls instead of nine
//! (tests/test_probe_dual_stack.py checks this against the two-socket answer
//! for listeners, bound and connected sockets and TIME_WAIT, on IPv4, IPv6,
//! dual-stack and mapped addresses). Where the host has no IPv6, the
//! IPv4 socket alone answers; where the one socket fails in any other way, the
//! two-socket probe answers, so every error means what it always meant.

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

/// Probes `port` on `0.0.0.0` and `[::]`, with one dual-stack socket where
/// it answers. A family this host lacks is skipped.
pub fn probe_port(port: u16) -> Probe {
    match dual_stack(port) {
        Dual::Answer(probe) => probe,
        Dual::NoIpv6 => probe_family(port, Family::V4),
        Dual::AskTwo => probe_two_sockets(port),
    }
}

/// What the one dual-stack socket decided.
#[derive(Debug, PartialEq, Eq)]
enum Dual {
    /// Bound (free) or refused with `EADDRINUSE` (in use): the answer the two
    /// sockets would give.
    Answer(Probe),
    /// No IPv6 on this host (no such family, or no `[::]` to bind): the IPv4
    /// socket alone answers, as the two-socket probe skips a family the
    /// host lacks.
    NoIpv6,
    /// Any other failure: the two-socket probe answers, and classifies it.
    AskTwo,
}

/// One `[::]` bind with `IPV6_V6ONLY` off and `SO_REUSEADDR`, closed at once.
fn dual_stack(port: u16) -> Dual {
    let fd = match rustix::net::socket_with(
        AddressFamily::INET6,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return after_socket(e),
    };
    if sockopt::set_socket_reuseaddr(&fd, true).is_err()
        || sockopt::set_ipv6_v6only(&fd, false).is_err()
    {
        return Dual::AskTwo;
    }
    after_bind(rustix::net::bind(
        &fd,
        &SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0),
    ))
}

/// The meaning of a failed `socket(AF_INET6)`.
fn after_socket(errno: Errno) -> Dual {
    match errno {
        Errno::AFNOSUPPORT | Errno::PROTONOSUPPORT => Dual::NoIpv6,
        _ => Dual::AskTwo,
    }
}

/// The meaning of the dual-stack bind's outcome.
fn after_bind(result: rustix::io::Result<()>) -> Dual {
    match result {
        Ok(()) => Dual::Answer(Probe::Free),
        Err(Errno::ADDRINUSE) => Dual::Answer(Probe::InUse),
        Err(Errno::ADDRNOTAVAIL) => Dual::NoIpv6,
        Err(_) => Dual::AskTwo,
    }
}

/// The two-socket probe: `0.0.0.0` and `[::]` with `IPV6_V6ONLY`, each
/// classified on its own.
fn probe_two_sockets(port: u16) -> Probe {
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

    /// A socket of `family` bound to `addr` (IPv6 with `v6only` as given),
    /// listening if asked, with `SO_REUSEADDR` if asked.
    fn holder(
        addr: std::net::SocketAddr,
        v6only: Option<bool>,
        reuse: bool,
        listen: bool,
    ) -> rustix::fd::OwnedFd {
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = rustix::net::socket(family, SocketType::STREAM, None).unwrap();
        sockopt::set_socket_reuseaddr(&fd, reuse).unwrap();
        if let Some(v6only) = v6only {
            sockopt::set_ipv6_v6only(&fd, v6only).unwrap();
        }
        rustix::net::bind(&fd, &addr).unwrap();
        if listen {
            rustix::net::listen(&fd, 1).unwrap();
        }
        fd
    }

    #[test]
    fn one_socket_answers_as_two() {
        // A free port to hold in each way, found as the probe finds them.
        let port = || {
            let listener = TcpListener::bind("[::]:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let v4 = |p: u16| std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let v4_any = |p: u16| std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, p));
        let v6 = |p: u16| std::net::SocketAddr::from((Ipv6Addr::LOCALHOST, p));
        let v6_any = |p: u16| std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, p));
        type Case = (
            &'static str,
            fn(u16) -> std::net::SocketAddr,
            Option<bool>,
            bool,
            bool,
            Probe,
        );
        let cases: [Case; 10] = [
            ("listening 127.0.0.1", v4, None, true, true, Probe::InUse),
            ("listening 0.0.0.0", v4_any, None, true, true, Probe::InUse),
            ("listening ::1", v6, Some(true), true, true, Probe::InUse),
            (
                "listening :: dual-stack",
                v6_any,
                Some(false),
                true,
                true,
                Probe::InUse,
            ),
            (
                "listening :: V6ONLY",
                v6_any,
                Some(true),
                true,
                true,
                Probe::InUse,
            ),
            (
                "bound 127.0.0.1, SO_REUSEADDR",
                v4,
                None,
                true,
                false,
                Probe::Free,
            ),
            (
                "bound :: V6ONLY, SO_REUSEADDR",
                v6_any,
                Some(true),
                true,
                false,
                Probe::Free,
            ),
            ("bound 127.0.0.1", v4, None, false, false, Probe::InUse),
            ("bound ::1", v6, Some(true), false, false, Probe::InUse),
            (
                "bound :: V6ONLY",
                v6_any,
                Some(true),
                false,
                false,
                Probe::InUse,
            ),
        ];
        for (name, addr, v6only, reuse, listen, expected) in cases {
            let p = port();
            let held = holder(addr(p), v6only, reuse, listen);
            let two = probe_two_sockets(p);
            assert_eq!(two, expected, "{name}: the two-socket probe");
            assert_eq!(dual_stack(p), Dual::Answer(two), "{name}: the one socket");
            assert_eq!(probe_port(p), two, "{name}");
            drop(held);
            assert_eq!(probe_port(p), Probe::Free, "{name}, once closed");
        }
    }

    #[test]
    fn the_one_socket_decides_only_what_it_can() {
        // No IPv6 on the host: the IPv4 socket alone answers.
        assert_eq!(after_socket(Errno::AFNOSUPPORT), Dual::NoIpv6);
        assert_eq!(after_socket(Errno::PROTONOSUPPORT), Dual::NoIpv6);
        assert_eq!(after_bind(Err(Errno::ADDRNOTAVAIL)), Dual::NoIpv6);
        // Anything else: the two sockets answer, with their own meaning of
        // the error (out of descriptors stays unknown, a refusal unusable).
        for errno in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::ACCESS,
            Errno::PERM,
        ] {
            assert_eq!(after_socket(errno), Dual::AskTwo, "{errno:?}");
            assert_eq!(after_bind(Err(errno)), Dual::AskTwo, "{errno:?}");
        }
        assert_eq!(after_bind(Ok(())), Dual::Answer(Probe::Free));
        assert_eq!(
            after_bind(Err(Errno::ADDRINUSE)),
            Dual::Answer(Probe::InUse)
        );
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
