//! The registry's change log: between two full tables (the slot files), each
//! transaction appends only what it changed, one JSON line per change, so a
//! pick costs the same whether the registry holds ten leases or six thousand,
//! and a process that last looked a moment ago reads only the new lines.
//!
//! The lock file's header says how many bytes of the log are valid (see
//! `Header`): bytes past that (a writer that died before updating the header)
//! are ignored and overwritten by the next append, so a crash never leaves a
//! half-applied change, exactly as with the slots alone.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub use crate::lease::Change;
use crate::lease::Lease;

/// The registry's position, kept in the lock file (which is never replaced):
/// bytes 0-8 the change counter (what `fsutil::read_generation` reads),
/// 8-16 the change number of the full table in the slots, plus one (0: a
/// registry written before there was a log, whose table is the counter's
/// slot), 16-24 the valid length of the log; then, since format 2,
/// 24-32 `FORMAT_MAGIC << 32 | format`, 32-40 a copy of the counter as this
/// format last wrote it, and 40-48 a check of bytes 8-24 then. A writer that
/// does not know the format (an older build) moves the counter without the
/// copy: the check then says which older layout it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    /// The change number whose full table is in slot `base % 2`.
    pub base: u64,
    pub log_len: u64,
    /// Who wrote the registry last, as far as the header tells.
    pub layout: Layout,
}

/// The layouts a registry's header can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Nothing written yet, or this format (or the log layout before it,
    /// which keeps the same tables and log and is read and written alike).
    Current,
    /// The layout before the change log: only the counter, whose slot holds
    /// the table. Written by builds that never read the log.
    CounterOnly,
    /// A format newer than this build's (its number).
    Newer(u32),
}

/// "DPMR": marks the format word.
const FORMAT_MAGIC: u64 = 0x4450_4d52;
/// The registry format this build reads and writes.
pub const FORMAT: u32 = 2;
const HEADER_LEN: usize = 48;

impl Header {
    /// Reads the header. An error (EIO, EINTR that persists) is an error:
    /// a header that could not be read is never taken for an empty one.
    pub fn read(lock: &File) -> io::Result<Header> {
        let mut bytes = [0u8; HEADER_LEN];
        let mut read = 0;
        while read < HEADER_LEN {
            match lock.read_at(&mut bytes[read..], read as u64) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Header::parse(&bytes, read))
    }

    fn parse(bytes: &[u8; HEADER_LEN], read: usize) -> Header {
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        let generation = if read >= 8 { word(0) } else { 0 };
        let counter_only = Header {
            generation,
            base: generation,
            log_len: 0,
            layout: if generation == 0 {
                Layout::Current
            } else {
                Layout::CounterOnly
            },
        };
        if read < 24 || word(1) == 0 {
            return counter_only;
        }
        let current = Header {
            generation,
            base: word(1) - 1,
            log_len: word(2),
            layout: Layout::Current,
        };
        if read < HEADER_LEN || word(3) >> 32 != FORMAT_MAGIC {
            // The log layout without a format word: read as ours.
            return current;
        }
        let format = (word(3) & 0xffff_ffff) as u32;
        if format > FORMAT {
            return Header {
                layout: Layout::Newer(format),
                ..current
            };
        }
        if word(4) == generation {
            return current;
        }
        // Someone moved the counter without the copy. A build of the log
        // layout rewrites bytes 8-24 with it (the log's length or the
        // table's number always changes); a counter-only build leaves them.
        if word(5) == position_check(word(1), word(2)) {
            counter_only_after(generation)
        } else {
            current
        }
    }

    /// One write of the whole header: the new position takes effect at once.
    pub fn write(&self, lock: &File) -> io::Result<()> {
        let mut bytes = [0u8; HEADER_LEN];
        let base = self.base.wrapping_add(1);
        let words = [
            self.generation,
            base,
            self.log_len,
            FORMAT_MAGIC << 32 | u64::from(FORMAT),
            self.generation,
            position_check(base, self.log_len),
        ];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        lock.write_all_at(&bytes, 0)
    }
}

fn counter_only_after(generation: u64) -> Header {
    Header {
        generation,
        base: generation,
        log_len: 0,
        layout: Layout::CounterOnly,
    }
}

fn position_check(base_plus_one: u64, log_len: u64) -> u64 {
    (base_plus_one ^ log_len.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The log lines for `changes`.
pub fn encode(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::with_capacity(changes.len() * 160);
    for change in changes {
        serde_json::to_writer(&mut out, change).expect("a change always serializes");
        out.push(b'\n');
    }
    out
}

/// The changes in bytes `from..to` of the log.
pub fn read(log: &File, from: u64, to: u64) -> io::Result<Vec<Change>> {
    if to < from || to - from > crate::fsutil::MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the change log's length is out of bounds",
        ));
    }
    let mut bytes = vec![0u8; (to - from) as usize];
    log.read_exact_at(&mut bytes, from)?;
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .collect()
}

/// Applies `changes` to `leases`, in order.
pub fn apply(leases: &mut Vec<Lease>, changes: Vec<Change>) {
    for change in changes {
        match change {
            Change::Add(lease) => leases.push(lease),
            Change::Del(key) => {
                // As `LeaseTable::remove_where` removed it (same order after).
                if let Some(at) = leases.iter().position(|l| key.names(l)) {
                    leases.swap_remove(at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseKey;

    fn lease(port: u16) -> Lease {
        Lease {
            port,
            pid: 7,
            start_time: 9,
            owner: "s.json#7.1".into(),
            since: "now".into(),
            service: "s".into(),
        }
    }

    #[test]
    fn changes_round_trip_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("leases.log"))
            .unwrap();
        let first = encode(&[Change::Add(lease(3000)), Change::Add(lease(3001))]);
        log.write_all_at(&first, 0).unwrap();
        let second = encode(&[Change::Del(LeaseKey::of(&lease(3000)))]);
        log.write_all_at(&second, first.len() as u64).unwrap();
        // Bytes past the valid length (a writer that died) are not read.
        log.write_all_at(b"{\"garbage", (first.len() + second.len()) as u64)
            .unwrap();
        let end = (first.len() + second.len()) as u64;
        let mut leases = Vec::new();
        apply(&mut leases, read(&log, 0, end).unwrap());
        assert_eq!(leases, vec![lease(3001)]);
        // Read from a later position: only what came since.
        let since = read(&log, first.len() as u64, end).unwrap();
        assert_eq!(since.len(), 1);
    }

    #[test]
    fn an_empty_lock_file_is_a_new_registry() {
        let bytes = [0u8; HEADER_LEN];
        let header = Header::parse(&bytes, 0);
        assert_eq!(header.layout, Layout::Current);
        assert_eq!((header.generation, header.base, header.log_len), (0, 0, 0));
    }

    #[test]
    fn an_old_header_names_the_counters_slot_and_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("leases.lock"))
            .unwrap();
        lock.write_all_at(&5u64.to_le_bytes(), 0).unwrap();
        let header = Header::read(&lock).unwrap();
        assert_eq!(
            header,
            Header {
                generation: 5,
                base: 5,
                log_len: 0,
                layout: Layout::CounterOnly,
            }
        );
        let new = Header {
            generation: 6,
            base: 5,
            log_len: 120,
            layout: Layout::Current,
        };
        new.write(&lock).unwrap();
        assert_eq!(Header::read(&lock).unwrap(), new);
        assert_eq!(crate::fsutil::read_generation(&lock, 0), 6);
        // A counter-only build moves the counter alone: seen as such.
        lock.write_all_at(&7u64.to_le_bytes(), 0).unwrap();
        assert_eq!(Header::read(&lock).unwrap().layout, Layout::CounterOnly);
        // A log-layout build without the format word writes bytes 0-24.
        new.write(&lock).unwrap();
        let mut older = [0u8; 24];
        older[0..8].copy_from_slice(&7u64.to_le_bytes());
        older[8..16].copy_from_slice(&6u64.to_le_bytes());
        older[16..24].copy_from_slice(&180u64.to_le_bytes());
        lock.write_all_at(&older, 0).unwrap();
        let read = Header::read(&lock).unwrap();
        assert_eq!(
            (read.layout, read.base, read.log_len),
            (Layout::Current, 5, 180)
        );
        // A newer format is named.
        let mut newer = (FORMAT_MAGIC << 32 | 3).to_le_bytes();
        lock.write_all_at(&newer, 24).unwrap();
        assert_eq!(Header::read(&lock).unwrap().layout, Layout::Newer(3));
        newer = [0; 8];
        let _ = newer;
    }
}
