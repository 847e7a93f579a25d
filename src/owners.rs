//! Who holds a port: the processes whose sockets use it, and the lease on it.
//!
//! The kernel lists TCP sockets with their inode (`sock_diag`, else the
//! `/proc/net/tcp{,6}` tables); a process holds a socket when one of its
//! `/proc/<pid>/fd/*` links reads `socket:[<inode>]`. Every state but
//! TIME_WAIT counts (a connection's local port is as taken as a listener's),
//! so the dump walks the kernel's whole connection table: milliseconds on a
//! large host, against microseconds for listeners alone. The fd walk is one
//! readlink per open descriptor on the host, so it stops as soon as every
//! inode it looks for has a holder. A socket whose holder it cannot see
//! (another user's process, another pid namespace) is reported by its uid
//! rather than left out: no extra permission is needed and none is assumed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::lease::Lease;
use crate::port_set::PortSet;

/// A process holding a socket on the port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    /// The program's name in full (see `full_name`); None if the process is
    /// gone or unreadable.
    pub name: Option<String>,
    /// `/proc/<pid>/cmdline` split at NULs; None where it cannot be read.
    pub cmdline: Option<Vec<String>>,
    /// The uid that owns the socket.
    pub uid: u32,
}

/// The lease on the port, as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseHolder {
    pub pid: u32,
    /// The state file of the manager that handed it out.
    pub state_file: String,
    /// The registry's owner string (state file, `#`, manager instance).
    pub owner: String,
    pub since: String,
    pub alive: bool,
    /// The service's name (see `Lease::service`).
    pub service: String,
}

/// Everything known about one used port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortOwners {
    pub port: u16,
    /// A socket listens on it.
    pub listening: bool,
    /// TCP sockets using it as their local port (TIME_WAIT not counted).
    pub sockets: usize,
    pub processes: Vec<Process>,
    /// Uids of sockets whose process could not be seen (sorted, once each).
    pub unknown_uids: Vec<u32>,
    pub lease: Option<LeaseHolder>,
}

/// One socket as the kernel table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub port: u16,
    pub listening: bool,
    pub uid: u32,
    /// 0 for a connection not yet accepted: it has no file and no holder.
    pub inode: u64,
}

/// The owners of every port of `ports` that a socket or a lease uses, in port
/// order. Ports no one uses are left out.
pub fn find(ports: &PortSet, leases: &[Lease]) -> io::Result<Vec<PortOwners>> {
    Ok(report(
        Path::new("/proc"),
        &kernel_sockets()?,
        ports,
        leases,
    ))
}

/// `find` over given sockets and a proc tree (`/proc`, or a copy in a test).
pub fn report(
    proc: &Path,
    sockets: &[Socket],
    ports: &PortSet,
    leases: &[Lease],
) -> Vec<PortOwners> {
    let sockets: Vec<&Socket> = sockets.iter().filter(|s| ports.contains(s.port)).collect();
    let wanted: Vec<u64> = sockets
        .iter()
        .map(|s| s.inode)
        .filter(|&i| i != 0)
        .collect();
    let holders = holders_of(proc, &wanted);
    let mut names = HashMap::new();
    let mut report: BTreeMap<u16, PortOwners> = BTreeMap::new();
    for socket in sockets {
        let owners = entry(&mut report, socket.port);
        owners.sockets += 1;
        owners.listening |= socket.listening;
        match holders.get(&socket.inode) {
            Some(pids) => {
                for &pid in pids {
                    if owners.processes.iter().all(|p| p.pid != pid) {
                        let (name, cmdline) = names
                            .entry(pid)
                            .or_insert_with(|| describe(proc, pid))
                            .clone();
                        owners.processes.push(Process {
                            pid,
                            name,
                            cmdline,
                            uid: socket.uid,
                        });
                    }
                }
            }
            // An accept-queue connection (inode 0) belongs to its listener.
            None if socket.inode == 0 => {}
            None => {
                if !owners.unknown_uids.contains(&socket.uid) {
                    owners.unknown_uids.push(socket.uid);
                }
            }
        }
    }
    for lease in leases.iter().filter(|l| ports.contains(l.port)) {
        let owners = entry(&mut report, lease.port);
        if owners.lease.is_none() {
            owners.lease = Some(LeaseHolder {
                pid: lease.pid,
                state_file: state_file_of(&lease.owner).to_string(),
                owner: lease.owner.clone(),
                since: lease.since.clone(),
                alive: lease.holder().is_alive(),
                service: lease.service.clone(),
            });
        }
    }
    report
        .into_values()
        .map(|mut o| {
            o.processes.sort_by_key(|p| p.pid);
            o.unknown_uids.sort_unstable();
            o
        })
        .collect()
}

fn entry(report: &mut BTreeMap<u16, PortOwners>, port: u16) -> &mut PortOwners {
    report.entry(port).or_insert_with(|| PortOwners {
        port,
        listening: false,
        sockets: 0,
        processes: Vec::new(),
        unknown_uids: Vec::new(),
        lease: None,
    })
}

/// The registry's owner is `<state file>#<instance>`; the state file may itself contain `#`.
pub fn state_file_of(owner: &str) -> &str {
    owner.rsplit_once('#').map_or(owner, |(file, _)| file)
}

/// Every TCP socket but TIME_WAIT ones: netlink where it answers, else /proc.
pub fn kernel_sockets() -> io::Result<Vec<Socket>> {
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
pub fn proc_sockets() -> io::Result<Vec<Socket>> {
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
pub fn holders_of(proc: &Path, wanted: &[u64]) -> HashMap<u64, Vec<u32>> {
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
fn describe(proc: &Path, pid: u32) -> (Option<String>, Option<Vec<String>>) {
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

fn base_name(arg: &str) -> &str {
    arg.rsplit('/').next().unwrap_or(arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn only(port: u16) -> PortSet {
        [port].into_iter().collect()
    }

    #[test]
    fn a_listener_of_this_process_is_found_with_its_name() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = find(&only(port), &[]).unwrap();
        assert_eq!(report.len(), 1, "{report:?}");
        let owners = &report[0];
        assert!(owners.listening && owners.sockets == 1 && owners.lease.is_none());
        let me = std::process::id();
        assert_eq!(owners.processes.len(), 1, "{owners:?}");
        let process = &owners.processes[0];
        assert_eq!(process.pid, me);
        // The test binary's name (`dynamic_port_manager-<hash>`) in full, not
        // the kernel's 15 bytes of it.
        let argv0 = std::env::args().next().unwrap();
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert!(base_name(&argv0).starts_with(comm.trim_end()));
        assert_eq!(process.name.as_deref(), Some(base_name(&argv0)));
        assert!(process.cmdline.as_ref().is_some_and(|c| !c.is_empty()));
        assert!(owners.unknown_uids.is_empty());
    }

    #[test]
    fn connections_on_the_port_count_and_free_ports_are_left_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let report = find(&only(port), &[]).unwrap();
        assert_eq!(report[0].sockets, 2, "listener and accepted connection");
        assert_eq!(report[0].processes.len(), 1);
        drop(listener);
        drop(_accepted);
        let none = TcpListener::bind("127.0.0.1:0").unwrap();
        let free = none.local_addr().unwrap().port();
        drop(none);
        assert!(find(&only(free), &[]).unwrap().is_empty());
    }

    #[test]
    fn a_lease_without_a_socket_is_reported() {
        let lease = Lease {
            port: 1,
            pid: std::process::id(),
            start_time: crate::holder::Holder::current().start_time,
            owner: "/srv/a#b/ports.json#123.4".into(),
            since: "2024-07-22T12:00:00+00:00".into(),
            service: "ports".into(),
        };
        let report = find(&only(1), std::slice::from_ref(&lease)).unwrap();
        let held = report[0].lease.as_ref().unwrap();
        assert_eq!(held.state_file, "/srv/a#b/ports.json");
        assert!(held.alive && report[0].processes.is_empty() && report[0].sockets == 0);
    }

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
    fn sockets_map_to_processes_through_fd_links_and_the_rest_is_unknown() {
        let proc = tempfile::tempdir().unwrap();
        let make = |pid: &str, fds: &[(&str, &str)], comm: &str, cmdline: &[u8]| {
            let dir = proc.path().join(pid);
            fs::create_dir_all(dir.join("fd")).unwrap();
            for (fd, target) in fds {
                std::os::unix::fs::symlink(target, dir.join("fd").join(fd)).unwrap();
            }
            fs::write(dir.join("comm"), comm).unwrap();
            fs::write(dir.join("cmdline"), cmdline).unwrap();
        };
        make(
            "7",
            &[("0", "/dev/null"), ("3", "socket:[555]")],
            "server\n",
            b"server\0-p\08080\0",
        );
        make("9", &[("4", "socket:[555]")], "worker\n", b"");
        make("12", &[("3", "pipe:[777]")], "other\n", b"other\0");
        fs::create_dir_all(proc.path().join("self")).unwrap(); // not a pid: ignored
        let socket = |port, inode, uid| Socket {
            port,
            listening: true,
            uid,
            inode,
        };
        let sockets = [
            socket(8080, 555, 1000),
            socket(8080, 0, 1000), // queued connection: no file, no holder
            socket(8081, 777, 0),  // no readable fd holds it
            socket(9999, 555, 1000),
        ];
        let ports: PortSet = [8080, 8081, 8082].into_iter().collect();
        let found = report(proc.path(), &sockets, &ports, &[]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].port, 8080);
        assert_eq!(found[0].sockets, 2);
        assert!(found[0].unknown_uids.is_empty());
        let pids: Vec<u32> = found[0].processes.iter().map(|p| p.pid).collect();
        // 777 is never found, so the walk goes on to the end and meets the
        // second holder of 555 (a forked worker) too.
        assert_eq!(pids, vec![7, 9]);
        assert_eq!(found[0].processes[0].name.as_deref(), Some("server"));
        assert_eq!(
            found[0].processes[0].cmdline,
            Some(vec!["server".into(), "-p".into(), "8080".into()])
        );
        assert_eq!(found[1].port, 8081);
        assert!(found[1].processes.is_empty());
        assert_eq!(found[1].unknown_uids, vec![0]);
        // Asked about 8080 alone, the walk stops at the first holder.
        let only_8080: PortSet = [8080].into_iter().collect();
        let found = report(proc.path(), &sockets, &only_8080, &[]);
        assert_eq!(found[0].processes.len(), 1);
        assert_eq!(found[0].processes[0].pid, 7);
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
