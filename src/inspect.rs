//! Looking without touching: the state a manager would show, and the list of
//! backups, computed without writing anything (no lease, no save, no backup,
//! no damaged file moved). For the command line's inspection commands.

use std::path::Path;

use crate::clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::registry::{self, Registry};
use crate::scan;
use crate::state::State;
use crate::state_view::{adopt, initial_state, leased_in, owner_prefix, recompute_lists};
use crate::store::{Backup, Store};

/// The state a manager with `config` would show right now (the file's record,
/// today's leases and a fresh scan), without writing anything: no lease, no
/// save, no backup, no damaged file moved. For inspection (the CLI's `state`,
/// `free`, `used`, `history`). A damaged file is reported in `last_error` and
/// shown from its newest valid backup.
pub fn read_state(config: &Config) -> Result<State> {
    let path = std::path::absolute(&config.json_path)
        .map_err(|e| Error::io(format!("json_path {:?}", config.json_path), e))?;
    let registry = Registry::open(&registry::resolve_dir(config.registry_dir.as_deref()))?;
    let mut store = Store::new(path.clone(), config.backup_max, false);
    let stamp = clock::now();
    let mut state = initial_state(config, registry.dir());
    match store.peek() {
        Ok(None) => {}
        Ok(Some(Ok(disk))) => adopt(&mut state, disk),
        Ok(Some(Err(reason))) => {
            let shown = match store.best_backup() {
                Ok(Some((backup, recovered))) => {
                    adopt(&mut state, recovered);
                    format!("shown from backup {}", backup.name)
                }
                Ok(None) => "no valid backup".to_string(),
                Err(e) => format!("backups not used: {e}"),
            };
            let message = format!(
                "state file {} is damaged ({reason}); {shown}",
                path.display()
            );
            state.record_error(&stamp.jalali, message);
        }
        Err(e) => {
            let message = format!("cannot read state file {}: {e}", path.display());
            state.record_error(&stamp.jalali, message);
        }
    }
    let range = config.start..=config.end;
    let prefix = owner_prefix(&path);
    let leased = registry.transact(|t| leased_in(t, &range, &prefix))?;
    let bound = scan::ports_in_use(range.clone());
    state.leases = leased.mine;
    let skipped = config
        .skip_unsafe
        .then(crate::port_policy::browser_unsafe)
        .unwrap_or_default();
    recompute_lists(&mut state, range, &leased.ports, &bound, &skipped);
    state.last_checked = Some(stamp.jalali.clone());
    state.last_checked_unix = Some(stamp.unix);
    Ok(state)
}

/// The backups of the state file `json_path`, oldest first (nothing written).
pub fn list_backups(json_path: &Path) -> Result<Vec<Backup>> {
    let path = std::path::absolute(json_path)
        .map_err(|e| Error::io(format!("json_path {json_path:?}"), e))?;
    Store::new(path.clone(), 0, false)
        .backups()
        .map_err(|e| Error::io(format!("backups of {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use crate::manager::Manager;
    use std::fs;

    fn everything(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .chain(fs::read_dir(dir.join("backups")).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| (p.display().to_string(), fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn reading_the_state_writes_nothing_even_when_the_file_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let config = Args {
            start: 24200,
            end: 24205,
            json_path: dir.path().join("s.json"),
            registry_dir: Some(dir.path().join("registry")),
            console_log: crate::events::ConsoleLog::Off,
            ..Args::default()
        }
        .check()
        .unwrap();
        let m = Manager::new(config.clone()).unwrap();
        let port = m.pick_port(None).unwrap();
        let before = everything(dir.path());
        let seen = read_state(&config).unwrap();
        assert_eq!(seen.history.back().unwrap().new, Some(port));
        assert!(seen.used_ports.contains(port), "today's lease shows");
        assert_eq!(everything(dir.path()), before);

        fs::write(dir.path().join("s.json"), b"{\"current_port\"").unwrap();
        let before = everything(dir.path());
        let seen = read_state(&config).unwrap();
        assert!(seen.last_error.unwrap().contains("shown from backup"));
        assert_eq!(everything(dir.path()), before, "the damaged file stays put");
        m.stop();
        assert_eq!(
            list_backups(&dir.path().join("s.json")).unwrap().len(),
            m.backups().len()
        );
    }
}
