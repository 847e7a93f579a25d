//! Which registries this build uses. The lock file's header (see
//! `lease_log::Header`) says who wrote last: a newer format is refused, and
//! the layout before the change log is taken over only once none of its
//! writers is alive (it would not see this build's leases).

use std::io;

use crate::error::{Error, Result};
use crate::lease_log::{Header, Layout, FORMAT};

use super::table::{Cached, Loaded};
use super::{AliveCache, Registry};

impl Registry {
    /// The error for a registry this build must not use (another format).
    fn refusal(&self, why: String) -> Error {
        Error::registry(
            &self.dir,
            io::Error::new(io::ErrorKind::Unsupported, format!("not used: {why}")),
        )
    }

    /// Refuses a registry a newer build wrote (its leases cannot be read).
    pub(super) fn refuse_newer(&self, header: Header) -> Result<()> {
        if let Layout::Newer(format) = header.layout {
            return Err(self.refusal(format!(
                "it was written by a newer dynamic-port-manager (registry format {format}; this \
                 build reads format {FORMAT}), whose leases this build cannot read. Upgrade this \
                 service to the same version, or give it a registry of its own (DPM_REGISTRY_DIR)"
            )));
        }
        Ok(())
    }

    /// For a registry in the layout before the change log: refused while a
    /// holder of that older build is alive, else moved to this layout (the
    /// table is written back whole).
    pub(super) fn adopt_counter_only(
        &self,
        loaded: &mut Loaded,
        alive: &mut AliveCache,
        cache: &mut Option<Cached>,
    ) -> Result<()> {
        // An older build (no change log) writes here, or wrote last.
        // Its live holders' leases are in a table that build alone keeps
        // up to date: sharing the registry would hand out ports twice.
        let mut live: Vec<u32> = loaded
            .leases
            .iter()
            .filter(|l| !alive.is_dead(l.holder()))
            .map(|l| l.pid)
            .collect();
        let _ = alive.take_unknown();
        live.sort_unstable();
        live.dedup();
        if !live.is_empty() {
            *cache = None;
            return Err(self.refusal(format!(
                "it is in use by an older dynamic-port-manager (the registry layout without \
                 a format version or change log; live holders: pid {}), which would not see \
                 this build's leases. Stop or upgrade those services first, or give this one \
                 a registry of its own (DPM_REGISTRY_DIR)",
                live.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // Nobody of the older build is left: the table moves to this layout.
        loaded.repaired = true;
        Ok(())
    }
}
