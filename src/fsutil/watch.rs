//! What this process knows of a folder's names, kept for as long as the
//! folder is unchanged, so that a folder holding thousands of state files or
//! backups is not listed again for every new manager in it.
//!
//! A folder's mtime and ctime move whenever a name in it is made, removed or
//! renamed (ctime too because anyone owning the folder can set its mtime, but
//! not its ctime; on Linux 6.13 and later both are fine-grained once read).
//! Same times, same names. This process's own changes are bracketed: the
//! folder's times are read before and after, and if nothing else had changed
//! it before, the change is applied to what is known. A change by another
//! process inside such a bracket is taken for ours; all that can hide is a
//! temporary file of a saver killed at that instant, which the background
//! refresh's sweep (once a minute, unconditional) still removes, and a backup
//! name, which `Store` copes with (a name taken is retried with the next
//! suffix).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::sync::{Mutex, MutexGuard};

use super::Dir;
use crate::sys::PerProcess;

/// A folder's identity and its times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirStamp {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl DirStamp {
    fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

struct Known {
    stamp: DirStamp,
    /// The folder's names as of `stamp`, if they were listed.
    names: Option<Vec<OsString>>,
    /// Whether temporary files of killed savers were swept as of `stamp`.
    swept: bool,
}

type Table = Mutex<HashMap<(u64, u64), Known>>;

fn table() -> MutexGuard<'static, HashMap<(u64, u64), Known>> {
    static TABLE: PerProcess<Table> = PerProcess::new();
    TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl Dir {
    /// The folder's identity and times, from its descriptor.
    pub(crate) fn stamp(&self) -> io::Result<DirStamp> {
        let st = self.stat_self()?;
        Ok(DirStamp {
            dev: st.dev,
            ino: st.ino,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
        })
    }
}

/// The folder's names that `wanted` accepts: from what this process knows
/// while the folder is unchanged, else listed afresh (and kept).
pub(crate) fn names_where(dir: &Dir, wanted: impl Fn(&OsStr) -> bool) -> io::Result<Vec<OsString>> {
    let now = dir.stamp()?;
    if let Some(Known {
        names: Some(names), ..
    }) = table().get(&now.key()).filter(|k| k.stamp == now)
    {
        return Ok(names.iter().filter(|n| wanted(n)).cloned().collect());
    }
    // Stamped before listing: a change during the listing makes the stamp
    // stale, so the next call lists again (never the other way round).
    let names = dir.names()?;
    let found = names.iter().filter(|n| wanted(n)).cloned().collect();
    let mut table = table();
    let swept = table
        .get(&now.key())
        .is_some_and(|k| k.stamp == now && k.swept);
    table.insert(
        now.key(),
        Known {
            stamp: now,
            names: Some(names),
            swept,
        },
    );
    Ok(found)
}

/// Hands the folder's names to `remove` (which removes what it should and
/// returns what it removed), unless `always` is false and the folder has not
/// changed since this process last did so.
pub(crate) fn sweep(
    dir: &Dir,
    always: bool,
    remove: impl FnOnce(&[OsString]) -> Vec<OsString>,
) -> io::Result<()> {
    let now = dir.stamp()?;
    if !always
        && table()
            .get(&now.key())
            .is_some_and(|k| k.stamp == now && k.swept)
    {
        return Ok(());
    }
    let names = dir.names()?;
    let removed = remove(&names);
    // What we removed moved the folder's times: taken as our own change.
    let stamp = if removed.is_empty() {
        now
    } else {
        dir.stamp()?
    };
    // The names are not kept: a state folder is swept, not looked up, and
    // it may hold thousands.
    table().insert(
        stamp.key(),
        Known {
            stamp,
            names: None,
            swept: true,
        },
    );
    Ok(())
}

/// A change this process is about to make in a folder (see the module's text).
pub(crate) struct OwnChange {
    before: Option<DirStamp>,
}

impl OwnChange {
    pub(crate) fn begin(dir: &Dir) -> OwnChange {
        // Nothing known of the folder (never listed or swept here, or
        // forgotten when someone else changed it): nothing to keep up to
        // date, and no `fstat` before or after. What a listing or sweep
        // started meanwhile records is stamped by its own look, which our
        // change either precedes (and it sees) or follows (and then the
        // folder's times no longer match that stamp).
        if let Some(key) = dir.known_identity() {
            if !table().contains_key(&key) {
                return OwnChange { before: None };
            }
        }
        OwnChange {
            before: dir.stamp().ok(),
        }
    }

    /// The change is made: `edit` applies it to the names, if they are
    /// known, and returns false if it cannot (they are then forgotten).
    pub(crate) fn end(self, dir: &Dir, edit: impl FnOnce(&mut Vec<OsString>) -> bool) {
        let Some(before) = self.before else {
            return;
        };
        // Changed by someone else before we began (or nothing known): what
        // is known, if anything, is stale, and no `fstat` after is needed.
        {
            let mut table = table();
            if !table.get(&before.key()).is_some_and(|k| k.stamp == before) {
                table.remove(&before.key());
                return;
            }
        }
        let after = dir.stamp().ok();
        let mut table = table();
        match table.get_mut(&before.key()) {
            Some(known)
                if known.stamp == before && after.is_some_and(|a| a.key() == before.key()) =>
            {
                known.stamp = after.expect("checked");
                if let Some(names) = known.names.as_mut() {
                    if !edit(names) {
                        known.names = None;
                    }
                }
            }
            // Changed by someone else before we began: what is known is stale.
            Some(_) => {
                table.remove(&before.key());
            }
            None => {}
        }
    }
}

/// For `OwnChange::end`: `name` was made.
pub(crate) fn added(name: &OsStr) -> impl FnOnce(&mut Vec<OsString>) -> bool + '_ {
    move |names| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_os_string());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn listed(dir: &Dir) -> Vec<OsString> {
        let mut names = names_where(dir, |_| true).unwrap();
        names.sort();
        names
    }

    #[test]
    fn a_change_by_someone_else_is_seen_and_our_own_is_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("a"), b"").unwrap();
        assert_eq!(listed(&dir), ["a"]);
        // Someone else (not bracketed): the next look lists again.
        fs::write(tmp.path().join("b"), b"").unwrap();
        assert_eq!(listed(&dir), ["a", "b"]);
        // Our own, bracketed: applied without a listing.
        let change = OwnChange::begin(&dir);
        fs::write(tmp.path().join("c"), b"").unwrap();
        change.end(&dir, added(OsStr::new("c")));
        assert_eq!(listed(&dir), ["a", "b", "c"]);
        // A bracket that began after an unseen change forgets what was known.
        fs::write(tmp.path().join("d"), b"").unwrap();
        let change = OwnChange::begin(&dir);
        fs::write(tmp.path().join("e"), b"").unwrap();
        change.end(&dir, added(OsStr::new("e")));
        assert_eq!(listed(&dir), ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_change_to_a_folder_nothing_is_known_of_costs_no_look() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        dir.stamp().unwrap();
        let key = dir.known_identity().unwrap();
        // An entry another test left for a folder whose inode this one reuses.
        table().remove(&key);
        let change = OwnChange::begin(&dir);
        assert!(change.before.is_none(), "no fstat before");
        fs::write(tmp.path().join("a"), b"").unwrap();
        change.end(&dir, added(OsStr::new("a")));
        assert!(!table().contains_key(&key), "nothing made up");
        assert_eq!(listed(&dir), ["a"]);
        // Known now: our own changes are bracketed and applied again.
        let change = OwnChange::begin(&dir);
        assert!(change.before.is_some());
        fs::write(tmp.path().join("b"), b"").unwrap();
        change.end(&dir, added(OsStr::new("b")));
        assert!(table().get(&key).unwrap().names.is_some());
        assert_eq!(listed(&dir), ["a", "b"]);
        // Someone else, then ours: forgotten, and the next bracket looks at nothing.
        fs::write(tmp.path().join("c"), b"").unwrap();
        let change = OwnChange::begin(&dir);
        fs::write(tmp.path().join("d"), b"").unwrap();
        change.end(&dir, added(OsStr::new("d")));
        assert!(!table().contains_key(&key));
        assert!(OwnChange::begin(&dir).before.is_none());
        assert_eq!(listed(&dir), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_sweep_is_skipped_only_while_the_folder_is_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut offered = Vec::new();
        let mut look = |always: bool| {
            sweep(&dir, always, |names| {
                offered.push(names.len());
                Vec::new()
            })
            .unwrap()
        };
        look(false);
        fs::write(tmp.path().join("x"), b"").unwrap();
        look(false);
        look(false);
        look(true);
        assert_eq!(
            offered,
            [0, 1, 1],
            "nothing changed: no listing; always: listed"
        );
    }

    #[test]
    fn what_a_sweep_removed_does_not_make_the_next_one_list_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("keep"), b"").unwrap();
        fs::write(tmp.path().join("stale"), b"").unwrap();
        sweep(&dir, false, |_| {
            fs::remove_file(tmp.path().join("stale")).unwrap();
            vec![OsString::from("stale")]
        })
        .unwrap();
        sweep(&dir, false, |_| panic!("listed again")).unwrap();
        assert_eq!(listed(&dir), ["keep"]);
    }
}
