//! The JSON state document, field for field the layout of the original module
//! (so files it wrote load here, and tools that read ours keep working), plus
//! extras under keys of their own.

mod pieces;
mod usage;

use std::collections::VecDeque;
use std::io::IoSlice;

use serde::{Deserialize, Serialize};

pub use crate::lease::{LeaseList, LeaseView};
use crate::port_list::PortList;
pub use usage::PortUsage;

/// Bumped when an extra key changes meaning. The SPEC keys never change.
pub const SCHEMA_VERSION: u32 = 1;

/// The keys the original module always wrote. A file without any of them is
/// the wrong shape and is treated like a corrupt one.
pub const REQUIRED_KEYS: [&str; 10] = [
    "current_port",
    "free_ports",
    "used_ports",
    "port_usage",
    "history",
    "last_checked",
    "change_count",
    "last_error",
    "last_error_time",
    "settings",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(deserialize_with = "present")]
    pub current_port: Option<u16>,
    #[serde(serialize_with = "one_line")]
    pub free_ports: PortList,
    #[serde(serialize_with = "one_line")]
    pub used_ports: PortList,
    /// Picks per port. Integer keys serialize as JSON strings ("3000").
    #[serde(serialize_with = "pieces::usage_in_file")]
    pub port_usage: PortUsage,
    pub history: VecDeque<HistoryEntry>,
    #[serde(deserialize_with = "present")]
    pub last_checked: Option<String>,
    pub change_count: u64,
    #[serde(deserialize_with = "present")]
    pub last_error: Option<String>,
    #[serde(deserialize_with = "present")]
    pub last_error_time: Option<String>,
    pub settings: Settings,

    // ---- extras (not in the original layout) ----
    #[serde(default)]
    pub schema_version: u32,
    /// `last_checked` as seconds since the Unix epoch (for metrics and tools
    /// that should not parse Jalali dates).
    #[serde(default)]
    pub last_checked_unix: Option<f64>,
    /// Whether `last_error` is still in effect: set with it, cleared by the
    /// next save that met no problem (so a monitor can tell "broken now"
    /// from "broke once").
    #[serde(default)]
    pub error_active: bool,
    /// The host-wide leases inside this range, as of the last change or refresh.
    /// Free ports of the range that are not handed out because web browsers
    /// refuse to open them (`skip_unsafe`); in neither list above.
    #[serde(default, serialize_with = "one_line")]
    pub skipped_ports: PortList,
    /// Where the range overlaps the kernel's ephemeral port range (any
    /// outgoing connection may take such a port), if it does.
    #[serde(default)]
    pub ephemeral_overlap: Option<EphemeralOverlap>,
    #[serde(default, serialize_with = "pieces::leases_in_file")]
    pub leases: LeaseList,
    #[serde(default)]
    pub stats: Stats,
    #[serde(default)]
    pub options: Options,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub time: String,
    pub prev: Option<u16>,
    pub new: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub port_range: [u16; 2],
    pub json_path: String,
    pub history_max: usize,
    /// The service's name (`DynamicPortManager(service=...)`, else from the
    /// state file's name); not in the original layout.
    #[serde(default)]
    pub service: String,
}

/// The range's ports inside `net.ipv4.ip_local_port_range` and not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralOverlap {
    pub ephemeral_range: [u16; 2],
    pub first: u16,
    pub last: u16,
    pub count: usize,
}

/// Counters for monitoring (kept across restarts with the file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub picks: u64,
    pub releases: u64,
    pub errors: u64,
}

/// The settings the original did not have.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub refresh_interval: f64,
    pub backup_max: usize,
    pub durable: bool,
    pub registry_dir: String,
}

/// Reads a key of the original layout whose value may be `null`, as a key
/// that must be there: serde would take a missing `Option` for `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

/// Writes a port list on one line even inside the pretty-printed file: a
/// 6,001-port range is one readable line instead of 6,001. The digits are
/// written straight into one buffer, which serde_json then copies verbatim
/// through its raw-value protocol (a struct named with its `RawValue` token):
/// the lists are most of the file, and this halves the cost of a save.
/// `port_lists_stay_on_one_line` checks the result.
fn one_line<S: serde::Serializer>(ports: &PortList, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";
    ports.with_json(|text| {
        let mut raw = serializer.serialize_struct(RAW_VALUE_TOKEN, 1)?;
        raw.serialize_field(RAW_VALUE_TOKEN, text)?;
        raw.end()
    })
}

impl State {
    pub fn fresh(settings: Settings, options: Options) -> State {
        State {
            current_port: None,
            free_ports: PortList::default(),
            used_ports: PortList::default(),
            port_usage: PortUsage::default(),
            history: VecDeque::new(),
            last_checked: None,
            change_count: 0,
            last_error: None,
            last_error_time: None,
            settings,
            schema_version: SCHEMA_VERSION,
            last_checked_unix: None,
            error_active: false,
            skipped_ports: PortList::default(),
            ephemeral_overlap: None,
            leases: LeaseList::default(),
            stats: Stats::default(),
            options,
        }
    }

    /// Parses a state file, insisting on the original layout's keys. Read
    /// straight into a state first (every key of the original layout is
    /// required there too: see `present`); only a file that fails is read
    /// again as a JSON value, for the reason it is rejected.
    pub fn parse(bytes: &[u8]) -> Result<State, String> {
        if let Ok(state) = serde_json::from_slice(bytes) {
            return Ok(state);
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err("the file is empty".into());
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON ({e})"))?;
        let object = value
            .as_object()
            .ok_or("the top level is not a JSON object")?;
        let missing: Vec<&str> = REQUIRED_KEYS
            .iter()
            .copied()
            .filter(|k| !object.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing keys: {}", missing.join(", ")));
        }
        serde_json::from_value(value).map_err(|e| format!("wrong shape ({e})"))
    }

    /// The state file's text (`with_json`'s pieces, joined).
    pub fn to_json(&self) -> Vec<u8> {
        self.with_json(|pieces| {
            let mut text = Vec::with_capacity(pieces.iter().map(|p| p.len()).sum());
            for piece in pieces {
                text.extend_from_slice(piece);
            }
            text
        })
    }

    /// Hands `write` the state file's text, pretty as the original wrote it
    /// (people read this file), in pieces: the leases and the usage counts,
    /// most of a crowded file, are kept as text between saves by groups of
    /// ports and only the groups that changed are written again (see
    /// `pieces.rs`).
    pub fn with_json<R>(&self, write: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        pieces::with_pieces(self, write)
    }

    /// Records a change of the active port: history (bounded), change count,
    /// and the usage count of the new port.
    pub fn record_change(&mut self, time: &str, prev: Option<u16>, new: Option<u16>) {
        self.current_port = new;
        self.change_count += 1;
        if let Some(port) = new {
            self.port_usage.add(port);
        }
        self.history.push_back(HistoryEntry {
            time: time.to_string(),
            prev,
            new,
        });
        self.trim_history();
    }

    /// Records a port handed to another process (`pick_port(pid=...)`): in
    /// the history (with no `prev`), counts and usage, but not as this
    /// manager's `current_port`.
    pub fn record_handout(&mut self, time: &str, port: u16) {
        let current = self.current_port;
        self.record_change(time, None, Some(port));
        self.current_port = current;
    }

    /// Records that `port`, held through this state file by a process that
    /// is gone, was taken back: a history entry `{prev: port, new: null}`.
    pub fn record_reclaim(&mut self, time: &str, port: u16) {
        self.change_count += 1;
        self.history.push_back(HistoryEntry {
            time: time.to_string(),
            prev: Some(port),
            new: None,
        });
        self.trim_history();
    }

    pub fn trim_history(&mut self) {
        while self.history.len() > self.settings.history_max {
            self.history.pop_front();
        }
    }

    pub fn record_error(&mut self, time: &str, message: String) {
        self.last_error = Some(message);
        self.last_error_time = Some(time.to_string());
        self.error_active = true;
        self.stats.errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(history_max: usize) -> Settings {
        Settings {
            port_range: [3000, 9000],
            json_path: "s.json".into(),
            history_max,
            service: "s".into(),
        }
    }

    #[test]
    fn the_original_layout_loads() {
        let original = br#"{
          "current_port": 3000, "free_ports": [8001, 8002, 8003], "used_ports": [3000],
          "port_usage": {"3000": 3, "8001": 1},
          "history": [{"time": "1403/05/01 12:00 doshanbe", "prev": null, "new": 3000}],
          "last_checked": "1403/05/01 12:10 doshanbe", "change_count": 2,
          "last_error": null, "last_error_time": null,
          "settings": {"port_range": [3000, 9000], "json_path": "x.json", "history_max": 50}
        }"#;
        let state = State::parse(original).unwrap();
        assert_eq!(state.current_port, Some(3000));
        assert_eq!(state.port_usage.get(3000), Some(3));
        assert_eq!(state.history[0].new, Some(3000));
        assert_eq!(state.stats, Stats::default());
    }

    #[test]
    fn written_keys_are_the_spec_keys_plus_extras() {
        let state = State::fresh(settings(50), Options::default());
        let value: serde_json::Value = serde_json::from_slice(&state.to_json()).unwrap();
        for key in REQUIRED_KEYS {
            assert!(value.get(key).is_some(), "{key}");
        }
        let mut settings_keys: Vec<_> = value["settings"].as_object().unwrap().keys().collect();
        settings_keys.sort();
        assert_eq!(
            settings_keys,
            ["history_max", "json_path", "port_range", "service"]
        );
    }

    #[test]
    fn port_lists_stay_on_one_line() {
        let mut state = State::fresh(settings(50), Options::default());
        state.free_ports = [
            3000, 3001, 3002, 1, 65535, 10, 0, 99, 100, 999, 10000, 10001,
        ]
        .into_iter()
        .collect();
        let text = String::from_utf8(state.to_json()).unwrap();
        assert!(
            text.contains("\"free_ports\": [0,1,10,99,100,999,3000,3001,3002,10000,10001,65535]"),
            "{text}"
        );
        assert!(text.contains("\"used_ports\": []"), "{text}");
        assert_eq!(State::parse(text.as_bytes()).unwrap(), state);
    }

    #[test]
    fn port_usage_keys_are_strings() {
        let mut state = State::fresh(settings(50), Options::default());
        state.record_change("t", None, Some(3000));
        let value: serde_json::Value = serde_json::from_slice(&state.to_json()).unwrap();
        assert_eq!(value["port_usage"]["3000"], 1);
    }

    #[test]
    fn history_is_bounded_oldest_dropped() {
        let mut state = State::fresh(settings(3), Options::default());
        for p in 0..5u16 {
            state.record_change("t", p.checked_sub(1), Some(p));
        }
        assert_eq!(state.history.len(), 3);
        assert_eq!(state.history[0].new, Some(2));
        assert_eq!(state.change_count, 5);
    }

    #[test]
    fn leases_are_written_as_before() {
        // The file's bytes are those serde_json writes for the same leases as
        // a plain list, escapes and all; compact JSON too.
        #[derive(Serialize)]
        struct Plain<'a> {
            port: u16,
            pid: u32,
            owner: &'a str,
            since: &'a str,
        }
        #[derive(Serialize)]
        struct Wrap<'a> {
            leases: Vec<Plain<'a>>,
        }
        let rows = [
            (3000, 7, "/d/s.json#7.1", "1403/05/01 12:00 doshanbe"),
            (3001, 8, "/d/\"q\"\\ \u{e9}\u{1}\t.json#8.2", ""),
            (65535, 0, "", "\u{1f600}"),
        ];
        let mut state = State::fresh(settings(50), Options::default());
        let plain = |n: usize| Wrap {
            leases: rows[..n]
                .iter()
                .map(|&(port, pid, owner, since)| Plain {
                    port,
                    pid,
                    owner,
                    since,
                })
                .collect(),
        };
        for n in 0..=rows.len() {
            let views: Vec<LeaseView> = plain(n)
                .leases
                .iter()
                .map(|p| {
                    LeaseView::new(crate::lease::ViewFields {
                        port: p.port,
                        pid: p.pid,
                        owner: p.owner.into(),
                        since: p.since.into(),
                    })
                })
                .collect();
            state.leases = LeaseList::from(views);
            let text = String::from_utf8(state.to_json()).unwrap();
            let wrapped = serde_json::to_string_pretty(&plain(n)).unwrap();
            let list = &wrapped["{\n  \"leases\": ".len()..wrapped.len() - "\n}".len()];
            assert!(
                text.contains(&format!("\n  \"leases\": {list},\n")),
                "{text}"
            );
            assert_eq!(State::parse(text.as_bytes()).unwrap(), state);
            let compact = String::from_utf8(serde_json::to_vec(&state).unwrap()).unwrap();
            let wrapped = serde_json::to_string(&plain(n)).unwrap();
            let list = &wrapped["{\"leases\":".len()..wrapped.len() - 1];
            assert!(
                compact.contains(&format!(",\"leases\":{list},")),
                "{compact}"
            );
        }
        // As people read it.
        state.leases.retain(|v| v.port == 3000);
        let text = String::from_utf8(state.to_json()).unwrap();
        let shown = "  \"leases\": [\n    {\n      \"port\": 3000,\n      \"pid\": 7,\n      \
                     \"owner\": \"/d/s.json#7.1\",\n      \"since\": \"1403/05/01 12:00 doshanbe\"\n    \
                     }\n  ],\n";
        assert!(text.contains(shown), "{text}");
    }

    #[test]
    fn bad_files_are_rejected_with_a_reason() {
        assert!(State::parse(b"").unwrap_err().contains("empty"));
        assert!(State::parse(b"{\"current_port\": 1")
            .unwrap_err()
            .contains("JSON"));
        assert!(State::parse(b"[]").unwrap_err().contains("object"));
        assert!(State::parse(b"{}").unwrap_err().contains("missing keys"));
        let wrong = br#"{"current_port": "x", "free_ports": [], "used_ports": [],
          "port_usage": {}, "history": [], "last_checked": null, "change_count": 0,
          "last_error": null, "last_error_time": null,
          "settings": {"port_range": [1, 2], "json_path": "", "history_max": 1}}"#;
        assert!(State::parse(wrong).unwrap_err().contains("wrong shape"));
    }

    #[test]
    fn a_key_that_may_be_null_must_still_be_there() {
        let full = r#"{"current_port": null, "free_ports": [], "used_ports": [],
          "port_usage": {}, "history": [], "last_checked": null, "change_count": 0,
          "last_error": null, "last_error_time": null,
          "settings": {"port_range": [1, 2], "json_path": "", "history_max": 1}}"#;
        let state = State::parse(full.as_bytes()).unwrap();
        assert_eq!(state.current_port, None);
        let value: serde_json::Value = serde_json::from_str(full).unwrap();
        assert_eq!(serde_json::from_value::<State>(value).unwrap(), state);
        for key in [
            "current_port",
            "last_checked",
            "last_error",
            "last_error_time",
        ] {
            let without = full.replacen(&format!("\"{key}\": null,"), "", 1);
            assert_ne!(without, full);
            let error = State::parse(without.as_bytes()).unwrap_err();
            assert_eq!(error, format!("missing keys: {key}"));
        }
        // A key twice: the last one, as a JSON value takes it.
        let twice = full.replacen(
            "\"change_count\": 0,",
            "\"change_count\": 1, \"change_count\": 2,",
            1,
        );
        assert_eq!(State::parse(twice.as_bytes()).unwrap().change_count, 2);
    }
}
