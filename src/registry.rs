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
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{ensure_dir, read_generation, write_generation, FileId, LockFile, LOCK_WAIT};
use crate::holder::Holder;

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
}

struct Inner {
    lock: LockFile,
    /// The table as last read or written, the slot file it came from and the
    /// lock file's change counter at that moment.
    cache: Option<(FileId, u64, Vec<Lease>)>,
    /// A problem found while reading, for the caller to report once no lock
    /// is held (reporting may call into Python logging).
    notice: Option<String>,
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

impl Registry {
    /// The registry in `dir`, shared by every manager of this process that uses
    /// the same folder (one in-process mutex, one cache, one lock descriptor).
    pub fn open(dir: &Path) -> Result<Arc<Registry>> {
        static OPEN: OnceLock<Mutex<HashMap<PathBuf, Arc<Registry>>>> = OnceLock::new();
        let dir = std::path::absolute(dir).map_err(|e| Error::registry(dir, e))?;
        let mut open = OPEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(reg) = open.get(&dir) {
            return Ok(reg.clone());
        }
        let reg = Arc::new(Registry::create(&dir)?);
        open.insert(dir, reg.clone());
        Ok(reg)
    }

    fn create(dir: &Path) -> Result<Registry> {
        ensure_dir(dir, 0o700).map_err(|e| Error::registry(dir, e))?;
        check_private(dir).map_err(|e| Error::registry(dir, e))?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                lock: LockFile::new(dir.join(LOCK_FILE)),
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
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner {
            lock,
            cache,
            notice,
        } = &mut *inner;
        let (guard, reopened) = lock
            .acquire(LOCK_WAIT)
            .map_err(|e| Error::registry(self.dir.join(LOCK_FILE), e))?;
        if reopened {
            *cache = None;
        }
        let generation = read_generation(&guard);
        let (leases, read_id) = self.load(cache, notice, generation)?;
        let mut table = LeaseTable {
            leases,
            dirty: false,
        };
        let result = f(&mut table);
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
        let slot = self.slot(next);
        write_in_place(&slot, &bytes).map_err(|e| Error::registry(&slot, e))?;
        // The new table exists in full; now make it the current one.
        write_generation(&guard, next).map_err(|e| Error::registry(&self.dir, e))?;
        let id = FileId::of(&slot).map_err(|e| Error::registry(&slot, e))?;
        *cache = Some((id, next, file.leases));
        Ok(result)
    }

    /// The slot file that holds the table of change number `generation`.
    fn slot(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("leases-{}.json", generation % 2))
    }

    /// A copy of the current leases (taken under the lock).
    pub fn snapshot(&self) -> Result<Vec<Lease>> {
        self.transact(|t| t.leases.clone())
    }

    /// A problem met while reading the registry since the last call, if any.
    pub fn take_notice(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notice
            .take()
    }

    /// Reads the current slot unless the cached table is still it. Takes the
    /// cached table out (no copy); `transact` puts it back.
    fn load(
        &self,
        cache: &mut Option<(FileId, u64, Vec<Lease>)>,
        notice: &mut Option<String>,
        generation: u64,
    ) -> Result<(Vec<Lease>, Option<FileId>)> {
        let cached = cache.take();
        let slot = self.slot(generation);
        let id = match FileId::of(&slot) {
            Ok(id) => id,
            // Nothing written yet (or the folder was emptied): no leases.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
            Err(e) => return Err(Error::registry(&slot, e)),
        };
        if let Some((cached_id, cached_generation, leases)) = cached {
            if cached_id == id && cached_generation == generation {
                return Ok((leases, Some(id)));
            }
        }
        let bytes = fs::read(&slot).map_err(|e| Error::registry(&slot, e))?;
        match serde_json::from_slice::<LeaseFile>(&bytes) {
            Ok(file) => Ok((file.leases, Some(id))),
            Err(e) => {
                // Slots are complete before they become current, so this is
                // outside damage. Keep the evidence and start empty: live
                // managers re-assert their own leases at their next refresh,
                // and bind probes still protect every port already bound.
                let mut aside = slot.clone().into_os_string();
                aside.push(format!(".corrupt-{}", crate::clock::now().compact));
                let aside = PathBuf::from(aside);
                let moved = fs::rename(&slot, &aside);
                *notice = Some(format!(
                    "lease registry {} was unreadable ({e}); {}; starting empty",
                    slot.display(),
                    match moved {
                        Ok(()) => format!("moved aside to {}", aside.display()),
                        Err(m) => format!("could not move it aside ({m})"),
                    }
                ));
                Ok((Vec::new(), None))
            }
        }
    }
}

/// Overwrites `path` with `bytes` in place (creating it if needed): the same
/// inode every time. Only for a slot that is not current, so no reader can
/// see it half-written.
fn write_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)
}

const LOCK_FILE: &str = "leases.lock";

/// Refuses a registry folder that another user owns or could write to: such a
/// user could plant leases, or delete ours and take our ports.
fn check_private(dir: &Path) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "folder is owned by uid {}, not by this user (uid {uid})",
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "folder is writable by other users (mode {:o}); chmod 700 it",
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

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
    fn a_corrupt_registry_is_moved_aside_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("leases-0.json"), b"{not json").unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        assert!(reg.snapshot().unwrap().is_empty());
        let notice = reg.take_notice().unwrap();
        assert!(notice.contains("unreadable"), "{notice}");
        let kept = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(kept, "the damaged file is kept for inspection");
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
