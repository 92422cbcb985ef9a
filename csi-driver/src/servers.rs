//! The set of enbd-servers the controller knows, each with a management client
//! and its last observed health.
//!
//! Discovery decides which servers exist (targets: id → management URL); the
//! prober decides which of them are live by calling `Health` on each, checking
//! the server reports the id we expect (a mis-wired URL must never receive
//! another server's volumes) and learning its NBD data address. Placement only
//! uses live servers; requests naming a known server that is down get
//! `Unavailable` (retry later), never "not found".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{GetCapacityRequest, HealthRequest};
use enbd_proto::ids::ServerId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::mgmt_tls::MgmtTls;

/// Management gRPC client of one enbd-server.
pub type MgmtClient = VolumeServiceClient<Channel>;
/// Replica membership client of one enbd-server (same connection as its [`MgmtClient`]).
pub type ReplicaClient = ReplicaServiceClient<Channel>;

/// Discovery's view: every server that should exist, with its management URL and zone.
pub type Targets = BTreeMap<ServerId, Target>;

/// One server as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub mgmt_url: String,
    /// Failure domain (`topology.kubernetes.io/zone`, or the static list's `@ZONE`);
    /// placement spreads a volume's replicas across zones when servers have one.
    pub zone: Option<String>,
}

impl Target {
    pub fn new(mgmt_url: impl Into<String>) -> Self {
        Self {
            mgmt_url: mgmt_url.into(),
            zone: None,
        }
    }
}

/// How long a health check may take before the server counts as down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How often every server is re-checked.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet.
    Unknown,
    Live {
        data_address: String,
    },
    Down {
        reason: String,
    },
}

#[derive(Clone)]
struct Entry {
    mgmt_url: String,
    zone: Option<String>,
    client: Option<(MgmtClient, ReplicaClient)>,
    health: Health,
    /// The data directory's space as of the last successful probe (metrics).
    capacity: Option<Capacity>,
}

/// A server's space, as its `GetCapacity` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub provisioned_bytes: u64,
}

/// A server that answered its last health check.
#[derive(Clone)]
pub struct LiveServer {
    pub id: ServerId,
    pub client: MgmtClient,
    pub replica: ReplicaClient,
    /// Management URL, as discovery gave it (nodes call the replica service there).
    pub mgmt_url: String,
    /// NBD `HOST:PORT` nodes should dial for this server's volumes.
    pub data_address: String,
    /// Failure domain, if discovery knows one.
    pub zone: Option<String>,
}

/// What the registry knows about one server id.
#[allow(clippy::large_enum_variant)] // short-lived lookups; boxing would only add an allocation
pub enum Lookup {
    Live(LiveServer),
    /// Known but not answering (or not checked yet): retry later.
    Down(String),
    /// Never heard of: nothing of it can exist as far as we can tell.
    Unknown,
}

/// Summary for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    pub id: ServerId,
    pub mgmt_url: String,
    pub health: Health,
    pub capacity: Option<Capacity>,
}

#[derive(Default)]
pub struct Servers {
    entries: RwLock<BTreeMap<ServerId, Entry>>,
    /// Set once discovery delivered its first complete list.
    synced: AtomicBool,
    /// Client certificate and server CA for `https://` management URLs.
    tls: Option<MgmtTls>,
    /// Woken when a probe found some server live that was not (the grant reconciliation
    /// waits on it: a server that was down missed the grants made meanwhile).
    became_live: tokio::sync::Notify,
}

fn lazy_client(
    url: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<(MgmtClient, ReplicaClient), String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| format!("invalid management URL {url:?}"))?;
    if url.starts_with("https://") {
        let tls = tls.ok_or_else(|| {
            format!("{url} is https but no --mgmt-tls-ca/--mgmt-tls-cert/--mgmt-tls-key were given")
        })?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("management TLS for {url}: {e}"))?;
    }
    let channel = endpoint.connect_timeout(HEALTH_TIMEOUT).connect_lazy();
    Ok((
        VolumeServiceClient::new(channel.clone()),
        ReplicaServiceClient::new(channel),
    ))
}

impl Servers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A registry whose `https://` servers are called with this client TLS configuration.
    pub fn with_tls(tls: Option<MgmtTls>) -> Arc<Self> {
        Arc::new(Self {
            tls,
            ..Self::default()
        })
    }

    fn tls_config(&self) -> Option<ClientTlsConfig> {
        self.tls.as_ref().map(MgmtTls::config)
    }

    /// After a certificate rotation (the files changed), every client is rebuilt so new
    /// connections present the new certificate and trust the new CA.
    fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        if !tls.reload_if_changed() {
            return;
        }
        let config = tls.config();
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for e in entries.values_mut() {
            e.client = lazy_client(&e.mgmt_url, Some(config.clone())).ok();
        }
    }

    /// Replaces the server set. Entries whose URL did not change keep their
    /// client and health, so a discovery update does not flap liveness.
    pub fn set_targets(&self, targets: &Targets) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|id, e| targets.get(id).map(|t| &t.mgmt_url) == Some(&e.mgmt_url));
        for (id, t) in targets {
            let url = &t.mgmt_url;
            if let Some(e) = entries.get_mut(id) {
                // A zone change (a relabelled node) keeps the client and its health.
                e.zone.clone_from(&t.zone);
                continue;
            }
            entries.entry(id.clone()).or_insert_with(|| {
                let (client, health) = match lazy_client(url, self.tls_config()) {
                    Ok(c) => (Some(c), Health::Unknown),
                    Err(reason) => (None, Health::Down { reason }),
                };
                Entry {
                    mgmt_url: url.clone(),
                    zone: t.zone.clone(),
                    client,
                    health,
                    capacity: None,
                }
            });
        }
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Vec<(ServerId, Entry)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn live(&self) -> Vec<LiveServer> {
        self.snapshot()
            .into_iter()
            .filter_map(|(id, e)| match (e.health, e.client) {
                (Health::Live { data_address }, Some((client, replica))) => Some(LiveServer {
                    id,
                    client,
                    replica,
                    mgmt_url: e.mgmt_url,
                    data_address,
                    zone: e.zone,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn lookup(&self, id: &ServerId) -> Lookup {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match entries.get(id) {
            None => Lookup::Unknown,
            Some(e) => match (&e.health, &e.client) {
                (Health::Live { data_address }, Some((client, replica))) => {
                    Lookup::Live(LiveServer {
                        id: id.clone(),
                        client: client.clone(),
                        replica: replica.clone(),
                        mgmt_url: e.mgmt_url.clone(),
                        data_address: data_address.clone(),
                        zone: e.zone.clone(),
                    })
                }
                (Health::Down { reason }, _) => Lookup::Down(reason.clone()),
                _ => Lookup::Down("not health-checked yet".into()),
            },
        }
    }

    /// Ids of servers that are known but not live.
    pub fn down_ids(&self) -> Vec<ServerId> {
        self.snapshot()
            .into_iter()
            .filter(|(_, e)| !matches!(e.health, Health::Live { .. }))
            .map(|(id, _)| id)
            .collect()
    }

    pub fn status(&self) -> Vec<ServerStatus> {
        self.snapshot()
            .into_iter()
            .map(|(id, e)| ServerStatus {
                id,
                mgmt_url: e.mgmt_url,
                health: e.health,
                capacity: e.capacity,
            })
            .collect()
    }

    /// Health-checks every server once, concurrently.
    pub async fn probe_all(&self) {
        let checks = self.snapshot().into_iter().map(|(id, e)| async move {
            let (health, capacity) = match e.client {
                Some((client, _)) => {
                    let health = check(&id, client.clone()).await;
                    let capacity = match health {
                        Health::Live { .. } => capacity(client).await,
                        _ => None,
                    };
                    (health, capacity)
                }
                None => (e.health, None),
            };
            (id, e.mgmt_url, health, capacity)
        });
        let results = futures::future::join_all(checks).await;
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut any_became_live = false;
        for (id, url, health, capacity) in results {
            // The set may have changed while we probed; only update what is still the same.
            if let Some(e) = entries.get_mut(&id).filter(|e| e.mgmt_url == url) {
                if e.health != health {
                    match &health {
                        Health::Live { data_address } => {
                            any_became_live |= !matches!(e.health, Health::Live { .. });
                            tracing::info!(server = %id, data_address, "enbd-server is live")
                        }
                        Health::Down { reason } => {
                            tracing::warn!(server = %id, reason, "enbd-server is down")
                        }
                        Health::Unknown => {}
                    }
                }
                e.health = health;
                // A failed capacity read keeps the last one known (metrics only).
                if capacity.is_some() {
                    e.capacity = capacity;
                }
            }
        }
        drop(entries);
        if any_became_live {
            // A stored permit: a waiter that is busy now still runs once more afterwards.
            self.became_live.notify_one();
        }
    }

    /// Returns once a probe found a server live that was not live before (one waiter: the
    /// grant reconciliation).
    pub async fn server_became_live(&self) {
        self.became_live.notified().await;
    }

    /// Applies discovery updates and re-probes periodically until cancelled.
    pub async fn run_prober(
        self: Arc<Self>,
        mut targets: watch::Receiver<Option<Targets>>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut discovery_open = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = targets.changed(), if discovery_open => {
                    if changed.is_err() {
                        // Discovery ended; keep probing the last set.
                        discovery_open = false;
                        continue;
                    }
                    let current = targets.borrow_and_update().clone();
                    if let Some(t) = current {
                        self.set_targets(&t);
                        self.probe_all().await;
                        self.mark_synced();
                    }
                }
                _ = tick.tick() => {
                    self.reload_tls();
                    self.probe_all().await
                }
            }
        }
    }
}

/// The server's space for the metrics; `None` if it does not answer in time.
async fn capacity(mut client: MgmtClient) -> Option<Capacity> {
    let r = tokio::time::timeout(HEALTH_TIMEOUT, client.get_capacity(GetCapacityRequest {}))
        .await
        .ok()?
        .ok()?
        .into_inner();
    Some(Capacity {
        total_bytes: r.total_bytes,
        available_bytes: r.available_bytes,
        provisioned_bytes: r.provisioned_bytes,
    })
}

async fn check(expected: &ServerId, mut client: MgmtClient) -> Health {
    match tokio::time::timeout(HEALTH_TIMEOUT, client.health(HealthRequest {})).await {
        Err(_) => Health::Down {
            reason: "health check timed out".into(),
        },
        Ok(Err(status)) => Health::Down {
            reason: format!(
                "health check failed: {}: {}",
                status.code(),
                status.message()
            ),
        },
        Ok(Ok(resp)) => {
            let h = resp.into_inner();
            if h.server_id != expected.as_str() {
                Health::Down {
                    reason: format!(
                        "server reports id {:?}, expected {:?}: check the discovery configuration",
                        h.server_id,
                        expected.as_str()
                    ),
                }
            } else if !h.ready {
                Health::Down {
                    reason: "server reports not ready".into(),
                }
            } else if h.data_address.is_empty() {
                Health::Down {
                    reason: "server reports no data address".into(),
                }
            } else {
                Health::Live {
                    data_address: h.data_address,
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn targets(entries: &[(&str, &str)]) -> Targets {
        entries
            .iter()
            .map(|(id, url)| (ServerId::parse(id).unwrap(), Target::new(*url)))
            .collect()
    }

    #[tokio::test]
    async fn unknown_until_probed_and_removed_when_gone() {
        let servers = Servers::new();
        servers.set_targets(&targets(&[("a", "http://127.0.0.1:1"), ("b", "not a url")]));
        let a = ServerId::parse("a").unwrap();
        let b = ServerId::parse("b").unwrap();
        assert!(matches!(servers.lookup(&a), Lookup::Down(_)));
        assert!(
            matches!(servers.lookup(&b), Lookup::Down(r) if r.contains("invalid management URL"))
        );
        assert!(servers.live().is_empty());
        servers.set_targets(&targets(&[("a", "http://127.0.0.1:1")]));
        assert!(matches!(servers.lookup(&b), Lookup::Unknown));
        // Port 1 on loopback refuses connections: the probe marks it down.
        servers.probe_all().await;
        assert!(matches!(servers.lookup(&a), Lookup::Down(r) if r.contains("health check")));
        assert_eq!(servers.down_ids(), vec![a]);
        use futures::FutureExt;
        assert!(
            servers.server_became_live().now_or_never().is_none(),
            "no server became live"
        );
    }
}
