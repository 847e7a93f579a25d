//! The kernel's TCP sockets (`sock_diag`, else `/proc/net/tcp{,6}`) and the
//! walk of `/proc/<pid>/fd` that finds their holders, with the holders' names.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use super::Socket;

/// Every TCP socket but TIME_WAIT ones: netlink where it answers, else /proc.
pub(super) fn kernel_sockets() -> io::Result<Vec<Socket>> {
    #[cfg(target_os = "linux")]
    if let Ok(found) = crate::sockdiag::sockets(crate::sockdiag::HOLDING_STATES) {
        return Ok(found
            .into_iter()
            .map(|s| Socket {
                port: s.port,
                listening: s.listening(),
                uid: s.uid,
                inode: s.inode,
            })
            .collect());
    }
    proc_sockets()
}

/// The `/proc/net/tcp` and `/proc/net/tcp6` tables. Fails only when neither exists.
pub(super) fn proc_sockets() -> io::Result<Vec<Socket>> {
    let mut found = Vec::new();
    let mut last_error = None;
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match fs::read_to_string(table) {
            Ok(text) => {
                found.extend(parse_table(&text));
                read_any = true;
            }
            Err(e) => last_error = Some(e),
        }
    }
    if read_any {
        Ok(found)
    } else {
        Err(last_error.unwrap_or_else(|| io::Error::other("no socket table")))
    }
}

/// Rows of one table: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_table(text: &str) -> impl Iterator<Item = Socket> + '_ {
    const LISTEN: u8 = 0x0A;
    const TIME_WAIT: u8 = 0x06;
    text.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_ascii_whitespace().take(10).collect();
        let [_, local, _, state, _, _, _, uid, _, inode] = fields[..] else {
            return None;
        };
        let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
        let state = u8::from_str_radix(state, 16).ok()?;
        (state != TIME_WAIT && port != 0).then_some(Socket {
            port,
            listening: state == LISTEN,
            uid: uid.parse().ok()?,
            inode: inode.parse().ok()?,
        })
    })
}

/// The pids whose descriptors hold each inode of `wanted`, walking
/// `<proc>/<pid>/fd`: stops once every inode has a holder, so a socket that
/// forked workers share may list only its first holder. Processes whose
/// descriptors this user may not read are skipped.
pub(super) fn holders_of(proc: &Path, wanted: &[u64]) -> HashMap<u64, Vec<u32>> {
    let mut found: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut missing: std::collections::HashSet<u64> = wanted.iter().copied().collect();
    if missing.is_empty() {
        return found;
    }
    let Ok(entries) = fs::read_dir(proc) else {
        return found;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // Oldest first: of processes sharing a socket, the parent is named.
    pids.sort_unstable();
    for pid in pids {
        let Ok(fds) = fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            if missing.remove(&inode) || found.contains_key(&inode) {
                let pids = found.entry(inode).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        if missing.is_empty() {
            break;
        }
    }
    found
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A process's name and command line, each None where it cannot be read.
pub(super) fn describe(proc: &Path, pid: u32) -> (Option<String>, Option<Vec<String>>) {
    let dir = proc.join(pid.to_string());
    let comm = fs::read(dir.join("comm")).ok().map(|b| {
        String::from_utf8_lossy(&b)
            .trim_end_matches('\n')
            .to_string()
    });
    let cmdline = fs::read(dir.join("cmdline"))
        .ok()
        .filter(|b| !b.is_empty()) // kernel threads and zombies have none
        .map(|b| {
            b.strip_suffix(b"\0")
                .unwrap_or(&b)
                .split(|&c| c == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        });
    (full_name(comm, cmdline.as_deref()), cmdline)
}

/// The kernel keeps a process's name (`comm`) to 15 bytes: `dynamic-port-manager`
/// shows as `dynamic-port-ma`.
const COMM_MAX: usize = 15;

/// The program's name in full: `comm`, or where the kernel may have cut it
/// short, the file name of the first argument that it begins (argv[0], or the
/// script an interpreter runs: `python3 /venv/bin/dynamic-port-manager serve`).
/// Where the command line cannot be read (a zombie, another user's process
/// under `hidepid`) or no argument matches (a renamed thread), `comm` as it is.
fn full_name(comm: Option<String>, cmdline: Option<&[String]>) -> Option<String> {
    let Some(comm) = comm else {
        // No comm but a command line: the name its first argument gives.
        let first = cmdline?.first()?;
        return Some(base_name(first).to_string()).filter(|n| !n.is_empty());
    };
    if comm.len() < COMM_MAX {
        return Some(comm);
    }
    let longer = cmdline
        .unwrap_or_default()
        .iter()
        .take(2) // the program, or an interpreter and its script
        .map(|arg| base_name(arg))
        .find(|name| name.len() > comm.len() && name.starts_with(comm.as_str()));
    Some(longer.map_or(comm, str::to_string))
}

pub(super) fn base_name(arg: &str) -> &str {
    arg.rsplit('/').next().unwrap_or(arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_proc_tables_give_the_same_inodes_as_netlink() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let from_proc: Vec<Socket> = proc_sockets()
            .unwrap()
            .into_iter()
            .filter(|s| s.port == port)
            .collect();
        let from_kernel: Vec<Socket> = kernel_sockets()
            .unwrap()
            .into_iter()
            .filter(|s| s.port == port)
            .collect();
        assert_eq!(from_proc.len(), 1);
        assert_eq!(from_proc, from_kernel);
        assert!(from_proc[0].listening && from_proc[0].inode != 0);
    }

    #[test]
    fn parses_table_rows_and_skips_time_wait() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:0BB9 0100007F:D431 06 00000000:00000000 03:00001585 00000000     0        0 0 3 0\n\
   short line\n";
        let rows: Vec<Socket> = parse_table(table).collect();
        assert_eq!(
            rows,
            vec![Socket {
                port: 3000,
                listening: true,
                uid: 1000,
                inode: 4242
            }]
        );
    }

    #[test]
    fn names_cut_to_15_bytes_are_completed_from_the_command_line() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let name = |comm: Option<&str>, cmdline: Option<&[String]>| {
            full_name(comm.map(str::to_string), cmdline)
        };
        // A console script: the interpreter, then the script it runs.
        let script = args(&[
            "/venv/bin/python3",
            "/venv/bin/dynamic-port-manager",
            "serve",
        ]);
        assert_eq!(
            name(Some("dynamic-port-ma"), Some(&script)).as_deref(),
            Some("dynamic-port-manager")
        );
        let binary = args(&["/usr/sbin/a-very-long-daemon-name", "-f"]);
        assert_eq!(
            name(Some("a-very-long-dae"), Some(&binary)).as_deref(),
            Some("a-very-long-daemon-name")
        );
        // Short names are whole; a name no argument begins is kept as it is.
        assert_eq!(name(Some("nginx"), Some(&binary)).as_deref(), Some("nginx"));
        let other = args(&["/usr/bin/python3", "worker.py"]);
        assert_eq!(
            name(Some("renamed-thread-"), Some(&other)).as_deref(),
            Some("renamed-thread-")
        );
        // No command line (a zombie, a process hidden by hidepid): comm.
        assert_eq!(
            name(Some("dynamic-port-ma"), None).as_deref(),
            Some("dynamic-port-ma")
        );
        assert_eq!(
            name(None, Some(&binary)).as_deref(),
            Some("a-very-long-daemon-name")
        );
        assert_eq!(name(None, None), None);
    }

    #[test]
    fn link_targets_parse_only_as_sockets() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }
}
