//! The manager: picks, releases and refreshes, composing the registry (who holds
//! which port, host-wide), the probe and scan (what the kernel says), and the
//! state file's shared view (`shared/`).
//!
//! A manager belongs to the process that uses it: everything that names this
//! process (the lease owner, the active port) or holds a lock lives in a
//! per-process part, so a forked child's manager holds no port of the parent,
//! never touches the parent's leases, and inherits no lock.
//!
//! Locking order, always: the manager's mutex, then the file view's, then the
//! state file's slot, then the registry's. Events are emitted only after every
//! lock is released (see `events/mod.rs`). Every operation goes through that
//! sequence in `transaction.rs`; `start.rs`: start and stop; `pick.rs`: pick
//! and release; `upkeep.rs`: refresh.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{Origin, Sink};
use crate::holder::Holder;
use crate::registry::{self, Lease, Registry};
use crate::scan::PortSet;
use crate::shared::SharedFile;
use crate::state::State;
use crate::store::Backup;
use crate::sys::PerProcess;

mod pick;
mod read;
mod start;
mod transaction;
mod upkeep;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Manager {
    id: u64,
    me: Weak<Manager>,
    config: Config,
    /// The state file, absolute (fixed at construction, whatever `chdir` follows).
    path: PathBuf,
    registry_dir: PathBuf,
    stopped: AtomicBool,
    /// Made on first successful use in each process (a failed registry open
    /// is tried again at the next call, not kept).
    local: PerProcess<Local>,
}

/// The manager as one process sees it.
struct Local {
    holder: Holder,
    /// This manager's name in the registry: state file, pid, instance number.
    owner: String,
    registry: Arc<Registry>,
    file: Arc<SharedFile>,
    mine: Mutex<Mine>,
}

struct Mine {
    /// The port this manager holds a lease on, in this process.
    active: Option<u16>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("range", &(self.config.start, self.config.end))
            .field("path", &self.path)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not make every later call panic too.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Opens (or creates) the state file and joins the host registry. Emits START.
    pub fn new(config: Config) -> Result<Arc<Manager>> {
        let path = std::path::absolute(&config.json_path)
            .map_err(|e| Error::io(format!("json_path {:?}", config.json_path), e))?;
        let registry_dir =
            std::path::absolute(registry::resolve_dir(config.registry_dir.as_deref()))
                .map_err(|e| Error::io("registry_dir", e))?;
        let manager = Arc::new_cyclic(|me| Manager {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            me: me.clone(),
            config,
            path,
            registry_dir,
            stopped: AtomicBool::new(false),
            local: PerProcess::new(),
        });
        let local = manager.local()?;
        if let Err(what) = local.file.lock().check_path() {
            return Err(Error::invalid(
                "json_path",
                format!(
                    "{} {what}; only a regular file can be a state file",
                    manager.path.display()
                ),
            ));
        }
        manager.start(local)?;
        Ok(manager)
    }

    /// This process's part, made on first use in each process (a forked
    /// child's manager starts with no port, under the child's own name).
    fn local(&self) -> Result<&Local> {
        self.local.get_or_try_init(|| {
            let registry = Registry::open(&self.registry_dir)?;
            let holder = Holder::current();
            let file = SharedFile::open(&self.path, &self.config, &registry);
            // Refreshed in every process that uses it (a forked child's
            // schedule starts empty).
            if !self.is_stopped() {
                let me: Weak<dyn crate::refresh::Refreshed> = self.me.clone();
                crate::refresh::register(self.id, me, self.config.refresh_interval);
            }
            Ok(Local {
                owner: format!("{}{}.{}", file.owner_prefix(), holder.pid, self.id),
                holder,
                registry,
                file,
                mine: Mutex::new(Mine { active: None }),
            })
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn registry_dir(&self) -> &Path {
        &self.registry_dir
    }

    /// This process's registry handle.
    pub fn registry(&self) -> Result<Arc<Registry>> {
        Ok(self.local()?.registry.clone())
    }

    pub fn active_port(&self) -> Option<u16> {
        self.local.current().and_then(|l| lock(&l.mine).active)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The state as last computed (what `get_state()` returns), with this
    /// manager's own active port as `current_port`.
    /// The state as fresh as the file: what any process saved since is read
    /// first (nothing is re-read when nothing changed), and a port whose only
    /// holder has died is taken back before the state is shown (used means
    /// held; a holder that cannot be checked stays).
    pub fn state(&self) -> State {
        self.with_state(|state, active| {
            let mut state = state.clone();
            state.current_port = active;
            state
        })
    }

    fn range(&self) -> RangeInclusive<u16> {
        self.config.start..=self.config.end
    }

    fn sink(&self) -> Sink {
        Sink {
            console: self.config.console_log,
        }
    }

    /// The ECS record of the current state (`log_json()`), from `origin`.
    pub fn json_record(&self, origin: &Origin) -> serde_json::Value {
        let state = self.state();
        let stamp = clock::now();
        let service = &self.config.service;
        crate::events::snapshot(&self.path, service, &state, stamp, origin)
    }

    /// The backups of this manager's state file, oldest first (none when the
    /// backups folder is not to be trusted).
    pub fn backups(&self) -> Vec<Backup> {
        match self.local() {
            Ok(local) => local.file.lock().store.backups().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The path of the backup called `name`, only if it is one of this state
    /// file's backups; nothing else on disk is ever named by what a caller sends.
    pub fn backup_path(&self, name: &str) -> Option<PathBuf> {
        self.backups()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.path)
    }

    /// The content of backup `name`, if it is one of this state file's
    /// backups and still the file that was read (see `Store::read_backup`).
    pub fn read_backup(&self, name: &str) -> Option<Vec<u8>> {
        let local = self.local().ok()?;
        let mut file = local.file.lock();
        file.store.read_backup(name)
    }

    pub fn backup_dir(&self) -> PathBuf {
        self.path.parent().unwrap_or(Path::new("/")).join("backups")
    }

    /// Gives the lease back when the last handle goes away without `stop()`,
    /// quietly: this may run during interpreter shutdown, when logging is no
    /// longer safe. The state file keeps the last saved state.
    pub fn abandon(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::refresh::unregister(self.id);
        let Some(local) = self.local.current() else {
            return;
        };
        if let Some(port) = lock(&local.mine).active.take() {
            let _ = local.registry.transact_removing(|t| {
                t.remove_where(|l| l.port == port && l.owner == local.owner)
            });
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl crate::refresh::Refreshed for Manager {
    fn range(&self) -> RangeInclusive<u16> {
        Manager::range(self)
    }

    fn registry(&self) -> Result<Arc<Registry>> {
        Manager::registry(self)
    }

    fn path(&self) -> &Path {
        Manager::path(self)
    }

    fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease]) {
        Manager::refresh(self, host, reclaimed, false);
    }
}
