//! The replies: netlink datagrams of `inet_diag_msg`s, ended by
//! `NLMSG_DONE` (or an `NLMSG_ERROR`), read into a kept buffer.

use std::io;
use std::mem;

use super::request::{NlMsgHdr, SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK, TCP_LISTEN};
use crate::probe::Fd;

const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;

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

const RECEIVE_SIZE: usize = 32 * 1024;

thread_local! {
    /// The receive buffer (see `kept.rs`).
    static RECEIVE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads the answer to one dump request, passing each socket to `each`,
/// until its end.
pub(super) fn receive_dump(fd: &Fd, each: &mut dyn FnMut(SockInfo)) -> io::Result<()> {
    crate::kept::with(&RECEIVE, |buf| {
        buf.resize(RECEIVE_SIZE, 0);
        loop {
            let n = crate::sys::recv(fd, buf)?;
            if n == 0 {
                return Ok(());
            }
            if parse_messages(&buf[..n], each)? {
                return Ok(());
            }
        }
    })
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

    /// A netlink message of `kind` around `payload`, padded to 4 bytes.
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = (16 + payload.len()) as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn diag_msg(port: u16, state: u8, uid: u32, inode: u32) -> Vec<u8> {
        let mut m = vec![0u8; 72];
        m[0] = libc::AF_INET as u8;
        m[1] = state;
        m[4..6].copy_from_slice(&port.to_be_bytes());
        m[64..68].copy_from_slice(&uid.to_ne_bytes());
        m[68..72].copy_from_slice(&inode.to_ne_bytes());
        m
    }

    #[test]
    fn a_datagram_yields_its_sockets_and_says_where_the_dump_ends() {
        let mut data = message(TCPDIAG_GETSOCK, &diag_msg(8080, 10, 1000, 77));
        // Port 0 (a socket not bound yet) is no one's port.
        data.extend(message(SOCK_DIAG_BY_FAMILY, &diag_msg(0, 10, 0, 1)));
        data.extend(message(SOCK_DIAG_BY_FAMILY, &diag_msg(9090, 1, 0, 0)));
        let mut seen = Vec::new();
        assert!(!parse_messages(&data, &mut |s| seen.push(s)).unwrap());
        assert_eq!(
            seen,
            [
                SockInfo {
                    port: 8080,
                    state: 10,
                    uid: 1000,
                    inode: 77
                },
                SockInfo {
                    port: 9090,
                    state: 1,
                    uid: 0,
                    inode: 0
                }
            ]
        );
        assert!(seen[0].listening() && !seen[1].listening());
        data.extend(message(NLMSG_DONE, &[0; 4]));
        assert!(parse_messages(&data, &mut |_| {}).unwrap());
    }

    #[test]
    fn an_error_or_a_broken_message_is_an_error() {
        let refused = message(NLMSG_ERROR, &(-libc::EINVAL).to_ne_bytes());
        let e = parse_messages(&refused, &mut |_| {}).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // An acknowledgement (error 0) is not an error.
        let ack = message(NLMSG_ERROR, &0i32.to_ne_bytes());
        assert!(!parse_messages(&ack, &mut |_| {}).unwrap());
        let mut short = message(TCPDIAG_GETSOCK, &diag_msg(1, 10, 0, 0));
        short[0..4].copy_from_slice(&4000u32.to_ne_bytes());
        let e = parse_messages(&short, &mut |_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
