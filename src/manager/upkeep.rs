//! Upkeep: a manager's refresh (its own lease re-asserted, the range
//! re-scanned now and then, the state saved if what it shows changed).

use super::transaction::Slot;
use super::{Local, Manager, Mine};
use crate::clock::Stamp;
use crate::error::Result;
use crate::events::{registry_notice, Kind};
use crate::registry::Lease;
use crate::scan::{self, PortSet};
use crate::shared::{Save, Sweep};
use crate::state_view::{leased_in, Leased};

/// What went wrong on the way, each to be logged at its level.
type Problems = Vec<(Kind, String)>;

impl Manager {
    /// One refresh: this manager's lease re-asserted, and (once per file and
    /// interval, whichever manager of the file comes first) the kernel's view
    /// of the range, with the state saved if what it shows changed. `host` is
    /// a whole-host scan from the refresher (`None` where there is none);
    /// `reclaimed` are dead leases the refresher just removed.
    /// `asked`: called for by the user (`refresh()`), not the background
    /// thread: the folder is swept for stale temporary files every time.
    pub fn refresh(&self, host: Option<&PortSet>, reclaimed: &[Lease], asked: bool) {
        if self.is_stopped() {
            return;
        }
        let Ok(local) = self.local() else {
            return;
        };
        self.transact(local, |txn| {
            // An asked-for refresh always looks at the kernel and the registry
            // afresh; the background one once per file and half an interval.
            let due = asked
                || txn
                    .file
                    .refreshed
                    .is_none_or(|at| at.elapsed() >= self.config.refresh_interval / 2);
            // Between the file's scans, a manager only makes sure its own
            // lease is still recorded (cheap: a thousand managers idle at a
            // fraction of a percent of one core).
            let (_, quick_problems, reinserted) = self
                .reassert(local, &txn.mine, &txn.stamp, false)
                .unwrap_or_else(|refused| (None, vec![(Kind::Error, refused.to_string())], false));
            let reclaimed_here = txn.reclaims(reclaimed);
            if !due && quick_problems.is_empty() && !reinserted && reclaimed_here.is_empty() {
                return;
            }
            let (leases, mut problems) = self
                .leases_in_range(local, &txn.mine, &txn.stamp)
                .unwrap_or_else(|refused| (None, vec![(Kind::Error, refused.to_string())]));
            for problem in quick_problems {
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
            txn.file.refreshed = Some(std::time::Instant::now());
            txn.file.scanned(match host {
                Some(set) => set.clone(),
                None => scan::ports_in_use(self.range()),
            });
            txn.file
                .tidy(if asked { Sweep::Asked } else { Sweep::Periodic });
            // One time for the whole refresh: the lease re-asserted above has it.
            let stamp = txn.stamp.clone();
            let _ = txn.take_slot(Slot::Bounded);
            txn.stamp = stamp;
            let state = &txn.file.state;
            let before = (state.free_ports.len(), state.used_ports.len());
            txn.update(leases, Save::IfChanged, problems, |s, stamp| {
                for port in reclaimed_here {
                    s.record_reclaim(&stamp.jalali, port);
                }
            });
            let state = &txn.file.state;
            let after = (state.free_ports.len(), state.used_ports.len());
            if before != after {
                let note = format!(
                    "free {} -> {}, used {} -> {}",
                    before.0, after.0, before.1, after.1
                );
                let event = txn.event(Kind::Refresh, note);
                txn.tell(event);
            }
        });
    }

    /// A read shows what the kernel says, not only what the file said: the
    /// range's first scan, if none ran yet (taken outside the locks; written
    /// with the next save, reported now if it changed the lists).
    pub(super) fn first_scan(&self, local: &Local) {
        let bound = scan::ports_in_use(self.range());
        self.transact(local, |txn| {
            if txn.file.unscanned.is_none() {
                return;
            }
            if let Some(before) = txn.file.first_scan(self.range(), bound) {
                let state = &txn.file.state;
                let after = (state.free_ports.len(), state.used_ports.len());
                let note = format!(
                    "free {} -> {}, used {} -> {}",
                    before.0, after.0, before.1, after.1
                );
                let event = txn.event(Kind::Refresh, note);
                txn.tell(event);
            }
        });
    }

    /// The leases in range, re-asserting this manager's own lease if the
    /// registry lost it (file deleted or damaged): a port handed out stays
    /// held. A problem is returned for `last_error`, not recorded here (it
    /// must outlive the adoption of the file's state).
    pub(super) fn leases_in_range(
        &self,
        local: &Local,
        mine: &Mine,
        stamp: &Stamp,
    ) -> Result<(Option<Leased>, Problems)> {
        let (leased, problems, _) = self.reassert(local, mine, stamp, true)?;
        Ok((leased, problems))
    }

    /// Re-records this manager's lease if the registry lost it, and (with
    /// `view`) reads the leases in range. The flag says whether the lease had
    /// to be re-recorded. Cheap without `view`: no copy of the table. A
    /// registry of another build's format is the one error returned (the
    /// constructor fails on it); any other is a problem to log.
    fn reassert(
        &self,
        local: &Local,
        mine: &Mine,
        stamp: &Stamp,
        view: bool,
    ) -> Result<(Option<Leased>, Problems, bool)> {
        let range = self.range();
        let mut reinserted = false;
        let result = local.registry.transact(|table| {
            let mut conflict = None;
            if let Some(port) = mine.active {
                match table.holder_of(port) {
                    None => {
                        reinserted = true;
                        table.insert(Lease {
                            port,
                            pid: local.holder.pid,
                            start_time: local.holder.start_time,
                            owner: local.owner.clone(),
                            since: stamp.iso.clone(),
                            service: self.config.service.clone(),
                        })
                    }
                    Some(l) if l.owner != local.owner => conflict = Some(l.clone()),
                    Some(_) => {}
                }
            }
            let views = view.then(|| leased_in(table, &range, local.file.owner_prefix()));
            (views, conflict)
        });
        let mut problems = registry_notice(&local.registry);
        match result {
            Ok((views, conflict)) => {
                if let Some(other) = conflict {
                    problems.push((
                        Kind::Error,
                        format!(
                            "port {} held by this manager was leased to {} (pid {}) meanwhile",
                            other.port, other.owner, other.pid
                        ),
                    ));
                }
                Ok((views, problems, reinserted))
            }
            Err(e)
                if e.io_error().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::Unsupported) =>
            {
                Err(e)
            }
            Err(e) => {
                problems.push((Kind::Error, e.to_string()));
                Ok((None, problems, reinserted))
            }
        }
    }
}
