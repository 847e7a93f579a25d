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
//!
//! Here: what is reported and how it is put together; `procfs.rs`: the
//! kernel's socket tables and the `/proc` walk.

mod procfs;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::lease::Lease;
use crate::port_set::PortSet;
use procfs::{describe, holders_of, kernel_sockets};

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

#[cfg(test)]
mod tests {
    use super::procfs::base_name;
    use super::*;
    use std::fs;
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
}
