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

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::clock;
use crate::fsutil::{
    added, counter_slot, names_where, printable, sweep, temp_of, write_atomic, Dir, FileId, Kind,
    Open, OwnChange, Recycled, FOLDER_LOCK,
};
use crate::fsutil::{read_bounded, Stat};
use crate::state::State;

/// How many damaged files set aside are kept beside a state file.
const CORRUPT_KEPT: usize = 5;

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

/// A backup file of this state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub name: String,
    pub path: PathBuf,
    /// (`YYYYMMDD_HHMMSS`, suffix): the order backups were taken in.
    key: (String, u32),
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
    /// This file's backups as of our last save. Valid while no one else has
    /// saved the file since: backups are only taken, under the file's lock,
    /// right before a save, so an unchanged file means an unchanged list.
    backup_cache: Option<Vec<Backup>>,
    /// What the save in progress did to the backups folder's names.
    touched: Touched,
    /// Backups whose content names another state file with this one's stem
    /// (`a.json` and `a.state` both back up as `a_<time>.json`): never
    /// restored from, never rotated away by this file.
    foreign: std::collections::HashSet<String>,
    /// Backups known to be this file's (made by this store, or read once):
    /// rotation reads a backup's content only the first time it decides.
    ours: std::collections::HashSet<String>,
}

/// What a save did to the backups folder, for what the process knows of its
/// names (`fsutil::watch`).
#[derive(Debug, Default)]
enum Touched {
    #[default]
    Nothing,
    /// This backup made, these removed (or recycled by the save).
    Made(String, Vec<String>),
    /// Something, not known exactly (a failure part way).
    Unknown,
}

/// Backup names are made from the state file's stem, written as
/// `fsutil::printable` does, so two state files whose names differ only in
/// bytes that are not UTF-8 never share backups.
pub fn backup_stem(stem: &OsStr) -> String {
    printable(stem)
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
            backup_cache: None,
            touched: Touched::Nothing,
            foreign: Default::default(),
            ours: Default::default(),
        }
    }

    /// Does the backup `name`'s content belong to this state file? It does
    /// unless its `settings.json_path` names a file of another name (the
    /// original's backups, and any without settings, count as this file's).
    /// A backup that cannot be read is not called foreign (unknown is not
    /// known): it is left out of recovery by its failed parse instead.
    fn belongs_here(&self, dir: &Dir, name: &str) -> bool {
        let Ok(bytes) = dir.read(OsStr::new(name)) else {
            return true;
        };
        names_this_file(&bytes, &self.name)
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
        let existing = self.dir().stat(&self.name)?;
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
        existing: Option<crate::fsutil::Stat>,
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
        let written =
            state.with_json(|text| write_atomic(folder, &self.name, text, self.durable, reuse));
        if let (Some(old), Some(dir)) = (&recycle, backups) {
            // Not recycled (declined, or the write failed): still past backup_max.
            if !matches!(written, Ok(Recycled::Yes)) {
                let _ = dir.remove(OsStr::new(old));
            }
        }
        if let Err(e) = written {
            // Only the counter moved (we bumped it for this save).
            self.known = self.known.map(|(id, _)| (id, generation));
            return Err(e);
        }
        self.known = folder
            .stat(&self.name)
            .ok()
            .flatten()
            .map(|st| (FileId::from_stat(&st), generation));
        Ok(backup_problem)
    }

    /// Lists the backups once now, so the first save after start-up does not
    /// have to (a shared backups folder can hold thousands of files).
    pub fn prime_backup_cache(&mut self) {
        if self.backup_cache.is_none() && self.known.is_some() {
            self.backup_cache = self.backups().ok();
        }
    }

    /// The backups folder, opened (created with `create`) and checked: a
    /// folder that is a link, that another user owns or that others can write
    /// is refused, and nothing in it is read or written.
    fn backups_folder(&mut self, create: bool) -> io::Result<&Dir> {
        if self.backups.is_none() {
            let name = OsStr::new("backups");
            let folder = self.folder(create)?;
            let dir = if create {
                folder.sub_create(name, 0o755)?
            } else {
                folder.sub(name)?
            };
            dir.check_trusted()?;
            self.backups = Some(dir);
        }
        Ok(self.backups.as_ref().expect("just opened"))
    }

    /// The backups of this state file, oldest first. `Err` when the folder is
    /// there but not to be trusted (or unreadable); no folder is no backups.
    pub fn backups(&mut self) -> io::Result<Vec<Backup>> {
        let stem = self.stem.clone();
        let backup_dir = self.backup_dir.clone();
        let foreign = std::mem::take(&mut self.foreign);
        let listed = self.list_backups(&stem, &backup_dir, &foreign);
        self.foreign = foreign;
        listed
    }

    fn list_backups(
        &mut self,
        stem: &str,
        backup_dir: &Path,
        foreign: &std::collections::HashSet<String>,
    ) -> io::Result<Vec<Backup>> {
        let dir = match self.backups_folder(false) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A cheap first cut; each name is parsed below, once.
        let prefix = format!("{stem}_");
        let ours = |n: &OsStr| n.as_bytes().starts_with(prefix.as_bytes());
        let mut backups: Vec<Backup> = names_where(dir, ours)?
            .into_iter()
            .filter_map(|name| {
                let name = name.into_string().ok()?;
                if foreign.contains(&name) {
                    return None;
                }
                let key = parse_backup_name(stem, &name)?;
                // Only regular files: a link or FIFO planted here is not a backup.
                let st = dir.stat(OsStr::new(&name)).ok()??;
                (st.kind == Kind::File).then(|| Backup {
                    path: backup_dir.join(&name),
                    name,
                    key,
                })
            })
            .collect();
        backups.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(backups)
    }

    /// The content of backup `name` if it is one of `backups()`: opened
    /// relative to the backups folder, never through a link, read only if a
    /// regular file, and only if the name still names what was read (the
    /// store recycles the backup it prunes as its next temporary file: a
    /// backup pruned while it was read may be torn).
    pub fn read_backup(&mut self, name: &str) -> Option<Vec<u8>> {
        if !self.backups().ok()?.iter().any(|b| b.name == name) {
            return None;
        }
        let dir = self.backups.as_ref()?;
        let mut file = dir.open_file(OsStr::new(name), Open::Read).ok()?;
        let read = Stat::of_file(&file).ok()?;
        if read.kind != Kind::File {
            return None;
        }
        let bytes = read_bounded(&mut file, &self.backup_dir.join(name)).ok()?;
        let still = dir.stat(OsStr::new(name)).ok()??;
        ((still.dev, still.ino) == (read.dev, read.ino)).then_some(bytes)
    }

    /// The valid backup with the highest `change_count` (the most recent
    /// state, whatever the clock said when it was named; names only break
    /// ties). `Err` when the backups folder is not to be trusted.
    pub fn best_backup(&mut self) -> io::Result<Option<(Backup, State)>> {
        let backups = self.backups()?;
        let dir = match self.backups.as_ref() {
            Some(dir) => dir,
            None => return Ok(None),
        };
        let mut best: Option<(Backup, State)> = None;
        for backup in backups {
            let Ok(bytes) = dir.read(OsStr::new(&backup.name)) else {
                continue;
            };
            let Ok(state) = State::parse(&bytes) else {
                continue;
            };
            if !names_this_file(&bytes, &self.name) {
                self.foreign.insert(backup.name);
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(_, b)| state.change_count >= b.change_count)
            {
                best = Some((backup, state));
            }
        }
        Ok(best)
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
        let me = std::process::id();
        let _ = sweep(folder, always, |names| {
            let temporaries: Vec<(&OsString, &OsStr, u32)> = names
                .iter()
                .filter_map(|n| temp_of(n).map(|(name, pid)| (n, name, pid)))
                .filter(|&(_, _, pid)| pid != me)
                .collect();
            if temporaries.is_empty() {
                return Vec::new();
            }
            let locks: std::collections::HashSet<&[u8]> = names
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

    /// Keeps the file about to be replaced under a new backup name. A hard
    /// link costs no copy: saves never modify a file in place, so the linked
    /// inode keeps the old content for good.
    /// Returns the oldest backup past `backup_max`, left for the caller to
    /// recycle as the next temporary file (the others past it are deleted).
    fn backup_current(&mut self) -> io::Result<Option<String>> {
        if self.backup_max == 0 {
            return Ok(None);
        }
        let mut existing = match self.backup_cache.take() {
            Some(cached) if self.known.is_some() && self.backups.is_some() => cached,
            _ => {
                self.backups_folder(true)?;
                self.backups()?
            }
        };
        self.touched = Touched::Unknown;
        let compact = clock::now().compact;
        let mut suffix = existing
            .iter()
            .filter(|b| b.key.0 == compact)
            .map(|b| b.key.1 + 1)
            .max()
            .unwrap_or(0);
        let folder = self.folder.as_ref().expect("opened by save");
        let backups = self.backups.as_ref().expect("opened above");
        let name = loop {
            let name = if suffix == 0 {
                format!("{}_{compact}.json", self.stem)
            } else {
                format!("{}_{compact}_{suffix}.json", self.stem)
            };
            let taken = match folder.link(&self.name, backups, OsStr::new(&name)) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    copy_new(folder, &self.name, backups, OsStr::new(&name))
                }
                other => other,
            };
            match taken {
                Ok(()) => break name,
                // A backup this process did not know of has the name (one
                // taken by another process in the same second, say): never
                // overwritten, the next suffix is tried.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && suffix < 1000 => suffix += 1,
                Err(e) => return Err(e),
            }
        };
        self.ours.insert(name.clone());
        existing.push(Backup {
            path: self.backup_dir.join(&name),
            name,
            key: (compact, suffix),
        });
        // The oldest past `backup_max` go, each only once its content shows
        // it is this file's: another same-stem file's backup leaves the list
        // (and is never counted again) but stays on disk.
        let mut dropped: Vec<Backup> = Vec::new();
        while existing.len() > self.backup_max {
            let oldest = existing.remove(0);
            if self.ours.remove(&oldest.name) || self.belongs_here(backups, &oldest.name) {
                dropped.push(oldest);
            } else {
                self.foreign.insert(oldest.name);
            }
        }
        let made = existing
            .last()
            .map(|b| b.name.clone())
            .expect("just pushed");
        // The one recycled by the save is gone from here too, either way.
        let removed = dropped.iter().map(|b| b.name.clone()).collect();
        let recycle = dropped.pop().map(|b| b.name);
        for old in dropped {
            let _ = backups.remove(OsStr::new(&old.name));
        }
        self.backup_cache = Some(existing);
        self.touched = Touched::Made(made, removed);
        Ok(recycle)
    }

    /// Moves a damaged state file aside under a name that is never reused,
    /// keeping only the newest `CORRUPT_KEPT` such files.
    fn set_aside(&mut self) -> io::Result<PathBuf> {
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

/// Does a state file's content (a backup's) name the state file `name` in
/// its `settings.json_path`, or name none at all?
fn names_this_file(bytes: &[u8], name: &OsStr) -> bool {
    #[derive(serde::Deserialize)]
    struct Only {
        #[serde(default)]
        settings: Option<OnlyPath>,
    }
    #[derive(serde::Deserialize)]
    struct OnlyPath {
        #[serde(default)]
        json_path: Option<String>,
    }
    let Ok(only) = serde_json::from_slice::<Only>(bytes) else {
        return true;
    };
    match only.settings.and_then(|s| s.json_path) {
        Some(path) if !path.is_empty() => Path::new(&path)
            .file_name()
            // Written lossily (`to_string_lossy`): compared the same way.
            .is_none_or(|file| file.to_string_lossy() == name.to_string_lossy()),
        _ => true,
    }
}

/// Copies `from` to a new file `to` (never overwriting one).
fn copy_new(from_dir: &Dir, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
    let bytes = from_dir.read(from)?;
    let mut dst = to_dir.open_file(to, Open::CreateNew(0o644))?;
    io::Write::write_all(&mut dst, &bytes)
}

/// `<stem>_YYYYMMDD_HHMMSS.json` or `<stem>_YYYYMMDD_HHMMSS_N.json` → its order
/// key; anything else (another state file's backups included) → None.
pub fn parse_backup_name(stem: &str, name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix(stem)?.strip_prefix('_')?;
    let rest = rest.strip_suffix(".json")?;
    let (date, rest) = rest.split_at_checked(8)?;
    let rest = rest.strip_prefix('_')?;
    let (time, rest) = rest.split_at_checked(6)?;
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(date) || !all_digits(time) {
        return None;
    }
    let suffix = if rest.is_empty() {
        0
    } else {
        let n = rest.strip_prefix('_')?;
        if n.is_empty() || !all_digits(n) {
            return None;
        }
        n.parse().ok()?
    };
    Some((format!("{date}_{time}"), suffix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Options, Settings};
    use std::fs;
    use std::os::unix::fs::FileTypeExt;

    fn state(n: u64) -> State {
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
    fn backup_names_are_strict() {
        assert_eq!(
            parse_backup_name("svc", "svc_20240721_155445.json"),
            Some(("20240721_155445".into(), 0))
        );
        assert_eq!(
            parse_backup_name("svc", "svc_20240721_155445_12.json"),
            Some(("20240721_155445".into(), 12))
        );
        for bad in [
            "svc_b_20240721_155445.json",
            "svc_20240721_15544.json",
            "svc_20240721_155445_.json",
            "svc_20240721_155445.json.tmp",
            "other_20240721_155445.json",
            "../svc_20240721_155445.json",
        ] {
            assert_eq!(parse_backup_name("svc", bad), None, "{bad}");
        }
    }

    #[test]
    fn stems_that_differ_in_non_utf8_bytes_get_different_backup_names() {
        let a = backup_stem(OsStr::from_bytes(b"s\xff"));
        let b = backup_stem(OsStr::from_bytes(b"s\xfe"));
        assert_ne!(a, b);
        assert_eq!(a, "s%FF");
        assert_eq!(backup_stem(OsStr::new("plain")), "plain");
    }

    #[test]
    fn every_save_backs_up_the_previous_file_and_retention_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path().join("svc.json"), 3, false);
        for n in 0..6 {
            assert_eq!(store.save(&state(n), 0).unwrap(), None);
        }
        let backups = store.backups().unwrap();
        assert_eq!(backups.len(), 3, "{backups:?}");
        // The newest backup holds the content before the last save.
        let newest = State::parse(&fs::read(&backups[2].path).unwrap()).unwrap();
        assert_eq!(newest.change_count, 4);
        let oldest = State::parse(&fs::read(&backups[0].path).unwrap()).unwrap();
        assert_eq!(oldest.change_count, 2);
    }

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
    fn the_backup_with_the_highest_change_count_wins_whatever_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        fs::create_dir(&backups).unwrap();
        // A clock a year ahead named an older state "newer".
        let write = |name: &str, n: u64| {
            fs::write(backups.join(name), state(n).to_json()).unwrap();
        };
        write("svc_20271231_000000.json", 60);
        write("svc_20261125_000000.json", 62);
        write("svc_20261125_000001.json", 61);
        let mut store = Store::new(dir.path().join("svc.json"), 5, false);
        let (backup, recovered) = store.best_backup().unwrap().unwrap();
        assert_eq!(recovered.change_count, 62);
        assert_eq!(backup.name, "svc_20261125_000000.json");
    }

    #[test]
    fn nothing_is_read_from_a_backups_folder_others_can_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        fs::create_dir(&backups).unwrap();
        fs::write(
            backups.join("svc_29991231_235959.json"),
            state(999).to_json(),
        )
        .unwrap();
        fs::set_permissions(&backups, fs::Permissions::from_mode(0o777)).unwrap();
        let mut store = Store::new(dir.path().join("svc.json"), 5, false);
        let err = store.best_backup().unwrap_err();
        assert!(err.to_string().contains("writable by other users"), "{err}");
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
