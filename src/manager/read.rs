//! Reading the state without copying it: lent to a function, as fresh as
//! `state()` makes it, or (for a caller that must not wait) not at all.

use super::{lock, Manager};
use crate::state::State;

impl Manager {
    /// What `state()` returns, lent to `f` instead of copied: the state as
    /// fresh as `state()` makes it (same check, same reclaim), with the view's
    /// own `current_port`, and this manager's active port (the `current_port`
    /// `state()` shows). `f` runs under the view's lock: keep it short.
    pub fn with_state<R>(&self, f: impl FnOnce(&State, Option<u16>) -> R) -> R {
        match self.local() {
            Ok(local) => {
                let (any_dead, unscanned) = {
                    let mut file = local.file.lock();
                    file.catch_up();
                    let any_dead = !self.is_stopped() && local.registry.any_dead(&file.holders);
                    (any_dead, file.unscanned.is_some())
                };
                if any_dead {
                    let reclaimed = local.registry.sweep_dead();
                    self.refresh(None, &reclaimed, true);
                } else if unscanned && !self.is_stopped() {
                    self.first_scan(local);
                }
                let mine = lock(&local.mine);
                let file = local.file.lock();
                f(&file.state, mine.active)
            }
            Err(_) => {
                let settings = crate::state::Settings {
                    port_range: [self.config.start, self.config.end],
                    json_path: self.config.json_path.to_string_lossy().into_owned(),
                    history_max: self.config.history_max,
                    service: self.config.service.clone(),
                };
                f(&State::fresh(settings, Default::default()), None)
            }
        }
    }

    /// `with_state` for a caller that must not wait (an event loop): `None`
    /// where it would wait for a lock, read what another process saved, take
    /// back a dead holder's port, or take the range's first scan (the caller
    /// then uses `with_state`).
    pub fn try_with_state<R>(&self, f: impl FnOnce(&State, Option<u16>) -> R) -> Option<R> {
        let local = self.local.current()?;
        let mine = match local.mine.try_lock() {
            Ok(mine) => mine,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let mut file = local.file.try_lock()?;
        if !file.is_current() || (file.unscanned.is_some() && !self.is_stopped()) {
            return None;
        }
        if !self.is_stopped() && local.registry.try_any_dead(&file.holders)? {
            return None;
        }
        Some(f(&file.state, mine.active))
    }
}
