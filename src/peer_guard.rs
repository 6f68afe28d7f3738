//! Which peers may talk to metald at all (spec §5.1). VMs run customers' code, and the dev
//! token scheme trusts whoever reaches the API, so every listener refuses connections from
//! the subnets of the networks metald puts VMs on. The subnets are learned from the engine
//! (`service::watch` sets them at every connect and re-list); the listeners only read them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// At most one warning per source address in this time.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Sources remembered for the warning limit; past it the oldest are forgotten.
const WARN_MEMORY: usize = 4096;

/// The subnets VMs live on, as last read from the engine.
#[derive(Debug, Default)]
pub struct PeerGuard {
    subnets: RwLock<Arc<Vec<IpNet>>>,
    warned: Mutex<HashMap<IpAddr, Instant>>,
}

impl PeerGuard {
    /// Replaces the known VM subnets; logs when they change.
    pub fn set_vm_subnets(&self, mut subnets: Vec<IpNet>) {
        subnets.sort();
        subnets.dedup();
        let mut current = match self.subnets.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if **current != subnets {
            let shown: Vec<String> = subnets.iter().map(ToString::to_string).collect();
            tracing::info!(subnets = %shown.join(","), "API closed to VM subnets");
            *current = Arc::new(subnets);
        }
    }

    pub fn vm_subnets(&self) -> Arc<Vec<IpNet>> {
        match self.subnets.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether a connection from `peer` comes from a VM network (IPv4-mapped IPv6 peers, as a
    /// dual-stack listener sees IPv4 clients, are read as IPv4).
    pub fn is_vm(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.vm_subnets().iter().any(|net| net.contains(&peer))
    }

    /// Whether a refusal of `peer` should be logged now: once per source per minute, so a VM
    /// hammering the port cannot flood the log.
    pub fn should_warn(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let mut warned = match self.warned.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if warned
            .get(&peer)
            .is_some_and(|at| now.duration_since(*at) < WARN_EVERY)
        {
            return false;
        }
        if warned.len() >= WARN_MEMORY {
            warned.retain(|_, at| now.duration_since(*at) < WARN_EVERY);
            if warned.len() >= WARN_MEMORY {
                // Every remembered source warned within the minute: stay quiet rather than
                // grow without end.
                return false;
            }
        }
        warned.insert(peer, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_subnets_refuse_their_peers_only() {
        let guard = PeerGuard::default();
        assert!(!guard.is_vm("172.18.0.2".parse().unwrap()));
        guard.set_vm_subnets(vec![
            "172.18.0.0/16".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ]);
        assert!(guard.is_vm("172.18.0.2".parse().unwrap()));
        assert!(guard.is_vm("::ffff:172.18.3.4".parse().unwrap()));
        assert!(guard.is_vm("fd00::5".parse().unwrap()));
        assert!(!guard.is_vm("127.0.0.1".parse().unwrap()));
        assert!(!guard.is_vm("172.17.0.1".parse().unwrap()));
    }

    #[test]
    fn warns_once_per_source_per_minute() {
        let guard = PeerGuard::default();
        let a: IpAddr = "172.18.0.2".parse().unwrap();
        let b: IpAddr = "172.18.0.3".parse().unwrap();
        assert!(guard.should_warn(a));
        assert!(!guard.should_warn(a));
        assert!(guard.should_warn(b));
    }
}
