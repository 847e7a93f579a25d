//! What the state shows, computed without I/O: the leases a registry
//! transaction finds in the range and whose they are, the free, used and
//! skipped lists, a saved state adopted, the state before anything is read.
//! Shared by the file view (`shared/`) and inspection (`inspect.rs`).

use std::cell::RefCell;
use std::ops::RangeInclusive;
use std::path::Path;

use crate::config::Config;
use crate::lease::Holder;
use crate::lease::{note_holder, Lease, LeaseTable};
use crate::names::printable;
use crate::port_set::{words_of, PortSet};
use crate::state::{LeaseList, LeaseView, Options, Settings, State};

/// What every lease taken through the state file `path` has as its owner's
/// start: the path, with bytes that are not UTF-8 escaped (two files whose
/// names differ only there must not count each other's leases as theirs).
pub(crate) fn owner_prefix(path: &Path) -> String {
    format!("{}#", printable(path.as_os_str()))
}

/// The state before anything is read: this configuration's settings and options.
pub(crate) fn initial_state(config: &Config, registry_dir: &Path) -> State {
    let settings = Settings {
        port_range: [config.start, config.end],
        json_path: config.json_path.to_string_lossy().into_owned(),
        history_max: config.history_max,
        service: config.service.clone(),
    };
    let options = Options {
        refresh_interval: config.refresh_interval.as_secs_f64(),
        backup_max: config.backup_max,
        durable: config.durable,
        registry_dir: registry_dir.to_string_lossy().into_owned(),
    };
    State::fresh(settings, options)
}

/// Takes another manager's saved state as ours, keeping our own settings.
pub(crate) fn adopt(state: &mut State, mut disk: State) {
    disk.settings = state.settings.clone();
    disk.options = state.options.clone();
    disk.schema_version = state.schema_version;
    disk.trim_history();
    disk.leases = std::mem::take(&mut disk.leases).reusing(&state.leases);
    *state = disk;
}

/// What one registry transaction tells the state: the ports leased in the
/// range (by anyone) and the leases taken through this state file.
#[derive(Clone)]
pub struct Leased {
    pub ports: PortSet,
    pub mine: LeaseList,
    /// The processes holding leases in the range, each with its lowest port
    /// there: what a pick checks for dead holders without another pass.
    pub holders: Vec<(Holder, u16)>,
}

pub(crate) fn leased_in(table: &LeaseTable, range: &RangeInclusive<u16>, prefix: &str) -> Leased {
    let mut ports = PortSet::default();
    let mut owned = Vec::new();
    let mut holders: Vec<(Holder, u16)> = Vec::new();
    for lease in table.iter().filter(|l| range.contains(&l.port)) {
        ports.insert(lease.port);
        if owned_through(&lease.owner, prefix) {
            owned.push(lease);
        }
        note_holder(&mut holders, lease.holder(), lease.port);
    }
    Leased {
        ports,
        mine: views_of(owned, prefix),
        holders,
    }
}

thread_local! {
    /// The lease lists this thread showed last, with the prefix of their
    /// state file, newest first (see `views_of`).
    static SHOWN: RefCell<Vec<(String, LeaseList)>> = const { RefCell::new(Vec::new()) };
}

/// State files whose last lease list a thread keeps.
const SHOWN_KEPT: usize = 4;

/// The views of `owned` (the leases through the state file of `prefix`),
/// lowest port first. From one transaction to the next a lease or two
/// changes: the views this thread made last for the file are reused for the
/// leases they show (and the whole list when it is the same), so thousands
/// of leases are not copied again at each pick.
fn views_of(mut owned: Vec<&Lease>, prefix: &str) -> LeaseList {
    owned.sort_unstable_by_key(|l| l.port);
    let kept = |shown: &Vec<(String, LeaseList)>| {
        let i = shown.iter().position(|(p, _)| p == prefix)?;
        Some(shown[i].1.clone())
    };
    let last = SHOWN
        .with(|shown| shown.try_borrow().ok().and_then(|s| kept(&s)))
        .unwrap_or_default();
    let mut before = last.iter().peekable();
    let mut views = Vec::with_capacity(owned.len());
    for lease in owned {
        while before.next_if(|v| v.port < lease.port).is_some() {}
        views.push(match before.next_if(|v| v.shows(lease)) {
            Some(view) => view.clone(),
            None => LeaseView::of(lease),
        });
    }
    drop(before);
    let list = LeaseList::from(views).reusing(&last);
    if list.same(&last) {
        return last;
    }
    SHOWN.with(|shown| {
        if let Ok(mut shown) = shown.try_borrow_mut() {
            shown.retain(|(p, _)| p != prefix);
            shown.truncate(SHOWN_KEPT - 1);
            shown.insert(0, (prefix.to_string(), list.clone()));
        }
    });
    list
}

/// Is `owner` a lease taken through the state file whose owners start with
/// `prefix` (`<state file>#`)? The byte where the prefix's `#` would stand is
/// looked at first: in a registry of thousands of leases through other state
/// files, nearly all differ there, and a full compare of each long path was
/// a tenth of a pick. The rest after the prefix (`<pid>.<instance>` or
/// `pid`) never holds a `#`: that tells `a.json#x.json#12.1` (a lease through
/// the file `a.json#x.json`) from a lease through `a.json`, with the owners
/// every earlier build wrote.
pub(crate) fn owned_through(owner: &str, prefix: &str) -> bool {
    let (owner, prefix) = (owner.as_bytes(), prefix.as_bytes());
    owner.len() >= prefix.len()
        && prefix
            .last()
            .is_none_or(|last| owner[prefix.len() - 1] == *last)
        && owner.starts_with(prefix)
        && !owner[prefix.len()..].contains(&b'#')
}

/// used = leased or bound; skipped = the rest that is never handed out;
/// free = what a pick would hand out. Worked 64 ports at a time on the sets'
/// bits (a 6,001-port range is 95 words, not 18,000 look-ups).
pub(crate) fn recompute_lists(
    state: &mut State,
    range: RangeInclusive<u16>,
    leased: &PortSet,
    bound: &PortSet,
    skipped: &PortSet,
) {
    state.free_ports.clear();
    state.used_ports.clear();
    state.skipped_ports.clear();
    for (start, inside) in words_of(&range) {
        let used = (leased.word(start) | bound.word(start)) & inside;
        let never = skipped.word(start) & inside & !used;
        state.used_ports.add_word(start, used);
        state.skipped_ports.add_word(start, never);
        state.free_ports.add_word(start, inside & !used & !never);
    }
}

#[cfg(test)]
mod tests {
    use super::owned_through;

    #[test]
    fn an_owner_belongs_to_one_state_file_whatever_its_name_holds() {
        // `a.json#x.json` is a file name of its own, not `a.json`'s lease.
        assert!(owned_through("/d/a.json#12.1", "/d/a.json#"));
        assert!(owned_through("/d/a.json#pid", "/d/a.json#"));
        assert!(!owned_through("/d/a.json#x.json#12.1", "/d/a.json#"));
        assert!(owned_through("/d/a.json#x.json#12.1", "/d/a.json#x.json#"));
        assert!(!owned_through("/d/a.json#12.1", "/d/a.json#x.json#"));
    }

    #[test]
    fn the_lists_split_the_range_port_by_port() {
        use super::recompute_lists;
        use crate::scan::PortSet;
        use crate::state::{Options, Settings, State};
        let settings = Settings {
            port_range: [0, 0],
            json_path: String::new(),
            history_max: 1,
            service: String::new(),
        };
        let leased: PortSet = [63, 64, 200, 65535].into_iter().collect();
        let bound: PortSet = [64, 130, 65534].into_iter().collect();
        let skipped: PortSet = [65, 130, 131, 65533].into_iter().collect();
        for range in [60..=200, 0..=65535, 64..=64, 127..=129, 65530..=65535] {
            let mut state = State::fresh(settings.clone(), Options::default());
            recompute_lists(&mut state, range.clone(), &leased, &bound, &skipped);
            let mut used = Vec::new();
            let mut never = Vec::new();
            let mut free = Vec::new();
            for port in range {
                if leased.contains(port) || bound.contains(port) {
                    used.push(port);
                } else if skipped.contains(port) {
                    never.push(port);
                } else {
                    free.push(port);
                }
            }
            assert_eq!(state.used_ports.iter().collect::<Vec<_>>(), used);
            assert_eq!(state.skipped_ports.iter().collect::<Vec<_>>(), never);
            assert_eq!(state.free_ports.iter().collect::<Vec<_>>(), free);
            assert_eq!(state.free_ports.len(), free.len());
        }
    }

    #[test]
    fn owners_are_matched_by_their_whole_prefix() {
        let prefix = "/srv/state/s.json#";
        assert!(owned_through("/srv/state/s.json#41.1", prefix));
        assert!(owned_through("/srv/state/s.json#pid", prefix));
        assert!(!owned_through("/srv/state/f12.json#41.1", prefix));
        assert!(!owned_through("/srv/state/t.json#41.1", prefix));
        assert!(!owned_through("/srv/state/s.json", prefix));
        assert!(!owned_through("/srv/other/s.json#41.1", prefix));
    }
}
