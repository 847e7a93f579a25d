//! Tests of the atomic write (temporary names, recycled backups, links and
//! folders at the name) and of the folder-change brackets' helpers.

use super::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

impl FileId {
    fn of(path: &Path) -> io::Result<FileId> {
        let m = fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        })
    }
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn atomic_write_replaces_and_leaves_no_temporary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let path = tmp.path().join("a.json");
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"one")],
        false,
        None,
        false,
    )
    .unwrap();
    let first = FileId::of(&path).unwrap();
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"two!")],
        true,
        None,
        false,
    )
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"two!");
    assert_ne!(FileId::of(&path).unwrap(), first);
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn a_file_said_missing_is_made_and_one_that_appeared_since_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let path = tmp.path().join("a.json");
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"new")],
        false,
        None,
        true,
    )
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    // Made by someone else after the caller looked: replaced all the same.
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"newer")],
        false,
        None,
        true,
    )
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"newer");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    // A folder that appeared there is neither replaced nor entered.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    assert!(write_atomic(&dir, n("a.json"), &[IoSlice::new(b"x")], false, None, true).is_err());
    assert!(path.is_dir());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn a_link_planted_at_the_temporary_name_is_not_written_through() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    // At the name earlier versions used, and at one of the current form.
    let pid = std::process::id();
    for planted in [
        format!(".a.json.{pid}.tmp"),
        format!(".a.json.{pid}.abcdefghijkl.tmp"),
    ] {
        std::os::unix::fs::symlink(&victim, tmp.path().join(planted)).unwrap();
    }
    let dir = Dir::open(tmp.path()).unwrap();
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"state")],
        false,
        None,
        false,
    )
    .unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(tmp.path().join("a.json")).unwrap(), b"state");
}

#[test]
fn a_replaced_file_leaves_nothing_behind_and_keeps_its_other_links() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let path = tmp.path().join("a.json");
    fs::write(&path, b"old").unwrap();
    let backup = tmp.path().join("a_backup.json");
    fs::hard_link(&path, &backup).unwrap();
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"new")],
        false,
        None,
        false,
    )
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(fs::read(&backup).unwrap(), b"old");
    assert_eq!(fs::metadata(&backup).unwrap().nlink(), 1);
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.json", "a_backup.json"]);
}

#[test]
fn a_folder_swapped_in_at_the_name_is_put_back_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    fs::create_dir(tmp.path().join("a.json")).unwrap();
    fs::write(tmp.path().join("a.json/inside"), b"kept").unwrap();
    fs::write(tmp.path().join(".t"), b"new").unwrap();
    let err = put_in_place(&dir, n(".t"), n("a.json")).unwrap_err();
    assert!(errno(&err) == Some(Errno::ISDIR), "{err}");
    assert_eq!(fs::read(tmp.path().join("a.json/inside")).unwrap(), b"kept");
    assert_eq!(fs::read(tmp.path().join(".t")).unwrap(), b"new");
}

#[test]
fn temporary_names_carry_their_pid_and_are_recognised_in_both_forms() {
    let name = temp_name(n("s.json"), 4242, "abcdefghijkl");
    assert_eq!(name, ".s.json.4242.abcdefghijkl.tmp");
    assert_eq!(temp_of(&name), Some((n("s.json"), 4242)));
    // The form of earlier versions.
    assert_eq!(temp_of(n(".s.json.4242.tmp")), Some((n("s.json"), 4242)));
    assert_eq!(temp_of(n(".t.json.4242.tmp")), Some((n("t.json"), 4242)));
    // A state file whose name looks like a new-form suffix.
    assert_eq!(
        temp_of(n(".x.1.abcdefghijkl.4242.tmp")),
        Some((n("x.1.abcdefghijkl"), 4242))
    );
    for not_ours in [
        ".s.json.x.tmp",
        ".s.json..tmp",
        "..4242.tmp",
        "s.json.4242.tmp",
        ".s.json.abcdefghijkl.tmp",
        ".s.json.4242.abcdefghijk.tmp",
        ".s.json.4242.ABCDEFGHIJKL.tmp",
        ".4242.abcdefghijkl.tmp",
    ] {
        assert_eq!(temp_of(n(not_ours)), None, "{not_ours}");
    }
}

#[test]
fn temporary_names_differ_between_saves() {
    let names: std::collections::HashSet<String> = (0..100).map(|_| random_letters()).collect();
    assert_eq!(names.len(), 100);
    assert!(names
        .iter()
        .all(|r| r.len() == RANDOM_LEN && r.bytes().all(|b| b.is_ascii_lowercase())));
}

#[test]
fn a_taken_temporary_name_is_drawn_again_a_few_times() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let pid = std::process::id();
    let taken = temp_name(n("a.json"), pid, "aaaaaaaaaaaa");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        tmp.path().join(&taken),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let mut draws = ["aaaaaaaaaaaa", "bbbbbbbbbbbb"].into_iter();
    let draw = || draws.next().unwrap().to_string();
    let (made, _file) = create_temp_drawing(&dir, n("a.json"), draw).unwrap();
    assert_eq!(made, temp_name(n("a.json"), pid, "bbbbbbbbbbbb"));
    let mut draws = 0;
    let always_taken = || {
        draws += 1;
        "aaaaaaaaaaaa".to_string()
    };
    let err = create_temp_drawing(&dir, n("a.json"), always_taken).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(draws, TEMP_TRIES);
    // The FIFO was never opened (that would have blocked) nor removed.
    assert!(fs::symlink_metadata(tmp.path().join(&taken)).is_ok());
}

#[test]
fn a_recycled_file_keeps_its_inode_and_a_linked_one_is_never_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let path = tmp.path().join("a.json");
    let old = tmp.path().join("old.json");
    fs::write(&old, b"a much longer old content").unwrap();
    let inode = fs::metadata(&old).unwrap().ino();
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"new")],
        false,
        Some((&dir, n("old.json"))),
        false,
    )
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
    assert!(!old.exists());
    // A file with a second link (the live file under another name) stays.
    let twin = tmp.path().join("twin.json");
    fs::hard_link(&path, &twin).unwrap();
    write_atomic(
        &dir,
        n("a.json"),
        &[IoSlice::new(b"newer")],
        false,
        Some((&dir, n("twin.json"))),
        false,
    )
    .unwrap();
    assert_eq!(fs::read(&twin).unwrap(), b"new");
    assert_eq!(fs::read(&path).unwrap(), b"newer");
    // A folder or a FIFO at the name is put back where it was, untouched.
    fs::create_dir(tmp.path().join("folder")).unwrap();
    fs::write(tmp.path().join("folder/inside"), b"kept").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        tmp.path().join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    for (name, content) in [("folder", "newest"), ("fifo", "newest!")] {
        let reuse = Some((&dir, n(name)));
        let taken = write_atomic(
            &dir,
            n("a.json"),
            &[IoSlice::new(content.as_bytes())],
            false,
            reuse,
            false,
        );
        assert_eq!(taken.unwrap().0, Recycled::No, "{name}");
        assert_eq!(fs::read(&path).unwrap(), content.as_bytes());
    }
    assert_eq!(fs::read(tmp.path().join("folder/inside")).unwrap(), b"kept");
    assert!(fs::symlink_metadata(tmp.path().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.json", "fifo", "folder", "twin.json"]);
}
