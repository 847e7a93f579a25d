//! A manager's start (the state loaded or recovered, START; no scan)
//! and its stop (the port given back, STOP).

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;

use super::transaction::Slot;
use super::{Local, Manager};
use crate::error::Result;
use crate::events::{registry_notice, Kind};
use crate::registry;
use crate::shared::{Save, Sweep};

impl Manager {
    /// Loads or recovers the state (once per file view), saves. Emits START.
    /// No scan of the host on the way: a pick needs none (its bind probe
    /// decides), and until the first scan (a read, a refresh, or a pick that
    /// finds the range full) the state keeps what the file said of the ports
    /// nothing looked at.
    pub(super) fn start(&self, local: &Local) -> Result<()> {
        self.transact(local, |txn| {
            let first = !txn.file.started;
            if first {
                txn.file.tidy(Sweep::IfChanged);
                txn.file.ephemeral = ephemeral_warning(self.range(), &mut txn.warnings);
            }
            txn.take_slot(Slot::Interruptible)?;
            if let Some(why) = registry::fallback_notice(&self.registry_dir) {
                txn.warnings.push((Kind::Warning, why));
            }
            if let Some(uid) = txn.file.lock_owner_if_foreign() {
                let warning = format!(
                    "{} belongs to uid {uid}, another user, who can hold this state \
                     file's lock and stall every save; keep state files in a folder \
                     only their user can write",
                    txn.file.store.lock_path().display()
                );
                txn.warnings.push((Kind::Warning, warning));
            }
            // A registry of another build's format fails the start here,
            // before anything is saved: a manager that started anyway would
            // not see that build's leases (or it ours) and hand out their ports.
            let (leases, problems) = self.leases_in_range(local, &txn.mine, &txn.stamp)?;
            // A current_port left by a manager that is gone is no one's port.
            let live: Vec<u16> = leases
                .iter()
                .flat_map(|l| l.mine.iter().map(|v| v.port))
                .collect();
            // A start that finds the file as it would write it writes nothing
            // (a missing or damaged file is always written).
            txn.update(leases, Save::IfChanged, problems, |s, _| {
                if s.current_port.is_some_and(|p| !live.contains(&p)) {
                    s.current_port = None;
                }
            });
            if first {
                txn.file.store.prime_backup_cache();
                txn.file.started = true;
            }
            let note = "DynamicPortManager started.".to_string();
            let event = txn.event(Kind::Start, note);
            txn.tell(event);
            Ok(())
        })
    }

    /// Stops the manager: releases the active port and emits STOP. Idempotent.
    /// Needs no new file descriptor to give the port back.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::refresh::unregister(self.id);
        // In a process that never used this manager there is nothing of it here.
        let Some(local) = self.local.current() else {
            return;
        };
        self.transact(local, |txn| {
            // Stopping always gives the port back; only the record waits.
            let _ = txn.take_slot(Slot::Bounded);
            let released_port = txn.mine.active.take();
            let (leases, mut problems, note) = match released_port {
                Some(port) => match self.drop_lease(local, &mut txn.file, port) {
                    Ok(leases) => (
                        Some(leases),
                        Vec::new(),
                        format!("DynamicPortManager stopped; released {port}."),
                    ),
                    Err(e) => (
                        None,
                        // The registry is unreachable: the lease stays until
                        // this process exits, and is reclaimed then.
                        vec![(Kind::Error, format!("stop could not release {port}: {e}"))],
                        format!("DynamicPortManager stopped; {port} left to be reclaimed."),
                    ),
                },
                None => (None, Vec::new(), "DynamicPortManager stopped.".into()),
            };
            let released = leases.as_ref().and(released_port);
            problems.extend(registry_notice(&local.registry));
            let save = if released.is_some() {
                Save::Always
            } else {
                Save::IfChanged
            };
            txn.update(leases, save, problems, |s, stamp| {
                if let Some(port) = released {
                    s.record_change(&stamp.jalali, Some(port), None);
                    s.stats.releases += 1;
                }
            });
            let event = txn.event(Kind::Stop, note);
            txn.tell(event.with_port(released_port));
        });
    }
}

/// Says (a WARNING) where the range overlaps the kernel's ephemeral range.
fn ephemeral_warning(
    range: RangeInclusive<u16>,
    warnings: &mut Vec<(Kind, String)>,
) -> Option<crate::state::EphemeralOverlap> {
    let o = crate::port_policy::ephemeral_overlap(range)?;
    warnings.push((
        Kind::Warning,
        format!(
            "{} ports of the range ({}-{}) lie in the kernel's ephemeral port range {}-{}: \
             any outgoing connection may take one without asking. Reserve them with \
             `sysctl -w net.ipv4.ip_local_reserved_ports={}-{}` (keep any already \
             reserved), or choose a range outside {}-{}.",
            o.count,
            o.first,
            o.last,
            o.ephemeral[0],
            o.ephemeral[1],
            o.first,
            o.last,
            o.ephemeral[0],
            o.ephemeral[1]
        ),
    ));
    Some(crate::state::EphemeralOverlap {
        ephemeral_range: o.ephemeral,
        first: o.first,
        last: o.last,
        count: o.count,
    })
}
