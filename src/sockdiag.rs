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

use std::io;
use std::mem;
use std::ops::RangeInclusive;

use crate::port_set::PortSet;
use crate::probe::Fd;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCPDIAG_GETSOCK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
/// `linux/inet_diag.h`: the request attribute that holds a filter program,
/// and the two comparisons of the source port it uses.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
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
#[derive(Clone, Copy, Default)]
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

/// `struct nlattr`: length (header included) and type.
#[repr(C)]
#[derive(Clone, Copy)]
struct NlAttr {
    len: u16,
    kind: u16,
}

/// `struct inet_diag_bc_op`: an instruction of the filter. The kernel moves
/// `yes` bytes on when the test holds and `no` bytes on when it fails; the
/// socket is reported when the program ends exactly at its last byte. A port
/// comparison is followed by a second op whose `no` is the port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BcOp {
    code: u8,
    yes: u8,
    no: u16,
}

/// The filter attribute: source port >= first, then source port <= last.
#[repr(C)]
#[derive(Clone, Copy)]
struct PortFilter {
    attr: NlAttr,
    ops: [BcOp; 4],
}

impl PortFilter {
    fn new(range: &RangeInclusive<u16>) -> PortFilter {
        const PROGRAM: u16 = 4 * mem::size_of::<BcOp>() as u16;
        // A failed test jumps 4 bytes past the end: rejected.
        let op = |code, left: u16| BcOp {
            code,
            yes: 8,
            no: left + 4,
        };
        let value = |port| BcOp {
            code: 0,
            yes: 0,
            no: port,
        };
        PortFilter {
            attr: NlAttr {
                len: mem::size_of::<PortFilter>() as u16,
                kind: INET_DIAG_REQ_BYTECODE,
            },
            ops: [
                op(INET_DIAG_BC_S_GE, PROGRAM),
                value(*range.start()),
                op(INET_DIAG_BC_S_LE, PROGRAM - 8),
                value(*range.end()),
            ],
        }
    }
}

/// A dump request: the header, the request, and (unless every port is
/// wanted) the port filter; the message length says which.
#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: InetDiagReqV2,
    filter: PortFilter,
}

/// `struct inet_diag_req`, the request of the older `TCPDIAG_GETSOCK`
/// message. The kernel serves it with the address family left open, so one
/// walk of its socket tables reports IPv4 and IPv6 sockets alike, where
/// `SOCK_DIAG_BY_FAMILY` needs a request (and a walk of every socket of the
/// host) per family.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagReq {
    family: u8,
    src_len: u8,
    dst_len: u8,
    ext: u8,
    id: InetDiagSockId,
    states: u32,
    dbs: u32,
}

#[repr(C)]
struct RequestBoth {
    header: NlMsgHdr,
    body: InetDiagReq,
    filter: PortFilter,
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

#[derive(Clone, Copy)]
enum Family {
    /// IPv4 and IPv6 in one dump (`TCPDIAG_GETSOCK`).
    Both,
    /// `SOCK_DIAG_BY_FAMILY` for one address family.
    One(u8),
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
    let header = |kind, len: usize| NlMsgHdr {
        len: len as u32,
        kind,
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq: 1,
        pid: 0,
    };
    // An all-zero socket id matches every socket.
    let id = InetDiagSockId::default();
    let port_filter = PortFilter::new(filter.unwrap_or(&(0..=u16::MAX)));
    match family {
        Family::Both => {
            let len = match filter {
                Some(_) => mem::size_of::<RequestBoth>(),
                None => mem::offset_of!(RequestBoth, filter),
            };
            let request = RequestBoth {
                header: header(TCPDIAG_GETSOCK, len),
                body: InetDiagReq {
                    family: libc::AF_INET as u8,
                    src_len: 0,
                    dst_len: 0,
                    ext: 0,
                    id,
                    states,
                    dbs: 0,
                },
                filter: port_filter,
            };
            send_prefix(fd, &request, len)?;
        }
        Family::One(family) => {
            let len = match filter {
                Some(_) => mem::size_of::<Request>(),
                None => mem::offset_of!(Request, filter),
            };
            let request = Request {
                header: header(SOCK_DIAG_BY_FAMILY, len),
                body: InetDiagReqV2 {
                    family,
                    protocol: libc::IPPROTO_TCP as u8,
                    ext: 0,
                    pad: 0,
                    states,
                    id,
                },
                filter: port_filter,
            };
            send_prefix(fd, &request, len)?;
        }
    }
    crate::kept::with(&RECEIVE, |buf| {
        buf.resize(RECEIVE_SIZE, 0);
        receive(fd, buf, each)
    })
}

/// Sends the first `len` bytes of `request` (a repr(C) struct of u8, u16 and
/// u32 fields in their natural order: no padding) as one message.
fn send_prefix<T>(fd: &Fd, request: &T, len: usize) -> io::Result<()> {
    crate::sys::send_prefix(fd, request, len)
}

const RECEIVE_SIZE: usize = 32 * 1024;

thread_local! {
    /// The receive buffer (see `kept.rs`).
    static RECEIVE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn receive(fd: &Fd, buf: &mut [u8], each: &mut dyn FnMut(SockInfo)) -> io::Result<()> {
    loop {
        let n = crate::sys::recv(fd, buf)?;
        if n == 0 {
            return Ok(());
        }
        if parse_messages(&buf[..n], each)? {
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
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
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

    #[test]
    fn the_filter_program_accepts_by_ending_on_its_last_byte() {
        let filter = PortFilter::new(&(3000..=3999));
        assert_eq!(filter.attr.len, 20);
        assert_eq!(filter.attr.kind, INET_DIAG_REQ_BYTECODE);
        let run = |port: u16| {
            // The kernel's inet_diag_bc_run over the four ops.
            let mut at: i32 = 0;
            while (0..16).contains(&at) {
                let op = filter.ops[at as usize / 4];
                let arg = filter.ops[at as usize / 4 + 1].no;
                let yes = match op.code {
                    INET_DIAG_BC_S_GE => port >= arg,
                    INET_DIAG_BC_S_LE => port <= arg,
                    code => panic!("unexpected op {code}"),
                };
                at += i32::from(if yes { u16::from(op.yes) } else { op.no });
            }
            at == 16
        };
        assert!(run(3000) && run(3500) && run(3999));
        assert!(!run(2999) && !run(4000) && !run(0) && !run(65535));
    }
}
