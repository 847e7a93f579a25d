//! Picking: the lowest free port of the range, under the registry's lock,
//! dead holders' leases taken back on the way; and releasing.

use std::ops::RangeInclusive;

use super::transaction::Slot;
use super::{Local, Manager};
use crate::error::{Error, Result};
use crate::events::{registry_notice, Kind};
use crate::holder::Holder;
use crate::port_set::{words_of, PortSet};
use crate::probe::{probe_port, Probe};
use crate::registry::{note_holder, Lease};
use crate::scan;
use crate::shared::{FileView, Save};
use crate::state::LeaseView;
use crate::state_view::{leased_in, owned_through, Leased};

impl Manager {
    /// Picks the lowest free port of the range and makes it the active port
    /// (releasing the previous one). With `for_pid`, the lease is held by that
    /// process until it exits, and this manager's active port is unchanged.
    pub fn pick_port(&self, for_pid: Option<u32>) -> Result<u16> {
        if self.is_stopped() {
            return Err(Error::Stopped(self.path.clone()));
        }
        let local = self.local()?;
        let holder = match for_pid {
            None => local.holder,
            Some(pid) => Holder::of_pid(pid).ok_or_else(|| {
                Error::invalid("pid", format!("no running process has pid {pid}"))
            })?,
        };
        self.transact(local, |txn| {
            // The state file's lock first, before the registry changes.
            txn.take_slot(Slot::Required("nothing was changed"))?;
            let stamp = txn.stamp.clone();
            let prev = txn.mine.active;
            let moving = for_pid.is_none();
            let owner = if moving {
                local.owner.clone()
            } else {
                format!("{}pid", local.file.owner_prefix())
            };
            let lease = |port| Lease {
                port,
                pid: holder.pid,
                start_time: holder.start_time,
                owner: owner.clone(),
                since: stamp.iso.clone(),
                service: self.config.service.clone(),
            };
            let replacing = moving.then_some(prev).flatten();
            let mut picked = self.try_pick(local, &mut txn.file, replacing, &lease)?;
            if picked.0.is_none() {
                // Exhausted as far as we knew: look at the kernel afresh.
                txn.file.scanned(scan::ports_in_use(self.range()));
                let again = self.try_pick(local, &mut txn.file, replacing, &lease)?;
                picked.0 = again.0;
                picked.1.extend(again.1);
            }
            let (found, reclaimed) = picked;
            let mut problems = registry_notice(&local.registry);
            let reclaimed_here = txn.reclaims(&reclaimed);
            let Some((port, leases)) = found else {
                let leased = txn.file.leased.count_in(self.range());
                let err = Error::NoFreePort {
                    start: self.config.start,
                    end: self.config.end,
                    leased,
                    bound: txn.file.bound.count_in(self.range()),
                };
                problems.push((Kind::Error, err.to_string()));
                txn.update(None, Save::Always, problems, |s, stamp| {
                    for port in reclaimed_here {
                        s.record_reclaim(&stamp.jalali, port);
                    }
                });
                return Err(err);
            };
            if moving {
                txn.mine.active = Some(port);
            }
            // Every pick is recorded. A pick on behalf of another pid is not a
            // change of this manager's active port: its entry has no `prev`.
            txn.update(Some(leases), Save::Always, problems, |s, stamp| {
                for old in reclaimed_here {
                    s.record_reclaim(&stamp.jalali, old);
                }
                if moving {
                    s.record_change(&stamp.jalali, prev, Some(port));
                } else {
                    s.record_handout(&stamp.jalali, port);
                }
                s.stats.picks += 1;
            });
            let note = match (moving, prev) {
                (false, _) => format!("picked {port} for pid {}", holder.pid),
                (true, Some(old)) => format!("moved from {old} to {port}"),
                (true, None) => format!("picked {port}"),
            };
            let event = txn.event(Kind::Pick, note);
            txn.tell(
                event
                    .with_port(Some(port))
                    .with_prev(prev.filter(|_| moving))
                    .with_pid(holder.pid),
            );
            Ok(port)
        })
    }

    /// One pass over the range under the registry lock: the lowest port that
    /// no live holder's lease names, no scan saw in use, and a bind probe
    /// confirms. Leases of dead holders below it are taken back on the way
    /// (returned), so the lowest free port is never kept by a process that
    /// exited. Records the lease (and drops `replacing`'s) in the same
    /// transaction.
    fn try_pick(
        &self,
        local: &Local,
        file: &mut FileView,
        replacing: Option<u16>,
        lease: &dyn Fn(u16) -> Lease,
    ) -> Result<Picked> {
        let mut memo = file.leased_memo.take();
        let bound = &mut file.bound;
        let skipped = &file.skipped;
        let range = self.range();
        let owner = &local.owner;
        let prefix = local.file.owner_prefix();
        let picked = local.registry.transact_seeing(|table, seen| {
            let mut reclaimed = Vec::new();
            // Checked under the registry's lock: the exit hook's release of
            // this process's leases comes after this pick or sees its lease.
            if crate::exit::begun() {
                return Err((None, reclaimed));
            }
            // One pass over the table for both the search and the state's
            // view (none if the table is as the last pick left it); it is
            // kept up to date below rather than built again.
            let (port, mut leased) = loop {
                let leased = match memo.take() {
                    Some((version, leased)) if version == table.version() && version != 0 => leased,
                    _ => leased_in(table, &range, prefix),
                };
                let found = match lowest_free(range.clone(), &leased.ports, bound, skipped) {
                    Ok(found) => found,
                    // Nothing was learnt: no holder is checked, nothing taken.
                    Err(e) => return Err((Some(e), reclaimed)),
                };
                let dead = table.remove_dead_among(&range, found, &leased.holders, seen);
                if dead.is_empty() {
                    break (found, leased);
                }
                reclaimed.extend(dead);
            };
            let Some(port) = port else {
                return Ok((None, reclaimed, None));
            };
            let new = lease(port);
            leased.ports.insert(port);
            note_holder(&mut leased.holders, new.holder(), port);
            if owned_through(&new.owner, prefix) {
                leased.mine.push(LeaseView::of(&new));
                leased.mine.sort_by_port();
            }
            table.insert(new);
            if let Some(old) = replacing {
                let gone = table.remove_where(|l| l.port == old && &l.owner == owner);
                if !gone.is_empty() {
                    leased.mine.retain_at(old, |v| &v.owner != owner);
                    if table.holder_of(old).is_none() {
                        leased.ports.remove(old);
                    }
                }
            }
            // A holder's lowest port may now be one it gave up: too low is
            // safe (it is only checked for being alive once more).
            let memo = (table.version_after(), leased.clone());
            Ok((Some((port, leased)), reclaimed, Some(memo)))
        })?;
        let (picked, reclaimed, memo) = match picked {
            Ok(picked) => picked,
            Err((None, _)) => return Err(Error::Stopped(self.path.clone())),
            Err((Some(e), _)) => {
                return Err(Error::io(
                    format!(
                        "cannot look for a free port in {}-{} (a bind probe failed)",
                        self.config.start, self.config.end
                    ),
                    e,
                ))
            }
        };
        file.leased_memo = memo;
        Ok((picked, reclaimed))
    }

    /// Frees the active port. `Ok(false)` when there was none.
    pub fn release_port(&self) -> Result<bool> {
        if self.is_stopped() {
            return Err(Error::Stopped(self.path.clone()));
        }
        let local = self.local()?;
        self.transact(local, |txn| {
            let Some(port) = txn.mine.active else {
                return Ok(false);
            };
            // As a pick: the lock first, so a release is never half done.
            txn.take_slot(Slot::Required(&format!("{port} is still held")))?;
            let leases = self.drop_lease(local, &mut txn.file, port)?;
            txn.mine.active = None;
            // The holder has usually closed its listener by now: look again,
            // so the state shows the port free at once (or still in use).
            match probe_port(port) {
                Probe::Free => txn.file.seen_free(port),
                Probe::InUse | Probe::Unusable => txn.file.bound.insert(port),
                // No answer: what was known of the port stays as it was.
                Probe::Unknown(_) => {}
            }
            let problems = registry_notice(&local.registry);
            txn.update(Some(leases), Save::Always, problems, |s, stamp| {
                s.record_change(&stamp.jalali, Some(port), None);
                s.stats.releases += 1;
            });
            let event = txn.event(Kind::Release, format!("released {port}"));
            txn.tell(event.with_port(Some(port)));
            Ok(true)
        })
    }

    /// Removes this manager's lease on `port`, returning the leases after;
    /// kept as the next pick's view of the table, as a pick keeps its own.
    pub(super) fn drop_lease(
        &self,
        local: &Local,
        file: &mut FileView,
        port: u16,
    ) -> Result<Leased> {
        let range = self.range();
        let mut memo = file.leased_memo.take();
        let (version, leased) = local.registry.transact_removing(|table| {
            let gone = table.remove_where(|l| l.port == port && l.owner == local.owner);
            // The table as the last pick or release left it: its view is
            // changed as the table was rather than built again from every lease.
            let leased = match memo.take() {
                Some((version, mut leased)) if version == table.version() && version != 0 => {
                    if !gone.is_empty() {
                        leased.mine.retain_at(port, |v| v.owner != local.owner);
                        if table.holder_of(port).is_none() {
                            leased.ports.remove(port);
                        }
                    }
                    leased
                }
                _ => leased_in(table, &range, local.file.owner_prefix()),
            };
            (table.version_after(), leased)
        })?;
        file.leased_memo = Some((version, leased.clone()));
        Ok(leased)
    }
}

/// What one pass found: the port with the leases after it was recorded (none
/// if the range is full), and the dead holders' leases taken back on the way.
type Picked = (Option<(u16, Leased)>, Vec<Lease>);

/// The lowest port of `range` that no lease names, no scan saw in use and a
/// bind probe confirms free (ports found in use are added to `bound`). `Err` when a probe could not be made (this
/// process is out of descriptors, say): the search stops there, since what
/// lies above says nothing of the ports it could not look at.
fn lowest_free(
    range: RangeInclusive<u16>,
    leased: &PortSet,
    bound: &mut PortSet,
    skipped: &PortSet,
) -> std::result::Result<Option<u16>, std::io::Error> {
    // 64 ports at a time: in a range that is nearly all leased, the search
    // skips whole words instead of looking up each port three times.
    for (start, inside) in words_of(&range) {
        let mut open = inside & !(leased.word(start) | bound.word(start) | skipped.word(start));
        while open != 0 {
            let port = start + open.trailing_zeros() as u16;
            open &= open - 1;
            match probe_port(port) {
                Probe::Free => return Ok(Some(port)),
                Probe::InUse | Probe::Unusable => bound.insert(port),
                Probe::Unknown(errno) => {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
            }
        }
    }
    Ok(None)
}
