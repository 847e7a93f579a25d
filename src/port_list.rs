//! The state's port lists (`free_ports`, `used_ports`, `skipped_ports`): in the
//! file a JSON list in ascending order, in memory a bitmap with its length.
//!
//! Every change recomputes all three from the sets of leased, bound and
//! skipped ports, 64 ports at a time. As vectors that was 6,001 pushes and
//! 12 KB of fresh memory per list and view (each page zeroed by the kernel,
//! and dear on a VM: about a tenth of a new manager and its first pick, by
//! perf); as bitmaps it is one word written per 64 ports, in a kilobyte or two.
//!
//! Written as JSON, a list of a 6,001-port range is 35 KB of text, and each
//! save writes it. From one save to the next the free list changes by a port
//! or two, so each thread keeps the text of the lists it wrote last and
//! patches the one closest to the new list (when it differs by few ports)
//! rather than writing every port again (`with_json`).

use std::cell::RefCell;

use serde::{Deserialize, Deserializer};

use crate::port_set::PortSet;

/// A set of ports that reads like a sorted list: iterated, counted, written
/// and compared in ascending order. A list read from a file may come in any
/// order or repeat a port; it is kept as the set it describes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PortList {
    set: PortSet,
    len: usize,
}

impl PortList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, port: u16) -> bool {
        self.set.contains(port)
    }

    /// The ports, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.set.iter()
    }

    /// The non-empty 64-port words, lowest first: each word's first port and
    /// its bits (bit i is port `start + i`).
    pub fn iter_words(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.set.iter_words()
    }

    pub fn first(&self) -> Option<u16> {
        self.iter().next()
    }

    pub fn last(&self) -> Option<u16> {
        self.set.last()
    }

    /// Adds the ports of `bits` (bit i is port `start + i`; `start` a
    /// multiple of 64) to the list.
    pub fn add_word(&mut self, start: u16, bits: u64) {
        if bits != 0 {
            let before = self.set.word(start);
            self.set.or_word(start, bits);
            self.len += (bits & !before).count_ones() as usize;
        }
    }

    pub fn clear(&mut self) {
        self.set.clear();
        self.len = 0;
    }
}

impl PortList {
    /// Hands `write` the list as JSON (`[p1,p2,...]`, as serde_json writes
    /// it): the text this thread wrote last for this list or one that differs
    /// from it by at most `PATCH_MAX` ports, patched, or else written anew.
    pub fn with_json<R>(&self, write: impl FnOnce(&str) -> R) -> R {
        RENDERED.with(|kept| match kept.try_borrow_mut() {
            Ok(mut kept) => {
                let result = write(kept.text_of(self));
                kept.trim();
                result
            }
            // In use further up the stack (never, today): written afresh.
            Err(_) => {
                let mut text = String::new();
                render(self, &mut text);
                write(&text)
            }
        })
    }
}

/// Lists' texts a thread keeps: a state's three lists and one more.
const RENDERED_KEPT: usize = 4;

/// The most ports by which a kept list may differ from the one asked for to
/// be patched rather than written anew (each patched port moves the text
/// after it once).
const PATCH_MAX: u32 = 16;

thread_local! {
    static RENDERED: RefCell<Rendered> = const { RefCell::new(Rendered { lists: Vec::new() }) };
}

/// The lists this thread wrote last, most recent first, and their texts.
struct Rendered {
    lists: Vec<(PortList, String)>,
}

impl Rendered {
    fn text_of(&mut self, ports: &PortList) -> &str {
        let mut closest: Option<(usize, Vec<(u16, u64)>)> = None;
        for (i, (list, _)) in self.lists.iter().enumerate() {
            match changed_words(list, ports, PATCH_MAX) {
                Some(changes) if changes.is_empty() => {
                    closest = Some((i, changes));
                    break;
                }
                Some(changes)
                    if closest
                        .as_ref()
                        .is_none_or(|(_, c)| ports_in(&changes) < ports_in(c)) =>
                {
                    closest = Some((i, changes));
                }
                _ => {}
            }
        }
        let entry = match closest {
            Some((i, changes)) => {
                let (mut list, mut text) = self.lists.remove(i);
                if !changes.is_empty() {
                    patch(&list, &mut text, &changes);
                    list.clone_from(ports);
                }
                (list, text)
            }
            None => {
                // The least recently used entry's buffer is written over.
                let mut text = if self.lists.len() >= RENDERED_KEPT {
                    self.lists.pop().map(|(_, text)| text).unwrap_or_default()
                } else {
                    String::new()
                };
                render(ports, &mut text);
                (ports.clone(), text)
            }
        };
        self.lists.insert(0, entry);
        self.lists.truncate(RENDERED_KEPT);
        &self.lists[0].1
    }

    /// Forgets texts past `kept::KEPT_MAX`: a huge list once must not pin
    /// its memory for good.
    fn trim(&mut self) {
        self.lists
            .retain(|(_, text)| text.capacity() <= crate::kept::KEPT_MAX);
    }
}

/// The words in which `a` and `b` differ (their first port, and the bits
/// that differ), lowest first, if they differ in at most `max` ports.
fn changed_words(a: &PortList, b: &PortList, max: u32) -> Option<Vec<(u16, u64)>> {
    let diff = a.len().abs_diff(b.len());
    if diff > max as usize {
        return None;
    }
    let mut changes = Vec::new();
    let mut count = 0;
    let (mut xs, mut ys) = (a.iter_words().peekable(), b.iter_words().peekable());
    loop {
        let (start, bits) = match (xs.peek().copied(), ys.peek().copied()) {
            (None, None) => break,
            (Some((s, x)), Some((t, y))) if s == t => {
                xs.next();
                ys.next();
                (s, x ^ y)
            }
            (Some((s, x)), Some((t, _))) if s < t => {
                xs.next();
                (s, x)
            }
            (Some((s, x)), None) => {
                xs.next();
                (s, x)
            }
            (_, Some((t, y))) => {
                ys.next();
                (t, y)
            }
        };
        if bits != 0 {
            count += bits.count_ones();
            if count > max {
                return None;
            }
            changes.push((start, bits));
        }
    }
    Some(changes)
}

fn ports_in(changes: &[(u16, u64)]) -> u32 {
    changes.iter().map(|(_, bits)| bits.count_ones()).sum()
}

/// How many decimal digits `port` has.
fn digits(port: u32) -> usize {
    1 + usize::from(port >= 10)
        + usize::from(port >= 100)
        + usize::from(port >= 1000)
        + usize::from(port >= 10_000)
}

/// The bytes the ports of `list` below `port` take in its text, each written
/// as `,digits` (the first comma being the `[`): one count of bits per
/// word and digit count.
fn bytes_below(list: &PortList, port: u32) -> usize {
    let mut bytes = 0;
    for (start, bits) in list.iter_words() {
        let start = u32::from(start);
        if start >= port {
            break;
        }
        let bits = if port - start >= 64 {
            bits
        } else {
            bits & ((1u64 << (port - start)) - 1)
        };
        let count = bits.count_ones() as usize;
        bytes += 2 * count; // the comma and the first digit
        for from in [10u32, 100, 1000, 10_000] {
            let at_least = if from <= start {
                bits
            } else if from >= start + 64 {
                0
            } else {
                bits & (!0u64 << (from - start))
            };
            bytes += at_least.count_ones() as usize;
        }
    }
    bytes
}

/// Makes `text` (the JSON of `list`) the text of `list` with the ports of
/// `changes` (`changed_words`) added or removed. Worked from the highest
/// port down, so that where each lower port's text lies is as in `list`.
fn patch(list: &PortList, text: &mut String, changes: &[(u16, u64)]) {
    let mut body = std::mem::take(text).into_bytes();
    // `[p1,p2]` → `,p1,p2`: every port as `,digits`.
    body.pop();
    if body.len() > 1 {
        body[0] = b',';
    } else {
        body.clear();
    }
    for &(start, bits) in changes.iter().rev() {
        let mut bits = bits;
        while bits != 0 {
            let high = 63 - bits.leading_zeros();
            bits &= !(1u64 << high);
            let port = u32::from(start) + high;
            let at = bytes_below(list, port);
            if list.contains(port as u16) {
                body.drain(at..at + 1 + digits(port));
            } else {
                let written = format!(",{port}");
                body.splice(at..at, written.bytes());
            }
        }
    }
    if body.is_empty() {
        body.extend_from_slice(b"[");
    } else {
        body[0] = b'[';
    }
    body.push(b']');
    // Only '[', ']', ',' and ASCII digits were written.
    *text = crate::sys::string_from_ascii(body);
}

/// Four decimal digits of each number below 10,000, zero-padded.
static DIGITS4: [[u8; 4]; 10_000] = {
    let mut table = [[0u8; 4]; 10_000];
    let mut n = 0;
    while n < 10_000 {
        table[n] = [
            b'0' + (n / 1000) as u8,
            b'0' + (n / 100 % 10) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        n += 1;
    }
    table
};

/// `[p1,p2,...]` with one table look-up per port, a 64-port word of the
/// bitmap at a time, each port written as `,ddddd` into a buffer sized for
/// the list up front (no growth checks in the loop; the first comma becomes
/// the `[`): a 60,000-port list in about half the time of pushing each port's
/// digits onto a growing buffer, and the same bytes.
fn render(ports: &PortList, text: &mut String) {
    let mut out = std::mem::take(text).into_bytes();
    // Counted from the bits, so the buffer fits whatever the list's length says.
    let count: usize = ports
        .iter_words()
        .map(|(_, bits)| bits.count_ones() as usize)
        .sum();
    out.clear();
    out.resize(count * 6 + 2, 0);
    let buf = out.as_mut_slice();
    let mut at = 0;
    for (start, mut bits) in ports.iter_words() {
        while bits != 0 {
            let port = usize::from(start) + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let slot: &mut [u8; 6] = (&mut buf[at..at + 6]).try_into().expect("6 bytes");
            slot[0] = b',';
            if port >= 10_000 {
                slot[1] = b'0' + (port / 10_000) as u8;
                slot[2..6].copy_from_slice(&DIGITS4[port % 10_000]);
                at += 6;
            } else {
                // All four digits, then the leading zeros dropped.
                let skip = match port {
                    0..=9 => 3,
                    10..=99 => 2,
                    100..=999 => 1,
                    _ => 0,
                };
                slot[1..5].copy_from_slice(&DIGITS4[port]);
                slot.copy_within(1 + skip..5, 1);
                at += 5 - skip;
            }
        }
    }
    buf[0] = b'[';
    at = at.max(1);
    buf[at] = b']';
    out.truncate(at + 1);
    if out.capacity() > crate::kept::KEPT_MAX {
        out.shrink_to(crate::kept::KEPT_MAX);
    }
    // Only '[', ']', ',' and ASCII digits were written.
    *text = crate::sys::string_from_ascii(out);
}

impl FromIterator<u16> for PortList {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let set: PortSet = iter.into_iter().collect();
        let len = set.iter_words().map(|(_, w)| w.count_ones() as usize).sum();
        PortList { set, len }
    }
}

impl std::fmt::Debug for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'de> Deserialize<'de> for PortList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<u16>::deserialize(deserializer)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_are_written_as_serde_json_writes_them() {
        let mut lists: Vec<Vec<u16>> = vec![
            vec![],
            vec![0],
            vec![65535],
            vec![
                9, 10, 99, 100, 999, 1000, 9999, 10000, 10001, 19999, 20000, 65534,
            ],
            (0..=65535).collect(),
            (20000..=26000).filter(|p| p % 7 != 0).collect(),
        ];
        lists.push((0..=65535).step_by(63).collect());
        let mut text = String::new();
        for ports in lists {
            let list: PortList = ports.iter().copied().collect();
            render(&list, &mut text);
            assert_eq!(text, serde_json::to_string(&ports).unwrap());
        }
    }

    #[test]
    fn a_list_is_its_ports_in_ascending_order_once_each() {
        let list: PortList = [3001, 3000, 65535, 0, 3000, 64, 63].into_iter().collect();
        assert_eq!(
            list.iter().collect::<Vec<_>>(),
            [0, 63, 64, 3000, 3001, 65535]
        );
        assert_eq!(list.len(), 6);
        assert_eq!((list.first(), list.last()), (Some(0), Some(65535)));
        assert!(list.contains(64) && !list.contains(65));
        let empty = PortList::default();
        assert!(empty.is_empty());
        assert_eq!((empty.first(), empty.last()), (None, None));
    }

    #[test]
    fn words_add_their_new_ports_only() {
        let mut list = PortList::default();
        list.add_word(128, 0b1011);
        list.add_word(128, 0b0011);
        list.add_word(0, 1 << 63);
        assert_eq!(list.iter().collect::<Vec<_>>(), [63, 128, 129, 131]);
        assert_eq!(list.len(), 4);
        list.clear();
        assert!(list.is_empty() && list.iter().next().is_none());
        assert_eq!(list, PortList::default());
    }

    #[test]
    fn a_kept_text_patched_is_the_text_written_anew() {
        // A small generator (no dependency): the same lists every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |below: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(below)) as u32
        };
        let mut ports: std::collections::BTreeSet<u16> = (20_000..=26_000).collect();
        ports.extend([0, 9, 10, 99, 100, 999, 1000, 9999, 10_000, 65_535]);
        for round in 0..300 {
            // A few ports added or removed anywhere, digit-count edges too.
            for _ in 0..=next(PATCH_MAX) {
                let port = match next(4) {
                    0 => [0, 9, 10, 99, 100, 999, 1000, 9999, 10_000, 65_535][next(10) as usize],
                    _ => 19_990 + next(6_020) as u16,
                };
                if !ports.remove(&port) {
                    ports.insert(port);
                }
            }
            if round == 150 {
                ports.clear(); // to empty and back
            }
            let list: PortList = ports.iter().copied().collect();
            let expected = serde_json::to_string(&ports.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(list.with_json(str::to_string), expected, "round {round}");
        }
    }

    #[test]
    fn lists_read_from_json_in_any_order() {
        let list: PortList = serde_json::from_str("[9000, 3000, 3000, 4000]").unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), [3000, 4000, 9000]);
        assert!(serde_json::from_str::<PortList>("[70000]").is_err());
        assert!(serde_json::from_str::<PortList>("[\"3000\"]").is_err());
    }
}
