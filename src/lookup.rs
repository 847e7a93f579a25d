//! Finding a service by name on this host: the registry's leases of that
//! service whose holders are alive. Nothing but the registry is read (no
//! state file), and a holder's liveness and command line are looked up only
//! for the leases asked for, so a name among a thousand leases costs one
//! table copy and a few `/proc` reads.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::holder::Holder;
use crate::owners::state_file_of;
use crate::registry::{resolve_dir, Registry};

/// One live holder of a service's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub service: String,
    pub port: u16,
    pub pid: u32,
    /// `/proc/<pid>/cmdline` split at NULs; None where it cannot be read.
    pub command: Option<Vec<String>>,
    /// The state file of the manager that holds the port.
    pub state_file: String,
    /// When the port was taken (ISO-8601).
    pub since: String,
}

/// The live holders of `service` (`None`: of every named service) in the
/// registry `registry_dir` (`None`: the default folder), by service and port.
pub fn find(registry_dir: Option<&Path>, service: Option<&str>) -> Result<Vec<Instance>> {
    let reg = Registry::open(&resolve_dir(registry_dir))?;
    let leases = reg.transact(|table| {
        table
            .iter()
            .filter(|l| match service {
                Some(name) => l.service == name,
                None => !l.service.is_empty(),
            })
            .cloned()
            .collect::<Vec<_>>()
    })?;
    // One look per process, however many of its leases match.
    let mut alive: HashMap<Holder, bool> = HashMap::new();
    let mut commands: HashMap<u32, Option<Vec<String>>> = HashMap::new();
    let mut found: Vec<Instance> = leases
        .into_iter()
        .filter(|l| {
            *alive
                .entry(l.holder())
                .or_insert_with(|| l.holder().is_alive())
        })
        .map(|l| Instance {
            command: commands
                .entry(l.pid)
                .or_insert_with(|| command_of(l.pid))
                .clone(),
            state_file: state_file_of(&l.owner).to_string(),
            service: l.service,
            port: l.port,
            pid: l.pid,
            since: l.since,
        })
        .collect();
    found.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
    Ok(found)
}

fn command_of(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Lease;

    #[test]
    fn only_live_holders_of_the_name_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let me = Holder::current();
        let lease = |port, pid, start_time, service: &str| Lease {
            port,
            pid,
            start_time,
            owner: format!("/srv/{service}.json#{pid}.1"),
            since: "2024-07-22T12:00:00+00:00".into(),
            service: service.into(),
        };
        reg.transact(|t| {
            t.insert(lease(4001, me.pid, me.start_time, "orders"));
            t.insert(lease(4000, me.pid, me.start_time, "orders"));
            t.insert(lease(4002, me.pid, me.start_time, "billing"));
            // Another start time under our pid: a holder that is gone.
            t.insert(lease(4003, me.pid, me.start_time + 1, "orders"));
            t.insert(lease(4004, me.pid, me.start_time, ""));
        })
        .unwrap();
        let orders = find(Some(dir.path()), Some("orders")).unwrap();
        assert_eq!(
            orders.iter().map(|i| i.port).collect::<Vec<_>>(),
            [4000, 4001]
        );
        assert_eq!(orders[0].state_file, "/srv/orders.json");
        assert_eq!(orders[0].pid, me.pid);
        assert!(!orders[0].command.as_ref().unwrap().is_empty());
        let all = find(Some(dir.path()), None).unwrap();
        let names: Vec<_> = all.iter().map(|i| (i.service.as_str(), i.port)).collect();
        assert_eq!(
            names,
            [("billing", 4002), ("orders", 4000), ("orders", 4001)]
        );
        assert!(find(Some(dir.path()), Some("nothing")).unwrap().is_empty());
    }
}
