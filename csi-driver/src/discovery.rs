//! Where the list of enbd-servers comes from: a fixed `--servers` list, or a
//! kube-rs watch of the enbd-server pods selected by label.
//!
//! Discovery publishes complete target sets (server id → management URL) on a
//! watch channel; `None` means "no complete list yet", so the controller never
//! acts on half a listing. In Kubernetes the server id is the pod name (the
//! StatefulSet's stable identity, also the server's default `--server-id`); the
//! management URL uses the pod IP, which is fine because it never leaves the
//! controller: volume IDs carry the server id and volume contexts carry the
//! server's advertised, DNS-based data address.

use std::collections::BTreeMap;

use enbd_proto::ids::ServerId;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Discovery;
use crate::servers::{Target, Targets};

/// Management port used when the pod names no container port `mgmt`.
pub const DEFAULT_MGMT_PORT: i32 = 10810;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot build a Kubernetes client (in-cluster config or kubeconfig): {0}")]
    Client(#[source] kube::Error),
}

/// Runs discovery until cancelled, publishing target sets on `tx`.
pub async fn run(
    discovery: Discovery,
    tls: bool,
    tx: watch::Sender<Option<Targets>>,
    cancel: CancellationToken,
) -> Result<(), DiscoveryError> {
    match discovery {
        Discovery::Static(servers) => {
            let targets = servers
                .into_iter()
                .map(|s| {
                    let t = Target {
                        mgmt_url: s.mgmt_url,
                        zone: s.zone,
                    };
                    (s.id, t)
                })
                .collect();
            tx.send_replace(Some(targets));
            // Keep the sender alive: the prober treats a closed channel as "no
            // more updates", which is true, but it is tidier to end together.
            cancel.cancelled().await;
            Ok(())
        }
        Discovery::Kubernetes {
            namespace,
            selector,
        } => {
            let client = Client::try_default()
                .await
                .map_err(DiscoveryError::Client)?;
            let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
            tracing::info!(%namespace, %selector, "watching enbd-server pods");
            let nodes: Api<Node> = Api::all(client.clone());
            let api: Api<Pod> = Api::namespaced(client, &namespace);
            watch_pods(api, nodes, &selector, tls, tx, cancel).await;
            Ok(())
        }
    }
}

async fn watch_pods(
    api: Api<Pod>,
    nodes: Api<Node>,
    selector: &str,
    tls: bool,
    tx: watch::Sender<Option<Targets>>,
    cancel: CancellationToken,
) {
    let stream =
        watcher::watcher(api, watcher::Config::default().labels(selector)).default_backoff();
    futures::pin_mut!(stream);
    // Pod name → its target, if it currently is one.
    let mut pods: BTreeMap<String, Option<(ServerId, Target)>> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<String, Option<(ServerId, Target)>>> = None;
    let mut zones = NodeZones::default();
    let mut synced = false;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = stream.next() => event,
        };
        let changed = match event {
            None => return,
            Some(Err(e)) => {
                // The backoff retries; keep serving the last complete list.
                tracing::warn!(error = %e, "enbd-server pod watch failed; retrying");
                false
            }
            Some(Ok(Event::Init)) => {
                relisting = Some(BTreeMap::new());
                false
            }
            Some(Ok(Event::InitApply(pod))) => {
                let t = zoned(target_of(&pod, tls), &pod, &nodes, &mut zones).await;
                if let Some(buf) = relisting.as_mut() {
                    buf.insert(pod_name(&pod), t);
                }
                false
            }
            Some(Ok(Event::InitDone)) => {
                pods = relisting.take().unwrap_or_default();
                synced = true;
                true
            }
            Some(Ok(Event::Apply(pod))) => {
                let t = zoned(target_of(&pod, tls), &pod, &nodes, &mut zones).await;
                pods.insert(pod_name(&pod), t);
                true
            }
            Some(Ok(Event::Delete(pod))) => {
                pods.remove(&pod_name(&pod));
                true
            }
        };
        if changed && synced {
            let targets: Targets = pods.values().flatten().cloned().collect();
            tracing::debug!(servers = targets.len(), "enbd-server set changed");
            tx.send_replace(Some(targets));
        }
    }
}

/// The pod label or node label that names a zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Zones of the nodes looked up so far (a node's zone label does not change in practice;
/// a pod moved to another node is looked up under that node's name).
#[derive(Default)]
struct NodeZones(BTreeMap<String, Option<String>>);

/// The pod's zone: its own `topology.kubernetes.io/zone` label if it has one (for servers
/// whose zone an operator sets on the pod), else its node's.
async fn zoned(
    target: Option<(ServerId, Target)>,
    pod: &Pod,
    nodes: &Api<Node>,
    cache: &mut NodeZones,
) -> Option<(ServerId, Target)> {
    let (id, mut t) = target?;
    t.zone = match pod_zone(pod) {
        Some(z) => Some(z),
        None => match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            None => None,
            Some(node) => match cache.0.get(&node) {
                Some(z) => z.clone(),
                None => {
                    let z = match nodes.get_opt(&node).await {
                        Ok(n) => n.as_ref().and_then(node_zone),
                        Err(e) => {
                            // Not cached: asked again at the pod's next event.
                            tracing::warn!(node, error = %e, "cannot read the node's zone label");
                            return Some((id, t));
                        }
                    };
                    cache.0.insert(node, z.clone());
                    z
                }
            },
        },
    };
    Some((id, t))
}

fn pod_zone(pod: &Pod) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// A target for `url` with the zone the pod's labels name, if any.
fn zoned_target(pod: &Pod, url: String) -> Target {
    let mut t = Target::new(url);
    t.zone = pod_zone(pod);
    t
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// The server a pod stands for, if it is running, has an IP and a valid name.
///
/// Plain text: `http://<pod IP>:<port>`. With management TLS (`tls`): the pod's stable DNS
/// name through its StatefulSet's headless Service, `https://<hostname>.<subdomain>.<namespace>.svc:<port>`,
/// the name the server certificate is issued for (a pod IP is not in it).
pub fn target_of(pod: &Pod, tls: bool) -> Option<(ServerId, Target)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let name = pod.metadata.name.as_deref()?;
    let id = match ServerId::parse(name) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(pod = name, error = %e, "ignoring enbd-server pod with an unusable name");
            return None;
        }
    };
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("mgmt"))
        .map_or(DEFAULT_MGMT_PORT, |p| p.container_port);
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    if !tls {
        return Some((id, zoned_target(pod, format!("http://{host}:{port}"))));
    }
    let spec = pod.spec.as_ref();
    let subdomain = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty());
    let namespace = pod.metadata.namespace.as_deref().filter(|s| !s.is_empty());
    let Some((subdomain, namespace)) = subdomain.zip(namespace) else {
        tracing::warn!(
            pod = name,
            "enbd-server pod has no subdomain or namespace: its management certificate cannot be checked by DNS name; dialing its IP"
        );
        return Some((id, zoned_target(pod, format!("https://{host}:{port}"))));
    };
    let hostname = spec
        .and_then(|s| s.hostname.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(name);
    let url = format!("https://{hostname}.{subdomain}.{namespace}.svc:{port}");
    Some((id, zoned_target(pod, url)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn running_pod_with_named_port() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "enbd-server-1"},
            "spec": {"containers": [{"name": "server", "ports": [
                {"name": "nbd", "containerPort": 10809},
                {"name": "mgmt", "containerPort": 7000}
            ]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3"}
        }));
        let (id, t) = target_of(&p, false).unwrap();
        assert_eq!(id.as_str(), "enbd-server-1");
        assert_eq!(t.mgmt_url, "http://10.1.2.3:7000");
        assert_eq!(t.zone, None);
    }

    #[test]
    fn tls_dials_the_stable_dns_name() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "enbd-server-1", "namespace": "storage"},
            "spec": {"hostname": "enbd-server-1", "subdomain": "enbd-server", "containers": [{"name": "server", "ports": [
                {"name": "mgmt", "containerPort": 10810}
            ]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3"}
        }));
        assert_eq!(
            target_of(&p, true).unwrap().1.mgmt_url,
            "https://enbd-server-1.enbd-server.storage.svc:10810"
        );
        let bare = pod(serde_json::json!({
            "metadata": {"name": "s0"},
            "spec": {"containers": [{"name": "server"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }));
        assert_eq!(
            target_of(&bare, true).unwrap().1.mgmt_url,
            "https://10.0.0.1:10810"
        );
    }

    #[test]
    fn defaults_port_and_brackets_ipv6() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "s0"},
            "spec": {"containers": [{"name": "server"}]},
            "status": {"phase": "Running", "podIP": "fd00::5"}
        }));
        assert_eq!(
            target_of(&p, false).unwrap().1.mgmt_url,
            "http://[fd00::5]:10810"
        );
    }

    #[test]
    fn a_zone_comes_from_the_pod_label_or_the_node_label() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "s1", "labels": {"topology.kubernetes.io/zone": "eu-1b"}},
            "spec": {"containers": [{"name": "server"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.9"}
        }));
        assert_eq!(
            target_of(&p, false).unwrap().1.zone.as_deref(),
            Some("eu-1b")
        );
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "eu-1c"}}
        }))
        .unwrap();
        assert_eq!(node_zone(&n).as_deref(), Some("eu-1c"));
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap();
        assert_eq!(node_zone(&bare), None);
    }

    #[test]
    fn skips_pods_that_cannot_serve() {
        for json in [
            serde_json::json!({"metadata": {"name": "s0"}, "status": {"phase": "Pending", "podIP": "10.0.0.1"}}),
            serde_json::json!({"metadata": {"name": "s0"}, "status": {"phase": "Running"}}),
            serde_json::json!({"metadata": {"name": "S_0"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
            serde_json::json!({"metadata": {"name": "s0", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                               "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
        ] {
            assert!(target_of(&pod(json.clone()), false).is_none(), "{json}");
        }
    }
}
