//! Reading the state file: for a reader without the lock, and under the
//! lock, where a damaged file is set aside.

use std::io;

use crate::fsutil::{FileId, Kind};
use crate::state::State;

use super::{not_a_state_file, Loaded, Store};

impl Store {
    /// What is at the state file's path now (not following a link).
    pub fn kind_on_disk(&mut self) -> io::Result<Option<Kind>> {
        match self.open_folder(false) {
            Ok(()) => Ok(self.dir().stat(&self.name)?.map(|st| st.kind)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// For a reader, without the lock: the file's state if another process
    /// wrote it since this store last read or wrote it (`generation`: the
    /// lock file's counter, read first). Nothing is ever set aside or written
    /// here; anything but a changed, valid file is `None` (the caller goes on
    /// from memory, and the next update deals with it under the lock).
    pub fn changed_since(&mut self, generation: u64) -> Option<State> {
        self.open_folder(false).ok()?;
        let st = self.dir().stat(&self.name).ok()??;
        if st.kind != Kind::File {
            return None;
        }
        let id = FileId::from_stat(&st);
        if self.known == Some((id, generation)) {
            return None;
        }
        let bytes = self.dir().read(&self.name).ok()?;
        let state = State::parse(&bytes).ok()?;
        self.backup_cache = None;
        self.known = Some((id, generation));
        Some(state)
    }

    /// Whether the state file is the one this store last read or wrote, at
    /// `generation`: `changed_since` finding nothing, without reading.
    pub fn is_current(&mut self, generation: u64) -> bool {
        self.open_folder(false).is_ok()
            && matches!(self.dir().stat(&self.name), Ok(Some(st))
                if st.kind == Kind::File && self.known == Some((FileId::from_stat(&st), generation)))
    }

    /// Reads the state file, setting a damaged one aside. `generation` is the
    /// lock file's change counter (0 without a lock).
    pub fn load(&mut self, generation: u64) -> Loaded {
        self.seen = None;
        match self.open_folder(false) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.known = None;
                self.backup_cache = None;
                return Loaded::Missing;
            }
            Err(e) => return Loaded::Unreadable(e),
        };
        let st = match self.dir().stat(&self.name) {
            Ok(Some(st)) => st,
            Ok(None) => {
                let had = self.known.take().is_some();
                self.backup_cache = None;
                // The save that follows writes a new file (no second look).
                self.seen = Some((generation, None));
                return if had {
                    Loaded::Vanished
                } else {
                    Loaded::Missing
                };
            }
            Err(e) => return Loaded::Unreadable(e),
        };
        // A link is never followed; unlike a failed read it is a definite
        // answer (what the name holds is not a state file): set aside and
        // rebuilt like a damaged file. A FIFO or device is never touched.
        if st.kind == Kind::Symlink {
            return self.corrupt("a symbolic link, which is never followed".into());
        }
        if st.kind != Kind::File {
            self.known = None;
            return Loaded::Unreadable(not_a_state_file(&self.path, st.kind));
        }
        let id = FileId::from_stat(&st);
        if self.known == Some((id, generation)) {
            self.seen = Some((generation, Some(st)));
            return Loaded::Unchanged;
        }
        self.backup_cache = None;
        let bytes = match self.dir().read(&self.name) {
            Ok(bytes) => bytes,
            // Too large: damage, set aside like any other.
            Err(e) if e.kind() == io::ErrorKind::InvalidData && st.kind == Kind::File => {
                return self.corrupt(e.to_string());
            }
            Err(e) => return Loaded::Unreadable(e),
        };
        match State::parse(&bytes) {
            Ok(state) => {
                self.known = Some((id, generation));
                self.seen = Some((generation, Some(st)));
                Loaded::Valid(Box::new(state))
            }
            Err(reason) => self.corrupt(reason),
        }
    }

    fn corrupt(&mut self, reason: String) -> Loaded {
        self.known = None;
        let moved_to = self.set_aside().ok();
        Loaded::Corrupt { reason, moved_to }
    }

    /// Reads and parses the state file without touching anything: `None` when
    /// it does not exist, else the state or why it does not parse.
    pub fn peek(&mut self) -> io::Result<Option<Result<State, String>>> {
        let name = self.name.clone();
        let folder = match self.folder(false) {
            Ok(folder) => folder,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match folder.stat(&name)? {
            None => Ok(None),
            Some(st) if st.kind != Kind::File => Err(not_a_state_file(&self.path, st.kind)),
            Some(_) => Ok(Some(State::parse(&folder.read(&name)?))),
        }
    }
}
