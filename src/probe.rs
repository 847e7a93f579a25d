//! "Can a server bind this port right now?", answered the way a server would ask
//! it, without disturbing anyone: a bind (never a listen, so no connection can
//! land on the probe) with `SO_REUSEADDR` as servers set it, on the IPv4 and the
//! IPv6 wildcard addresses, closed at once.

use std::io;
use std::mem;

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

/// An owned socket descriptor, closed on every path out of its scope.
pub(crate) struct Fd(pub(crate) libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor was returned by socket() and is closed once.
        unsafe { libc::close(self.0) };
    }
}

fn probe_family(port: u16, family: Family) -> Probe {
    match bind_once(port, family) {
        Ok(()) => Probe::Free,
        Err(e) => classify(&e),
    }
}

/// The meaning of a failed bind, per errno.
fn classify(error: &io::Error) -> Probe {
    match error.raw_os_error() {
        Some(libc::EADDRINUSE) => Probe::InUse,
        // The host has no such address family (IPv6 disabled, say): nothing
        // there can conflict, so it does not count against the port.
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT) => {
            Probe::Free
        }
        // This process is out of something: the port was never looked at.
        Some(
            errno @ (libc::EMFILE
            | libc::ENFILE
            | libc::ENOBUFS
            | libc::ENOMEM
            | libc::EINTR
            | libc::EAGAIN),
        ) => Probe::Unknown(errno),
        // EACCES (privileged port) and anything unexpected: not usable.
        _ => Probe::Unusable,
    }
}

fn bind_once(port: u16, family: Family) -> io::Result<()> {
    let domain = match family {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(raw);
    set_flag(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    match family {
        Family::V4 => {
            // SAFETY: sockaddr_in is plain old data; zeroed is a valid value.
            let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = port.to_be();
            addr.sin_addr = libc::in_addr {
                s_addr: libc::INADDR_ANY,
            };
            bind(&fd, &addr)
        }
        Family::V6 => {
            // Without V6ONLY, [::] would also claim the IPv4 port and the two
            // probes would measure the same thing twice.
            set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
            // SAFETY: sockaddr_in6 is plain old data; zeroed is `[::]`.
            let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            addr.sin6_port = port.to_be();
            bind(&fd, &addr)
        }
    }
}

fn set_flag(fd: &Fd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.0,
            level,
            name,
            &one as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bind<T>(fd: &Fd, addr: &T) -> io::Result<()> {
    // SAFETY: `addr` is a fully initialised sockaddr_in/sockaddr_in6 of size T.
    let rc = unsafe {
        libc::bind(
            fd.0,
            addr as *const T as *const libc::sockaddr,
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return; // no IPv6 on this host: nothing to test
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
