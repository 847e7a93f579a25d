//! The library's only `unsafe` code: what rustix has no safe function for.
//! Every other system call goes through rustix, which makes its calls by
//! system call number (no glibc symbol newer than the wheel's glibc 2.17).
//!
//! - `set_range_lock`: an open-file-description byte-range lock
//!   (`F_OFD_SETLK`), the slot locks of a state folder's lock file;
//! - `Fd`, `netlink_diag_socket`, `send_prefix`, `recv`: the netlink socket
//!   of `sockdiag/` and its raw messages;
//! - `PerProcess` (`per_process.rs`): values that a forked child never
//!   inherits, published through an atomic pointer;
//! - `on_fork_in_child`: `pthread_atfork`, which counts fork generations;
//! - `wiped_on_fork_page`: a page the kernel zeroes in a forked child;
//! - `string_from_ascii`: the state's port lists, not validated twice.

mod per_process;
pub(crate) use per_process::{process_id, PerProcess};

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// What `set_range_lock` does to a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeLock {
    /// Locks it for writing (exclusive).
    Write,
    /// Releases this descriptor's lock on it.
    Unlock,
}

/// Sets or clears this open file description's lock of `len` bytes at
/// `offset`, without waiting (`fcntl(F_OFD_SETLK)`): `EAGAIN` or `EACCES` if
/// another open file description holds a conflicting lock.
pub(crate) fn set_range_lock(
    file: impl AsFd,
    lock: RangeLock,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let kind = match lock {
        RangeLock::Write => libc::F_WRLCK,
        RangeLock::Unlock => libc::F_UNLCK,
    };
    let too_far = |_| io::Error::new(io::ErrorKind::InvalidInput, "lock range out of bounds");
    // SAFETY: `flock` is plain old data, for which all zeroes is a valid
    // value; the fields that matter are set below.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = kind as libc::c_short;
    range.l_whence = libc::SEEK_SET as libc::c_short;
    range.l_start = libc::off_t::try_from(offset).map_err(too_far)?;
    range.l_len = libc::off_t::try_from(len).map_err(too_far)?;
    // SAFETY: `file` is an open descriptor borrowed for the call, and
    // F_OFD_SETLK reads one `flock`, which lives until the call returns.
    let rc = unsafe {
        libc::fcntl(
            file.as_fd().as_raw_fd(),
            libc::F_OFD_SETLK,
            &range as *const libc::flock,
        )
    };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An owned socket descriptor, closed on every path out of its scope.
pub(crate) struct Fd(pub(crate) libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor came from socket(2), is owned by this value
        // alone and is closed once, here.
        unsafe { libc::close(self.0) };
    }
}

/// A netlink `NETLINK_SOCK_DIAG` datagram socket whose receives give up
/// after `timeout`.
pub(crate) fn netlink_diag_socket(timeout: std::time::Duration) -> io::Result<Fd> {
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
    let timeval = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value is a timeval that outlives the call.
    unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeval as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// Sends the first `len` bytes of `request` (a repr(C) struct of u8, u16 and
/// u32 fields in their natural order: no padding) as one message.
pub(crate) fn send_prefix<T>(fd: &Fd, request: &T, len: usize) -> io::Result<()> {
    assert!(len <= std::mem::size_of::<T>());
    // SAFETY: reading `len` bytes, at most its size, of a struct without
    // padding that outlives the call.
    let sent = unsafe { libc::send(fd.0, request as *const T as *const libc::c_void, len, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf` (at most its length); 0 at the end.
pub(crate) fn recv(fd: &Fd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a buffer we own, at most its length.
    let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A string of bytes the caller wrote as ASCII only (digits and JSON
/// punctuation), without checking them again: checking 36 KB of it was a
/// twentieth of a pick. Checked in debug builds.
pub(crate) fn string_from_ascii(bytes: Vec<u8>) -> String {
    debug_assert!(bytes.is_ascii());
    // SAFETY: ASCII is valid UTF-8; every caller writes only ASCII bytes.
    unsafe { String::from_utf8_unchecked(bytes) }
}

/// Runs `handler` in the child after every `fork` of this process (from any
/// thread). It must be async-signal-safe. `false` if it could not be
/// registered (ENOMEM).
pub(crate) fn on_fork_in_child(handler: extern "C" fn()) -> bool {
    // SAFETY: registers a plain function with no captured state; it stays
    // valid for the life of the process.
    unsafe { libc::pthread_atfork(None, None, Some(handler)) == 0 }
}

/// A new private page of memory (at least `len` bytes, zero-filled) that the
/// kernel hands a child of `fork` zero-filled again (`MADV_WIPEONFORK`, Linux
/// 4.14). `None` where the kernel cannot (EINVAL) or no memory is left. Never
/// unmapped.
pub(crate) fn wiped_on_fork_page(len: usize) -> Option<*mut u8> {
    let len = len.max(1);
    // SAFETY: a new anonymous private mapping at an address the kernel
    // chooses; nothing else is touched. The result is checked.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: advice on the mapping just made, which no one uses yet.
    if unsafe { libc::madvise(page, len, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: the mapping just made, of that length, used by no one.
        unsafe { libc::munmap(page, len) };
        return None;
    }
    Some(page.cast())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_lock_excludes_another_description_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("lock");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let (a, b) = (open(), open());
        set_range_lock(&a, RangeLock::Write, 8, 8).unwrap();
        set_range_lock(&b, RangeLock::Write, 16, 8).unwrap();
        let err = set_range_lock(&b, RangeLock::Write, 8, 8).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)),
            "{err}"
        );
        set_range_lock(&a, RangeLock::Unlock, 8, 8).unwrap();
        set_range_lock(&b, RangeLock::Write, 8, 8).unwrap();
    }
}
