//! The read-modify-write of the state file under its slot: what another
//! process saved adopted, the change applied, the lists recomputed, the file
//! saved (with a backup), and a missing or damaged file recovered.

use std::ops::RangeInclusive;

use super::{lock_problem, FileView, Save};
use crate::clock::Stamp;
use crate::events::Kind;
use crate::fsutil::SlotGuard;
use crate::state::State;
use crate::state_view::{adopt, recompute_lists, Leased};
use crate::store::{Loaded, Store};

impl FileView {
    /// The read-modify-write of the state file, under its lock: adopt what
    /// another process wrote, apply `change`, recompute the free and used
    /// lists, save (with a backup). `problems` found before (and those found
    /// here) become `last_error` after the file's own state is adopted, and
    /// are returned for the caller's events; none is raised, the state lives
    /// on in memory.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        held: std::io::Result<SlotGuard>,
        range: RangeInclusive<u16>,
        stamp: &Stamp,
        leases: Option<Leased>,
        save: Save,
        mut problems: Vec<(Kind, String)>,
        change: impl FnOnce(&mut State),
    ) -> Vec<(Kind, String)> {
        let FileView {
            state,
            store,
            bound,
            leased,
            skipped,
            ephemeral,
            holders,
            started,
            unscanned,
            unsaved,
            ..
        } = self;
        // A lock not taken is an error, never a skip: without it nothing is
        // read (the counter that says what changed is the lock's) and nothing
        // is written; the change lives on in memory, saved at the next update
        // that holds the lock.
        let guard = match held {
            Ok(guard) => guard,
            Err(e) => {
                let problem = format!(
                    "{}; not written, the state lives on in memory",
                    lock_problem(store, &e)
                );
                problems.push((Kind::Error, problem));
                change(state);
                for (_, message) in &problems {
                    state.record_error(&stamp.jalali, message.clone());
                }
                return problems;
            }
        };
        let generation = guard.generation();
        let fresh = state.change_count == 0 && state.last_checked.is_none();
        let mut must_write = save == Save::Always || std::mem::take(unsaved);
        let mut may_write = true;
        match store.load(generation) {
            Loaded::Unchanged => {}
            Loaded::Missing => {
                must_write = true;
                // At start-up (memory empty) the best valid backup wins.
                if fresh {
                    if let Some(source) = restore(state, store) {
                        problems.push((
                            Kind::Recover,
                            format!(
                                "state file {} was missing; {source}",
                                store.path().display()
                            ),
                        ));
                    }
                }
            }
            Loaded::Vanished => {
                must_write = true;
                problems.push((
                    Kind::Recover,
                    format!(
                        "state file {} was deleted; rewritten from memory",
                        store.path().display()
                    ),
                ));
            }
            Loaded::Valid(disk) => adopt(state, *disk),
            Loaded::Corrupt { reason, moved_to } => {
                must_write = true;
                let aside = moved_to.map_or("it could not be moved aside".to_string(), |p| {
                    format!("moved aside to {}", p.display())
                });
                // Memory is newer than any backup once we are running.
                let source = if fresh {
                    restore(state, store).unwrap_or_else(|| "no valid backup; started fresh".into())
                } else {
                    "rewritten from memory".to_string()
                };
                problems.push((
                    Kind::Recover,
                    format!(
                        "state file {} was damaged ({reason}); {aside}; {source}",
                        store.path().display()
                    ),
                ));
            }
            // Unreadable is not damaged: a file that could not be opened or
            // read in full (EINTR, EMFILE, EIO) may be intact. It is neither
            // restored from a backup nor written over until it reads again.
            Loaded::Unreadable(e) => {
                may_write = false;
                problems.push((
                    Kind::Error,
                    format!(
                        "cannot read state file {} ({e}); left as it is, the state lives on \
                         in memory",
                        store.path().display()
                    ),
                ));
            }
        }
        let before = (
            std::mem::take(&mut state.free_ports),
            std::mem::take(&mut state.used_ports),
            state.leases.clone(),
            state.current_port,
        );
        change(state);
        if let Some(leases) = leases {
            state.leases = leases.mine;
            *leased = leases.ports;
            *holders = leases.holders;
        }
        match unscanned {
            None => recompute_lists(state, range, leased, bound, skipped),
            // No scan yet: the ports the file said were in use stay so (only
            // a probe or a scan says otherwise).
            Some(unseen) => {
                // What the file said other programs hold: its used ports
                // but the leases (the registry speaks for those, its own
                // listed beside them included).
                if !*started {
                    let its_lease = |p: u16| before.2.iter().any(|l| l.port == p);
                    *unseen = before
                        .1
                        .iter()
                        .filter(|&p| !leased.contains(p) && !bound.contains(p) && !its_lease(p))
                        .collect();
                }
                let mut shown = bound.clone();
                for (start, bits) in unseen.iter_words() {
                    shown.or_word(start, bits);
                }
                recompute_lists(state, range, leased, &shown, skipped);
            }
        }
        state.ephemeral_overlap = ephemeral.clone();
        state.last_checked = Some(stamp.jalali.clone());
        state.last_checked_unix = Some(stamp.unix);
        let unchanged = before.0 == state.free_ports
            && before.1 == state.used_ports
            && before.2 == state.leases
            && before.3 == state.current_port;
        // An error in effect is cleared by the next clean save; one that
        // merely goes on (the same message again) is logged, not re-saved,
        // or every refresh would take a backup while it lasts.
        let clean_again = state.error_active && problems.is_empty();
        let same_again = state.error_active
            && problems
                .iter()
                .all(|(_, m)| state.last_error.as_deref() == Some(m.as_str()));
        if !must_write && unchanged && !clean_again && (problems.is_empty() || same_again) {
            return problems;
        }
        if problems.is_empty() {
            state.error_active = false;
        }
        for (_, message) in &problems {
            state.record_error(&stamp.jalali, message.clone());
        }
        if !may_write {
            return problems;
        }
        // Bump the file's counter in the lock file before replacing the state
        // file, so a reader never pairs the new file with the old counter.
        let generation = guard
            .set_generation(generation.wrapping_add(1))
            .map_or(generation, |()| generation.wrapping_add(1));
        match store.save(state, generation) {
            Ok(None) => {}
            Ok(Some(backup_problem)) => {
                state.record_error(&stamp.jalali, backup_problem.clone());
                problems.push((Kind::Error, backup_problem));
            }
            Err(e) => {
                let message = format!(
                    "cannot write state file {} ({e}); keeping the state in memory",
                    store.path().display()
                );
                state.record_error(&stamp.jalali, message.clone());
                problems.push((Kind::Error, message));
            }
        }
        drop(guard);
        problems
    }
}

/// Restores the best valid backup into `state`, saying what was done.
fn restore(state: &mut State, store: &mut Store) -> Option<String> {
    match store.best_backup() {
        Ok(Some((backup, recovered))) => {
            let count = recovered.change_count;
            adopt(state, recovered);
            Some(format!(
                "restored from backup {} (change_count {count})",
                backup.name
            ))
        }
        Ok(None) => None,
        Err(e) => Some(format!("backups not used: {e}")),
    }
}
