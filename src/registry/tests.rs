//! Tests of the transaction as a whole: handles of the same folder, and a
//! folder deleted or replaced under them.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::holder::Holder;

pub(super) fn lease(port: u16, holder: Holder, owner: &str) -> Lease {
    Lease {
        port,
        pid: holder.pid,
        start_time: holder.start_time,
        owner: owner.into(),
        since: "now".into(),
        service: String::new(),
    }
}

#[test]
fn a_deleted_lock_file_is_replaced_not_kept_locked_alone() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::create(dir.path()).unwrap();
    reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
        .unwrap();
    // A /tmp cleaner empties the folder.
    for entry in fs::read_dir(dir.path()).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
        .unwrap();
    // A newcomer locks the same (new) lock file and sees the same table.
    let newcomer = Registry::create(dir.path()).unwrap();
    let ports: Vec<u16> = newcomer
        .snapshot()
        .unwrap()
        .iter()
        .map(|l| l.port)
        .collect();
    assert_eq!(ports, vec![3001]);
    // ...and the two go on sharing one table: both lock the new file.
    newcomer
        .transact(|t| t.insert(lease(3002, Holder::current(), "b")))
        .unwrap();
    let ports: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
    assert_eq!(ports, vec![3001, 3002]);
}

#[test]
fn a_deleted_registry_folder_is_made_again_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join("reg");
    let reg = Registry::create(&reg_dir).unwrap();
    reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
        .unwrap();
    fs::remove_dir_all(&reg_dir).unwrap(); // a /tmp cleaner
    reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
        .unwrap();
    let newcomer = Registry::create(&reg_dir).unwrap();
    let ports: Vec<u16> = newcomer
        .snapshot()
        .unwrap()
        .iter()
        .map(|l| l.port)
        .collect();
    assert_eq!(
        ports,
        vec![3001],
        "both work in the folder the path names now"
    );
}

#[test]
fn a_folder_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("shared");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let err = Registry::create(&open).unwrap_err().to_string();
    assert!(err.contains("writable by other users"), "{err}");
}

#[test]
fn new_folders_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join("reg");
    Registry::create(&reg_dir).unwrap();
    let mode = fs::metadata(&reg_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
