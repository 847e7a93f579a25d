//! The requests: netlink header, `inet_diag` request (the older
//! `TCPDIAG_GETSOCK` one that leaves the family open, or
//! `SOCK_DIAG_BY_FAMILY` for one family), and the bytecode filter on the
//! source port that keeps the kernel's answer to a range.

use std::io;
use std::mem;
use std::ops::RangeInclusive;

use crate::probe::Fd;

pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const TCPDIAG_GETSOCK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
pub(super) const TCP_LISTEN: u32 = 10;
pub(super) const TCP_TIME_WAIT: u32 = 6;
/// `linux/inet_diag.h`: the request attribute that holds a filter program,
/// and the two comparisons of the source port it uses.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct NlMsgHdr {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
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

#[derive(Clone, Copy)]
pub(super) enum Family {
    /// IPv4 and IPv6 in one dump (`TCPDIAG_GETSOCK`).
    Both,
    /// `SOCK_DIAG_BY_FAMILY` for one address family.
    One(u8),
}

/// Sends one dump request for the sockets in one of `states` (a bit per
/// state), of `family`, with a local port in `filter` (every port: `None`).
pub(super) fn send_dump(
    fd: &Fd,
    family: Family,
    states: u32,
    filter: Option<&RangeInclusive<u16>>,
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
            send_prefix(fd, &request, len)
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
            send_prefix(fd, &request, len)
        }
    }
}

/// Sends the first `len` bytes of `request` (a repr(C) struct of u8, u16 and
/// u32 fields in their natural order: no padding) as one message.
fn send_prefix<T>(fd: &Fd, request: &T, len: usize) -> io::Result<()> {
    crate::sys::send_prefix(fd, request, len)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn requests_have_the_kernels_sizes() {
        // linux/inet_diag.h: inet_diag_req 60 bytes, inet_diag_req_v2 56.
        assert_eq!(mem::size_of::<NlMsgHdr>(), 16);
        assert_eq!(mem::size_of::<InetDiagReq>(), 60);
        assert_eq!(mem::size_of::<InetDiagReqV2>(), 56);
        assert_eq!(mem::size_of::<RequestBoth>(), 16 + 60 + 20);
        assert_eq!(mem::size_of::<Request>(), 16 + 56 + 20);
    }
}
