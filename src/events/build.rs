//! The events of a manager's operations, built while its locks are held
//! (they are emitted once the locks are released, see `mod.rs`).

use std::ops::RangeInclusive;
use std::path::Path;

use super::{Event, Kind, Origin, PortSummary};
use crate::clock::Stamp;
use crate::lease::Lease;
use crate::registry::Registry;
use crate::state::State;

/// One moment of a manager's operation as its events tell it: the manager
/// (its state file and service), the time, its active port and the state's
/// lists as they are now.
pub(crate) struct Scene<'a> {
    pub state_file: &'a Path,
    pub service: &'a str,
    pub stamp: &'a Stamp,
    pub active: Option<u16>,
    pub state: &'a State,
}

impl Scene<'_> {
    pub fn event(&self, kind: Kind, note: String) -> Event {
        Event {
            kind,
            time: self.stamp.clone(),
            active: self.active,
            free: PortSummary::of(&self.state.free_ports),
            used: PortSummary::of(&self.state.used_ports),
            note,
            state_file: self.state_file.display().to_string(),
            service: self.service.to_string(),
            port: None,
            prev: None,
            pid: crate::sys::process_id(),
        }
    }

    /// One event per problem, in order, of the problem's kind.
    pub fn problems(&self, problems: Vec<(Kind, String)>) -> impl Iterator<Item = Event> + '_ {
        problems
            .into_iter()
            .map(|(kind, message)| self.event(kind, message))
    }

    /// RECLAIM events for the dead holders' leases in `range`, with the ports
    /// that were taken through the state file whose owners start with
    /// `prefix` (its history records them).
    pub fn reclaims(
        &self,
        reclaimed: &[Lease],
        range: &RangeInclusive<u16>,
        prefix: &str,
    ) -> (Vec<Event>, Vec<u16>) {
        let mut events = Vec::new();
        let mut here = Vec::new();
        for lease in reclaimed.iter().filter(|l| range.contains(&l.port)) {
            let note = format!(
                "reclaimed {} from {} (pid {} is gone)",
                lease.port, lease.owner, lease.pid
            );
            let event = self.event(Kind::Reclaim, note);
            events.push(event.with_port(Some(lease.port)).with_pid(lease.pid));
            if crate::state_view::owned_through(&lease.owner, prefix) {
                here.push(lease.port);
            }
        }
        (events, here)
    }
}

/// A problem the registry met while reading since it was last asked, as an
/// ERROR.
pub(crate) fn registry_notice(registry: &Registry) -> Vec<(Kind, String)> {
    registry
        .take_notice()
        .map(|notice| (Kind::Error, notice))
        .into_iter()
        .collect()
}

/// The ECS record of `state` (`log_json()`) of the manager of `state_file`,
/// from `origin`.
pub(crate) fn snapshot(
    state_file: &Path,
    service: &str,
    state: &State,
    stamp: Stamp,
    origin: &Origin,
) -> serde_json::Value {
    let event = Event {
        kind: Kind::Refresh,
        time: stamp,
        active: state.current_port,
        free: PortSummary::of(&state.free_ports),
        used: PortSummary::of(&state.used_ports),
        note: "state snapshot".into(),
        state_file: state_file.display().to_string(),
        service: service.to_string(),
        port: state.current_port,
        prev: None,
        pid: crate::sys::process_id(),
    };
    let mut record = event.json(origin);
    record["event.action"] = "log_json".into();
    record["dpm.event"] = "log_json".into();
    record["dpm.current_port"] = state.current_port.into();
    record["dpm.change_count"] = state.change_count.into();
    record["dpm.last_error"] = state.last_error.clone().into();
    record["dpm.error_active"] = state.error_active.into();
    record
}
