//! dynamic-port-manager: host-wide, daemon-less TCP port allocation with an
//! inspectable JSON record. Everything but `python/` is plain Rust and knows
//! nothing of Python.

pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod events;
mod exit;
pub(crate) mod fsutil;
pub(crate) mod holder;
pub(crate) mod inspect;
pub(crate) mod kept;
pub(crate) mod lease;
pub(crate) mod lease_log;
pub(crate) mod liveness;
pub(crate) mod lookup;
pub(crate) mod manager;
pub(crate) mod names;
pub(crate) mod owners;

pub(crate) mod port_list;
pub(crate) mod port_policy;
pub(crate) mod port_set;
pub(crate) mod probe;
pub(crate) mod refresh;
pub(crate) mod registry;
pub(crate) mod registry_dir;
pub(crate) mod scan;
pub(crate) mod shared;
#[cfg(target_os = "linux")]
pub(crate) mod sockdiag;
pub(crate) mod state;
pub(crate) mod state_json;
pub(crate) mod state_view;
pub(crate) mod store;

mod python;
mod sys;

// Every module is private; the Rust API is these names (what tests/manager.rs
// and bench/bench_core.rs use). Python sees the crate through `python/`.
pub use config::{Args, Config};
pub use error::{Error, Result};
pub use events::ConsoleLog;
pub use manager::Manager;
pub use probe::probe_port;
pub use scan::{kernel_tables, proc_tables};

/// Creates a manager (which puts itself on this process's refresh schedule).
pub(crate) fn start_manager(config: Config) -> Result<std::sync::Arc<Manager>> {
    Manager::new(config)
}

/// Stops a manager and takes it off the refresh schedule.
pub(crate) fn stop_manager(manager: &Manager) {
    manager.stop();
}

/// Refreshes one manager now, as the refresh thread would: kernel scan, dead
/// leases reclaimed, state saved if what it shows changed.
pub(crate) fn refresh_manager(manager: &Manager) {
    let config = manager.config();
    let host = scan::kernel_tables(config.start..=config.end).ok();
    let reclaimed = manager
        .registry()
        .map(|r| r.sweep_dead())
        .unwrap_or_default();
    manager.refresh(host.as_ref(), &reclaimed, true);
}

/// At interpreter exit: stops the refresh thread (waiting a moment at most)
/// and gives back every lease this process holds, in every registry it used,
/// whatever other threads are doing. Each wait is bounded by `wait`.
pub(crate) fn release_at_exit(wait: std::time::Duration) {
    exit::begin();
    refresh::shutdown();
    let me = holder::Holder::current();
    for registry in registry::Registry::all_open() {
        let _ = registry.release_process(me, wait);
    }
}

/// Removes whatever lease holds `port` in the registry (`None`: the default
/// folder), returning what was removed. For the command line's `release PORT`.
pub(crate) fn release_lease(
    registry_dir: Option<&std::path::Path>,
    port: u16,
) -> Result<Vec<registry::Lease>> {
    let reg = registry::Registry::open(&registry::resolve_dir(registry_dir))?;
    reg.transact_removing(|t| t.remove_where(|l| l.port == port))
}

/// Every lease in the registry (`None`: the default folder), dead holders' included.
pub(crate) fn list_leases(registry_dir: Option<&std::path::Path>) -> Result<Vec<registry::Lease>> {
    let reg = registry::Registry::open(&registry::resolve_dir(registry_dir))?;
    reg.snapshot()
}

/// Who holds each used port of `ports`: processes and the lease (see `owners/`).
pub(crate) fn port_owners(
    registry_dir: Option<&std::path::Path>,
    ports: &scan::PortSet,
) -> Result<Vec<owners::PortOwners>> {
    let reg = registry::Registry::open(&registry::resolve_dir(registry_dir))?;
    owners_with(&reg, ports)
}

/// `port_owners` over an open registry (a manager's own).
pub(crate) fn owners_with(
    reg: &registry::Registry,
    ports: &scan::PortSet,
) -> Result<Vec<owners::PortOwners>> {
    let leases = reg.snapshot()?;
    owners::find(ports, &leases).map_err(|e| Error::io("reading the kernel's socket tables", e))
}
