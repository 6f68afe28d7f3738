//! Listing containers: VM containers of one scope (inspected, for the index) and containers by
//! name (as listed, for the reaper). Only what the caller will use is inspected: re-lists run
//! every minute, and other scopes' containers are none of this instance's business.

use std::collections::HashMap;

use bollard::query_parameters::ListContainersOptions;
use futures::StreamExt;

use super::labels;
use super::{ContainerView, DockerBackend, Error};

/// Containers as listed and inspected.
#[derive(Debug, Default)]
pub struct Listing {
    pub views: Vec<ContainerView>,
    /// The labels (from the listing) of containers that could not be inspected, though the
    /// engine answered: logged and passed over.
    pub unreadable: Vec<HashMap<String, String>>,
}

/// A container as the list call shows it (no inspect).
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    /// Docker's status word (`created`, `running`, `exited`, …).
    pub status: String,
}

impl DockerBackend {
    /// Every container that claims to be a VM of `scope`, inspected. The old service's
    /// containers (compat labels only) are not listed: they are no VMs of any scope.
    pub async fn list_vm_containers(&self, scope: &str) -> Result<Listing, Error> {
        let filter = format!("{}={}", labels::CREATED_BY, labels::CREATED_BY_VALUE);
        let listed = self
            .list(HashMap::from([("label".to_owned(), vec![filter])]))
            .await?
            .into_iter()
            .filter(|c| !labels::is_legacy(&c.labels) && labels::scope_of(&c.labels) == scope)
            .collect();
        self.inspect_all(listed).await
    }

    /// Every container whose name starts with `prefix`, as listed.
    pub async fn list_named(&self, prefix: &str) -> Result<Vec<Listed>, Error> {
        let listed = self
            .list(HashMap::from([(
                "name".to_owned(),
                vec![prefix.to_owned()],
            )]))
            .await?;
        // Docker's name filter matches anywhere in the name: keep true prefixes only.
        Ok(listed
            .into_iter()
            .filter(|c| c.name.starts_with(prefix))
            .collect())
    }

    async fn list(&self, filters: HashMap<String, Vec<String>>) -> Result<Vec<Listed>, Error> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .docker()?
            .list_containers(Some(options))
            .await
            .map_err(|e| Error::new("list containers", "", &e))?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let name = s
                    .names
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned();
                Some(Listed {
                    id: s.id?,
                    name,
                    labels: s.labels.unwrap_or_default(),
                    status: s.state.map(|s| s.to_string()).unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn inspect_all(&self, listed: Vec<Listed>) -> Result<Listing, Error> {
        // Inspections are independent; a handful at a time keeps startup quick on big hosts
        // without flooding the engine.
        let views: Vec<_> = futures::stream::iter(listed)
            .map(|c| async move { (self.inspect(&c.id).await, c.labels) })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut listing = Listing::default();
        for (view, labels) in views {
            match view {
                Ok(v) => listing.views.push(v),
                // Removed between list and inspect: simply not there any more.
                Err(e) if e.is_not_found() => {}
                // One container can hang an inspect until it times out: the engine is only
                // gone if it does not answer a ping either.
                Err(e) if e.is_unavailable() && self.ping().await.is_err() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not inspect a VM container; passing over it");
                    listing.unreadable.push(labels);
                }
            }
        }
        Ok(listing)
    }
}
