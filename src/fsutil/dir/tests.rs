//! Tests of `Dir`: links, FIFOs and folders refused, renames that never
//! replace, bounded reads.

use super::*;
use rustix::fs::FileType;
use std::os::unix::fs::symlink;

#[test]
fn renaming_to_a_new_name_never_replaces_with_or_without_renameat2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let n = OsStr::new;
    for (i, by_link) in [false, true].into_iter().enumerate() {
        let (a, b, taken) = (format!("a{i}"), format!("b{i}"), format!("t{i}"));
        fs::write(tmp.path().join(&a), b"moved").unwrap();
        fs::write(tmp.path().join(&taken), b"kept").unwrap();
        let rename = |from: &str, to: &str| {
            if by_link {
                dir.rename_new_by_link(n(from), &dir, n(to))
            } else {
                dir.rename_new(n(from), &dir, n(to))
            }
        };
        let err = rename(&a, &taken).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(tmp.path().join(&taken)).unwrap(), b"kept");
        assert_eq!(fs::read(tmp.path().join(&a)).unwrap(), b"moved");
        rename(&a, &b).unwrap();
        assert_eq!(fs::read(tmp.path().join(&b)).unwrap(), b"moved");
        assert!(!tmp.path().join(&a).exists());
    }
}

#[test]
fn links_fifos_and_folders_are_never_opened_as_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    fs::write(tmp.path().join("victim"), b"secret").unwrap();
    symlink(tmp.path().join("victim"), tmp.path().join("link")).unwrap();
    rustix::fs::mknodat(
        &dir.fd,
        "fifo",
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    fs::create_dir(tmp.path().join("sub")).unwrap();
    for name in ["link", "fifo", "sub"] {
        for how in [
            Open::Read,
            Open::ReadWriteCreate(0o600),
            Open::Overwrite(0o600),
        ] {
            let err = dir.open_file(OsStr::new(name), how).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }
    assert_eq!(fs::read(tmp.path().join("victim")).unwrap(), b"secret");
    assert!(dir
        .open_file(OsStr::new("victim"), Open::CreateNew(0o600))
        .is_err());
}

#[test]
fn a_linked_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("real")).unwrap();
    symlink(tmp.path().join("real"), tmp.path().join("alias")).unwrap();
    let err = Dir::open(&tmp.path().join("alias")).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let parent = Dir::open(tmp.path()).unwrap();
    assert!(parent.sub(OsStr::new("alias")).is_err());
}

#[test]
fn reads_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let big = fs::File::create(tmp.path().join("big")).unwrap();
    big.set_len(MAX_READ + 10).unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let err = dir.read(OsStr::new("big")).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn a_file_to_overwrite_stays_non_blocking_unless_mandatory_locking_could_apply() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = Dir::open(tmp.path()).unwrap();
    let nonblocking = |name: &str| {
        let (file, st) = dir
            .open_file_stat(OsStr::new(name), Open::Overwrite(0o644))
            .unwrap();
        assert_eq!(st.unwrap().kind, Kind::File);
        rustix::fs::fcntl_getfl(&file)
            .unwrap()
            .contains(OFlags::NONBLOCK)
    };
    fs::write(tmp.path().join("plain"), b"x").unwrap();
    assert!(nonblocking("plain"));
    // Setgid without group execute: mandatory locking, where it exists, would
    // make a write fail with EAGAIN rather than wait.
    fs::write(tmp.path().join("mand"), b"x").unwrap();
    fs::set_permissions(tmp.path().join("mand"), fs::Permissions::from_mode(0o2644)).unwrap();
    assert!(!nonblocking("mand"));
    assert!(!rustix::fs::fcntl_getfl(
        dir.open_file(OsStr::new("plain"), Open::ReadWriteCreate(0o644))
            .unwrap()
    )
    .unwrap()
    .contains(OFlags::NONBLOCK));
}
