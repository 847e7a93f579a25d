//! Saving the state file: the current file becomes a backup, then the new
//! content replaces it atomically.

use std::ffi::OsStr;
use std::io;

use crate::fsutil::{added, write_atomic, FileId, Kind, OwnChange, Recycled, Stat};
use crate::state::State;

use super::{not_a_state_file, Store, Touched};

impl Store {
    /// Saves `state`: the current file becomes a backup, then the new content
    /// replaces it atomically. Returns a non-fatal backup problem, if any,
    /// alongside success; a failed write is an error. Something at the path
    /// that is not a regular file (or a link) is never replaced.
    /// `generation` is the lock file's counter as bumped for this save.
    pub fn save(&mut self, state: &State, generation: u64) -> io::Result<Option<String>> {
        self.open_folder(true)?;
        // What this save makes and removes is this process's own change to
        // both folders (see `fsutil::watch`): no listing needed afterwards.
        let in_folder = OwnChange::begin(self.dir());
        let in_backups = self.backups.as_ref().map(OwnChange::begin);
        // The look `load` took under this lock in this update, if it took
        // one (`seen`): a second look would find what it found, short of a
        // change by someone who does not take the lock, which a second look
        // could race with just the same.
        let existing = match self.seen.take() {
            Some((seen_at, st)) if generation.wrapping_sub(seen_at) <= 1 => st,
            _ => self.dir().stat(&self.name)?,
        };
        let existed = existing.is_some();
        self.touched = Touched::Nothing;
        let result = self.save_unwatched(state, generation, existing);
        in_folder.end(self.dir(), |names| {
            existed || result.is_err() || added(&self.name)(names)
        });
        let touched = std::mem::take(&mut self.touched);
        if let (Some(change), Some(dir)) = (in_backups, self.backups.as_ref()) {
            change.end(dir, |names| match touched {
                Touched::Nothing => true,
                Touched::Made(made, removed) => {
                    if !removed.is_empty() {
                        names.retain(|n| !removed.iter().any(|r| n == r.as_str()));
                    }
                    names.push(made.into());
                    true
                }
                Touched::Unknown => false,
            });
        }
        result
    }

    fn save_unwatched(
        &mut self,
        state: &State,
        generation: u64,
        existing: Option<Stat>,
    ) -> io::Result<Option<String>> {
        if let Some(st) = existing {
            if matches!(st.kind, Kind::Dir | Kind::Other) {
                return Err(not_a_state_file(&self.path, st.kind));
            }
        }
        let (backup_problem, recycle) = if existing.is_some_and(|st| st.kind == Kind::File) {
            match self.backup_current() {
                Ok(recycle) => (None, recycle),
                Err(e) => (Some(format!("no backup taken before this save: {e}")), None),
            }
        } else {
            (None, None)
        };
        // On failure the old file is still there, untouched (the write is
        // atomic), so what we knew of it stays true: keep `known`, or the next
        // load would adopt that older file over the newer state in memory.
        let folder = self.folder.as_ref().expect("opened above");
        let backups = self.backups.as_ref();
        let reuse = match (&recycle, backups) {
            (Some(name), Some(dir)) => Some((dir, OsStr::new(name.as_str()))),
            _ => None,
        };
        // No file where the look under this lock found none: put there by a
        // rename that never replaces (see `write_atomic`).
        let missing = existing.is_none();
        let written = state
            .with_json(|text| write_atomic(folder, &self.name, text, self.durable, reuse, missing));
        if let (Some(old), Some(dir)) = (&recycle, backups) {
            // Not recycled (declined, or the write failed): still past backup_max.
            if !matches!(written, Ok((Recycled::Yes, _))) {
                let _ = dir.remove(OsStr::new(old));
            }
        }
        let written = match written {
            Ok((_, written)) => written,
            Err(e) => {
                // Only the counter moved (we bumped it for this save).
                self.known = self.known.map(|(id, _)| (id, generation));
                return Err(e);
            }
        };
        // What was written, as its descriptor said (no look at the name
        // afterwards): should someone have replaced it since, the next load
        // finds another identity and reads theirs.
        self.known = written.map(|st| (FileId::from_stat(&st), generation));
        Ok(backup_problem)
    }
}
