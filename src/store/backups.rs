//! The state file's backups in `<dir>/backups/`: one taken before each save
//! (a hard link, else a copy), the oldest past `backup_max` rotated away,
//! listed oldest first, and read back for recovery. Backups whose content
//! names another state file of the same stem are never this file's.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::clock;
use crate::fsutil::{names_where, printable, read_bounded, Dir, Kind, Open, Stat};
use crate::state::State;

use super::Store;

/// A backup file of this state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub name: String,
    pub path: PathBuf,
    /// (`YYYYMMDD_HHMMSS`, suffix): the order backups were taken in.
    key: (String, u32),
}

/// What a save did to the backups folder, for what the process knows of its
/// names (`fsutil::watch`).
#[derive(Debug, Default)]
pub(super) enum Touched {
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
        foreign: &HashSet<String>,
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

    /// Keeps the file about to be replaced under a new backup name. A hard
    /// link costs no copy: saves never modify a file in place, so the linked
    /// inode keeps the old content for good.
    /// Returns the oldest backup past `backup_max`, left for the caller to
    /// recycle as the next temporary file (the others past it are deleted).
    pub(super) fn backup_current(&mut self) -> io::Result<Option<String>> {
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
    use std::fs;
    use std::os::unix::ffi::OsStrExt;

    use super::*;
    use crate::store::tests::state;

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
}
