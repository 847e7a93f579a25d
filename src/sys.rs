//! The library's only `unsafe` code: what rustix has no safe function for.
//! Every other system call goes through rustix, which makes its calls by
//! system call number (no glibc symbol newer than the wheel's glibc 2.17).
//!
//! - `set_range_lock`: an open-file-description byte-range lock
//!   (`F_OFD_SETLK`), the slot locks of a state folder's lock file;
//! - `Fd`: a raw socket descriptor closed on drop, for the netlink socket of
//!   `sockdiag.rs` (until it uses `OwnedFd`).

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
