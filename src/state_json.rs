//! The state as JSON text, serialized once per distinct state.
//!
//! An HTTP server answering `GET /port/state` many times a second mostly
//! finds the state as it was: the cache keeps the last state it serialized
//! beside its text and answers with that text while the state compares
//! equal. The comparison is against the state itself, not a change counter,
//! so no path that changes the state can forget to invalidate it: any
//! difference, in any field, re-serializes.

use std::sync::{Arc, Mutex};

use crate::state::State;

/// One manager's last serialized state (boxed: a manager that is never
/// asked for its JSON, most of them, keeps one pointer, not a whole state).
#[derive(Default)]
pub struct StateJson {
    last: Mutex<Option<Box<Cached>>>,
}

struct Cached {
    /// The state as it was serialized (its own `current_port`).
    state: State,
    /// The `current_port` written in `text` in its place.
    shown_port: Option<u16>,
    text: Arc<[u8]>,
}

/// What the cache made of the state it was lent.
pub enum Seen {
    Same(Arc<[u8]>),
    /// A copy of the state and the port to show, to serialize outside the lender's lock.
    Changed(Box<(State, Option<u16>)>),
}

/// Lends the state to the function it is given, with the port to show as
/// its `current_port` (as `Manager::with_state` does), and returns its answer.
pub type Lend<'a> = dyn FnMut(&State, Option<u16>) -> Seen + 'a;

impl StateJson {
    /// The state `lend` shows, as compact JSON (`serde_json::to_vec` of the
    /// state with `current_port` replaced): the same `Arc` as last time while
    /// the state is the same. The state is only compared while lent (under
    /// the lender's lock), and copied out only when it changed.
    pub fn text(&self, lend: impl FnOnce(&mut Lend<'_>) -> Seen) -> serde_json::Result<Arc<[u8]>> {
        self.finish(lend(&mut |state, shown_port| self.look(state, shown_port)))
    }

    /// `text` with a lender that may decline (`None`: it would have to wait).
    pub fn try_text(
        &self,
        lend: impl FnOnce(&mut Lend<'_>) -> Option<Seen>,
    ) -> Option<serde_json::Result<Arc<[u8]>>> {
        lend(&mut |state, shown_port| self.look(state, shown_port)).map(|seen| self.finish(seen))
    }

    fn finish(&self, seen: Seen) -> serde_json::Result<Arc<[u8]>> {
        let changed = match seen {
            Seen::Same(text) => return Ok(text),
            Seen::Changed(copy) => copy,
        };
        let (mut state, shown_port) = *changed;
        let own = std::mem::replace(&mut state.current_port, shown_port);
        let text: Arc<[u8]> = serde_json::to_vec(&state)?.into();
        state.current_port = own;
        // Another thread may have stored a text meanwhile: either is right
        // for the state it was made of.
        *self.lock() = Some(Box::new(Cached {
            state,
            shown_port,
            text: text.clone(),
        }));
        Ok(text)
    }

    fn look(&self, state: &State, shown_port: Option<u16>) -> Seen {
        match &*self.lock() {
            Some(c) if c.shown_port == shown_port && c.state == *state => {
                Seen::Same(c.text.clone())
            }
            _ => Seen::Changed(Box::new((state.clone(), shown_port))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Cached>>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use crate::manager::Manager;
    use crate::state::Settings;

    fn state() -> State {
        let settings = Settings {
            port_range: [3000, 3010],
            json_path: "s.json".into(),
            history_max: 5,
            service: "s".into(),
        };
        State::fresh(settings, Default::default())
    }

    #[test]
    fn the_text_is_made_again_for_any_difference_only() {
        let cache = StateJson::default();
        let mut s = state();
        let text = |s: &State, port| cache.text(|f| f(s, port)).unwrap();
        let first = text(&s, None);
        assert_eq!(*first, *serde_json::to_vec(&s).unwrap());
        assert!(Arc::ptr_eq(&first, &text(&s, None)));
        // The port shown is part of the text.
        let shown = text(&s, Some(3001));
        assert!(std::str::from_utf8(&shown)
            .unwrap()
            .starts_with("{\"current_port\":3001,"));
        // Any field, however deep.
        s.stats.errors += 1;
        let counted = text(&s, Some(3001));
        assert!(!Arc::ptr_eq(&shown, &counted));
        s.settings.service.push('x');
        assert!(!Arc::ptr_eq(&counted, &text(&s, Some(3001))));
    }

    #[test]
    fn a_managers_text_follows_its_picks() {
        let dir = tempfile::tempdir().unwrap();
        let config = Args {
            start: 24200,
            end: 24210,
            json_path: dir.path().join("s.json"),
            refresh_interval: 3600.0,
            registry_dir: Some(dir.path().join("registry")),
            console_log: crate::events::ConsoleLog::Off,
            ..Args::default()
        }
        .check()
        .unwrap();
        let m = Manager::new(config).unwrap();
        let cache = StateJson::default();
        let text = || cache.text(|f| m.with_state(f)).unwrap();
        let first = text();
        assert_eq!(*first, *serde_json::to_vec(&m.state()).unwrap());
        assert!(Arc::ptr_eq(&first, &text()));
        m.pick_port(None).unwrap();
        let picked = text();
        assert_eq!(*picked, *serde_json::to_vec(&m.state()).unwrap());
        m.release_port().unwrap();
        let released = text();
        assert!(!Arc::ptr_eq(&picked, &released));
        // Nothing to wait for here: the same text without waiting.
        let now = cache.try_text(|f| m.try_with_state(f)).unwrap().unwrap();
        assert!(Arc::ptr_eq(&released, &now));
    }
}
