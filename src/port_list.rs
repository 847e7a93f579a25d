//! The state's port lists (`free_ports`, `used_ports`, `skipped_ports`): in the
//! file a JSON list in ascending order, in memory a bitmap with its length.
//!
//! Every change recomputes all three from the sets of leased, bound and
//! skipped ports, 64 ports at a time. As vectors that was 6,001 pushes and
//! 12 KB of fresh memory per list and view (each page zeroed by the kernel,
//! and dear on a VM: about a tenth of a new manager and its first pick, by
//! perf); as bitmaps it is one word written per 64 ports, in a kilobyte or two.

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
    fn lists_read_from_json_in_any_order() {
        let list: PortList = serde_json::from_str("[9000, 3000, 3000, 4000]").unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), [3000, 4000, 9000]);
        assert!(serde_json::from_str::<PortList>("[70000]").is_err());
        assert!(serde_json::from_str::<PortList>("[\"3000\"]").is_err());
    }
}
