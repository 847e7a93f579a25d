//! What is set aside or swept beside a state file: a damaged file moved
//! aside under a name never reused (the newest `CORRUPT_KEPT` kept), and the
//! temporary files of savers that were killed.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::clock;
use crate::fsutil::{sweep, temp_of, Dir, FOLDER_LOCK};

use super::Store;

/// How many damaged files set aside are kept beside a state file.
const CORRUPT_KEPT: usize = 5;

impl Store {
    /// Moves a damaged state file aside under a name that is never reused,
    /// keeping only the newest `CORRUPT_KEPT` such files.
    pub(super) fn set_aside(&mut self) -> io::Result<PathBuf> {
        let compact = clock::now().compact;
        let mut prefix = self.name.clone();
        prefix.push(".corrupt-");
        let name = self.name.clone();
        let folder = self.folder(false)?;
        for n in 0..1000u32 {
            let mut aside = prefix.clone();
            aside.push(&compact);
            if n > 0 {
                aside.push(format!("_{n}"));
            }
            match folder.rename_new(&name, folder, &aside) {
                Ok(()) => {
                    prune_set_aside(folder, &prefix);
                    return Ok(self.path.with_file_name(aside));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "too many corrupt copies set aside in one second",
        ))
    }

    /// Removes temporary files left by savers that were killed (their pid is
    /// gone), so the files beside a state file stay bounded: this state
    /// file's, and those of the folder's other state files, whose managers may
    /// never start again. Another name counts as a state file when it ends in
    /// `.json` and the folder has our lock file, or (as earlier versions made
    /// them) when `<name>.lock` is beside it: a user's `.notes.txt.123.tmp` is
    /// left alone. Unless `always`, only if the folder changed since this
    /// process last swept it.
    pub fn remove_stale_temporaries(&mut self, always: bool) {
        let own = self.name.clone();
        let Ok(folder) = self.folder(false) else {
            return;
        };
        let me = crate::sys::process_id();
        let _ = sweep(folder, always, |names| {
            let temporaries: Vec<(&OsString, &OsStr, u32)> = names
                .iter()
                .filter_map(|n| temp_of(n).map(|(name, pid)| (n, name, pid)))
                .filter(|&(_, _, pid)| pid != me)
                .collect();
            if temporaries.is_empty() {
                return Vec::new();
            }
            let locks: HashSet<&[u8]> = names
                .iter()
                .filter_map(|n| n.as_bytes().strip_suffix(b".lock"))
                .collect();
            let ours = names.iter().any(|n| n == FOLDER_LOCK);
            let state_file = |name: &OsStr| {
                name == own
                    || locks.contains(name.as_bytes())
                    || (ours && name.as_bytes().ends_with(b".json"))
            };
            temporaries
                .into_iter()
                .filter(|&(candidate, name, pid)| {
                    state_file(name)
                        && !crate::holder::pid_exists(pid)
                        && folder.remove(candidate).is_ok()
                })
                .map(|(candidate, ..)| candidate.clone())
                .collect()
        });
    }
}

fn prune_set_aside(folder: &Dir, prefix: &OsStr) {
    let Ok(names) = folder.names() else {
        return;
    };
    let mut aside: Vec<OsString> = names
        .into_iter()
        .filter(|n| n.as_bytes().starts_with(prefix.as_bytes()))
        .collect();
    aside.sort();
    let excess = aside.len().saturating_sub(CORRUPT_KEPT);
    for old in &aside[..excess] {
        let _ = folder.remove(old);
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use crate::store::tests::state;
    use crate::store::{Loaded, Store};

    #[test]
    fn a_corrupt_file_is_set_aside_and_the_best_backup_recovers_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.json");
        let mut store = Store::new(path.clone(), 5, false);
        store.save(&state(1), 0).unwrap();
        store.save(&state(2), 0).unwrap();
        fs::write(&path, b"{\"current_port\": 30").unwrap();
        match store.load(0) {
            Loaded::Corrupt { reason, moved_to } => {
                assert!(reason.contains("JSON"), "{reason}");
                let moved_to = moved_to.unwrap();
                assert_eq!(fs::read(&moved_to).unwrap(), b"{\"current_port\": 30");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
        let (_, recovered) = store.best_backup().unwrap().unwrap();
        assert_eq!(recovered.change_count, 1);
    }

    #[test]
    fn stale_temporaries_of_dead_savers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.path().join(format!(".svc.json.{dead}.tmp"));
        let live = dir
            .path()
            .join(format!(".svc.json.{}.tmp", std::process::id()));
        fs::write(&stale, b"x").unwrap();
        fs::write(&live, b"x").unwrap();
        let mut store = Store::new(dir.path().join("svc.json"), 5, false);
        store.remove_stale_temporaries(false);
        assert!(!stale.exists());
        assert!(live.exists());
    }
}
