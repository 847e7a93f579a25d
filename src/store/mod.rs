//! The state file on disk: its lock, atomic saves with a backup before each,
//! bounded backup retention, and recovery from a damaged or missing file.
//!
//! Beside `<dir>/<name>.json` live:
//! - `<dir>/.dynamic_port_manager.lock` (`fsutil::FOLDER_LOCK`): one for the
//!   folder's state files, never replaced, holding for each file a slot that
//!   is locked around each change and holds its change counter (locking the
//!   state file itself would protect nothing, since every save replaces it);
//! - `<dir>/backups/<stem>_YYYYMMDD_HHMMSS[_N].json`: the previous versions;
//! - `<dir>/<name>.json.corrupt-YYYYMMDD_HHMMSS[_N]`: damaged files, set aside
//!   (the newest `CORRUPT_KEPT` are kept);
//! - `<dir>/.<name>.json.<pid>.tmp`: a save in progress (a killed saver's is
//!   removed by the next manager that starts or refreshes).
//!
//! Every file is reached through the folder's descriptor (`fsutil::Dir`):
//! nothing is followed through a link, and nothing that is not a regular file
//! is read, replaced or renamed.
//!
//! This module: the `Store` and its folder. `load` and `save`: the state
//! file read and written; `backups`: taken, rotated, listed and read back;
//! `set_aside`: damaged files set aside, and dead savers' temporaries swept.

mod backups;
mod load;
mod save;
mod set_aside;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil::{counter_slot, Dir, FileId, Kind, Stat, FOLDER_LOCK};
use crate::state::State;

use backups::Touched;
pub use backups::{backup_stem, Backup};

/// What reading the state file found.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet.
    Missing,
    /// The file this store read or wrote is gone (deleted under us).
    Vanished,
    /// The file is the one this store last read or wrote: memory is current.
    Unchanged,
    /// Someone else wrote it since; here is their state.
    Valid(Box<State>),
    /// Damaged: set aside (if that worked) and to be rebuilt.
    Corrupt {
        reason: String,
        moved_to: Option<PathBuf>,
    },
    /// Something is there that is not a regular file we may read (a link, a
    /// FIFO, a device, a folder), or reading failed: left as it is.
    Unreadable(io::Error),
}

pub struct Store {
    path: PathBuf,
    name: OsString,
    backup_dir: PathBuf,
    stem: String,
    backup_max: usize,
    durable: bool,
    /// The state file's folder, opened once it exists.
    folder: Option<Dir>,
    /// The backups folder, opened once it exists and found trustworthy.
    backups: Option<Dir>,
    /// The file as this store last read or wrote it, with the lock file's
    /// change counter then (see `fsutil::read_generation`).
    known: Option<(FileId, u64)>,
    /// The regular file `load` found under the lock (`None`: no file at
    /// the name), with the counter it read: the save that follows in the
    /// same update (counter unchanged, or bumped once for that save) needs no
    /// second look at the name. Forgotten at the next operation
    /// (`revalidate`) and by the save.
    seen: Option<(u64, Option<Stat>)>,
    /// This file's backups as of our last save. Valid while no one else has
    /// saved the file since: backups are only taken, under the file's lock,
    /// right before a save, so an unchanged file means an unchanged list.
    backup_cache: Option<Vec<Backup>>,
    /// What the save in progress did to the backups folder's names.
    touched: Touched,
    /// Backups whose content names another state file with this one's stem
    /// (`a.json` and `a.state` both back up as `a_<time>.json`): never
    /// restored from, never rotated away by this file.
    foreign: HashSet<String>,
    /// Backups known to be this file's (made by this store, or read once):
    /// rotation reads a backup's content only the first time it decides.
    ours: HashSet<String>,
}

impl Store {
    /// `path` should be absolute so a later `chdir` of the host changes nothing.
    pub fn new(path: PathBuf, backup_max: usize, durable: bool) -> Store {
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = path.file_name().unwrap_or_default().to_os_string();
        let stem = backup_stem(path.file_stem().unwrap_or(OsStr::new("dynamic_ports")));
        Store {
            backup_dir: dir.join("backups"),
            path,
            name,
            stem,
            backup_max,
            durable,
            folder: None,
            backups: None,
            known: None,
            seen: None,
            backup_cache: None,
            touched: Touched::Nothing,
            foreign: Default::default(),
            ours: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file of the state file's folder (shared by its state files).
    pub fn lock_path(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or(Path::new("/"))
            .join(FOLDER_LOCK)
    }

    /// Where this file's change counter is in the folder's lock file.
    pub fn counter_offset(&self) -> u64 {
        counter_slot(&self.name)
    }

    /// The state file's folder, opened (and created, with `create`) on first need.
    pub fn folder(&mut self, create: bool) -> io::Result<&Dir> {
        self.open_folder(create)?;
        Ok(self.folder.as_ref().expect("just opened"))
    }

    /// Forgets the folders if the path no longer names them (deleted or
    /// replaced under us), so the next use works in what the path names now.
    /// Once per change (`FileView::update`), not at every file access.
    pub fn revalidate(&mut self) {
        self.seen = None;
        if self.folder.as_ref().is_some_and(|f| !f.still_at_path()) {
            self.folder = None;
            self.backups = None;
        }
    }

    fn open_folder(&mut self, create: bool) -> io::Result<()> {
        if self.folder.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("/"));
            // The folder the user named: a link there is followed (once).
            let opened = if create {
                Dir::create_following(dir, 0o755)?
            } else {
                Dir::open_following(dir)?
            };
            self.folder = Some(opened);
        }
        Ok(())
    }

    /// The folder, once `open_folder` succeeded.
    fn dir(&self) -> &Dir {
        self.folder.as_ref().expect("open_folder succeeded")
    }
}

fn not_a_state_file(path: &Path, kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {}; it is left as it is",
            path.display(),
            kind.describe()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Options, Settings, State};
    use std::fs;
    use std::os::unix::fs::FileTypeExt;

    pub(super) fn state(n: u64) -> State {
        let mut s = State::fresh(
            Settings {
                port_range: [3000, 3010],
                json_path: "svc.json".into(),
                history_max: 50,
                service: "s".into(),
            },
            Options::default(),
        );
        s.change_count = n;
        s
    }

    #[test]
    fn our_own_write_is_recognised_and_a_foreign_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.json");
        let mut mine = Store::new(path.clone(), 5, false);
        assert!(matches!(mine.load(0), Loaded::Missing));
        mine.save(&state(1), 0).unwrap();
        assert!(matches!(mine.load(0), Loaded::Unchanged));
        let mut theirs = Store::new(path, 5, false);
        theirs.save(&state(7), 1).unwrap();
        match mine.load(1) {
            Loaded::Valid(s) => assert_eq!(s.change_count, 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fifo_at_the_path_is_neither_read_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut store = Store::new(path.clone(), 5, false);
        assert!(matches!(store.load(0), Loaded::Unreadable(_)));
        let err = store.save(&state(1), 0).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_fifo());
    }
}
