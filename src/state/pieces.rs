//! The state file's text in pieces, for one `writev`: what serde_json writes
//! of the state with the `leases` list and the `port_usage` map left out
//! (the head), and those two as the texts of their blocks of 64 ports. With
//! thousands of managers on one file these two are nearly all of it (a
//! megabyte at 5,900 leases), and a pick changes one lease and one count:
//! writing every lease and count again, and copying the whole text into one
//! buffer, was half a pick. Each block keeps its text (`LeaseBlock::text`,
//! `UsageBlock::text`), made once: a change makes a new block. The bytes are
//! those serde_json writes for the whole state
//! (`the_file_is_what_serde_json_writes` checks).

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Write};

use super::{PortUsage, State};
use crate::lease::LeaseList;

const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

thread_local! {
    /// Set while the pretty-printed file is written (`with_pieces`).
    static IN_FILE: Cell<bool> = const { Cell::new(false) };
    /// Bytes of the head written so far (`Counted`).
    static WRITTEN: Cell<usize> = const { Cell::new(0) };
    /// Where in the head the usage map and the lease list go.
    static HOLES: Cell<Holes> = const { Cell::new(Holes { usage: None, leases: None }) };
    /// The head of the last file this thread saved (see `kept.rs`).
    static HEAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct Holes {
    usage: Option<usize>,
    leases: Option<usize>,
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
    usage: &PortUsage,
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
    crate::kept::with(&HEAD, |head| {
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
        // `port_usage` comes before `leases` in the layout.
        let mut pieces: Vec<IoSlice<'_>> = Vec::new();
        let mut from = 0;
        if let Some(at) = holes.usage {
            pieces.push(IoSlice::new(&head[from..at]));
            pieces.push(IoSlice::new(b"{"));
            for (i, block) in state.port_usage.blocks().iter().enumerate() {
                pieces.push(IoSlice::new(
                    &block.text().as_bytes()[usize::from(i == 0)..],
                ));
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

    /// The ports of a block: those with one `p >> SHIFT`.
    const SHIFT: u32 = 6;

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
        s.port_usage = views
            .iter()
            .map(|v| (v.port, u64::from(v.port % 5) + 1))
            .collect();
        s.record_change("t", None, Some(65535));
        check(&s);
        check(&s);
        // One lease and one count change; a group emptied; a new first group.
        let changed = views[200].port;
        s.leases.retain(|v| v.port != changed);
        s.leases.push(view(changed, "/d/other.json#1.1"));
        s.port_usage.add(views[10].port);
        check(&s);
        let first_group = views[0].port >> SHIFT;
        s.leases.retain(|v| v.port >> SHIFT != first_group);
        s.port_usage = s
            .port_usage
            .iter()
            .filter(|&(p, _)| p >> SHIFT != first_group)
            .collect();
        check(&s);
        s.leases.push(view(0, "/d/zero.json#0.1"));
        s.port_usage.add(0);
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
        s.port_usage = PortUsage::default();
        check(&s);
    }
}
