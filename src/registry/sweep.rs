//! Leases of holders that are gone: checked for on a read, swept by the
//! refresher, and this process's own given back at exit.

use std::io;

use crate::error::{Error, Result};
use crate::holder::Holder;

use super::{lock, Lease, LeaseTable, Make, Registry};

impl Registry {
    /// Is any of `holders` known to be gone (positive evidence only, the same
    /// check a pick makes)? For a read that must not report a dead holder's
    /// port as used. One `poll` of a cached pidfd per holder.
    pub fn any_dead(&self, holders: &[(Holder, u16)]) -> bool {
        if holders.is_empty() {
            return false;
        }
        let mut inner = lock(&self.inner);
        holders.iter().any(|(h, _)| inner.alive.is_dead(*h))
    }

    /// `any_dead` for a caller that must not wait: None while another thread
    /// holds the registry (in a transaction).
    pub fn try_any_dead(&self, holders: &[(Holder, u16)]) -> Option<bool> {
        if holders.is_empty() {
            return Some(false);
        }
        let mut inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(holders.iter().any(|(h, _)| inner.alive.is_dead(*h)))
    }

    /// Removes dead holders' leases from the whole registry (the refresher's
    /// sweep), returning them.
    pub fn sweep_dead(&self) -> Vec<Lease> {
        self.transact_seeing(LeaseTable::remove_dead)
            .unwrap_or_default()
    }

    /// Removes every lease `holder` (this process) has, waiting at most `wait`
    /// for the locks (interpreter exit: the process is going, and its ports
    /// with it; a busy thread must not hold the exit up).
    pub fn release_process(&self, holder: Holder, wait: std::time::Duration) -> Result<usize> {
        let deadline = std::time::Instant::now() + wait;
        let mut inner = loop {
            match self.inner.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::registry(
                            &self.dir,
                            io::Error::new(io::ErrorKind::TimedOut, "busy at exit"),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        crate::fsutil::with_wait_cap(left, || {
            self.transact_in(&mut inner, Make::No, |t, _| {
                t.remove_where(|l| l.holder() == holder).len()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holder::Holder;
    use crate::registry::tests::lease;

    /// A holder whose process has exited.
    fn dead_holder() -> Holder {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        Holder { pid, start_time: 1 }
    }

    #[test]
    fn giving_back_leases_never_makes_a_deleted_registry_folder_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reg");
        let reg = Registry::open(&dir).unwrap();
        reg.transact(|t| t.insert(lease(3000, Holder::current(), "a")))
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let removed = reg
            .transact_removing(|t| t.remove_where(|l| l.port == 3000).len())
            .unwrap();
        assert_eq!(removed, 0);
        reg.release_process(Holder::current(), std::time::Duration::from_secs(1))
            .unwrap();
        assert!(!dir.exists(), "made again only to be empty");
        // Taking a lease makes it again, as ever.
        reg.transact(|t| t.insert(lease(3001, Holder::current(), "a")))
            .unwrap();
        assert!(dir.join("leases.lock").exists());
    }

    #[test]
    fn dead_holders_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let dead = dead_holder();
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
        })
        .unwrap();
        let removed = reg.transact_seeing(|t, seen| t.remove_dead(seen)).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].port, 3000);
        let left = reg.snapshot().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].port, 3001);
    }

    #[test]
    fn dead_holders_below_a_port_are_reclaimed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::create(dir.path()).unwrap();
        let dead = dead_holder();
        reg.transact(|t| {
            t.insert(lease(3000, dead, "gone"));
            t.insert(lease(3001, Holder::current(), "me"));
            t.insert(lease(3005, dead, "gone"));
        })
        .unwrap();
        let range = 3000..=3010;
        let removed = reg
            .transact_seeing(|t, seen| {
                let holders = crate::shared::leased_in(t, &range, "me#").holders;
                t.remove_dead_among(&range, Some(3002), &holders, seen)
            })
            .unwrap();
        assert_eq!(removed.iter().map(|l| l.port).collect::<Vec<_>>(), [3000]);
        let mut left: Vec<u16> = reg.snapshot().unwrap().iter().map(|l| l.port).collect();
        left.sort();
        assert_eq!(left, [3001, 3005]);
    }
}
