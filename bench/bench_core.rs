//! Where a pick's time goes, piece by piece, in the core alone (no Python).
//! Run: `cargo run --release --example bench_core` (prints medians; asserts nothing).

use std::time::{Duration, Instant};

use dynamic_port_manager::probe_port;
use dynamic_port_manager::Args;
use dynamic_port_manager::Manager;
use dynamic_port_manager::{kernel_tables, proc_tables};

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

fn time(label: &str, n: usize, mut f: impl FnMut()) {
    let samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    println!("{label:<48} median {:>9.1} us  (n={n})", median(samples));
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = dir.join(format!("dpm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    println!("work folder: {}", work.display());

    time(
        "kernel scan: sock_diag netlink (LISTEN, 30000-36000)",
        200,
        || {
            kernel_tables(30000..=36000).unwrap();
        },
    );
    time("kernel scan: /proc/net/tcp + tcp6", 50, || {
        proc_tables().unwrap();
    });
    time("bind probe of one port (v4 + v6)", 1000, || {
        probe_port(30999);
    });

    let config = Args {
        start: 30000,
        end: 36000,
        json_path: work.join("svc.json"),
        refresh_interval: 3600.0,
        registry_dir: Some(work.join("registry")),
        console_log: dynamic_port_manager::ConsoleLog::Off,
        ..Args::default()
    }
    .check()
    .unwrap();
    let manager = Manager::new(config).unwrap();
    let state = manager.state();
    time("state to pretty JSON (6,001-port range)", 500, || {
        std::hint::black_box(state.to_json());
    });
    time("state to compact JSON", 500, || {
        std::hint::black_box(serde_json::to_vec(&state).unwrap());
    });
    time("pick_port (one manager, moving)", 2000, || {
        manager.pick_port(None).unwrap();
    });
    time("release_port + pick_port", 2000, || {
        manager.release_port().unwrap();
        manager.pick_port(None).unwrap();
    });
    time("refresh (scan + save)", 500, || {
        manager.refresh(kernel_tables(30000..=36000).ok().as_ref(), &[], false);
    });
    manager.stop();
    let _ = std::fs::remove_dir_all(&work);
}
