//! The state file on disk: its lock, atomic saves with a backup before each,
//! bounded backup retention, and recovery from a damaged file.
//!
//! Beside `<dir>/<stem>.json` live:
//! - `<dir>/<stem>.json.lock`: never replaced, `flock`ed around each change
//!   (locking the state file itself would protect nothing, since every save
//!   replaces it by rename);
//! - `<dir>/backups/<stem>_YYYYMMDD_HHMMSS[_N].json`: the previous versions;
//! - `<dir>/<stem>.json.corrupt-YYYYMMDD_HHMMSS[_N]`: damaged files, set aside.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::clock;
use crate::fsutil::{ensure_dir, write_atomic_reusing, FileId};
use crate::state::State;

/// What reading the state file found.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet.
    Missing,
    /// The file is the one this store last read or wrote: memory is current.
    Unchanged,
    /// Someone else wrote it since; here is their state.
    Valid(Box<State>),
    /// Damaged: set aside (if that worked) and to be rebuilt.
    Corrupt {
        reason: String,
        moved_to: Option<PathBuf>,
    },
    /// It exists but cannot be read (permissions, IO).
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
    backup_dir: PathBuf,
    stem: String,
    backup_max: usize,
    durable: bool,
    /// The file as this store last read or wrote it, with the lock file's
    /// change counter then (see `fsutil::read_generation`).
    known: Option<(FileId, u64)>,
    /// This file's backups as of our last save. Valid while no one else has
    /// saved the file since: backups are only taken, under the file's lock,
    /// right before a save, so an unchanged file means an unchanged list.
    backup_cache: Option<Vec<Backup>>,
}

impl Store {
    /// `path` should be absolute so a later `chdir` of the host changes nothing.
    pub fn new(path: PathBuf, backup_max: usize, durable: bool) -> Store {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dynamic_ports".into());
        Store {
            backup_dir: dir.join("backups"),
            path,
            stem,
            backup_max,
            durable,
            known: None,
            backup_cache: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn backup_dir(&self) -> &Path {
        &self.backup_dir
    }

    pub fn lock_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Reads the state file, setting a damaged one aside. `generation` is the
    /// lock file's change counter (0 without a lock).
    pub fn load(&mut self, generation: u64) -> Loaded {
        let id = match FileId::of(&self.path) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.known = None;
                self.backup_cache = None;
                return Loaded::Missing;
            }
            Err(e) => return Loaded::Unreadable(e),
        };
        if self.known == Some((id, generation)) {
            return Loaded::Unchanged;
        }
        self.backup_cache = None;
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return Loaded::Unreadable(e),
        };
        match State::parse(&bytes) {
            Ok(state) => {
                self.known = Some((id, generation));
                Loaded::Valid(Box::new(state))
            }
            Err(reason) => {
                self.known = None;
                let moved_to = self.set_aside().ok();
                Loaded::Corrupt { reason, moved_to }
            }
        }
    }

    /// Reads and parses the state file without touching anything: `None` when
    /// it does not exist, else the state or why it does not parse.
    pub fn peek(&self) -> io::Result<Option<Result<State, String>>> {
        match fs::read(&self.path) {
            Ok(bytes) => Ok(Some(State::parse(&bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves `state`: the current file becomes a backup, then the new content
    /// replaces it atomically. Returns a non-fatal backup problem, if any,
    /// alongside success; a failed write is an error.
    /// `generation` is the lock file's counter as bumped for this save.
    pub fn save(&mut self, state: &State, generation: u64) -> io::Result<Option<String>> {
        if let Some(dir) = self.path.parent() {
            ensure_dir(dir, 0o755)?;
        }
        let (backup_problem, recycle) = match self.backup_current() {
            Ok(recycle) => (None, recycle),
            Err(e) => (
                Some(format!(
                    "backup before save failed in {}: {e}",
                    self.backup_dir.display()
                )),
                None,
            ),
        };
        // On failure the old file is still there, untouched (the write is
        // atomic), so what we knew of it stays true: keep `known`, or the next
        // load would adopt that older file over the newer state in memory.
        let written = write_atomic_reusing(
            &self.path,
            &state.to_json(),
            self.durable,
            recycle.as_deref(),
        );
        if let Some(old) = recycle {
            // Not recycled (declined, or the write failed): still past backup_max.
            let _ = fs::remove_file(old);
        }
        if let Err(e) = written {
            // Only the counter moved (we bumped it for this save).
            self.known = self.known.map(|(id, _)| (id, generation));
            return Err(e);
        }
        self.known = FileId::of(&self.path).ok().map(|id| (id, generation));
        Ok(backup_problem)
    }

    /// Lists the backups once now, so the first save after start-up does not
    /// have to (a shared backups folder can hold thousands of files).
    pub fn prime_backup_cache(&mut self) {
        if self.backup_cache.is_none() && self.known.is_some() {
            self.backup_cache = Some(self.backups());
        }
    }

    /// The backups of this state file, oldest first.
    pub fn backups(&self) -> Vec<Backup> {
        let Ok(entries) = fs::read_dir(&self.backup_dir) else {
            return Vec::new();
        };
        let mut backups: Vec<Backup> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let key = parse_backup_name(&self.stem, &name)?;
                // Only regular files: a symlink planted here is not a backup.
                if !e.file_type().ok()?.is_file() {
                    return None;
                }
                Some(Backup {
                    path: self.backup_dir.join(&name),
                    name,
                    key,
                })
            })
            .collect();
        backups.sort_by(|a, b| a.key.cmp(&b.key));
        backups
    }

    /// The newest backup that parses, if any.
    pub fn newest_valid_backup(&self) -> Option<(Backup, State)> {
        self.backups().into_iter().rev().find_map(|b| {
            let bytes = fs::read(&b.path).ok()?;
            State::parse(&bytes).ok().map(|s| (b, s))
        })
    }

    /// Keeps the file about to be replaced under a new backup name. A hard
    /// link costs no copy: saves never modify a file in place, so the linked
    /// inode keeps the old content for good.
    /// Returns the oldest backup past `backup_max`, left for the caller to
    /// recycle as the next temporary file (the others past it are deleted).
    fn backup_current(&mut self) -> io::Result<Option<PathBuf>> {
        if self.backup_max == 0 || !self.path.exists() {
            return Ok(None);
        }
        ensure_dir(&self.backup_dir, 0o755)?;
        let mut existing = match self.backup_cache.take() {
            Some(cached) if self.known.is_some() => cached,
            _ => self.backups(),
        };
        let compact = clock::now().compact;
        let suffix = existing
            .iter()
            .filter(|b| b.key.0 == compact)
            .map(|b| b.key.1 + 1)
            .max()
            .unwrap_or(0);
        let name = if suffix == 0 {
            format!("{}_{compact}.json", self.stem)
        } else {
            format!("{}_{compact}_{suffix}.json", self.stem)
        };
        let target = self.backup_dir.join(&name);
        if fs::hard_link(&self.path, &target).is_err() {
            copy_new(&self.path, &target)?;
        }
        existing.push(Backup {
            name,
            path: target,
            key: (compact, suffix),
        });
        let excess = existing.len().saturating_sub(self.backup_max);
        let mut dropped: Vec<Backup> = existing.drain(..excess).collect();
        let recycle = dropped.pop().map(|b| b.path);
        for old in dropped {
            let _ = fs::remove_file(&old.path);
        }
        self.backup_cache = Some(existing);
        Ok(recycle)
    }

    /// Moves a damaged state file aside under a name that is never reused.
    fn set_aside(&self) -> io::Result<PathBuf> {
        let compact = clock::now().compact;
        for n in 0..1000u32 {
            let mut name = self.path.as_os_str().to_owned();
            name.push(format!(".corrupt-{compact}"));
            if n > 0 {
                name.push(format!("_{n}"));
            }
            let aside = PathBuf::from(name);
            if !aside.exists() {
                fs::rename(&self.path, &aside)?;
                return Ok(aside);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "too many corrupt copies set aside in one second",
        ))
    }
}

/// Copies `from` to a new file `to` (never overwriting one).
fn copy_new(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    io::copy(&mut src, &mut dst)?;
    Ok(())
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

    fn state(n: u64) -> State {
        let mut s = State::fresh(
            Settings {
                port_range: [3000, 3010],
                json_path: "s.json".into(),
                history_max: 50,
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
    fn every_save_backs_up_the_previous_file_and_retention_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path().join("svc.json"), 3, false);
        for n in 0..6 {
            assert_eq!(store.save(&state(n), 0).unwrap(), None);
        }
        let backups = store.backups();
        assert_eq!(backups.len(), 3, "{backups:?}");
        // The newest backup holds the content before the last save.
        let newest = State::parse(&fs::read(&backups[2].path).unwrap()).unwrap();
        assert_eq!(newest.change_count, 4);
        let oldest = State::parse(&fs::read(&backups[0].path).unwrap()).unwrap();
        assert_eq!(oldest.change_count, 2);
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_a_backup_recovers_it() {
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
        let (_, recovered) = store.newest_valid_backup().unwrap();
        assert_eq!(recovered.change_count, 1);
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
}
