//! The state file's text in pieces, for one `writev`: what serde_json writes
//! of the state with the `leases` list and the `port_usage` map left out
//! (the head), and those two as text kept between saves in chunks of 64
//! ports each. With thousands of managers on one file these two are nearly
//! all of it (a megabyte at 5,900 leases), and a pick changes one lease and
//! one count: writing every chunk again and copying the whole text into one
//! buffer was half a pick. The leases' chunks are the lease list's blocks,
//! each with its text (`LeaseBlock::text`, made once per block); the counts'
//! chunks are kept here, per file, and written again only when their counts
//! changed. The bytes are those serde_json writes for the whole state
//! (`the_file_is_what_serde_json_writes` checks).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, IoSlice, Write};

use super::State;
use crate::lease::LeaseList;

const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A chunk holds the leases or counts of the ports `p` with one `p >> SHIFT`.
const SHIFT: u32 = 6;

/// State files whose chunks a thread keeps.
const FILES_KEPT: usize = 4;

thread_local! {
    /// Set while the pretty-printed file is written (`with_pieces`).
    static IN_FILE: Cell<bool> = const { Cell::new(false) };
    /// Bytes of the head written so far (`Counted`).
    static WRITTEN: Cell<usize> = const { Cell::new(0) };
    /// Where in the head the usage map and the lease list go.
    static HOLES: Cell<Holes> = const { Cell::new(Holes { usage: None, leases: None }) };
    /// The head and the chunks of the files this thread saved last (see `kept.rs`).
    static KEPT: RefCell<Kept> = const { RefCell::new(Kept { head: Vec::new(), files: Vec::new() }) };
}

#[derive(Clone, Copy)]
struct Holes {
    usage: Option<usize>,
    leases: Option<usize>,
}

#[derive(Default)]
struct Kept {
    head: Vec<u8>,
    /// By `settings.json_path`, the most recent first.
    files: Vec<(String, Chunks)>,
}

#[derive(Default)]
struct Chunks {
    usage: Vec<UsageChunk>,
}

/// The usage counts of one group of ports, and their text: each as
/// `,\n    "port": count`.
struct UsageChunk {
    group: u16,
    counts: Vec<(u16, u64)>,
    text: String,
}

/// Writes the leases in the file as a hole (nothing, its place noted) that
/// `with_pieces` fills; elsewhere (compact JSON) as any list.
pub(super) fn leases_in_file<S: serde::Serializer>(
    leases: &LeaseList,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    if leases.is_empty() || !IN_FILE.get() {
        return leases.serialize(serializer);
    }
    HOLES.set(Holes {
        leases: Some(WRITTEN.get()),
        ..HOLES.get()
    });
    hole(serializer)
}

/// `leases_in_file` for the usage counts.
pub(super) fn usage_in_file<S: serde::Serializer>(
    usage: &BTreeMap<u16, u64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    if usage.is_empty() || !IN_FILE.get() {
        return usage.serialize(serializer);
    }
    HOLES.set(Holes {
        usage: Some(WRITTEN.get()),
        ..HOLES.get()
    });
    hole(serializer)
}

/// An empty raw value: serde_json writes the key and nothing for its value.
fn hole<S: serde::Serializer>(serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut raw = serializer.serialize_struct(RAW_VALUE_TOKEN, 1)?;
    raw.serialize_field(RAW_VALUE_TOKEN, "")?;
    raw.end()
}

/// The head's buffer, telling `WRITTEN` its length after each write (serde_json
/// writes straight through, so a hole's place is the length when it is reached).
struct Counted<'a>(&'a mut Vec<u8>);

impl Write for Counted<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(bytes);
        WRITTEN.set(self.0.len());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands `write` the state file's text in pieces (see the module's text).
pub(super) fn with_pieces<R>(state: &State, write: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
    crate::kept::with(&KEPT, |kept| {
        let Kept { head, files } = kept;
        head.clear();
        let outer = (IN_FILE.replace(true), HOLES.get(), WRITTEN.get());
        HOLES.set(Holes {
            usage: None,
            leases: None,
        });
        WRITTEN.set(0);
        serde_json::to_writer_pretty(Counted(head), state).expect("state always serializes");
        let holes = HOLES.get();
        IN_FILE.set(outer.0);
        HOLES.set(outer.1);
        WRITTEN.set(outer.2);
        let chunks = chunks_of(files, &state.settings.json_path);
        let mut pieces: Vec<IoSlice<'_>> = Vec::new();
        let mut from = 0;
        if let Some(at) = holes.usage {
            update_usage(&mut chunks.usage, &state.port_usage);
            pieces.push(IoSlice::new(&head[from..at]));
            pieces.push(IoSlice::new(b"{"));
            for (i, chunk) in chunks.usage.iter().enumerate() {
                pieces.push(IoSlice::new(&chunk.text.as_bytes()[usize::from(i == 0)..]));
            }
            pieces.push(IoSlice::new(b"\n  }"));
            from = at;
        }
        if let Some(at) = holes.leases {
            pieces.push(IoSlice::new(&head[from..at]));
            pieces.push(IoSlice::new(b"["));
            for (i, block) in state.leases.blocks().iter().enumerate() {
                pieces.push(IoSlice::new(
                    &block.text().as_bytes()[usize::from(i == 0)..],
                ));
            }
            pieces.push(IoSlice::new(b"\n  ]"));
            from = at;
        }
        pieces.push(IoSlice::new(&head[from..]));
        let result = write(&pieces);
        drop(pieces);
        if past_need(head.capacity(), head.len()) {
            *head = Vec::new();
        }
        result
    })
}

/// The chunks kept for the file `path`, made the most recent.
fn chunks_of<'a>(files: &'a mut Vec<(String, Chunks)>, path: &str) -> &'a mut Chunks {
    match files.iter().position(|(p, _)| p == path) {
        Some(0) => {}
        Some(i) => {
            let entry = files.remove(i);
            files.insert(0, entry);
        }
        None => {
            files.truncate(FILES_KEPT - 1);
            files.insert(0, (path.to_string(), Chunks::default()));
        }
    }
    &mut files[0].1
}

/// Makes `kept` the chunks of `usage`, reusing those with the same counts.
fn update_usage(kept: &mut Vec<UsageChunk>, usage: &BTreeMap<u16, u64>) {
    let mut before = std::mem::take(kept).into_iter().peekable();
    let mut counts = usage.iter().map(|(&p, &n)| (p, n)).peekable();
    let mut run = Vec::new();
    while let Some(&(first, _)) = counts.peek() {
        let group = first >> SHIFT;
        run.clear();
        while let Some(count) = counts.next_if(|&(p, _)| p >> SHIFT == group) {
            run.push(count);
        }
        while before.next_if(|c| c.group < group).is_some() {}
        kept.push(
            before
                .next_if(|c| c.group == group && c.counts == run)
                .unwrap_or_else(|| {
                    let mut text = String::new();
                    for (port, n) in &run {
                        let _ = write!(text, ",\n    \"{port}\": {n}");
                    }
                    UsageChunk {
                        group,
                        counts: run.clone(),
                        text,
                    }
                }),
        );
    }
}

/// Is a kept buffer of `capacity` bytes, just used for `used` of them, to be
/// given back? Past `kept::KEPT_MAX` only when the text no longer needs most
/// of it: a buffer given back at each save was taken anew and grown page by
/// freshly zeroed page; a huge state once still does not pin its memory past
/// the next, smaller save.
fn past_need(capacity: usize, used: usize) -> bool {
    capacity > crate::kept::KEPT_MAX && capacity > used.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::super::{Options, Settings};
    use super::*;
    use crate::lease::{LeaseView, ViewFields};

    fn view(port: u16, owner: &str) -> LeaseView {
        LeaseView::new(ViewFields {
            port,
            pid: u32::from(port) * 7,
            owner: owner.into(),
            since: format!("2024-07-22T12:00:{:02}.000+03:30", port % 60),
        })
    }

    fn state() -> State {
        let settings = Settings {
            port_range: [1, 65535],
            json_path: "pieces.json".into(),
            history_max: 50,
            service: "s".into(),
        };
        State::fresh(settings, Options::default())
    }

    /// The file as serde_json writes the same state in one piece.
    fn whole(state: &State) -> Vec<u8> {
        serde_json::to_vec_pretty(state).unwrap()
    }

    #[test]
    fn the_file_is_what_serde_json_writes() {
        let mut s = state();
        let check = |s: &State| {
            let text = s.to_json();
            assert_eq!(
                String::from_utf8(text.clone()).unwrap(),
                String::from_utf8(whole(s)).unwrap()
            );
            assert_eq!(State::parse(&text).unwrap(), *s);
        };
        check(&s);
        // Across many groups, with owners serde_json must escape.
        let mut views: Vec<LeaseView> = (0..400u16)
            .map(|i| {
                view(
                    1 + i * 37 % 3000 + i,
                    &format!("/d/\"q\"\\ \u{e9}\u{1}.json#{i}.1"),
                )
            })
            .collect();
        views.sort_by_key(|v| v.port);
        views.dedup_by_key(|v| v.port);
        s.leases = LeaseList::from(views.clone());
        for v in &views {
            s.port_usage.insert(v.port, u64::from(v.port % 5) + 1);
        }
        s.record_change("t", None, Some(65535));
        check(&s);
        check(&s);
        // One lease and one count change; a group emptied; a new first group.
        let changed = views[200].port;
        s.leases.retain(|v| v.port != changed);
        s.leases.push(view(changed, "/d/other.json#1.1"));
        *s.port_usage.get_mut(&views[10].port).unwrap() += 1;
        check(&s);
        let first_group = views[0].port >> SHIFT;
        s.leases.retain(|v| v.port >> SHIFT != first_group);
        s.port_usage.retain(|&p, _| p >> SHIFT != first_group);
        check(&s);
        s.leases.push(view(0, "/d/zero.json#0.1"));
        s.port_usage.insert(0, 9);
        check(&s);
        // Read back from the file: the same text.
        let read = State::parse(&s.to_json()).unwrap();
        check(&read);
        // Another file on the same thread, then this one again.
        let mut other = state();
        other.settings.json_path = "other.json".into();
        other.leases = LeaseList::from(vec![view(5, "/o.json#1.1")]);
        check(&other);
        check(&s);
        // Down to none.
        s.leases = LeaseList::default();
        s.port_usage.clear();
        check(&s);
    }
}
