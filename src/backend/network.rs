//! The network VMs live on (spec §5, §5.1): metald makes its own when missing, a bridge on
//! which containers cannot reach each other, and reads its subnets for the listeners' guard.
//!
//! The engine here (20.10) checks duplicate names only when asked (`CheckDuplicate`), and not
//! atomically even then: several metald starting at once can each make one. So after any
//! create, or whenever the name is ambiguous, the same-named networks are settled on one (the
//! oldest, which every instance agrees on) and the other ones metald made are removed.

use std::collections::HashMap;
use std::time::SystemTime;

use bollard::models::{Ipam, NetworkCreateRequest};
use bollard::query_parameters::{InspectNetworkOptions, ListNetworksOptions};
use ipnet::IpNet;

use super::convert::parse_time;
use super::{DockerBackend, Error, ErrorKind};

/// Marks a network metald made.
pub const NETWORK_CREATED_BY: &str = "unkey.network.created_by";
/// Docker's bridge option for inter-container traffic.
const ENABLE_ICC: &str = "com.docker.network.bridge.enable_icc";

/// The VM network as the engine has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetwork {
    pub name: String,
    pub id: String,
    /// Made by this very call.
    pub created: bool,
    /// Labelled as made by metald.
    pub ours: bool,
    /// A bridge with inter-container traffic off: VMs cannot reach each other on it.
    pub isolated: bool,
    /// Every IPv4 and IPv6 subnet of the network, and of any duplicate of its name that is
    /// still there (the guard must refuse every VM).
    pub subnets: Vec<IpNet>,
}

/// One network of the configured name, read.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    created: Option<SystemTime>,
    ours: bool,
    isolated: bool,
    subnets: Vec<IpNet>,
}

impl DockerBackend {
    /// Makes sure the configured network exists (creating metald's own when it does not) and
    /// reads it.
    #[tracing::instrument(name = "docker.network", level = "info", skip_all, fields(otel.kind = "client", network = %self.settings().network))]
    pub async fn ensure_network(&self) -> Result<VmNetwork, Error> {
        let name = self.settings().network.clone();
        let docker = self.docker()?;
        match docker
            .inspect_network(&name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) => {
                let seen = Seen {
                    id: n.id.unwrap_or_default(),
                    created: n.created.as_deref().and_then(|t| parse_time(Some(t))),
                    ours: is_ours(n.labels.as_ref()),
                    isolated: is_isolated(n.driver.as_deref(), n.options.as_ref()),
                    subnets: subnets_of(n.ipam.as_ref()),
                };
                return Ok(network_of(&name, &seen, false, seen.subnets.clone()));
            }
            Err(e) => {
                let err = Error::new("inspect network", &name, &e);
                let ambiguous = matches!(&err.kind, ErrorKind::Rejected { message, .. } if message.contains("ambiguous"));
                if !err.is_not_found() && !ambiguous {
                    return Err(err);
                }
                if ambiguous {
                    return self.settle(&name, None).await;
                }
            }
        }
        let made = self.create_network(&name).await?;
        self.settle(&name, made.as_deref()).await
    }

    /// Creates metald's network; `Some(id)` when this call made it, `None` when another
    /// creator got there first (a 409).
    async fn create_network(&self, name: &str) -> Result<Option<String>, Error> {
        let body = serde_json::json!({
            "Name": name,
            "CheckDuplicate": true,
            "Driver": "bridge",
            "Labels": { NETWORK_CREATED_BY: super::labels::CREATED_BY_VALUE },
            "Options": { ENABLE_ICC: "false" },
        });
        // bollard's request type (API 1.53) no longer has CheckDuplicate, which API 1.41
        // engines need to refuse a second network of the same name: this one request's body
        // is sent as written here.
        let bytes = bytes::Bytes::from(body.to_string());
        let docker = self.docker()?.with_request_modifier(move |request| {
            let (parts, _) = request.into_parts();
            http::Request::from_parts(parts, bollard::body_full(bytes.clone()))
        });
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(created) => Ok(Some(created.id)),
            Err(e) => {
                let err = Error::new("create network", name, &e);
                match err.kind {
                    ErrorKind::Conflict(_) => Ok(None),
                    _ => Err(err),
                }
            }
        }
    }

    /// Reads every network of that name; with several, keeps the oldest and removes the others
    /// that metald made.
    async fn settle(&self, name: &str, made: Option<&str>) -> Result<VmNetwork, Error> {
        let docker = self.docker()?;
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("name".to_owned(), vec![name.to_owned()])])),
        };
        let listed = docker
            .list_networks(Some(options))
            .await
            .map_err(|e| Error::new("list networks", name, &e))?;
        let mut seen: Vec<Seen> = listed
            .into_iter()
            // The name filter matches parts of names too.
            .filter(|n| n.name.as_deref() == Some(name))
            .map(|n| Seen {
                id: n.id.unwrap_or_default(),
                created: n.created.as_deref().and_then(|t| parse_time(Some(t))),
                ours: is_ours(n.labels.as_ref()),
                isolated: is_isolated(n.driver.as_deref(), n.options.as_ref()),
                subnets: subnets_of(n.ipam.as_ref()),
            })
            .collect();
        let Some(winner) = oldest(&seen) else {
            return Err(Error {
                op: "inspect network",
                target: name.to_owned(),
                kind: ErrorKind::NotFound(format!("network {name} vanished after its create")),
            });
        };
        let winner = seen.swap_remove(winner);
        let mut subnets = winner.subnets.clone();
        for extra in &seen {
            if !extra.ours {
                subnets.extend(extra.subnets.iter().copied());
                continue;
            }
            match docker.remove_network(&extra.id).await {
                Ok(()) => tracing::info!(
                    network = name,
                    network_id = extra.id,
                    "removed a duplicate of the VM network (made by a concurrent start)"
                ),
                Err(e) => {
                    subnets.extend(extra.subnets.iter().copied());
                    tracing::error!(
                        network = name,
                        network_id = extra.id,
                        error = %Error::new("remove network", &extra.id, &e),
                        "several networks have the VM network's name and one cannot be removed: creating VMs fails until only one is left"
                    )
                }
            }
        }
        if seen.iter().any(|s| !s.ours) {
            tracing::error!(
                network = name,
                count = seen.len() + 1,
                "several networks have the VM network's name, not all made by metald: creating VMs fails until only one is left"
            );
        }
        let created = made == Some(winner.id.as_str());
        Ok(network_of(name, &winner, created, subnets))
    }
}

fn network_of(name: &str, seen: &Seen, created: bool, subnets: Vec<IpNet>) -> VmNetwork {
    VmNetwork {
        name: name.to_owned(),
        id: seen.id.clone(),
        created,
        ours: seen.ours,
        isolated: seen.isolated,
        subnets,
    }
}

fn is_ours(labels: Option<&HashMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(NETWORK_CREATED_BY))
        .map(String::as_str)
        == Some(super::labels::CREATED_BY_VALUE)
}

/// A bridge whose inter-container traffic is off. Docker's default for a bridge is on, and
/// any other driver (host, macvlan, overlay) offers no such switch here.
fn is_isolated(driver: Option<&str>, options: Option<&HashMap<String, String>>) -> bool {
    driver == Some("bridge")
        && options
            .and_then(|o| o.get(ENABLE_ICC))
            .is_some_and(|v| v == "false")
}

fn subnets_of(ipam: Option<&Ipam>) -> Vec<IpNet> {
    ipam.and_then(|i| i.config.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.subnet.as_deref()?.parse().ok())
        .collect()
}

/// The network every instance settles on: the first made (later creates are later in time,
/// so whoever sees more of them agrees on the same one), ties by id.
fn oldest(seen: &[Seen]) -> Option<usize> {
    (0..seen.len()).min_by(|&a, &b| {
        let key = |s: &Seen| (s.created.unwrap_or(SystemTime::UNIX_EPOCH), s.id.clone());
        key(&seen[a]).cmp(&key(&seen[b]))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bollard::models::IpamConfig;

    use super::*;

    fn options(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_a_bridge_with_icc_off_is_isolated() {
        let off = options(&[(ENABLE_ICC, "false")]);
        let on = options(&[(ENABLE_ICC, "true")]);
        assert!(is_isolated(Some("bridge"), Some(&off)));
        assert!(!is_isolated(Some("bridge"), Some(&on)));
        assert!(!is_isolated(Some("bridge"), None), "Docker's default is on");
        assert!(!is_isolated(Some("macvlan"), Some(&off)));
    }

    #[test]
    fn reads_ipv4_and_ipv6_subnets() {
        let ipam = Ipam {
            config: Some(vec![
                IpamConfig {
                    subnet: Some("172.18.0.0/16".into()),
                    ..Default::default()
                },
                IpamConfig {
                    subnet: Some("fd00:1::/64".into()),
                    ..Default::default()
                },
                IpamConfig::default(),
            ]),
            ..Default::default()
        };
        let nets = subnets_of(Some(&ipam));
        assert_eq!(
            nets,
            vec![
                "172.18.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert!(subnets_of(None).is_empty());
    }

    #[test]
    fn duplicates_settle_on_the_oldest() {
        let at = |s: u64, id: &str| Seen {
            id: id.into(),
            created: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            ours: true,
            isolated: true,
            subnets: vec![],
        };
        let seen = vec![at(5, "a"), at(3, "c"), at(3, "b"), at(9, "0")];
        assert_eq!(oldest(&seen), Some(2));
        assert_eq!(oldest(&[]), None);
        assert!(is_ours(Some(&options(&[(NETWORK_CREATED_BY, "metald")]))));
        assert!(!is_ours(None));
    }
}
