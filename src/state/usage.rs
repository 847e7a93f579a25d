//! `port_usage`, the picks per port, kept in blocks of 64 ports, each with
//! its text in the state file: a pick counts one port, so a save writes
//! again the text of one block, and looks at no other count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

/// A block holds the counts of the ports `p` with one `p >> SHIFT`.
const SHIFT: u32 = 6;

/// Picks per port, lowest port first. Serialized as a map from the port (a
/// JSON string, "3000") to its count, as the original wrote it.
#[derive(Clone, Default)]
pub struct PortUsage {
    /// Lowest group first, none empty.
    blocks: Vec<Arc<UsageBlock>>,
}

pub struct UsageBlock {
    group: u16,
    counts: Vec<(u16, u64)>,
    text: OnceLock<Box<str>>,
}

impl UsageBlock {
    fn new(group: u16, counts: Vec<(u16, u64)>) -> Arc<UsageBlock> {
        Arc::new(UsageBlock {
            group,
            counts,
            text: OnceLock::new(),
        })
    }

    /// Each count as `,\n    "port": count`: the blocks' texts one after the
    /// other, less the first comma, are the map's entries as serde_json's
    /// pretty printer writes them in the state file.
    pub fn text(&self) -> &str {
        self.text.get_or_init(|| {
            let mut text = String::new();
            for (port, n) in &self.counts {
                let _ = write!(text, ",\n    \"{port}\": {n}");
            }
            text.into_boxed_str()
        })
    }
}

impl PortUsage {
    /// Counts one more pick of `port`.
    pub fn add(&mut self, port: u16) {
        let group = port >> SHIFT;
        match self.blocks.binary_search_by_key(&group, |b| b.group) {
            Ok(i) => {
                let mut counts = self.blocks[i].counts.clone();
                match counts.binary_search_by_key(&port, |c| c.0) {
                    Ok(j) => counts[j].1 += 1,
                    Err(j) => counts.insert(j, (port, 1)),
                }
                self.blocks[i] = UsageBlock::new(group, counts);
            }
            Err(i) => self
                .blocks
                .insert(i, UsageBlock::new(group, vec![(port, 1)])),
        }
    }

    pub fn get(&self, port: u16) -> Option<u64> {
        let i = self
            .blocks
            .binary_search_by_key(&(port >> SHIFT), |b| b.group)
            .ok()?;
        let counts = &self.blocks[i].counts;
        let j = counts.binary_search_by_key(&port, |c| c.0).ok()?;
        Some(counts[j].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.blocks.iter().flat_map(|b| b.counts.iter().copied())
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn blocks(&self) -> &[Arc<UsageBlock>] {
        &self.blocks
    }
}

/// The count of a port that has one (panics for any other, as a map does).
impl std::ops::Index<&u16> for PortUsage {
    type Output = u64;
    fn index(&self, port: &u16) -> &u64 {
        let found = self
            .blocks
            .binary_search_by_key(&(port >> SHIFT), |b| b.group)
            .ok()
            .and_then(|i| {
                let counts = &self.blocks[i].counts;
                let j = counts.binary_search_by_key(port, |c| c.0).ok()?;
                Some(&counts[j].1)
            });
        found.unwrap_or_else(|| panic!("port {port} was never picked"))
    }
}

impl FromIterator<(u16, u64)> for PortUsage {
    /// Counts of one port given twice: the last one.
    fn from_iter<I: IntoIterator<Item = (u16, u64)>>(counts: I) -> PortUsage {
        let counts: BTreeMap<u16, u64> = counts.into_iter().collect();
        let mut blocks: Vec<Arc<UsageBlock>> = Vec::new();
        let mut run = Vec::new();
        let mut counts = counts.into_iter().peekable();
        while let Some(&(first, _)) = counts.peek() {
            let group = first >> SHIFT;
            while let Some(count) = counts.next_if(|&(p, _)| p >> SHIFT == group) {
                run.push(count);
            }
            blocks.push(UsageBlock::new(group, std::mem::take(&mut run)));
        }
        PortUsage { blocks }
    }
}

impl PartialEq for PortUsage {
    fn eq(&self, other: &PortUsage) -> bool {
        self.blocks.len() == other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.counts == b.counts)
    }
}

impl std::fmt::Debug for PortUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for PortUsage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for PortUsage {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<u16, u64>::deserialize(deserializer).map(|m| m.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_kept_per_port_and_written_as_a_map() {
        let mut usage = PortUsage::default();
        let mut plain: BTreeMap<u16, u64> = BTreeMap::new();
        for port in [3000, 64, 63, 3000, 65535, 0, 3001, 64, 3000] {
            usage.add(port);
            *plain.entry(port).or_insert(0) += 1;
            assert_eq!(usage.iter().collect::<BTreeMap<_, _>>(), plain);
        }
        assert_eq!(usage.get(3000), Some(3));
        assert_eq!(usage.get(3002), None);
        assert_eq!(usage[&64], 2);
        assert_eq!(
            serde_json::to_string(&usage).unwrap(),
            serde_json::to_string(&plain).unwrap()
        );
        let read: PortUsage = serde_json::from_str(r#"{"7": 1, "3000": 2, "7": 5}"#).unwrap();
        assert_eq!(read.iter().collect::<Vec<_>>(), [(7, 5), (3000, 2)]);
        // The text of the blocks, each count after a comma.
        let text: String = usage.blocks().iter().map(|b| b.text()).collect();
        assert!(
            text.starts_with(",\n    \"0\": 1,\n    \"63\": 1,\n    \"64\": 2,"),
            "{text}"
        );
        let before = usage.clone();
        usage.add(65535);
        assert!(Arc::ptr_eq(&usage.blocks()[0], &before.blocks()[0]));
        assert_ne!(usage, before);
        assert_eq!(PortUsage::from_iter(plain), before);
    }
}
