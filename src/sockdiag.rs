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

use std::io;
use std::mem;

use crate::probe::Fd;
use crate::scan::PortSet;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
/// Every TCP state (1..=12 in the kernel's numbering) but TIME_WAIT, which
/// holds no port against a server and belongs to no process.
pub const HOLDING_STATES: u32 = 0x1ffe & !(1 << TCP_TIME_WAIT);

#[repr(C)]
#[derive(Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: InetDiagReqV2,
}

/// One socket of the dump: its local port, state, owner uid and inode (0 for
/// a connection not yet accepted, which has no file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    pub port: u16,
    pub state: u8,
    pub uid: u32,
    pub inode: u64,
}

impl SockInfo {
    pub fn listening(&self) -> bool {
        u32::from(self.state) == TCP_LISTEN
    }
}

/// The local ports of every listening TCP socket (IPv4 and IPv6) in this
/// network namespace. Fails where netlink sock_diag is unavailable.
pub fn listening_ports() -> io::Result<PortSet> {
    let mut set = PortSet::default();
    dump_both(1 << TCP_LISTEN, &mut |s| set.insert(s.port))?;
    Ok(set)
}

/// Every TCP socket (IPv4 and IPv6) in one of `states` (a bit per state).
pub fn sockets(states: u32) -> io::Result<Vec<SockInfo>> {
    let mut found = Vec::new();
    dump_both(states, &mut |s| found.push(s))?;
    Ok(found)
}

fn dump_both(states: u32, each: &mut dyn FnMut(SockInfo)) -> io::Result<()> {
    // One socket for both dumps: a dump ends with NLMSG_DONE, after which the
    // socket takes the next request.
    let fd = diag_socket()?;
    dump(&fd, libc::AF_INET as u8, states, each)?;
    match dump(&fd, libc::AF_INET6 as u8, states, each) {
        // A kernel without IPv6 has no IPv6 sockets to report.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn diag_socket() -> io::Result<Fd> {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(raw);
    // Never wait long for the kernel: a refresh must not hang on a scan.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: the option value is a timeval that outlives the call.
    unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

fn dump(fd: &Fd, family: u8, states: u32, each: &mut dyn FnMut(SockInfo)) -> io::Result<()> {
    let request = Request {
        header: NlMsgHdr {
            len: mem::size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq: 1,
            pid: 0,
        },
        body: InetDiagReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states,
            // SAFETY: an all-zero socket id matches every socket.
            id: unsafe { mem::zeroed() },
        },
    };
    // SAFETY: sending the bytes of a repr(C) struct that outlives the call.
    let sent = unsafe {
        libc::send(
            fd.0,
            &request as *const Request as *const libc::c_void,
            mem::size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    crate::kept::with(&RECEIVE, |buf| {
        buf.resize(RECEIVE_SIZE, 0);
        receive(fd, buf, each)
    })
}

const RECEIVE_SIZE: usize = 32 * 1024;

thread_local! {
    /// The receive buffer (see `kept.rs`).
    static RECEIVE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn receive(fd: &Fd, buf: &mut [u8], each: &mut dyn FnMut(SockInfo)) -> io::Result<()> {
    loop {
        // SAFETY: receiving into a buffer we own, at most its length.
        let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        if parse_messages(&buf[..n as usize], each)? {
            return Ok(());
        }
    }
}

/// Passes each socket of one datagram's messages to `each`. Returns true at
/// the end of the dump.
fn parse_messages(mut data: &[u8], each: &mut dyn FnMut(SockInfo)) -> io::Result<bool> {
    let header_len = mem::size_of::<NlMsgHdr>();
    while data.len() >= header_len {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < header_len || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed netlink message",
            ));
        }
        let payload = &data[header_len..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .unwrap_or(-libc::EIO);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(info) = parse_diag_msg(payload) {
                    if info.port != 0 {
                        each(info);
                    }
                }
            }
            _ => {}
        }
        let aligned = (len + 3) & !3;
        data = data.get(aligned..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `inet_diag_msg`: family, state, timer, retrans (a byte each), the
/// 48-byte socket id whose first field is the big-endian source port, then
/// expires, rqueue, wqueue, uid and inode (u32 each, host order).
fn parse_diag_msg(payload: &[u8]) -> Option<SockInfo> {
    let u32_at = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    let port = payload.get(4..6)?;
    Some(SockInfo {
        port: u16::from_be_bytes([port[0], port[1]]),
        state: *payload.get(1)?,
        uid: u32_at(64).unwrap_or(u32::MAX),
        inode: u32_at(68).map_or(0, u64::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn lists_ipv4_and_ipv6_listeners() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v4_port = v4.local_addr().unwrap().port();
        let set = listening_ports().unwrap();
        assert!(set.contains(v4_port));
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let v6_port = v6.local_addr().unwrap().port();
            assert!(listening_ports().unwrap().contains(v6_port));
        }
        drop(v4);
        assert!(!listening_ports().unwrap().contains(v4_port));
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
        // SAFETY: geteuid cannot fail.
        assert_eq!(found[0].uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn a_connected_client_port_is_not_a_listener() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert!(!listening_ports().unwrap().contains(client_port));
    }
}
