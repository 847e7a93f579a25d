//! A folder opened once, by descriptor, and every file in it reached relative
//! to that descriptor: swapping a symbolic link into the path later changes
//! nothing, no name is ever followed through a link, and nothing that is not
//! a regular file (a FIFO, a device, a socket, a folder) is ever read, written
//! or replaced. This is how OpenSSH checks its private files and how systemd's
//! `chase()` avoids link swaps; every file the library opens goes through here.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

mod retry;
mod stat;

use retry::retry_interrupted;
pub(crate) use retry::{errno, retry_eintr};
pub(crate) use stat::{Kind, Stat};

/// The most the library reads of any file: a state file of the largest range
/// with a long history is well under 1 MiB; 16 MiB leaves room and keeps a
/// link to `/dev/zero` or a giant file from taking the host's memory.
pub(crate) const MAX_READ: u64 = 16 * 1024 * 1024;

/// A name as the system calls take it; one with a NUL byte is refused.
fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file name contains a NUL byte",
        )
    })
}

/// How a file in a `Dir` is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    Read,
    /// Read and write, if it exists.
    ReadWrite,
    /// Read and write, creating it (mode) if missing; never truncated here.
    ReadWriteCreate(u32),
    /// A new file that must not exist yet (O_EXCL), write only.
    CreateNew(u32),
    /// `ReadWriteCreate` for a file about to be overwritten whole (a
    /// recycled temporary): left non-blocking once it is found to be a
    /// regular file (see `open_file_stat`).
    Overwrite(u32),
}

/// An open folder (see the module's text).
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    /// Opened through a link at `path` (`open_following`).
    follows: bool,
    /// The folder's (device, inode), read once: an open descriptor's file
    /// never changes, so neither does its identity.
    id: std::sync::OnceLock<(u64, u64)>,
}

impl std::fmt::Debug for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Dir").field(&self.path).finish()
    }
}

impl Dir {
    /// Opens the folder `path`; its last component must not be a symbolic
    /// link (a link planted in a sticky /tmp is refused, not followed).
    pub(crate) fn open(path: &Path) -> io::Result<Dir> {
        Dir::open_with(path, false)
    }

    /// Opens the folder `path` the user named for a state file, following a
    /// link there (`port_state -> ../shared/port_state` is a deployment's own
    /// layout), once: the descriptor then pins the folder it reached. The
    /// folders the library makes inside it are opened with `open`'s rules.
    pub(crate) fn open_following(path: &Path) -> io::Result<Dir> {
        Dir::open_with(path, true)
    }

    fn open_with(path: &Path, follow: bool) -> io::Result<Dir> {
        let c = cstr(path.as_os_str())?;
        let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        let fd = retry_eintr(|| rustix::fs::open(c.as_c_str(), flags, Mode::empty()))
            .map_err(|e| explain_dir(path, e))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
            follows: follow,
            id: Default::default(),
        })
    }

    /// `open`, creating the folder (and its parents, new ones with `mode`) first.
    pub(crate) fn create(path: &Path, mode: u32) -> io::Result<Dir> {
        Dir::make(path, mode)?;
        Dir::open(path)
    }

    /// `open_following`, creating the folder (and its parents) first.
    pub(crate) fn create_following(path: &Path, mode: u32) -> io::Result<Dir> {
        Dir::make(path, mode)?;
        Dir::open_following(path)
    }

    fn make(path: &Path, mode: u32) -> io::Result<()> {
        match retry_interrupted(|| fs::symlink_metadata(path)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut builder = fs::DirBuilder::new();
                builder.recursive(true).mode(mode);
                match retry_interrupted(|| builder.create(path)) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The folder's own owner and mode, from the descriptor.
    pub(crate) fn stat_self(&self) -> io::Result<Stat> {
        let st = Stat::of(&retry_eintr(|| rustix::fs::fstat(&self.fd))?);
        // Its identity too, kept (`identity`): `still_at_path` then needs
        // no `fstat` of its own after the folder's first stamp or check.
        let _ = self.id.set((st.dev, st.ino));
        Ok(st)
    }

    /// Does the path still name this folder? Not after it was deleted,
    /// renamed, or replaced (by a link, say): the caller then reopens it,
    /// with every check again, rather than work in a folder no one else sees.
    pub(crate) fn still_at_path(&self) -> bool {
        let on_disk = retry_interrupted(|| {
            if self.follows {
                fs::metadata(&self.path)
            } else {
                fs::symlink_metadata(&self.path)
            }
        });
        let Ok(on_disk) = on_disk else {
            return false;
        };
        use std::os::unix::fs::MetadataExt;
        self.identity()
            .is_ok_and(|id| id == (on_disk.dev(), on_disk.ino()))
    }

    /// The folder's (device, inode) if an `fstat` of it was made already
    /// (no system call here).
    pub(crate) fn known_identity(&self) -> Option<(u64, u64)> {
        self.id.get().copied()
    }

    /// The folder's (device, inode): from the descriptor the first time, then
    /// remembered (what a descriptor refers to cannot change).
    fn identity(&self) -> io::Result<(u64, u64)> {
        if let Some(id) = self.id.get() {
            return Ok(*id);
        }
        let st = self.stat_self()?;
        Ok((st.dev, st.ino))
    }

    /// Refuses a folder that another user owns or that group or others can
    /// write: such a user could plant files here, or delete ours.
    pub(crate) fn check_trusted(&self) -> io::Result<()> {
        let st = self.stat_self()?;
        let uid = rustix::process::geteuid().as_raw();
        if st.uid != uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "folder {} is owned by uid {}, not by this user (uid {uid})",
                    self.path.display(),
                    st.uid
                ),
            ));
        }
        if st.mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "folder {} is writable by other users (mode {:o}); chmod go-w it",
                    self.path.display(),
                    st.mode & 0o777
                ),
            ));
        }
        Ok(())
    }

    /// `fstatat` of `name`, not following a link. `Ok(None)`: no such name.
    pub(crate) fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        let c = cstr(name)?;
        match retry_eintr(|| rustix::fs::statat(&self.fd, c.as_c_str(), AtFlags::SYMLINK_NOFOLLOW))
        {
            Ok(st) => Ok(Some(Stat::of(&st))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the regular file `name`: never through a symbolic link, never
    /// blocking on a FIFO or a device (O_NONBLOCK, then `fstat`), and never
    /// anything but a regular file (`InvalidData` naming what it is). An open
    /// a signal interrupted is tried again.
    pub(crate) fn open_file(&self, name: &OsStr, how: Open) -> io::Result<File> {
        Ok(self.open_file_stat(name, how)?.0)
    }

    /// `open_file`, with the `fstat` it made of the open file (`None` for
    /// `CreateNew`, which makes none: a new file is what it asked for).
    pub(crate) fn open_file_stat(
        &self,
        name: &OsStr,
        how: Open,
    ) -> io::Result<(File, Option<Stat>)> {
        let c = cstr(name)?;
        let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        let (flags, mode) = match how {
            Open::Read => (OFlags::RDONLY, 0),
            Open::ReadWrite => (OFlags::RDWR, 0),
            Open::ReadWriteCreate(mode) | Open::Overwrite(mode) => {
                (OFlags::RDWR | OFlags::CREATE, mode)
            }
            Open::CreateNew(mode) => (OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode),
        };
        let mode = Mode::from_raw_mode(mode as rustix::fs::RawMode);
        let fd = retry_eintr(|| rustix::fs::openat(&self.fd, c.as_c_str(), base | flags, mode))
            .map_err(|e| match errno(&e) {
                Some(Errno::LOOP) => not_regular(&self.path.join(name), Kind::Symlink),
                Some(Errno::ISDIR) => not_regular(&self.path.join(name), Kind::Dir),
                Some(Errno::NXIO) => not_regular(&self.path.join(name), Kind::Other),
                _ => e,
            })?;
        let file = File::from(fd);
        if let Open::CreateNew(_) = how {
            // O_CREAT|O_EXCL made a new regular file: nothing to check, and
            // O_NONBLOCK means nothing for it.
            return Ok((file, None));
        }
        let st = Stat::of_file(&file)?;
        if st.kind != Kind::File {
            return Err(not_regular(&self.path.join(name), st.kind));
        }
        // A regular file ignores O_NONBLOCK on Linux (what `CreateNew` relies
        // on for every new temporary), except under mandatory locking
        // (kernels before 5.15, `-o mand`), which only a file that is setgid
        // without group execute is subject to: a file to overwrite skips the
        // `fcntl` below unless its mode says that (a system call per save).
        let mandatory_locking = st.mode & 0o2010 == 0o2000;
        if matches!(how, Open::Overwrite(_)) && !mandatory_locking {
            return Ok((file, Some(st)));
        }
        // Back to blocking IO for a regular file (O_NONBLOCK only guarded the
        // open). F_SETFL sets only O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME and
        // O_NONBLOCK, and the open asked for none but the last: clearing them
        // all needs no F_GETFL first.
        retry_eintr(|| rustix::fs::fcntl_setfl(&file, OFlags::empty()))?;
        Ok((file, Some(st)))
    }

    /// Renames `from` here to `to` in `dest`, replacing a file there.
    pub(crate) fn rename(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        Ok(rustix::fs::renameat(
            &self.fd,
            f.as_c_str(),
            &dest.fd,
            t.as_c_str(),
        )?)
    }

    /// Swaps the files `a` and `b` of this folder in one step (both must
    /// exist). `ENOSYS` or `EINVAL` where the kernel or file system cannot.
    pub(crate) fn exchange(&self, a: &OsStr, b: &OsStr) -> io::Result<()> {
        renameat2(self, &cstr(a)?, self, &cstr(b)?, RenameFlags::EXCHANGE)
    }

    /// Renames `from` to `to` only if `to` does not exist (never replaces).
    /// Where the kernel or file system has no such rename, a second link
    /// made only if `to` is free, then the first name removed.
    pub(crate) fn rename_new(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        match renameat2(self, &f, dest, &t, RenameFlags::NOREPLACE) {
            Err(e) if matches!(errno(&e), Some(Errno::NOSYS | Errno::INVAL)) => {
                self.rename_new_by_link(from, dest, to)
            }
            other => other,
        }
    }

    /// `rename_new` without renameat2: `to` is made as a second link (which
    /// fails if it exists), then `from` is removed.
    fn rename_new_by_link(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        self.link(from, dest, to)?;
        self.remove(from)
    }

    /// A second name `to` in `dest` for the file `from` here (never a link's target).
    pub(crate) fn link(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // No AT_SYMLINK_FOLLOW: a link is linked, not followed.
        Ok(rustix::fs::linkat(
            &self.fd,
            f.as_c_str(),
            &dest.fd,
            t.as_c_str(),
            AtFlags::empty(),
        )?)
    }

    pub(crate) fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = cstr(name)?;
        Ok(rustix::fs::unlinkat(
            &self.fd,
            c.as_c_str(),
            AtFlags::empty(),
        )?)
    }

    /// The names in the folder (through the descriptor, not the path).
    pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
        // A descriptor of its own ("." reopened), so that reading it moves
        // no position another listing shares.
        let listing = retry_eintr(|| rustix::fs::Dir::read_from(&self.fd))?;
        let mut names = Vec::new();
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(names)
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Reads the regular file `name` whole, up to `MAX_READ` bytes.
    pub(crate) fn read(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        let mut file = self.open_file(name, Open::Read)?;
        read_bounded(&mut file, &self.path.join(name))
    }

    /// The folder `name` inside this one, opened the same way.
    pub(crate) fn sub(&self, name: &OsStr) -> io::Result<Dir> {
        let c = cstr(name)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let path = self.path.join(name);
        let fd = retry_eintr(|| rustix::fs::openat(&self.fd, c.as_c_str(), flags, Mode::empty()))
            .map_err(|e| explain_dir(&path, e))?;
        Ok(Dir {
            fd,
            path,
            follows: false,
            id: Default::default(),
        })
    }

    /// `sub`, creating it with `mode` if missing.
    pub(crate) fn sub_create(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        let c = cstr(name)?;
        let mode = Mode::from_raw_mode(mode as rustix::fs::RawMode);
        match rustix::fs::mkdirat(&self.fd, c.as_c_str(), mode) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.sub(name)
    }
}

/// Reads `file` whole, refusing more than `MAX_READ` bytes (a read a signal
/// interrupted is tried again: `read_to_end` does).
pub(crate) fn read_bounded(file: &mut File, path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_READ + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is larger than {} MiB; not read",
                path.display(),
                MAX_READ / 1024 / 1024
            ),
        ));
    }
    Ok(bytes)
}

fn not_regular(path: &Path, kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {}; only regular files are used",
            path.display(),
            kind.describe()
        ),
    )
}

fn explain_dir(path: &Path, e: io::Error) -> io::Error {
    match errno(&e) {
        Some(Errno::LOOP) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is a symbolic link; it is not followed", path.display()),
        ),
        // O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: tell the two apart.
        Some(Errno::NOTDIR)
            if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is a symbolic link; it is not followed", path.display()),
            )
        }
        Some(Errno::NOTDIR) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a folder", path.display()),
        ),
        _ => e,
    }
}

/// renameat2(2), which rustix calls by its system call number: glibc has a
/// wrapper only from 2.28, and the wheel must load on glibc 2.17.
fn renameat2(
    from_dir: &Dir,
    from: &CStr,
    to_dir: &Dir,
    to: &CStr,
    flags: RenameFlags,
) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        &from_dir.fd,
        from,
        &to_dir.fd,
        to,
        flags,
    )?)
}

#[cfg(test)]
mod tests;
