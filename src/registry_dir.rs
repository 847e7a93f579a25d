//! Where the lease registry lives: the caller's choice, `DPM_REGISTRY_DIR`, or
//! the default (with its fallback when another user has taken it), and the
//! checks that make a folder fit to hold it.

use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::Dir;

/// The environment variable that moves the registry (e.g. per test session).
pub const REGISTRY_ENV: &str = "DPM_REGISTRY_DIR";

/// The folder used when neither the caller nor `DPM_REGISTRY_DIR` names one.
///
/// A fixed path under /tmp rather than `$XDG_RUNTIME_DIR`: that variable is
/// missing under cron, sudo and many service managers, and logind deletes the
/// folder on the user's last logout; either would split one user's managers
/// across two registries and break uniqueness.
///
/// Any local user can create that path first (a folder of theirs, or a
/// link). Then, and only then, every process of this user moves to the same
/// fallback (see `fallback_dir`), and each manager says so at start
/// (`fallback_notice`): a squatter cannot stop this user's managers.
pub fn default_dir() -> PathBuf {
    default_choice().0.clone()
}

/// The /tmp path the default registry lives at unless it is taken.
fn tmp_dir() -> PathBuf {
    PathBuf::from(format!(
        "/tmp/dynamic-port-manager-{}",
        crate::fsutil::effective_uid()
    ))
}

/// The default folder and, when it is a fallback, why. Decided once per
/// process: every manager of a process uses one registry.
fn default_choice() -> &'static (PathBuf, Option<String>) {
    static CHOICE: std::sync::OnceLock<(PathBuf, Option<String>)> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| {
        let tmp = tmp_dir();
        let refusal = match open_private(&tmp) {
            Ok(_) => return (tmp, None),
            // Only a path someone else controls is a reason to move; any
            // other failure (a full disk, EMFILE) is reported where it happens.
            Err(e) if squatted(&tmp) => e.to_string(),
            Err(_) => return (tmp, None),
        };
        match fallback_dir() {
            Some(dir) if open_private(&dir).is_ok() => {
                let why = format!(
                    "the default lease registry {} cannot be used ({refusal}); using {} \
                     instead (every process of this user does the same while it is taken)",
                    tmp.display(),
                    dir.display()
                );
                (dir, Some(why))
            }
            _ => (tmp, None),
        }
    })
}

/// Is `path` something this user does not control: a link, not a folder, a
/// folder of another user or one that others can write? (Positive evidence
/// only: a path that cannot be looked at is not called taken.)
fn squatted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(st) => {
            !st.is_dir() || st.uid() != crate::fsutil::effective_uid() || st.mode() & 0o022 != 0
        }
        Err(_) => false,
    }
}

/// Where the default registry moves when its /tmp path is taken by another
/// user: the user's runtime folder (`$XDG_RUNTIME_DIR`, or `/run/user/<uid>`
/// where logind made it, so that cron and services without the variable find
/// the same one), else `~/.cache`. Only a folder this user owns and no one
/// else can write is used.
fn fallback_dir() -> Option<PathBuf> {
    let uid = crate::fsutil::effective_uid();
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(format!("/run/user/{uid}"))));
    if let Some(runtime) = runtime.filter(|d| Dir::open(d).is_ok_and(|f| f.check_trusted().is_ok()))
    {
        return Some(runtime.join("dynamic-port-manager"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    let cache = PathBuf::from(home).join(".cache");
    Dir::create(&cache, 0o700).ok()?;
    Some(cache.join("dynamic-port-manager-registry"))
}

/// Why `dir` is not the /tmp default, when it is the fallback taken instead.
pub fn fallback_notice(dir: &Path) -> Option<String> {
    let (chosen, why) = default_choice();
    (chosen == dir).then(|| why.clone()).flatten()
}

/// The registry folder for an explicit choice, else the environment, else the default.
pub fn resolve_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os(REGISTRY_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => default_dir(),
    }
}

pub(crate) fn open_private(dir: &Path) -> Result<Dir> {
    let folder = Dir::create(dir, 0o700).map_err(|e| Error::registry(dir, e))?;
    folder.check_trusted().map_err(|e| {
        // The error names the folder already; the registry error names it once.
        let text = e.to_string();
        let named = format!("folder {} ", dir.display());
        let text = text
            .strip_prefix(&named)
            .map_or(text.clone(), |rest| format!("the folder {rest}"));
        Error::registry(dir, io::Error::new(e.kind(), text))
    })?;
    Ok(folder)
}
