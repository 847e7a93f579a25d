//! Ports that are free but should not be handed out, or only with a warning:
//! those web browsers refuse to connect to, and the kernel's ephemeral range.

use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::port_set::PortSet;
use crate::sys::PerProcess;

/// The Fetch standard's "bad ports", which Chromium (`net/base/port_util.cc`)
/// and Firefox (`nsIOService.cpp`) refuse with ERR_UNSAFE_PORT: a service on
/// one of them cannot be opened in a browser. Mostly well-known service ports;
/// in 3000-9000: 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665-6669, 6679, 6697.
pub const BROWSER_UNSAFE: [u16; 81] = [
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102,
    103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465,
    512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993,
    995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668,
    6669, 6697, 10080,
];

/// The browser-unsafe ports (plus 6679, an IRC+TLS port Chromium also blocks).
pub fn browser_unsafe() -> PortSet {
    BROWSER_UNSAFE.iter().copied().chain([6679]).collect()
}

/// How the range meets the kernel's ephemeral (local) port range, less the
/// ports reserved from it: any outgoing connection may take such a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralOverlap {
    /// `net.ipv4.ip_local_port_range`.
    pub ephemeral: [u16; 2],
    /// The range's ports inside it and not reserved.
    pub first: u16,
    pub last: u16,
    pub count: usize,
}

/// Reads `/proc/sys/net/ipv4/ip_local_port_range` and `ip_local_reserved_ports`.
/// `None` when they cannot be read or the range does not overlap.
/// The two files are read (and parsed) at most once a second per process: a
/// thousand managers started at once need not read them a thousand times.
pub fn ephemeral_overlap(range: RangeInclusive<u16>) -> Option<EphemeralOverlap> {
    type Sysctls = Mutex<Option<(Instant, Option<[u16; 2]>, PortSet)>>;
    static READ: PerProcess<Sysctls> = PerProcess::new();
    let mut read = READ
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if read
        .as_ref()
        .is_none_or(|(at, ..)| at.elapsed() >= Duration::from_secs(1))
    {
        let local = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| parse_local_range(&text));
        let reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .unwrap_or_default();
        *read = Some((Instant::now(), local, parse_port_list(&reserved)));
    }
    let (_, local, reserved) = read.as_ref().expect("just read");
    overlap(range, (*local)?, reserved)
}

/// `32768\t60999` (the sysctl's format) as its two bounds.
fn parse_local_range(text: &str) -> Option<[u16; 2]> {
    let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>());
    Some([bounds.next()?.ok()?, bounds.next()?.ok()?])
}

/// The ports of `range` inside `[low, high]` and not reserved: found from the
/// ends of the intersection, counted with the reserved ones taken off (a walk
/// of the reserved ports, usually none, not of every port of the range).
fn overlap(
    range: RangeInclusive<u16>,
    [low, high]: [u16; 2],
    reserved: &PortSet,
) -> Option<EphemeralOverlap> {
    let (lo, hi) = ((*range.start()).max(low), (*range.end()).min(high));
    if lo > hi {
        return None;
    }
    let first = (lo..=hi).find(|p| !reserved.contains(*p))?;
    let last = (lo..=hi).rev().find(|p| !reserved.contains(*p))?;
    let taken = reserved
        .iter()
        .filter(|p| (first..=last).contains(p))
        .count();
    let count = usize::from(last - first) + 1 - taken;
    Some(EphemeralOverlap {
        ephemeral: [low, high],
        first,
        last,
        count,
    })
}

/// `1000,2000-2010` (the sysctl's format) as a set.
fn parse_port_list(text: &str) -> PortSet {
    let mut set = PortSet::default();
    for item in text.trim().split(',').filter(|s| !s.is_empty()) {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            for port in a..=b {
                set.insert(port);
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_list_holds_the_ports_named_in_the_range_people_use() {
        let unsafe_ports = browser_unsafe();
        let in_range: Vec<u16> = (3000..=9000)
            .filter(|p| unsafe_ports.contains(*p))
            .collect();
        assert_eq!(
            in_range,
            [3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697]
        );
    }

    #[test]
    fn overlap_leaves_out_reserved_ports() {
        let local = parse_local_range("32768\t60999\n").unwrap();
        let reserved = parse_port_list("32768-32800,32999\n");
        let o = overlap(32000..=33000, local, &reserved).unwrap();
        assert_eq!(o.ephemeral, [32768, 60999]);
        assert_eq!((o.first, o.last), (32801, 33000));
        assert_eq!(o.count, 33000 - 32801 + 1 - 1);
        let none = PortSet::default();
        assert_eq!(
            overlap(
                3000..=9000,
                parse_local_range("32768 60999").unwrap(),
                &none
            ),
            None
        );
    }

    #[test]
    fn overlap_counts_as_a_walk_of_every_port_would() {
        let local = [32768, 60999];
        let reserved = parse_port_list("30000-32770,33000,33005-33010,40000,60990-61010");
        let ranges = [
            (30000, 36000),
            (32768, 32768),
            (32771, 32771),
            (60999, 65535),
            (1, 32767),
            (60980, 60999),
            (32000, 32770),
        ];
        for (start, end) in ranges {
            let walked: Vec<u16> = (start..=end)
                .filter(|p| (local[0]..=local[1]).contains(p) && !reserved.contains(*p))
                .collect();
            let expected = walked.first().map(|&first| EphemeralOverlap {
                ephemeral: local,
                first,
                last: *walked.last().unwrap(),
                count: walked.len(),
            });
            assert_eq!(
                overlap(start..=end, local, &reserved),
                expected,
                "{start}-{end}"
            );
        }
    }
}
