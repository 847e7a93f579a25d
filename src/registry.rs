//! The host-wide lease registry: the one place every manager of this user, in
//! every process, records which port it holds. This is what makes two managers
//! with different state files still never hand out the same port.
//!
//! Layout of the registry folder (mode 0700, owned by the user):
//! - `leases.lock`: never replaced; `flock`ed around every read-modify-write,
//!   and holding the change counter (`fsutil::read_generation`).
//! - `leases-0.json`, `leases-1.json`: `{"version": 1, "leases": [...]}`, two
//!   slots; the counter's parity names the current one. A change writes the
//!   other slot in place and only then bumps the counter, so a crash mid-write
//!   leaves the current table untouched, as a rename would, but without
//!   creating and freeing an inode per pick (which ext4 makes slow when it
//!   happens thousands of times a second).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{
    read_generation, write_generation, Dir, FileId, LockFile, Open, Stat, LOCK_WAIT, MAX_READ,
};
use crate::holder::Holder;
use crate::per_process::PerProcess;

/// The environment variable that moves the registry (e.g. per test session).
pub const REGISTRY_ENV: &str = "DPM_REGISTRY_DIR";

/// One port held by one manager (or one `pick --pid` of the command line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub port: u16,
    pub pid: u32,
    pub start_time: u64,
    /// Which manager in that process holds it (state file + instance number).
    pub owner: String,
    /// When it was taken (ISO-8601).
    pub since: String,
}

impl Lease {
    pub fn holder(&self) -> Holder {
        Holder {
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

/// The leases as one transaction sees them. Changes are written back when the
/// transaction ends, and only if there were any.
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    leases: Vec<Lease>,
    dirty: bool,
}

impl LeaseTable {
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter()
    }

    pub fn holder_of(&self, port: u16) -> Option<&Lease> {
        self.leases.iter().find(|l| l.port == port)
    }

    pub fn insert(&mut self, lease: Lease) {
        self.leases.push(lease);
        self.dirty = true;
    }

    /// Removes the leases for which `drop` is true, and returns them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        let mut removed = Vec::new();
        self.leases.retain(|l| {
            if drop(l) {
                removed.push(l.clone());
                false
            } else {
                true
            }
        });
        if !removed.is_empty() {
            self.dirty = true;
        }
        removed
    }

    /// Removes the leases whose holder process is gone, and returns them.
    pub fn remove_dead(&mut self) -> Vec<Lease> {
        let mut alive: HashMap<Holder, bool> = HashMap::new();
        self.remove_where(|l| {
            !*alive
                .entry(l.holder())
                .or_insert_with(|| l.holder().is_alive())
        })
    }

    /// Removes the leases on ports of `range` below `below` (all of the range
    /// when `None`) whose holder is gone, and returns them. For a pick: the
    /// lowest free port must not stay held by a process that exited. The
    /// holders are few (one per process), so each is checked once, and one
    /// seen alive within the last second is not checked again (`seen`).
    pub fn remove_dead_below(
        &mut self,
        range: &std::ops::RangeInclusive<u16>,
        below: Option<u16>,
        seen: &mut AliveCache,
    ) -> Vec<Lease> {
        let in_scope = |l: &Lease| range.contains(&l.port) && below.is_none_or(|b| l.port < b);
        let mut dead: Vec<Holder> = Vec::new();
        let mut checked: Vec<Holder> = Vec::new();
        for lease in self.leases.iter().filter(|l| in_scope(l)) {
            let holder = lease.holder();
            if checked.contains(&holder) {
                continue;
            }
            checked.push(holder);
            if !seen.is_alive(holder) {
                dead.push(holder);
            }
        }
        if dead.is_empty() {
            return Vec::new();
        }
        self.remove_where(|l| in_scope(l) && dead.contains(&l.holder()))
    }
}

/// Handles on holders seen alive, so a pick does not read `/proc` for each
/// of them every time: a pidfd (Linux 5.3+) becomes readable the moment its
/// process exits, so a death is seen at once, for one `poll` per holder.
#[derive(Default)]
pub struct AliveCache {
    watched: HashMap<Holder, OwnedFd>,
}

/// At most this many pidfds are kept open (others are checked through /proc).
const WATCHED_MAX: usize = 64;

impl AliveCache {
    fn is_alive(&mut self, holder: Holder) -> bool {
        if let Some(fd) = self.watched.get(&holder) {
            if !has_exited(fd) {
                return true;
            }
            self.watched.remove(&holder);
            return false;
        }
        if !holder.is_alive() {
            return false;
        }
        if self.watched.len() < WATCHED_MAX {
            // Checked again once the handle is open: the pid could have been
            // reused in between, and then the handle would watch a stranger.
            if let Some(fd) = pidfd_open(holder.pid) {
                if holder.is_alive() {
                    self.watched.insert(holder, fd);
                }
            }
        }
        true
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor the kernel just gave us (close-on-exec by default).
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn has_exited(fd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready != 0
}

struct Inner {
    /// The folder, opened (never through a link) and checked private; opened
    /// again, and checked again, if the path stops naming it (a /tmp cleaner).
    folder: Dir,
    lock: LockFile,
    /// The two slot files, kept open: a release must not need a new
    /// descriptor (a process out of descriptors still gives its ports back).
    slots: [Option<Slot>; 2],
    /// Holders seen alive lately (see `LeaseTable::remove_dead_below`).
    alive: AliveCache,
    /// The table as last read or written, the slot file it came from and the
    /// lock file's change counter at that moment.
    cache: Option<(FileId, u64, Vec<Lease>)>,
    /// A problem found while reading, for the caller to report once no lock
    /// is held (reporting may call into Python logging).
    notice: Option<String>,
}

struct Slot {
    file: File,
    id: (u64, u64),
}

pub struct Registry {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dir", &self.dir).finish()
    }
}

/// The folder used when neither the caller nor `DPM_REGISTRY_DIR` names one.
///
/// A fixed path under /tmp rather than `$XDG_RUNTIME_DIR`: that variable is
/// missing under cron, sudo and many service managers, and logind deletes the
/// folder on the user's last logout; either would split one user's managers
/// across two registries and break uniqueness.
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/tmp/dynamic-port-manager-{uid}"))
}

/// The registry folder for an explicit choice, else the environment, else the default.
pub fn resolve_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os(REGISTRY_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => default_dir(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type OpenRegistries = Mutex<HashMap<PathBuf, Arc<Registry>>>;

/// This process's open registries (a forked child opens its own).
fn open_registries() -> &'static OpenRegistries {
    static OPEN: PerProcess<OpenRegistries> = PerProcess::new();
    OPEN.get_or_init(Default::default)
}

impl Registry {
    /// The registry in `dir`, shared by every manager of this process that uses
    /// the same folder (one in-process mutex, one cache, one lock descriptor).
    /// A forked child gets registries of its own (see `per_process.rs`).
    pub fn open(dir: &Path) -> Result<Arc<Registry>> {
        let dir = std::path::absolute(dir).map_err(|e| Error::registry(dir, e))?;
        let mut open = lock(open_registries());
        if let Some(reg) = open.get(&dir) {
            return Ok(reg.clone());
        }
        let reg = Arc::new(Registry::create(&dir)?);
        open.insert(dir, reg.clone());
        Ok(reg)
    }

    /// Every registry this process has opened.
    pub fn all_open() -> Vec<Arc<Registry>> {
        lock(open_registries()).values().cloned().collect()
    }

    /// Opens the folder (creating it private), refusing one that is a link,
    /// that another user owns, or that others can write: such a user could
    /// plant leases, or delete ours and take our ports. The checks are made
    /// on the descriptor every later access goes through, so swapping a link
    /// in afterwards changes nothing.
    fn create(dir: &Path) -> Result<Registry> {
        let folder = open_private(dir)?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                folder,
                lock: LockFile::new(LOCK_FILE),
                slots: [None, None],
                alive: AliveCache::default(),
                cache: None,
                notice: None,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the current leases with the registry locked against every
    /// other thread and process, then writes the table back if `f` changed it.
    /// If the write fails, the error is returned and nothing `f` decided holds.
    pub fn transact<R>(&self, f: impl FnOnce(&mut LeaseTable) -> R) -> Result<R> {
        self.transact_seeing(|table, _| f(table))
    }

    /// `transact`, with the cache of holders seen alive (for a pick that
    /// reclaims dead holders' ports on its way).
    pub fn transact_seeing<R>(
        &self,
        f: impl FnOnce(&mut LeaseTable, &mut AliveCache) -> R,
    ) -> Result<R> {
        self.transact_in(&mut lock(&self.inner), f)
    }

    fn transact_in<R>(
        &self,
        inner: &mut Inner,
        f: impl FnOnce(&mut LeaseTable, &mut AliveCache) -> R,
    ) -> Result<R> {
        if !inner.folder.still_at_path() {
            // Deleted or replaced: every process must meet in the folder the
            // path names now, so open (or make) that one, checked afresh.
            inner.folder = open_private(&self.dir)?;
            inner.slots = [None, None];
            inner.cache = None;
            inner.lock = LockFile::new(LOCK_FILE);
        }
        let Inner {
            folder,
            lock,
            slots,
            alive,
            cache,
            notice,
        } = inner;
        // Interruptible: nothing has been changed yet if the wait gives up.
        let (guard, reopened) = lock
            .acquire(folder, LOCK_WAIT, true)
            .map_err(|e| Error::registry(self.dir.join(LOCK_FILE), e))?;
        if reopened {
            *cache = None;
        }
        let generation = read_generation(&guard);
        let (leases, read_id, repaired) = self.load(folder, slots, cache, notice, generation)?;
        let mut table = LeaseTable {
            leases,
            dirty: repaired,
        };
        let result = f(&mut table, alive);
        if !table.dirty {
            // Unchanged: keep the table as the cache of the slot it came from.
            *cache = read_id.map(|id| (id, generation, table.leases));
            return Ok(result);
        }
        let file = LeaseFile {
            version: 1,
            leases: table.leases,
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| Error::registry(&self.dir, io::Error::other(e)))?;
        // Forget the cache first: if the write fails we must re-read.
        *cache = None;
        let next = generation.wrapping_add(1);
        let path = self.dir.join(slot_name(next));
        let slot = match slot(folder, slots, next) {
            // Not a regular file (a link, a FIFO: never ours): it holds no
            // table, so it is set aside and a new slot made in its place.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let moved = set_aside(folder, &slot_name(next));
                add_notice(notice, format!("lease registry {e}; {moved}"));
                slot(folder, slots, next)
            }
            other => other,
        }
        .map_err(|e| Error::registry(&path, e))?;
        write_in_place(&slot.file, &bytes).map_err(|e| Error::registry(&path, e))?;
        let id = Stat::of_file(&slot.file)
            .map(|st| FileId::from_stat(&st))
            .map_err(|e| Error::registry(&path, e))?;
        // The new table exists in full; now make it the current one.
        write_generation(&guard, next).map_err(|e| Error::registry(&self.dir, e))?;
        *cache = Some((id, next, file.leases));
        Ok(result)
    }

    /// A copy of the current leases (taken under the lock).
    pub fn snapshot(&self) -> Result<Vec<Lease>> {
        self.transact(|t| t.leases.clone())
    }

    /// A problem met while reading the registry since the last call, if any.
    pub fn take_notice(&self) -> Option<String> {
        lock(&self.inner).notice.take()
    }

    /// Reads the current slot unless the cached table is still it. Takes the
    /// cached table out (no copy); `transact` puts it back. A damaged current
    /// slot falls back to the other one (the table one change older): live
    /// holders re-record their own leases at their next call or refresh, and
    /// bind probes still protect every port already bound.
    fn load(
        &self,
        folder: &Dir,
        slots: &mut [Option<Slot>; 2],
        cache: &mut Option<(FileId, u64, Vec<Lease>)>,
        notice: &mut Option<String>,
        generation: u64,
    ) -> Result<(Vec<Lease>, Option<FileId>, bool)> {
        let cached = cache.take();
        let name = slot_name(generation);
        let path = self.dir.join(&name);
        let st = match folder.stat(OsStr::new(&name)) {
            Ok(Some(st)) => st,
            // Nothing written yet (or the folder was emptied): no leases.
            Ok(None) => return Ok((Vec::new(), None, false)),
            Err(e) => return Err(Error::registry(&path, e)),
        };
        let id = FileId::from_stat(&st);
        if let Some((cached_id, cached_generation, leases)) = cached {
            if cached_id == id && cached_generation == generation {
                return Ok((leases, Some(id), false));
            }
        }
        let read = slot(folder, slots, generation).and_then(|slot| read_slot(&slot.file, &path));
        match read {
            Ok(leases) => Ok((leases, Some(id), false)),
            Err(e) => {
                // Keep the evidence; the next write makes a new slot file.
                let moved = set_aside(folder, &name);
                slots[(generation % 2) as usize] = None;
                let other = generation.wrapping_sub(1);
                let other_name = slot_name(other);
                let fallback = match folder.stat(OsStr::new(&other_name)) {
                    Ok(Some(_)) => slot(folder, slots, other)
                        .and_then(|slot| read_slot(&slot.file, &self.dir.join(&other_name)))
                        .map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                add_notice(
                    notice,
                    format!(
                        "lease registry {} was unreadable ({e}); {moved}; {}",
                        path.display(),
                        match &fallback {
                            Ok(Some(_)) => format!("using the table before it, from {other_name}"),
                            Ok(None) => "no table before it; starting empty".into(),
                            Err(_) =>
                                "the table before it is unreadable too; starting empty".into(),
                        }
                    ),
                );
                // Written back at once, so every process reads the same table.
                Ok((fallback.ok().flatten().unwrap_or_default(), None, true))
            }
        }
    }

    /// Removes every lease `holder` (this process) has, waiting at most `wait`
    /// for the locks (interpreter exit: the process is going, and its ports
    /// with it; a busy thread must not hold the exit up).
    pub fn release_process(&self, holder: Holder, wait: std::time::Duration) -> Result<usize> {
        let deadline = std::time::Instant::now() + wait;
        let mut inner = loop {
            match self.inner.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::registry(
                            &self.dir,
                            io::Error::new(io::ErrorKind::TimedOut, "busy at exit"),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        crate::fsutil::with_wait_cap(left, || {
            self.transact_in(&mut inner, |t, _| {
                t.remove_where(|l| l.holder() == holder).len()
            })
        })
    }
}

/// The open slot file of change number `generation`, (re)opened if the
/// name no longer names the file held (deleted, moved aside, replaced).
fn slot<'a>(
    folder: &Dir,
    slots: &'a mut [Option<Slot>; 2],
    generation: u64,
) -> io::Result<&'a Slot> {
    let name = slot_name(generation);
    let on_disk = folder.stat(OsStr::new(&name))?.map(|st| (st.dev, st.ino));
    let held = &mut slots[(generation % 2) as usize];
    if held.as_ref().map(|s| s.id) != on_disk || on_disk.is_none() {
        let file = folder.open_file(OsStr::new(&name), Open::ReadWriteCreate(0o600))?;
        let st = Stat::of_file(&file)?;
        *held = Some(Slot {
            file,
            id: (st.dev, st.ino),
        });
    }
    Ok(held.as_ref().expect("just opened"))
}

/// Opens (creating) the registry folder, refusing one that is a link, that
/// another user owns, or that others can write: such a user could plant
/// leases, or delete ours and take our ports. The checks are made on the
/// descriptor every later access goes through.
fn open_private(dir: &Path) -> Result<Dir> {
    let folder = Dir::create(dir, 0o700).map_err(|e| Error::registry(dir, e))?;
    folder
        .check_trusted()
        .map_err(|e| Error::registry(dir, e))?;
    Ok(folder)
}

/// Moves the slot file `name` aside under a name never reused; says what happened.
fn set_aside(folder: &Dir, name: &str) -> String {
    let aside = format!("{name}.corrupt-{}", crate::clock::now().compact);
    match folder.rename_new(OsStr::new(name), folder, OsStr::new(&aside)) {
        Ok(()) => format!("moved aside to {aside}"),
        Err(e) => format!("could not move it aside ({e})"),
    }
}

/// Adds a problem to those not yet reported (one transaction can meet two).
fn add_notice(notice: &mut Option<String>, message: String) {
    *notice = Some(match notice.take() {
        Some(earlier) => format!("{earlier}; then {message}"),
        None => message,
    });
}

fn slot_name(generation: u64) -> String {
    format!("leases-{}.json", generation % 2)
}

/// A slot's table: a regular file, bounded in size, in the slot format.
fn read_slot(file: &File, path: &Path) -> io::Result<Vec<Lease>> {
    let mut bytes = Vec::new();
    let mut reader = file;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(reader, MAX_READ + 1), &mut bytes)?;
    if bytes.len() as u64 > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is too large", path.display()),
        ));
    }
    serde_json::from_slice::<LeaseFile>(&bytes)
        .map(|f| f.leases)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Overwrites the slot with `bytes` in place: the same inode every time.
/// Only for a slot that is not current, so no reader can see it half-written.
fn write_in_place(file: &File, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)
}

const LOCK_FILE: &str = "leases.lock";

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn lease(port: u16, holder: Holder, owner: &str) -> Lease {
        Lease {
            port,
            pid: holder.pid,
            start_time: holder.start_time,
            owner: owner.into(),
            since: "now".into(),
        }
    }

    #[test]
    fn leases_persist_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        // A second handle (as another process would have) sees the lease.
        let other = Registry::create(dir.path()).unwrap();
        let leases = other.snapshot().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].port, 3000);
        assert_eq!(leases[0].owner, "a");
    }

    #[test]
    fn a_change_that_keeps_inode_size_and_mtime_is_still_seen() {
        // ext4 reuses inodes at once and coarse clocks repeat mtimes: the
        // lock file's counter, not the file's metadata, must decide.
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        assert_eq!(reg.snapshot().unwrap()[0].port, 3000); // cached now
        let path = dir.path().join("leases-1.json");
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let text = fs::read_to_string(&path).unwrap().replace("3000", "3001");
        fs::write(&path, text).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let lock = File::options()
            .read(true)
            .write(true)
            .open(dir.path().join("leases.lock"))
            .unwrap();
        let generation = read_generation(&lock);
        assert_eq!(generation, 1);
        write_generation(&lock, generation + 2).unwrap(); // same slot, new change
        assert_eq!(reg.snapshot().unwrap()[0].port, 3001);
    }

    #[test]
    fn changes_alternate_between_two_slots_and_reuse_their_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        for port in 3000..3004 {
            reg.transact(|t| t.insert(lease(port, Holder::current(), "a")))
                .unwrap();
        }
        let inode = |name: &str| fs::metadata(dir.path().join(name)).unwrap().ino();
        let (slot0, slot1) = (inode("leases-0.json"), inode("leases-1.json"));
        reg.transact(|t| t.remove_where(|l| l.port == 3000))
            .unwrap();
        reg.transact(|t| t.remove_where(|l| l.port == 3001))
            .unwrap();
        assert_eq!(
            (inode("leases-0.json"), inode("leases-1.json")),
            (slot0, slot1)
        );
        let other = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = other.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![3002, 3003]);
    }

    #[test]
    fn a_deleted_lock_file_is_replaced_not_kept_locked_alone() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        // A /tmp cleaner empties the folder.
        for entry in fs::read_dir(dir.path()).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        // A newcomer locks the same (new) lock file and sees the same table.
        let newcomer = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = newcomer
            .snapshot()
            .unwrap()
            .iter()
            .map(|l| l.port)
            .collect();
        assert_eq!(ports, vec![3001]);
        // ...and the two go on sharing one table: both lock the new file.
        newcomer
            .transact(|t| t.insert(lease(3002, Holder::current(), "b")))
            .unwrap();
        let ports: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![3001, 3002]);
    }

    #[test]
    fn a_deleted_registry_folder_is_made_again_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("reg");
        let reg = Registry::create(&reg_dir).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        fs::remove_dir_all(&reg_dir).unwrap(); // a /tmp cleaner
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        let newcomer = Registry::create(&reg_dir).unwrap();
        let ports: Vec<u16> = newcomer
            .snapshot()
            .unwrap()
            .iter()
            .map(|l| l.port)
            .collect();
        assert_eq!(
            ports,
            vec![3001],
            "both work in the folder the path names now"
        );
    }

    #[test]
    fn dead_holders_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Holder { pid, start_time: 1 };
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
        })
        .unwrap();
        let removed = reg.transact(|t| t.remove_dead()).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].port, 3000);
        let left = reg.snapshot().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].port, 3001);
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_previous_table_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        // Generation 2 is current, in slot 0; slot 1 has the table before it.
        fs::write(dir.path().join("leases-0.json"), b"{not json").unwrap();
        let fresh = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = fresh.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![3000]);
        let notice = fresh.take_notice().unwrap();
        assert!(notice.contains("unreadable"), "{notice}");
        assert!(notice.contains("leases-1.json"), "{notice}");
    }

    #[test]
    fn dead_holders_below_a_port_are_reclaimed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Holder { pid, start_time: 1 };
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
            t.insert(lease(3005, dead, "gone"));
        })
        .unwrap();
        let removed = reg
            .transact_seeing(|t, seen| t.remove_dead_below(&(3000..=3010), Some(3002), seen))
            .unwrap();
        assert_eq!(removed.iter().map(|l| l.port).collect::<Vec<_>>(), [3000]);
        let left: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(left, [3001, 3005]);
    }

    #[test]
    fn slot_and_lock_files_that_are_links_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let reg_dir = dir.path().join("reg");
        fs::create_dir(&reg_dir).unwrap();
        fs::set_permissions(&reg_dir, fs::Permissions::from_mode(0o700)).unwrap();
        for name in ["leases-0.json", "leases-1.json"] {
            std::os::unix::fs::symlink(&victim, reg_dir.join(name)).unwrap();
        }
        let reg = Registry::create(&reg_dir).unwrap();
        // Set aside (links are never ours) and replaced by slots of our own.
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(reg.take_notice().unwrap().contains("moved aside"));
        assert_eq!(reg.snapshot().unwrap().len(), 1);
        fs::remove_file(reg_dir.join("leases.lock")).unwrap();
        std::os::unix::fs::symlink(&victim, reg_dir.join("leases.lock")).unwrap();
        assert!(
            reg.snapshot().is_err(),
            "a lock file that is a link is refused"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&reg_dir, &linked).unwrap();
        let err = Registry::create(&linked).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("shared");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Registry::create(&open).unwrap_err().to_string();
        assert!(err.contains("writable by other users"), "{err}");
    }

    #[test]
    fn new_folders_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("reg");
        Registry::create(&reg_dir).unwrap();
        let mode = fs::metadata(&reg_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
