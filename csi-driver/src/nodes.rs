//! Which nodes exist, so that ControllerPublishVolume to a node that does not is
//! `NotFound`, as the CSI spec requires.
//!
//! Two sources, chosen at start-up:
//! - `--nodes`: exactly the listed node ids (static set-ups, tests). A lone `*` accepts any
//!   node id; that gives up `NotFound` for unknown nodes and is meant for set-ups whose
//!   nodes come and go without the controller being told.
//! - otherwise the Kubernetes API: a node exists when a CSINode object (storage.k8s.io/v1)
//!   lists this driver with that node id — which is what node-driver-registrar writes when
//!   the node plugin registers, so it is also exactly the set of nodes that can stage our
//!   volumes. The client is built on first use, so a controller outside a cluster still
//!   starts; its publishes then fail `Unavailable` with a hint to use `--nodes`.
//!
//! An API error is `Unavailable` (retry), never `NotFound`: a node is only declared
//! missing on a complete answer.

use std::collections::BTreeSet;

use k8s_openapi::api::storage::v1::CSINode;
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::OnceCell;

use crate::error::CsiError;

pub enum Nodes {
    /// `--nodes`: these ids and no others.
    Listed(BTreeSet<String>),
    /// `--nodes '*'`: any node id.
    Any,
    /// CSINode objects registering `driver`.
    Kubernetes {
        driver: String,
        /// Boxed: an API client is large and this enum lives once per controller.
        api: Box<OnceCell<Api<CSINode>>>,
    },
}

impl Nodes {
    /// From the `--nodes` flag (`None`: ask Kubernetes).
    pub fn new(listed: Option<Vec<String>>, driver: &str) -> Self {
        match listed {
            Some(ids) if ids.iter().any(|i| i == "*") => Nodes::Any,
            Some(ids) => Nodes::Listed(ids.into_iter().collect()),
            None => Nodes::Kubernetes {
                driver: driver.to_owned(),
                api: Box::new(OnceCell::new()),
            },
        }
    }

    /// `Ok` if `node_id` is a node this driver runs on, `NotFound` if it is not.
    pub async fn check(&self, node_id: &str) -> Result<(), CsiError> {
        let unknown =
            |how: &str| CsiError::NotFound(format!("node {node_id:?} does not exist ({how})"));
        match self {
            Nodes::Any => Ok(()),
            Nodes::Listed(ids) if ids.contains(node_id) => Ok(()),
            Nodes::Listed(_) => Err(unknown("it is not in --nodes")),
            Nodes::Kubernetes { driver, api } => {
                let api = api
                    .get_or_try_init(|| async { Client::try_default().await.map(Api::all) })
                    .await
                    .map_err(|e| {
                        CsiError::Unavailable(format!(
                            "cannot check that node {node_id:?} exists: no Kubernetes API ({e}); \
                             outside a cluster, list the nodes with --nodes"
                        ))
                    })?;
                let api_err = |e: kube::Error| {
                    CsiError::Unavailable(format!(
                        "cannot read CSINode objects to check node {node_id:?}: {e}"
                    ))
                };
                // Usually the node id is the node's name, which is also its CSINode's name.
                if let Some(n) = api.get_opt(node_id).await.map_err(api_err)?
                    && registers(&n, driver, node_id)
                {
                    return Ok(());
                }
                let all = api.list(&ListParams::default()).await.map_err(api_err)?;
                if all.items.iter().any(|n| registers(n, driver, node_id)) {
                    Ok(())
                } else {
                    Err(unknown(&format!(
                        "no CSINode object registers driver {driver} with that node id"
                    )))
                }
            }
        }
    }
}

/// Whether a CSINode says `driver` runs on it as `node_id`.
pub fn registers(node: &CSINode, driver: &str, node_id: &str) -> bool {
    node.spec
        .drivers
        .iter()
        .any(|d| d.name == driver && d.node_id == node_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn csinode(json: serde_json::Value) -> CSINode {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_csinode_registers_only_its_drivers_node_id() {
        let n = csinode(serde_json::json!({
            "metadata": {"name": "worker-1"},
            "spec": {"drivers": [
                {"name": "other.csi.io", "nodeID": "n-7"},
                {"name": "csi.enbd.io", "nodeID": "worker-1"}
            ]}
        }));
        assert!(registers(&n, "csi.enbd.io", "worker-1"));
        assert!(!registers(&n, "csi.enbd.io", "n-7"));
        assert!(!registers(&n, "other.csi.io", "worker-1"));
        let bare = csinode(serde_json::json!({
            "metadata": {"name": "worker-2"}, "spec": {"drivers": []}
        }));
        assert!(!registers(&bare, "csi.enbd.io", "worker-2"));
    }

    #[tokio::test]
    async fn listed_nodes_exist_and_others_are_not_found() {
        let nodes = Nodes::new(Some(vec!["n1".into(), "n2".into()]), "csi.enbd.io");
        nodes.check("n1").await.unwrap();
        let err = nodes.check("some-fake-node-id").await.unwrap_err();
        assert!(matches!(err, CsiError::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains("some-fake-node-id"), "{err}");
        let any = Nodes::new(Some(vec!["*".into()]), "csi.enbd.io");
        any.check("whatever").await.unwrap();
    }
}
