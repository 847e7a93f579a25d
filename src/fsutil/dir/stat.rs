//! What a name in a folder is, as `fstatat` (never following a link) or
//! `fstat` of an open file reports it.

use std::fs::File;
use std::io;

use rustix::fs::FileType;

use super::retry::retry_eintr;

/// What kind of thing a name in a folder is (never following a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFO, socket, device.
    Other,
}

/// `fstatat` of a name, not following a final symbolic link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub nlink: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub uid: u32,
    pub mode: u32,
}

impl Stat {
    // The kernel's `struct stat` has other field types on other
    // architectures: some of these casts do nothing on x86_64.
    #[allow(clippy::unnecessary_cast)]
    pub(super) fn of(st: &rustix::fs::Stat) -> Stat {
        let kind = match FileType::from_raw_mode(st.st_mode as rustix::fs::RawMode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            nlink: st.st_nlink as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            uid: st.st_uid as u32,
            mode: st.st_mode as u32 & 0o7777,
        }
    }

    pub(crate) fn of_file(file: &File) -> io::Result<Stat> {
        Ok(Stat::of(&retry_eintr(|| rustix::fs::fstat(file))?))
    }
}

impl Kind {
    /// What a message says the thing is.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Dir => "a folder",
            Kind::Symlink => "a symbolic link (not followed)",
            Kind::Other => "not a regular file (a FIFO, socket or device)",
            Kind::File => "a regular file",
        }
    }
}
