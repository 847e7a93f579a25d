//! A set of TCP ports as a bitmap: what the scanner, the registry's view and
//! the state's lists share. Pure data: no I/O.

use std::ops::RangeInclusive;

/// Ports per chunk of a `PortSet`, and the chunks that cover all 65,536.
const CHUNK_PORTS: usize = 4096;
const CHUNK_WORDS: usize = CHUNK_PORTS / 64;
const CHUNKS: usize = 65_536 / CHUNK_PORTS;

/// A set of TCP ports: a bitmap in 16 chunks of 4,096 ports, each allocated
/// only once a port in it is added. A range of a few thousand ports then
/// costs a kilobyte or two, not 8 KB per set; every state file's view keeps
/// several, and fresh memory is not free (the kernel zeroes each new page).
#[derive(Clone, Default)]
pub struct PortSet {
    chunks: [Option<Box<[u64; CHUNK_WORDS]>>; CHUNKS],
}

const EMPTY_CHUNK: [u64; CHUNK_WORDS] = [0; CHUNK_WORDS];

impl PartialEq for PortSet {
    fn eq(&self, other: &Self) -> bool {
        let words = |c: &Option<Box<[u64; CHUNK_WORDS]>>| c.as_deref().copied();
        self.chunks
            .iter()
            .zip(&other.chunks)
            .all(|(a, b)| words(a).unwrap_or(EMPTY_CHUNK) == words(b).unwrap_or(EMPTY_CHUNK))
    }
}

impl Eq for PortSet {}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

fn place(port: u16) -> (usize, usize, u64) {
    let port = usize::from(port);
    let within = port % CHUNK_PORTS;
    (port / CHUNK_PORTS, within / 64, 1 << (within % 64))
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        let (chunk, word, bit) = place(port);
        self.chunks[chunk].get_or_insert_with(|| Box::new(EMPTY_CHUNK))[word] |= bit;
    }

    pub fn remove(&mut self, port: u16) {
        let (chunk, word, bit) = place(port);
        if let Some(words) = self.chunks[chunk].as_mut() {
            words[word] &= !bit;
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        let (chunk, word, bit) = place(port);
        self.chunks[chunk]
            .as_ref()
            .is_some_and(|words| words[word] & bit != 0)
    }

    /// The ports, lowest first, a word at a time.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.iter_words().flat_map(|(start, mut bits)| {
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let port = start + bits.trailing_zeros() as u16;
                    bits &= bits - 1;
                    port
                })
            })
        })
    }

    /// The non-empty words, lowest first: each word's first port and its bits.
    pub fn iter_words(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|words| (i, words)))
            .flat_map(|(i, words)| {
                words
                    .iter()
                    .enumerate()
                    .filter(|(_, bits)| **bits != 0)
                    .map(move |(w, bits)| ((i * CHUNK_PORTS + w * 64) as u16, *bits))
            })
    }

    /// The highest port in the set.
    pub fn last(&self) -> Option<u16> {
        let (i, words) = self
            .chunks
            .iter()
            .enumerate()
            .rev()
            .filter_map(|(i, c)| c.as_ref().map(|words| (i, words)))
            .find(|(_, words)| words.iter().any(|w| *w != 0))?;
        let (w, bits) = words.iter().enumerate().rev().find(|(_, b)| **b != 0)?;
        Some((i * CHUNK_PORTS + w * 64 + 63 - bits.leading_zeros() as usize) as u16)
    }

    /// Adds the ports of `bits` (bit i is port `start + i`; `start` a multiple of 64).
    pub fn or_word(&mut self, start: u16, bits: u64) {
        debug_assert_eq!(start % 64, 0);
        if bits != 0 {
            let (chunk, word, _) = place(start);
            self.chunks[chunk].get_or_insert_with(|| Box::new(EMPTY_CHUNK))[word] |= bits;
        }
    }

    /// Empties the set, keeping its chunks for the next use.
    pub fn clear(&mut self) {
        for words in self.chunks.iter_mut().flatten() {
            words.fill(0);
        }
    }

    /// The 64 ports from `start` (a multiple of 64) as bits, lowest port first.
    pub fn word(&self, start: u16) -> u64 {
        debug_assert_eq!(start % 64, 0);
        let (chunk, word, _) = place(start);
        self.chunks[chunk].as_ref().map_or(0, |words| words[word])
    }

    /// How many ports of `range` are in the set.
    pub fn count_in(&self, range: RangeInclusive<u16>) -> usize {
        range.filter(|p| self.contains(*p)).count()
    }
}

/// The 64-port words that cover `range`: each word's first port (a multiple
/// of 64) and the mask of its bits that lie inside the range.
pub fn words_of(range: &RangeInclusive<u16>) -> impl Iterator<Item = (u16, u64)> {
    let (first, last) = (u32::from(*range.start()), u32::from(*range.end()));
    let empty = range.is_empty();
    ((first & !63)..=last)
        .step_by(64)
        .filter(move |_| !empty)
        .map(move |base| {
            let low = first.saturating_sub(base);
            let high = (last - base).min(63);
            (base as u16, (u64::MAX << low) & (u64::MAX >> (63 - high)))
        })
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let mut set = PortSet::default();
        for port in iter {
            set.insert(port);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_set_holds_every_port_and_compares_by_content() {
        let ports = [0, 1, 63, 64, 4095, 4096, 20000, 65535];
        let mut set: PortSet = ports.into_iter().collect();
        assert_eq!(set.iter().collect::<Vec<_>>(), ports);
        assert!(ports.iter().all(|&p| set.contains(p)));
        assert!(!set.contains(2) && !set.contains(4097) && !set.contains(65534));
        assert_eq!(set.count_in(4000..=20000), 3);
        for p in ports {
            set.remove(p);
        }
        // Chunks that were used and are empty again equal chunks never used.
        assert_eq!(set, PortSet::default());
        assert_ne!(set, [7].into_iter().collect());
        set.remove(9);
        assert_eq!(set.iter().count(), 0);
        let words: Vec<(u16, u64)> = words_of(&(62..=130)).collect();
        assert_eq!(words, [(0, 0b11 << 62), (64, u64::MAX), (128, 0b111)]);
        assert_eq!(
            words_of(&(65535..=65535)).collect::<Vec<_>>(),
            [(65472, 1 << 63)]
        );
        let set: PortSet = [4096, 4097, 4159, 4160].into_iter().collect();
        assert_eq!(set.word(4096), 1 | 2 | 1 << 63);
        assert_eq!(set.word(4160), 1);
        assert_eq!(set.word(0), 0);
    }

    #[test]
    fn port_set_basics() {
        let mut set: PortSet = [1, 64, 65535].into_iter().collect();
        assert!(set.contains(64) && set.contains(65535) && !set.contains(63));
        set.remove(64);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1, 65535]);
        assert_eq!(set.count_in(0..=10), 1);
    }
}
