//! Host grants: the single-use tokens that make a save through the guest agent
//! host-owned. `ctl snapshot-process` grants one and sends it to the agent; the agent
//! passes it back with its save, and the snapshot service takes it. Unguessable
//! (random), so a guest cannot make a snapshot host-owned on its own (it would then
//! escape guest quotas and guest deletion).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// Host-requested process snapshots in flight: token -> snapshot name.
#[derive(Debug, Default)]
pub struct HostGrants(Mutex<BTreeMap<u64, String>>);

impl HostGrants {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allow one save named `name` through the agent to be host-owned; returns the
    /// single-use token to send the agent.
    pub fn grant(&self, name: &str) -> u64 {
        let mut grants = self.lock();
        loop {
            let mut b = [0u8; 8];
            // SAFETY: b is valid for 8 bytes of writes.
            let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
            let token = if n == 8 {
                u64::from_le_bytes(b)
            } else {
                // getrandom cannot fail for 8 bytes once the pool is seeded; fall back
                // to the clock mixed with the address space layout rather than abort.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                t ^ (&b as *const _ as u64).rotate_left(32)
            };
            if token != 0 && !grants.contains_key(&token) {
                grants.insert(token, name.to_string());
                return token;
            }
        }
    }

    /// Use the grant `token` for a save named `name`: true (and the grant is gone)
    /// when it was granted for that name.
    pub fn take(&self, token: u64, name: &str) -> bool {
        let mut grants = self.lock();
        match grants.get(&token) {
            Some(n) if n == name => {
                grants.remove(&token);
                true
            }
            _ => false,
        }
    }

    /// Forget a grant (its request is over, used or not).
    pub fn revoke(&self, token: u64) {
        self.lock().remove(&token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_single_use_and_bound_to_its_name() {
        let g = HostGrants::default();
        let t = g.grant("s");
        assert_ne!(t, 0);
        assert!(!g.take(t, "other"), "another name does not use it");
        assert!(!g.take(t ^ 1, "s"), "another token does not use it");
        assert!(g.take(t, "s"));
        assert!(!g.take(t, "s"), "used once");
        let t = g.grant("s");
        g.revoke(t);
        assert!(!g.take(t, "s"), "revoked");
    }
}
