//! The manager through the core's public API, without Python: uniqueness,
//! lifecycle, recovery. (The pytest suites cover the same through the binding,
//! across real processes.)

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use dynamic_port_manager::Args;
use dynamic_port_manager::{Error, Manager};

fn manager(dir: &Path, name: &str, start: i64, end: i64) -> Arc<Manager> {
    let config = Args {
        start,
        end,
        json_path: dir.join(name),
        refresh_interval: 3600.0,
        registry_dir: Some(dir.join("registry")),
        console_log: dynamic_port_manager::ConsoleLog::Off,
        backup_max: 5,
        ..Args::default()
    }
    .check()
    .unwrap();
    Manager::new(config).unwrap()
}

#[test]
fn managers_with_different_state_files_never_share_a_port() {
    let dir = tempfile::tempdir().unwrap();
    let a = manager(dir.path(), "a.json", 24100, 24103);
    let b = manager(dir.path(), "b.json", 24100, 24103);
    let pa = a.pick_port(None).unwrap();
    let pb = b.pick_port(None).unwrap();
    assert_ne!(pa, pb);
    assert_eq!((pa, pb), (24100, 24101));
    // Moving keeps the old port until the new one is leased: never the same.
    let pa2 = a.pick_port(None).unwrap();
    assert_eq!(pa2, 24102);
    // ...and the old one is free again for others.
    let c = manager(dir.path(), "c.json", 24100, 24103);
    assert_eq!(c.pick_port(None).unwrap(), 24100);
}

#[test]
fn a_listener_is_skipped_and_an_exhausted_range_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let m = manager(dir.path(), "s.json", i64::from(port), i64::from(port));
    match m.pick_port(None) {
        Err(Error::NoFreePort { bound, leased, .. }) => assert_eq!((bound, leased), (1, 0)),
        other => panic!("expected NoFreePort, got {other:?}"),
    }
    assert!(m.state().last_error.unwrap().contains("no free port"));
}

#[test]
fn stop_releases_and_forbids_further_picks() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), "s.json", 24110, 24111);
    let port = m.pick_port(None).unwrap();
    m.stop();
    m.stop();
    assert!(matches!(m.pick_port(None), Err(Error::Stopped(_))));
    let state = m.state();
    assert_eq!(state.current_port, None);
    assert_eq!(state.history.back().unwrap().prev, Some(port));
    let other = manager(dir.path(), "t.json", 24110, 24111);
    assert_eq!(other.pick_port(None).unwrap(), port);
}

#[test]
fn a_second_manager_continues_the_history_of_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let first = manager(dir.path(), "s.json", 24120, 24125);
    first.pick_port(None).unwrap();
    first.release_port().unwrap();
    first.stop();
    let second = manager(dir.path(), "s.json", 24120, 24125);
    second.pick_port(None).unwrap();
    let state = second.state();
    assert_eq!(state.change_count, 3);
    assert_eq!(state.port_usage[&24120], 2);
    assert_eq!(state.history.len(), 3);
}

#[test]
fn a_damaged_file_is_rebuilt_from_the_newest_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    let m = manager(dir.path(), "s.json", 24130, 24135);
    m.pick_port(None).unwrap();
    m.pick_port(None).unwrap();
    m.stop();
    let good = m.state().change_count;
    // Managers of one process share the file's view while any lives; a new
    // process (here: the last one gone) starts from the disk.
    drop(m);
    fs::write(&path, &fs::read(&path).unwrap()[..40]).unwrap(); // truncated
    let again = manager(dir.path(), "s.json", 24130, 24135);
    let state = again.state();
    let error = state.last_error.clone().unwrap();
    assert!(
        error.contains("damaged") && error.contains("restored from backup"),
        "{error}"
    );
    // The newest backup is the file as it was before the last save (STOP).
    assert_eq!(state.change_count, good - 1);
    let aside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("s.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept");
}

#[test]
fn an_unwritable_state_path_keeps_the_manager_working_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the state folder should be: no save can succeed,
    // even as root.
    fs::write(dir.path().join("blocked"), b"").unwrap();
    let m = manager(dir.path(), "blocked/s.json", 24140, 24141);
    assert_eq!(m.pick_port(None).unwrap(), 24140);
    assert_eq!(m.pick_port(None).unwrap(), 24141);
    let state = m.state();
    assert_eq!(state.change_count, 2);
    // Not even the lock can be taken there: nothing is written, and the
    // error names the state file.
    let error = state.last_error.unwrap();
    assert!(error.contains("blocked/s.json"), "{error}");
    assert!(error.contains("in memory"), "{error}");
}
