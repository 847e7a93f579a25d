//! A folder opened once, by descriptor, and every file in it reached relative
//! to that descriptor: swapping a symbolic link into the path later changes
//! nothing, no name is ever followed through a link, and nothing that is not
//! a regular file (a FIFO, a device, a socket, a folder) is ever read, written
//! or replaced. This is how OpenSSH checks its private files and how systemd's
//! `chase()` avoids link swaps; every file the library opens goes through here.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The most the library reads of any file: a state file of the largest range
/// with a long history is well under 1 MiB; 16 MiB leaves room and keeps a
/// link to `/dev/zero` or a giant file from taking the host's memory.
pub const MAX_READ: u64 = 16 * 1024 * 1024;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file name contains a NUL byte",
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// What kind of thing a name in a folder is (never following a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFO, socket, device.
    Other,
}

/// `fstatat` of a name, not following a final symbolic link.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
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
    fn of(st: &libc::stat) -> Stat {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            nlink: st.st_nlink,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        }
    }

    pub fn of_file(file: &File) -> io::Result<Stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` on success.
        check(unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) })?;
        Ok(Stat::of(unsafe { &st.assume_init() }))
    }
}

/// How a file in a `Dir` is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    Read,
    /// Read and write, creating it (mode) if missing; never truncated here.
    ReadWriteCreate(u32),
    /// A new file that must not exist yet (O_EXCL), write only.
    CreateNew(u32),
}

pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    /// Opened through a link at `path` (`open_following`).
    follows: bool,
}

impl std::fmt::Debug for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Dir").field(&self.path).finish()
    }
}

impl Dir {
    /// Opens the folder `path`; its last component must not be a symbolic
    /// link (a link planted in a sticky /tmp is refused, not followed).
    pub fn open(path: &Path) -> io::Result<Dir> {
        Dir::open_with(path, libc::O_NOFOLLOW)
    }

    /// Opens the folder `path` the user named for a state file, following a
    /// link there (`port_state -> ../shared/port_state` is a deployment's own
    /// layout), once: the descriptor then pins the folder it reached. The
    /// folders the library makes inside it are opened with `open`'s rules.
    pub fn open_following(path: &Path) -> io::Result<Dir> {
        Dir::open_with(path, 0)
    }

    fn open_with(path: &Path, follow: libc::c_int) -> io::Result<Dir> {
        let c = cstr(path.as_os_str())?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | follow | libc::O_CLOEXEC;
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        let fd = check(fd).map_err(|e| explain_dir(path, e))?;
        Ok(Dir {
            // SAFETY: a descriptor we just opened and own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
            follows: follow == 0,
        })
    }

    /// `open`, creating the folder (and its parents, new ones with `mode`) first.
    pub fn create(path: &Path, mode: u32) -> io::Result<Dir> {
        Dir::make(path, mode)?;
        Dir::open(path)
    }

    /// `open_following`, creating the folder (and its parents) first.
    pub fn create_following(path: &Path, mode: u32) -> io::Result<Dir> {
        Dir::make(path, mode)?;
        Dir::open_following(path)
    }

    fn make(path: &Path, mode: u32) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(path)
                {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's own owner and mode, from the descriptor.
    pub fn stat_self(&self) -> io::Result<Stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` on success.
        check(unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) })?;
        Ok(Stat::of(unsafe { &st.assume_init() }))
    }

    /// Does the path still name this folder? Not after it was deleted,
    /// renamed, or replaced (by a link, say): the caller then reopens it,
    /// with every check again, rather than work in a folder no one else sees.
    pub fn still_at_path(&self) -> bool {
        let on_disk = if self.follows {
            fs::metadata(&self.path)
        } else {
            fs::symlink_metadata(&self.path)
        };
        let Ok(on_disk) = on_disk else {
            return false;
        };
        use std::os::unix::fs::MetadataExt;
        self.stat_self()
            .is_ok_and(|st| st.dev == on_disk.dev() && st.ino == on_disk.ino())
    }

    /// Refuses a folder that another user owns or that group or others can
    /// write: such a user could plant files here, or delete ours.
    pub fn check_trusted(&self) -> io::Result<()> {
        let st = self.stat_self()?;
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
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
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        let c = cstr(name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid descriptor and C string; fills `st` on success.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(rc) {
            Ok(_) => Ok(Some(Stat::of(unsafe { &st.assume_init() }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the regular file `name`: never through a symbolic link, never
    /// blocking on a FIFO or a device (O_NONBLOCK, then `fstat`), and never
    /// anything but a regular file (`InvalidData` naming what it is).
    pub fn open_file(&self, name: &OsStr, how: Open) -> io::Result<File> {
        let c = cstr(name)?;
        let base = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
        let (flags, mode) = match how {
            Open::Read => (libc::O_RDONLY, 0),
            Open::ReadWriteCreate(mode) => (libc::O_RDWR | libc::O_CREAT, mode),
            Open::CreateNew(mode) => (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode),
        };
        // SAFETY: valid descriptor and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                base | flags,
                mode as libc::c_uint,
            )
        };
        let fd = check(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_regular(&self.path.join(name), Kind::Symlink),
            Some(libc::EISDIR) => not_regular(&self.path.join(name), Kind::Dir),
            Some(libc::ENXIO) => not_regular(&self.path.join(name), Kind::Other),
            _ => e,
        })?;
        // SAFETY: a descriptor we just opened and own.
        let file = unsafe { File::from_raw_fd(fd) };
        if let Open::CreateNew(_) = how {
            // O_CREAT|O_EXCL made a new regular file: nothing to check, and
            // O_NONBLOCK means nothing for it.
            return Ok(file);
        }
        let st = Stat::of_file(&file)?;
        if st.kind != Kind::File {
            return Err(not_regular(&self.path.join(name), st.kind));
        }
        // Back to blocking IO for a regular file (O_NONBLOCK only guarded the open).
        set_blocking(fd)?;
        Ok(file)
    }

    /// Renames `from` here to `to` in `dest`, replacing a file there.
    pub fn rename(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: valid descriptors and C strings.
        check(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                dest.fd.as_raw_fd(),
                t.as_ptr(),
            )
        })
        .map(drop)
    }

    /// Swaps the files `a` and `b` of this folder in one step (both must
    /// exist). `ENOSYS` or `EINVAL` where the kernel or file system cannot.
    pub fn exchange(&self, a: &OsStr, b: &OsStr) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        renameat2(fd, &cstr(a)?, fd, &cstr(b)?, libc::RENAME_EXCHANGE)
    }

    /// Renames `from` to `to` only if `to` does not exist (never replaces).
    /// Where the kernel or file system has no such rename, a second link
    /// made only if `to` is free, then the first name removed.
    pub fn rename_new(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        match renameat2(
            self.fd.as_raw_fd(),
            &f,
            dest.fd.as_raw_fd(),
            &t,
            libc::RENAME_NOREPLACE,
        ) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) => {
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
    pub fn link(&self, from: &OsStr, dest: &Dir, to: &OsStr) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: valid descriptors and C strings; flags 0: a link is not followed.
        check(unsafe {
            libc::linkat(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                dest.fd.as_raw_fd(),
                t.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid descriptor and C string.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// The names in the folder (through the descriptor, not the path).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let listing = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let mut names = Vec::new();
        for entry in fs::read_dir(listing)? {
            names.push(entry?.file_name());
        }
        Ok(names)
    }

    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(drop)
    }

    /// Reads the regular file `name` whole, up to `MAX_READ` bytes.
    pub fn read(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        let mut file = self.open_file(name, Open::Read)?;
        read_bounded(&mut file, &self.path.join(name))
    }

    /// The folder `name` inside this one, opened the same way.
    pub fn sub(&self, name: &OsStr) -> io::Result<Dir> {
        let c = cstr(name)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string; the result is checked.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        let path = self.path.join(name);
        let fd = check(fd).map_err(|e| explain_dir(&path, e))?;
        Ok(Dir {
            // SAFETY: a descriptor we just opened and own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path,
            follows: false,
        })
    }

    /// `sub`, creating it with `mode` if missing.
    pub fn sub_create(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        let c = cstr(name)?;
        // SAFETY: valid descriptor and C string.
        let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
        match check(rc) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.sub(name)
    }
}

/// Reads `file` whole, refusing more than `MAX_READ` bytes.
pub fn read_bounded(file: &mut File, path: &Path) -> io::Result<Vec<u8>> {
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

impl Kind {
    /// What a message says the thing is.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Dir => "a folder",
            Kind::Symlink => "a symbolic link (not followed)",
            Kind::Other => "not a regular file (a FIFO, socket or device)",
            Kind::File => "a regular file",
        }
    }
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
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is a symbolic link; it is not followed", path.display()),
        ),
        // O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: tell the two apart.
        Some(libc::ENOTDIR)
            if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is a symbolic link; it is not followed", path.display()),
            )
        }
        Some(libc::ENOTDIR) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a folder", path.display()),
        ),
        _ => e,
    }
}

/// renameat2(2) by its system call: glibc has a wrapper only from 2.28, and
/// the wheel must load on glibc 2.17 (one missing symbol and the module fails
/// to import there).
fn renameat2(
    from_dir: RawFd,
    from: &std::ffi::CStr,
    to_dir: RawFd,
    to: &std::ffi::CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: valid descriptors and C strings; the kernel checks the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from_dir,
            from.as_ptr(),
            to_dir,
            to.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // F_SETFL sets only O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME and
    // O_NONBLOCK, and `open_file` asks for none but the last: clearing them
    // all needs no F_GETFL first.
    // SAFETY: fcntl on a descriptor we own.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn renaming_to_a_new_name_never_replaces_with_or_without_renameat2() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let n = OsStr::new;
        for (i, by_link) in [false, true].into_iter().enumerate() {
            let (a, b, taken) = (format!("a{i}"), format!("b{i}"), format!("t{i}"));
            fs::write(tmp.path().join(&a), b"moved").unwrap();
            fs::write(tmp.path().join(&taken), b"kept").unwrap();
            let rename = |from: &str, to: &str| {
                if by_link {
                    dir.rename_new_by_link(n(from), &dir, n(to))
                } else {
                    dir.rename_new(n(from), &dir, n(to))
                }
            };
            let err = rename(&a, &taken).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
            assert_eq!(fs::read(tmp.path().join(&taken)).unwrap(), b"kept");
            assert_eq!(fs::read(tmp.path().join(&a)).unwrap(), b"moved");
            rename(&a, &b).unwrap();
            assert_eq!(fs::read(tmp.path().join(&b)).unwrap(), b"moved");
            assert!(!tmp.path().join(&a).exists());
        }
    }

    #[test]
    fn links_fifos_and_folders_are_never_opened_as_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("victim"), b"secret").unwrap();
        symlink(tmp.path().join("victim"), tmp.path().join("link")).unwrap();
        let c = CString::new(tmp.path().join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        fs::create_dir(tmp.path().join("sub")).unwrap();
        for name in ["link", "fifo", "sub"] {
            for how in [Open::Read, Open::ReadWriteCreate(0o600)] {
                let err = dir.open_file(OsStr::new(name), how).unwrap_err();
                assert!(err.to_string().contains(name), "{name}: {err}");
            }
        }
        assert_eq!(fs::read(tmp.path().join("victim")).unwrap(), b"secret");
        assert!(dir
            .open_file(OsStr::new("victim"), Open::CreateNew(0o600))
            .is_err());
    }

    #[test]
    fn a_linked_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("alias")).unwrap();
        let err = Dir::open(&tmp.path().join("alias")).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let parent = Dir::open(tmp.path()).unwrap();
        assert!(parent.sub(OsStr::new("alias")).is_err());
    }

    #[test]
    fn reads_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let big = fs::File::create(tmp.path().join("big")).unwrap();
        big.set_len(MAX_READ + 10).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let err = dir.read(OsStr::new("big")).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
