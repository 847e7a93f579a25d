//! The lease model: one port held by one process, and the table of them one
//! registry transaction sees and changes.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

mod list;

pub use list::LeaseList;

/// A process identity that survives pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22);
    /// 0 where the platform does not tell.
    pub start_time: u64,
}

/// The three answers a look at a process can give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// The check could not be made; the text says why.
    Unknown(String),
}

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
    /// The service the holder announced (empty in tables written before names).
    #[serde(default)]
    pub service: String,
}

impl Lease {
    pub fn holder(&self) -> Holder {
        Holder {
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

/// The leases as one transaction sees them. Changes are written back when the
/// transaction ends, and only if there were any.
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    pub(crate) leases: Vec<Lease>,
    /// What this transaction changed, in order: appended to the change log.
    pub(crate) changes: Vec<Change>,
    /// The whole table must be written (a damaged one was repaired).
    pub(crate) rewrite: bool,
    /// Names the content as loaded (see `Cached::version`); 0: unknown.
    pub(crate) version: u64,
    /// The name the content will have once this transaction's changes are written.
    pub(crate) next_version: u64,
}

impl LeaseTable {
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter()
    }

    /// Names the table's content as this transaction found it: equal
    /// versions, equal leases (within this process). 0 when unknown.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version the table has after this transaction, if its changes are
    /// written (a failed write makes the next load read afresh, under a new
    /// version).
    pub fn version_after(&self) -> u64 {
        if self.dirty() {
            self.next_version
        } else {
            self.version
        }
    }

    pub fn holder_of(&self, port: u16) -> Option<&Lease> {
        self.leases.iter().find(|l| l.port == port)
    }

    pub fn insert(&mut self, lease: Lease) {
        self.changes.push(Change::Add(lease.clone()));
        self.leases.push(lease);
    }

    pub(crate) fn dirty(&self) -> bool {
        self.rewrite || !self.changes.is_empty()
    }

    /// Removes the leases for which `drop` is true, and returns them.
    /// The table's order means nothing, so a removal moves the last lease
    /// into the gap instead of shifting thousands of them (every process
    /// replays the same removals from the log, so all keep the same order).
    pub fn remove_where(&mut self, mut drop: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.leases.len() {
            if drop(&self.leases[i]) {
                removed.push(self.leases.swap_remove(i));
            } else {
                i += 1;
            }
        }
        self.changes
            .extend(removed.iter().map(|l| Change::Del(LeaseKey::of(l))));
        removed
    }
}

/// Adds `holder` to `holders` (each with its lowest port seen), or lowers
/// its port. Holders are few (one per process) and leases of one holder tend
/// to follow each other: the newest entry is looked at first.
pub fn note_holder(holders: &mut Vec<(Holder, u16)>, holder: Holder, port: u16) {
    match holders.iter_mut().rev().find(|(h, _)| *h == holder) {
        Some((_, lowest)) => *lowest = (*lowest).min(port),
        None => holders.push((holder, port)),
    }
}

/// One change of the lease table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    #[serde(rename = "add")]
    Add(Lease),
    /// A lease removed, named by everything that identifies it.
    #[serde(rename = "del")]
    Del(LeaseKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseKey {
    pub port: u16,
    pub pid: u32,
    pub start_time: u64,
    pub owner: String,
}

impl LeaseKey {
    pub fn of(lease: &Lease) -> LeaseKey {
        LeaseKey {
            port: lease.port,
            pid: lease.pid,
            start_time: lease.start_time,
            owner: lease.owner.clone(),
        }
    }

    pub(crate) fn names(&self, lease: &Lease) -> bool {
        lease.port == self.port
            && lease.pid == self.pid
            && lease.start_time == self.start_time
            && lease.owner == self.owner
    }
}

/// A lease as the state shows it: who holds which port since when. Shared,
/// not copied: the state of every manager on a file lists every lease taken
/// through it, and a pick that cloned each lease's strings (into the state,
/// the view it keeps for the next pick, the copy it compares with) spent most
/// of its time in the allocator once thousands of managers shared a file.
/// Each view also keeps its text in the state file, written once.
#[derive(Clone)]
pub struct LeaseView(Arc<Shown>);

struct Shown {
    fields: ViewFields,
    /// The view as the pretty-printed state file has it (see `pretty`).
    text: OnceLock<Box<str>>,
}

/// The fields of a `LeaseView`, as the state file has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewFields {
    pub port: u16,
    pub pid: u32,
    pub owner: String,
    pub since: String,
}

impl LeaseView {
    pub fn of(lease: &Lease) -> LeaseView {
        LeaseView::new(ViewFields {
            port: lease.port,
            pid: lease.pid,
            owner: lease.owner.clone(),
            since: lease.since.clone(),
        })
    }

    pub fn new(fields: ViewFields) -> LeaseView {
        LeaseView(Arc::new(Shown {
            fields,
            text: OnceLock::new(),
        }))
    }

    /// Is this the very view `other` is (not only an equal one)?
    pub fn same(&self, other: &LeaseView) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Does this view show `lease`?
    pub fn shows(&self, lease: &Lease) -> bool {
        let f = &self.0.fields;
        f.port == lease.port
            && f.pid == lease.pid
            && f.owner == lease.owner
            && f.since == lease.since
    }

    /// The view as an element of the `leases` list in the state file, byte
    /// for byte what serde_json's pretty printer writes there (the list is a
    /// key of the top-level object): written once per view.
    pub fn pretty(&self) -> &str {
        self.0.text.get_or_init(|| {
            let f = &self.0.fields;
            let string = |s: &str| serde_json::to_string(s).expect("a string always serializes");
            format!(
                "    {{\n      \"port\": {},\n      \"pid\": {},\n      \"owner\": {},\n      \"since\": {}\n    }}",
                f.port,
                f.pid,
                string(&f.owner),
                string(&f.since)
            )
            .into_boxed_str()
        })
    }
}

impl std::ops::Deref for LeaseView {
    type Target = ViewFields;
    fn deref(&self) -> &ViewFields {
        &self.0.fields
    }
}

impl PartialEq for LeaseView {
    fn eq(&self, other: &LeaseView) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.fields == other.0.fields
    }
}

impl std::fmt::Debug for LeaseView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fields.fmt(f)
    }
}

impl Serialize for LeaseView {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.fields.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LeaseView {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ViewFields::deserialize(deserializer).map(LeaseView::new)
    }
}
