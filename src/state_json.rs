//! The state as JSON text, serialized once per distinct state.
//!
//! An HTTP server answering `GET /port/state` many times a second mostly
//! finds the state as it was: the cache keeps the last state it serialized
//! beside its text and answers with that text while the state (as fresh as
//! `Manager::state` makes it) compares equal. The comparison is against the
//! state itself, not a change counter, so no path that changes the state can
//! forget to invalidate it: any difference, in any field, re-serializes.

use std::sync::{Arc, Mutex};

use crate::manager::Manager;
use crate::state::State;

/// One manager's last serialized state.
#[derive(Default)]
pub struct StateJson {
    last: Mutex<Option<Cached>>,
}

struct Cached {
    /// The view's state as it was serialized (its own `current_port`).
    state: State,
    /// The manager's active port then (the `current_port` in `text`).
    active: Option<u16>,
    text: Arc<[u8]>,
}

impl StateJson {
    /// The state of `manager` as compact JSON, exactly `serde_json::to_string`
    /// of `manager.state()`; the same `Arc` as last time while nothing changed.
    pub fn get(&self, manager: &Manager) -> serde_json::Result<Arc<[u8]>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // Compared under the view's lock; copied out only when it changed.
        let fresh = manager.with_state(|state, active| match &*last {
            Some(c) if c.active == active && c.state == *state => Ok(c.text.clone()),
            _ => Err(Box::new((state.clone(), active))),
        });
        let (mut state, active) = match fresh {
            Ok(text) => return Ok(text),
            Err(copy) => *copy,
        };
        let own = std::mem::replace(&mut state.current_port, active);
        let text: Arc<[u8]> = serde_json::to_vec(&state)?.into();
        state.current_port = own;
        *last = Some(Cached {
            state,
            active,
            text: text.clone(),
        });
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;

    fn manager(dir: &std::path::Path) -> Arc<Manager> {
        let config = Args {
            start: 24200,
            end: 24210,
            json_path: dir.join("s.json"),
            refresh_interval: 3600.0,
            registry_dir: Some(dir.join("registry")),
            console_log: crate::events::ConsoleLog::Off,
            ..Args::default()
        }
        .check()
        .unwrap();
        Manager::new(config).unwrap()
    }

    #[test]
    fn the_text_is_the_states_and_made_again_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let cache = StateJson::default();
        let first = cache.get(&m).unwrap();
        assert_eq!(*first, *serde_json::to_vec(&m.state()).unwrap());
        assert!(Arc::ptr_eq(&first, &cache.get(&m).unwrap()));
        let port = m.pick_port(None).unwrap();
        let picked = cache.get(&m).unwrap();
        assert_eq!(*picked, *serde_json::to_vec(&m.state()).unwrap());
        assert!(std::str::from_utf8(&picked)
            .unwrap()
            .contains(&format!("\"current_port\":{port}")));
        m.release_port().unwrap();
        assert!(!Arc::ptr_eq(&picked, &cache.get(&m).unwrap()));
    }
}
