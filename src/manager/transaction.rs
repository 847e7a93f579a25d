//! The sequence every operation of a manager goes through: the manager's
//! lock, then the file view's, the state file's slot, the read-modify-write
//! of the file, the events told on the way, and their emission once every
//! lock is released.

use std::io::{self, ErrorKind};
use std::sync::MutexGuard;

use super::{lock, Local, Manager, Mine};
use crate::clock::{self, Stamp};
use crate::error::{Error, Result};
use crate::events::{Event, Kind, Scene};
use crate::fsutil::SlotGuard;
use crate::lease::Lease;
use crate::shared::{lock_problem, FileView, Save};
use crate::state::State;
use crate::state_view::Leased;

/// How an operation takes the state file's slot (always a wait bounded by
/// `LOCK_WAIT`).
pub(super) enum Slot<'s> {
    /// A lock not taken never fails the operation: the update records it
    /// and the state lives on in memory.
    Bounded,
    /// Ctrl-C fails the operation with the lock's problem; a lock not taken
    /// in time is recorded, as with `Bounded`.
    Interruptible,
    /// Ctrl-C or the time limit fails the operation, the error saying what
    /// that leaves (`; nothing was changed`).
    Required(&'s str),
}

/// One operation under the manager's and the file view's locks.
pub(super) struct Transaction<'a> {
    /// Dropped first: the slot, then the view's lock, then the manager's.
    held: Option<io::Result<SlotGuard>>,
    pub file: MutexGuard<'a, FileView>,
    pub mine: MutexGuard<'a, Mine>,
    manager: &'a Manager,
    local: &'a Local,
    /// The operation's time: when the slot was taken (or the locks, for one
    /// that has not taken it yet).
    pub stamp: Stamp,
    /// Told in order once the locks are released.
    events: Vec<Event>,
    /// Told before the next update's problems, with the state it leaves, but
    /// not recorded as errors (start's warnings).
    pub warnings: Vec<(Kind, String)>,
}

impl Manager {
    /// Runs `body` under this manager's lock and its file view's, then emits
    /// the events it told, whatever it returns, once both are released.
    pub(super) fn transact<T>(
        &self,
        local: &Local,
        body: impl FnOnce(&mut Transaction<'_>) -> T,
    ) -> T {
        let mine = lock(&local.mine);
        let file = local.file.lock();
        let mut txn = Transaction {
            held: None,
            file,
            mine,
            manager: self,
            local,
            stamp: clock::now(),
            events: Vec::new(),
            warnings: Vec::new(),
        };
        let result = body(&mut txn);
        let events = std::mem::take(&mut txn.events);
        drop(txn);
        self.sink().emit(&events);
        result
    }
}

impl Transaction<'_> {
    /// Takes the state file's slot (see `FileView::lock_slot`), before
    /// anything else changes (the registry), so a wait that ends the
    /// operation leaves nothing half done. A lock file that cannot be used
    /// at all (a read-only folder) lets the operation go on, recorded in
    /// memory. Stamps the operation.
    pub fn take_slot(&mut self, how: Slot<'_>) -> Result<()> {
        let held = self.file.lock_slot(!matches!(how, Slot::Bounded));
        let fails = match (how, held.as_ref().err().map(io::Error::kind)) {
            (Slot::Interruptible, Some(ErrorKind::Interrupted)) => Some(None),
            (Slot::Required(then), Some(ErrorKind::Interrupted | ErrorKind::TimedOut)) => {
                Some(Some(then))
            }
            _ => None,
        };
        match (fails, held) {
            (Some(then), Err(e)) => {
                let problem = lock_problem(&self.file.store, &e);
                let problem = match then {
                    Some(then) => format!("{problem}; {then}"),
                    None => problem,
                };
                return Err(Error::io(problem, e));
            }
            (_, held) => self.held = Some(held),
        }
        self.stamp = clock::now();
        Ok(())
    }

    /// The read-modify-write of the state file under the slot (taken here,
    /// `Bounded`, if the operation has not taken it), see `FileView::update`:
    /// `change` is applied to the state (with the operation's stamp). Tells
    /// the pending warnings, then the update's problems.
    pub fn update(
        &mut self,
        leases: Option<Leased>,
        save: Save,
        problems: Vec<(Kind, String)>,
        change: impl FnOnce(&mut State, &Stamp),
    ) {
        let held = match self.held.take() {
            Some(held) => held,
            None => self.file.lock_slot(false),
        };
        let range = self.manager.range();
        let stamp = &self.stamp;
        let problems = self
            .file
            .update(held, range, stamp, leases, save, problems, |s| {
                change(s, stamp)
            });
        let warnings = std::mem::take(&mut self.warnings);
        self.report(warnings);
        self.report(problems);
    }

    /// The scene of this moment: this manager, its active port, the state's lists.
    fn scene(&self) -> Scene<'_> {
        Scene {
            state_file: &self.manager.path,
            service: &self.manager.config.service,
            stamp: &self.stamp,
            active: self.mine.active,
            state: &self.file.state,
        }
    }

    /// An event of `kind` as of now.
    pub fn event(&self, kind: Kind, note: String) -> Event {
        self.scene().event(kind, note)
    }

    /// Tells `event` (once the locks are released).
    pub fn tell(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Tells each problem as an event of its kind.
    pub fn report(&mut self, problems: Vec<(Kind, String)>) {
        let events: Vec<Event> = self.scene().problems(problems).collect();
        self.events.extend(events);
    }

    /// Tells RECLAIM for the dead holders' leases in the range; returns the
    /// ports that were this state file's (their history records it).
    pub fn reclaims(&mut self, reclaimed: &[Lease]) -> Vec<u16> {
        let range = self.manager.range();
        let prefix = self.local.file.owner_prefix();
        let (events, here) = self.scene().reclaims(reclaimed, &range, prefix);
        self.events.extend(events);
        here
    }
}
