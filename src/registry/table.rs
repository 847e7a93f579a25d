//! The table as this process last read or wrote it, and how it is brought
//! up to date: the full table from a slot plus the log's lines, or only the
//! lines written since the cached read; a change writes the whole table to
//! the spare slot when the log has grown past it.

use std::ffi::OsStr;
use std::io;

use crate::error::{Error, Result};
use crate::fsutil::{Dir, FileId, Stat};
use crate::lease_log::{self, Header, Layout};

use super::files::{
    clone_error, is_damage, open_log, read_slot, set_aside, slot, slot_name, write_in_place,
    LeaseFile, Slot, LOG_FILE, TABLE_VERSION,
};
use super::{add_notice, fresh_version, Lease, Registry};

/// A table this process has read or written, and the position it matches:
/// while the full table and the log are the same files, only the log's lines
/// past `log_pos` are new.
pub(super) struct Cached {
    /// Names these leases: a number of this process's, new whenever the
    /// table is read afresh or changed, kept while it is unchanged. What a
    /// caller derived from a table of the same version still holds.
    pub(super) version: u64,
    pub(super) base: u64,
    pub(super) slot_id: Option<FileId>,
    pub(super) log_id: Option<(u64, u64)>,
    pub(super) log_pos: u64,
    /// The size of the full table, for when to write it again (compaction).
    pub(super) table_len: u64,
    pub(super) leases: Vec<Lease>,
}

/// What `load` found: the table, the position it matches, and whether it
/// had to be repaired (then the whole table is written back).
pub(super) struct Loaded {
    pub(super) leases: Vec<Lease>,
    pub(super) position: Cached,
    pub(super) repaired: bool,
}

impl Registry {
    /// Writes the whole table to the spare slot, which becomes the full
    /// table with an empty log once the header says so.
    pub(super) fn write_table(
        &self,
        folder: &Dir,
        slots: &mut [Option<Slot>; 2],
        notice: &mut Option<String>,
        header: Header,
        leases: Vec<Lease>,
    ) -> Result<(Header, Cached)> {
        let file = LeaseFile {
            version: TABLE_VERSION,
            leases,
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| Error::registry(&self.dir, io::Error::other(e)))?;
        let base = header.base.wrapping_add(1);
        let path = self.dir.join(slot_name(base));
        let slot = match slot(folder, slots, base) {
            // Not a regular file (a link, a FIFO: never ours): it holds no
            // table, so it is set aside and a new slot made in its place.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let moved = set_aside(folder, &slot_name(base));
                add_notice(notice, format!("lease registry {e}; {moved}"));
                slot(folder, slots, base)
            }
            other => other,
        }
        .map_err(|e| Error::registry(&path, e))?;
        write_in_place(&slot.file, &bytes).map_err(|e| Error::registry(&path, e))?;
        let slot_id = Stat::of_file(&slot.file)
            .map(|st| FileId::from_stat(&st))
            .map_err(|e| Error::registry(&path, e))?;
        let next = Header {
            generation: header.generation.wrapping_add(1),
            base,
            log_len: 0,
            layout: Layout::Current,
        };
        let log_id = folder
            .stat(OsStr::new(LOG_FILE))
            .ok()
            .flatten()
            .map(|st| (st.dev, st.ino));
        Ok((
            next,
            Cached {
                version: fresh_version(),
                base,
                slot_id: Some(slot_id),
                log_id,
                log_pos: 0,
                table_len: bytes.len() as u64,
                leases: file.leases,
            },
        ))
    }

    /// The current table: the full table in the slot the header names, plus
    /// the log's lines, or (when this process's cache is still that table)
    /// the cached table plus only the lines written since. A damaged full
    /// table falls back to the other slot (an older table), a damaged log to
    /// the full table alone; either way the whole table is written back at
    /// once, and live holders re-record their own leases at their next call
    /// or refresh, while bind probes still protect every port already bound.
    pub(super) fn load(
        &self,
        folder: &Dir,
        slots: &mut [Option<Slot>; 2],
        log: &mut Option<Slot>,
        cache: &mut Option<Cached>,
        notice: &mut Option<String>,
        header: Header,
    ) -> Result<Loaded> {
        let cached = cache.take();
        let name = slot_name(header.base);
        let path = self.dir.join(&name);
        let slot_id = folder
            .stat(OsStr::new(&name))
            .map_err(|e| Error::registry(&path, e))?
            .map(|st| FileId::from_stat(&st));
        let log_path = self.dir.join(LOG_FILE);
        let log_id = folder
            .stat(OsStr::new(LOG_FILE))
            .map_err(|e| Error::registry(&log_path, e))?
            .map(|st| (st.dev, st.ino));
        let position = |table_len: u64, log_pos: u64| Cached {
            version: fresh_version(),
            base: header.base,
            slot_id,
            log_id,
            log_pos,
            table_len,
            leases: Vec::new(),
        };
        if let Some(c) = cached {
            let same = c.base == header.base
                && c.slot_id == slot_id
                && (c.log_id == log_id || c.log_pos == 0)
                && c.log_pos <= header.log_len;
            if same {
                let mut leases = c.leases;
                if c.log_pos < header.log_len {
                    let lines = open_log(folder, log, notice)
                        .and_then(|f| lease_log::read(f, c.log_pos, header.log_len));
                    match lines {
                        Ok(changes) => lease_log::apply(&mut leases, changes),
                        // Read afresh, where damage is handled.
                        Err(e) if is_damage(&e) => {
                            return self.load(folder, slots, log, &mut None, notice, header)
                        }
                        Err(e) => return Err(Error::registry(&log_path, e)),
                    }
                }
                // Nothing new in the log: the very leases of the last look.
                let version = if c.log_pos == header.log_len {
                    c.version
                } else {
                    fresh_version()
                };
                return Ok(Loaded {
                    leases,
                    position: Cached {
                        version,
                        ..position(c.table_len, header.log_len)
                    },
                    repaired: false,
                });
            }
        }
        let (mut leases, table_len, mut repaired) = match slot_id {
            // No full table yet (a new registry, or an emptied folder).
            None => (Vec::new(), 0, false),
            Some(_) => match slot(folder, slots, header.base)
                .and_then(|s| read_slot(&s.file, &path))
            {
                Ok((leases, len)) => (leases, len, false),
                // Could not be read (out of descriptors, EIO): that says
                // nothing of the table, which stays as it is.
                Err(e) if !is_damage(&e) => return Err(Error::registry(&path, e)),
                Err(e) => {
                    // Keep the evidence; the next write makes a new slot file.
                    let moved = set_aside(folder, &name);
                    slots[(header.base % 2) as usize] = None;
                    let other = header.base.wrapping_sub(1);
                    let other_name = slot_name(other);
                    let fallback = match folder.stat(OsStr::new(&other_name)) {
                        Ok(Some(_)) => slot(folder, slots, other)
                            .and_then(|slot| read_slot(&slot.file, &self.dir.join(&other_name)))
                            .map(Some),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = &fallback {
                        if !is_damage(e) {
                            return Err(Error::registry(
                                self.dir.join(&other_name),
                                clone_error(e),
                            ));
                        }
                    }
                    add_notice(
                        notice,
                        format!(
                            "lease registry {} was unreadable ({e}); {moved}; {}",
                            path.display(),
                            match &fallback {
                                Ok(Some(_)) =>
                                    format!("using the table before it, from {other_name}"),
                                Ok(None) => "no table before it; starting empty".into(),
                                Err(_) =>
                                    "the table before it is unreadable too; starting empty".into(),
                            }
                        ),
                    );
                    let leases = fallback.ok().flatten().map(|(l, _)| l).unwrap_or_default();
                    (leases, 0, true)
                }
            },
        };
        // The log's lines apply on top of whichever table was read: after a
        // damaged table they still hold the latest changes.
        if header.log_len > 0 {
            let lines =
                open_log(folder, log, notice).and_then(|f| lease_log::read(f, 0, header.log_len));
            match lines {
                Ok(changes) => lease_log::apply(&mut leases, changes),
                Err(e) if !is_damage(&e) => return Err(Error::registry(&log_path, e)),
                Err(e) => {
                    // Keep the evidence; the next change starts a new log.
                    let moved = set_aside(folder, LOG_FILE);
                    *log = None;
                    add_notice(
                        notice,
                        format!(
                            "lease registry change log {} was unreadable ({e}); {moved}; using \
                             the full table before it",
                            log_path.display()
                        ),
                    );
                    repaired = true;
                }
            }
        }
        Ok(Loaded {
            leases,
            position: position(table_len, header.log_len),
            repaired,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};

    use super::*;
    use crate::holder::Holder;
    use crate::registry::tests::lease;

    #[test]
    fn leases_persist_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        // A second handle (as another process would have) sees the lease.
        let other = Registry::create(dir.path()).unwrap();
        let leases = other.snapshot().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].port, 3000);
        assert_eq!(leases[0].owner, "a");
    }

    #[test]
    fn another_handle_reads_only_the_new_lines_and_follows_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Registry::create(dir.path()).unwrap();
        let reader = Registry::create(dir.path()).unwrap();
        writer
            .transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        assert_eq!(reader.snapshot().unwrap().len(), 1); // cached now
        writer
            .transact(|t| {
                t.insert(lease(3001, Holder::current(), "a"));
                t.remove_where(|l| l.port == 3000);
            })
            .unwrap();
        let ports = |r: &Registry| -> Vec<u16> {
            let mut p: Vec<u16> = r.snapshot().unwrap().iter().map(|l| l.port).collect();
            p.sort();
            p
        };
        assert_eq!(ports(&reader), [3001]);
        // A change writes a line of the log, not the whole table.
        let slot_len = |name: &str| fs::metadata(dir.path().join(name)).unwrap().len();
        assert_eq!(slot_len("leases-1.json"), 0, "made, never written yet");
        let log_len = fs::metadata(dir.path().join("leases.log")).unwrap().len();
        assert!(log_len < 1024, "{log_len}");
        // Past 64 KiB of log the whole table is written to the spare slot
        // and the log starts again; every handle follows.
        fill_past_a_compaction(&writer);
        assert!(slot_len("leases-0.json") + slot_len("leases-1.json") > 32 * 1024);
        let expected: Vec<u16> = std::iter::once(3001).chain(4000..4400).collect();
        assert_eq!(ports(&reader), expected);
        assert_eq!(ports(&Registry::create(dir.path()).unwrap()), expected);
        assert!(fs::metadata(dir.path().join("leases.log")).unwrap().len() < 64 * 1024);
    }

    #[test]
    fn a_handle_replaying_the_log_keeps_the_writers_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Registry::create(dir.path()).unwrap();
        let reader = Registry::create(dir.path()).unwrap();
        writer
            .transact(|t| {
                for port in 3000..3010 {
                    t.insert(lease(port, Holder::current(), "a"));
                }
            })
            .unwrap();
        reader.snapshot().unwrap(); // cached at this point of the log
        writer
            .transact(|t| t.remove_where(|l| l.port % 3 == 0))
            .unwrap();
        let order =
            |r: &Registry| -> Vec<u16> { r.snapshot().unwrap().iter().map(|l| l.port).collect() };
        assert_eq!(order(&reader), order(&writer));
        assert_eq!(
            order(&Registry::create(dir.path()).unwrap()),
            order(&writer)
        );
    }

    #[test]
    fn lines_past_the_headers_length_are_never_read() {
        // A writer killed between its append and the header update.
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        let log = File::options()
            .append(true)
            .open(dir.path().join("leases.log"))
            .unwrap();
        std::io::Write::write_all(&mut &log, b"{\"add\":{\"port\":3001,\"pid\":1,\"start").unwrap();
        let fresh = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = fresh.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, [3000]);
        // The next change overwrites the torn line.
        fresh
            .transact(|t| t.insert(lease(3002, Holder::current(), "b")))
            .unwrap();
        let again = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = again.snapshot().unwrap().iter().map(|l| l.port).collect();
        assert_eq!(ports, [3000, 3002]);
        assert!(again.take_notice().is_none());
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_previous_table_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        // Enough leases for a full table in slot 1, then one more in the log.
        fill_past_a_compaction(&reg);
        assert!(
            fs::metadata(dir.path().join("leases-1.json"))
                .unwrap()
                .len()
                > 0
        );
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        fs::write(dir.path().join("leases-1.json"), b"{not json").unwrap();
        let fresh = Registry::create(dir.path()).unwrap();
        let ports: Vec<u16> = fresh.snapshot().unwrap().iter().map(|l| l.port).collect();
        // The table before it (none here) plus what the log says since: the
        // leases only the damaged table held are gone until re-recorded.
        assert!(ports.contains(&3001) && ports.contains(&4399), "{ports:?}");
        assert!(!ports.contains(&4000), "{ports:?}");
        let count = ports.len();
        let notice = fresh.take_notice().unwrap();
        assert!(notice.contains("unreadable"), "{notice}");
        assert!(notice.contains("leases-1.json"), "{notice}");
        // Written back whole at once: every process reads the same table.
        let other = Registry::create(dir.path()).unwrap();
        assert_eq!(other.snapshot().unwrap().len(), count);
        assert!(other.take_notice().is_none());
    }

    /// Leases on 4000-4399 with long owners: over 64 KiB of log, so the
    /// table is folded into a slot (once, then part of it into the log).
    fn fill_past_a_compaction(reg: &Registry) {
        let owner = "x".repeat(200);
        for port in 4000..4400 {
            reg.transact(|t| t.insert(lease(port, Holder::current(), &owner)))
                .unwrap();
        }
    }
}
