//! The floor of a pick: the file system and kernel operations a pick cannot
//! do without, each timed on its own in the folder given.
//!
//!     dpm-floor FOLDER [--n N] [--size BYTES] [--port PORT] [--json]
//!
//! - save, exchange scheme: the state file replaced the way the package does
//!   it, with a ring of 20 backups: open the oldest backup, write the new
//!   state into it, cut it to size, link the current file as the newest
//!   backup, exchange the two names (renameat2 RENAME_EXCHANGE), unlink the
//!   old version's second name. Nothing is created or freed on the way.
//! - save, create + write + rename: a new temporary file renamed over the
//!   state file (no backup).
//! - new file: a state-sized file made at a new name (open O_EXCL + write).
//! - empty file: open O_CREAT|O_EXCL + close, at a new name.
//! - probe: a bind of one port on 127.0.0.1 and on ::1 (SO_REUSEADDR, the
//!   IPv6 socket V6ONLY), both closed.
//! - dual-stack probe: one IPv6 socket, V6ONLY off and SO_REUSEADDR, bound to
//!   [::] (which conflicts with IPv4 and IPv6 sockets alike), closed.
//! - lock: an OFD write lock on a file taken and given back.
//!
//! Then the floors: a pick + release cycle is two saves, one probe and two
//! locks; a new manager + its first pick is one new file, one probe, one lock;
//! the probe in both is the cheaper of the two probes (one socket answers for
//! both families, so the kernel need not do more).
//! Prints medians (and p90s) in microseconds; `--json` prints one JSON object.

use std::ffi::CString;
use std::io;
use std::mem;
use std::time::Instant;

struct Options {
    folder: String,
    n: usize,
    size: usize,
    port: u16,
    json: bool,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        folder: String::new(),
        n: 2000,
        size: 41_000,
        port: 0,
        json: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| die(&format!("{name} needs a number")))
        };
        match arg.as_str() {
            "--n" => o.n = value("--n").max(1),
            "--size" => o.size = value("--size"),
            "--port" => o.port = u16::try_from(value("--port")).unwrap_or_else(|_| die("--port")),
            "--json" => o.json = true,
            _ if arg.starts_with("--") => die(&format!("unknown option {arg}")),
            _ => o.folder = arg,
        }
    }
    if o.folder.is_empty() {
        die("usage: dpm-floor FOLDER [--n N] [--size BYTES] [--port PORT] [--json]");
    }
    o
}

fn die(message: &str) -> ! {
    eprintln!("dpm-floor: {message}");
    std::process::exit(2)
}

fn check(result: libc::c_int, what: &str) -> libc::c_int {
    if result < 0 {
        die(&format!("{what}: {}", io::Error::last_os_error()));
    }
    result
}

fn c(name: &str) -> CString {
    CString::new(name).expect("no NUL in names")
}

/// Microseconds: (median, p90) of the samples.
fn summary(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at =
        |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.5), at(0.9))
}

fn time(n: usize, mut op: impl FnMut(usize)) -> (f64, f64) {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        op(i);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    summary(&mut samples)
}

struct Dir {
    fd: libc::c_int,
}

impl Dir {
    fn open(path: &str) -> Dir {
        let path = c(path);
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        Dir {
            fd: check(fd, "open folder"),
        }
    }

    fn open_file(&self, name: &str, flags: libc::c_int) -> libc::c_int {
        let name = c(name);
        // SAFETY: a valid C string and folder descriptor.
        let fd = unsafe { libc::openat(self.fd, name.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
        check(fd, "openat")
    }

    /// Writes `data` at a new name (O_EXCL).
    fn create(&self, name: &str, data: &[u8]) {
        let fd = self.open_file(name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL);
        write_all(fd, data);
        close(fd);
    }

    fn link(&self, from: &str, to: &str) {
        let (from, to) = (c(from), c(to));
        // SAFETY: valid C strings and folder descriptor.
        check(
            unsafe { libc::linkat(self.fd, from.as_ptr(), self.fd, to.as_ptr(), 0) },
            "linkat",
        );
    }

    fn rename(&self, from: &str, to: &str, flags: libc::c_uint) {
        let (from, to) = (c(from), c(to));
        // SAFETY: valid C strings and folder descriptor; renameat2 by its
        // system call (glibc's wrapper is recent).
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.fd,
                from.as_ptr(),
                self.fd,
                to.as_ptr(),
                flags,
            )
        };
        check(r as libc::c_int, "renameat2");
    }

    fn unlink(&self, name: &str) {
        let name = c(name);
        // SAFETY: a valid C string and folder descriptor.
        check(
            unsafe { libc::unlinkat(self.fd, name.as_ptr(), 0) },
            "unlinkat",
        );
    }
}

fn write_all(fd: libc::c_int, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing from a slice we own, at most its length.
        let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if n <= 0 {
            die(&format!("write: {}", io::Error::last_os_error()));
        }
        data = &data[n as usize..];
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: closing a descriptor we opened.
    unsafe { libc::close(fd) };
}

const BACKUPS: usize = 20;

fn exchange_saves(dir: &Dir, data: &[u8], n: usize) -> (f64, f64) {
    dir.create("x.json", data);
    for b in 0..BACKUPS {
        dir.create(&format!("x.b{b}"), data);
    }
    let result = time(n, |i| {
        let old = format!("x.b{i}");
        let new = format!("x.b{}", i + BACKUPS);
        let fd = dir.open_file(&old, libc::O_WRONLY);
        write_all(fd, data);
        // SAFETY: a descriptor we opened.
        check(
            unsafe { libc::ftruncate(fd, data.len() as libc::off_t) },
            "ftruncate",
        );
        close(fd);
        dir.link("x.json", &new);
        dir.rename(&old, "x.json", libc::RENAME_EXCHANGE);
        dir.unlink(&old);
    });
    dir.unlink("x.json");
    for b in n..n + BACKUPS {
        dir.unlink(&format!("x.b{b}"));
    }
    result
}

fn rename_saves(dir: &Dir, data: &[u8], n: usize) -> (f64, f64) {
    dir.create("r.json", data);
    let result = time(n, |_| {
        dir.create("r.json.tmp", data);
        dir.rename("r.json.tmp", "r.json", 0);
    });
    dir.unlink("r.json");
    result
}

/// Times making `n` files at new names with `data`, then removes them.
fn new_files(dir: &Dir, prefix: &str, data: &[u8], n: usize) -> (f64, f64) {
    let result = time(n, |i| dir.create(&format!("{prefix}{i}"), data));
    for i in 0..n {
        dir.unlink(&format!("{prefix}{i}"));
    }
    result
}

fn set_flag(fd: libc::c_int, level: libc::c_int, name: libc::c_int) {
    set_option(fd, level, name, 1);
}

fn set_option(fd: libc::c_int, level: libc::c_int, name: libc::c_int, one: libc::c_int) {
    // SAFETY: the option value is an int that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &one as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(r, "setsockopt");
}

/// Binds `port` on 127.0.0.1 and ::1; false if either is taken.
fn probe(port: u16) -> bool {
    // SAFETY: plain socket calls on descriptors we own, with sockaddrs that
    // outlive each call.
    unsafe {
        let v4 = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "socket",
        );
        set_flag(v4, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        let mut a4: libc::sockaddr_in = mem::zeroed();
        a4.sin_family = libc::AF_INET as libc::sa_family_t;
        a4.sin_port = port.to_be();
        a4.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let ok4 = libc::bind(
            v4,
            &a4 as *const libc::sockaddr_in as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0;
        let v6 = check(
            libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "socket",
        );
        set_flag(v6, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        set_flag(v6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
        let mut a6: libc::sockaddr_in6 = mem::zeroed();
        a6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a6.sin6_port = port.to_be();
        a6.sin6_addr.s6_addr[15] = 1;
        let r6 = libc::bind(
            v6,
            &a6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        // A host without IPv6 has nothing to take there.
        let ok6 = r6 == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EADDRNOTAVAIL);
        libc::close(v4);
        libc::close(v6);
        ok4 && ok6
    }
}

/// Binds `port` on [::] with one dual-stack socket (V6ONLY off); false if
/// taken on either family.
fn probe_dual(port: u16) -> bool {
    // SAFETY: plain socket calls on a descriptor we own, with a sockaddr that
    // outlives the call.
    unsafe {
        let v6 = check(
            libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
            "socket",
        );
        set_flag(v6, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        set_option(v6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
        let mut a6: libc::sockaddr_in6 = mem::zeroed();
        a6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a6.sin6_port = port.to_be();
        let ok = libc::bind(
            v6,
            &a6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) == 0;
        libc::close(v6);
        ok
    }
}

fn ofd_lock(fd: libc::c_int, kind: libc::c_int) {
    // SAFETY: a zeroed flock is valid; fcntl reads it during the call.
    unsafe {
        let mut lock: libc::flock = mem::zeroed();
        lock.l_type = kind as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        check(
            libc::fcntl(fd, libc::F_OFD_SETLK, &lock),
            "fcntl F_OFD_SETLK",
        );
    }
}

fn main() {
    let o = options();
    let dir = Dir::open(&o.folder);
    let data: Vec<u8> = (0..o.size).map(|i| b"0123456789, "[i % 12]).collect();

    let mut port = if o.port == 0 { 20000 } else { o.port };
    let mut tries = 0;
    while !(probe(port) && probe_dual(port)) {
        port = port.wrapping_add(1).max(1024);
        tries += 1;
        if tries > 1000 {
            die("no free port to probe");
        }
    }

    // A warm-up of each, untimed.
    let warm = (o.n / 10).max(10);
    exchange_saves(&dir, &data, warm);
    rename_saves(&dir, &data, warm);

    let exchange = exchange_saves(&dir, &data, o.n);
    let rename = rename_saves(&dir, &data, o.n);
    let new_file = new_files(&dir, "new", &data, o.n);
    let empty = new_files(&dir, "empty", &[], o.n);
    let probed = time(o.n, |_| {
        probe(port);
    });
    let dual = time(o.n, |_| {
        probe_dual(port);
    });
    let probe_floor = probed.0.min(dual.0);
    let lock_fd = dir.open_file("floor.lock", libc::O_RDWR | libc::O_CREAT);
    let lock = time(o.n, |_| {
        ofd_lock(lock_fd, libc::F_WRLCK);
        ofd_lock(lock_fd, libc::F_UNLCK);
    });
    close(lock_fd);
    dir.unlink("floor.lock");

    let cycle_exchange = 2.0 * exchange.0 + probe_floor + 2.0 * lock.0;
    let cycle_rename = 2.0 * rename.0 + probe_floor + 2.0 * lock.0;
    let new_manager = new_file.0 + probe_floor + lock.0;
    let ops = [
        ("save_exchange", exchange),
        ("save_create_rename", rename),
        ("new_file", new_file),
        ("empty_file", empty),
        ("probe", probed),
        ("probe_dual_stack", dual),
        ("lock_unlock", lock),
    ];
    if o.json {
        let fields: Vec<String> = ops
            .iter()
            .map(|(name, (median, p90))| format!("\"{name}\": [{median:.2}, {p90:.2}]"))
            .collect();
        println!(
            "{{{}, \"cycle_floor_exchange\": {cycle_exchange:.2}, \"cycle_floor_create_rename\": {cycle_rename:.2}, \
             \"new_manager_floor\": {new_manager:.2}, \"size\": {}, \"n\": {}, \"port\": {port}}}",
            fields.join(", "),
            o.size,
            o.n
        );
        return;
    }
    println!(
        "floor in {} ({} bytes, n={}, probe port {port})",
        o.folder, o.size, o.n
    );
    for (name, (median, p90)) in ops {
        println!("{name:<24} median {median:8.1} us  p90 {p90:8.1} us");
    }
    println!("{:<24} {cycle_exchange:8.1} us (exchange saves), {cycle_rename:.1} us (create+rename saves)", "pick+release cycle");
    println!("{:<24} {new_manager:8.1} us", "new manager + pick");
}
