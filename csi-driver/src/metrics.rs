//! Prometheus metrics of the controller: CSI RPCs by method and gRPC code (count and
//! latency), RPCs in flight, operations in progress, the grant reconciliation's grants,
//! revocations and failures, and each known server's health and space as the prober last
//! saw them. Served on `--metrics-listen` by the shared endpoint
//! (`enbd_proto::metrics`).
//!
//! Server gauges are computed from the registry at scrape time so they can never drift
//! from it. RPC bookkeeping takes a short mutex per call: the controller's calls are few
//! (provisioning, not IO).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enbd_proto::metrics::prometheus_client::collector::Collector;
use enbd_proto::metrics::prometheus_client::encoding::DescriptorEncoder;
use enbd_proto::metrics::prometheus_client::registry::Registry;
use enbd_proto::metrics::{self as prom, Histogram, Labels};

use crate::ops::Ops;
use crate::servers::{Health, ServerStatus, Servers};

type Key = (&'static str, &'static str);

#[derive(Default)]
pub struct Metrics {
    rpcs: Mutex<BTreeMap<Key, Arc<Histogram>>>,
    in_flight: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    reconcile: ReconcileCounts,
}

/// What the grant reconciliation changed on the servers, and how often it could not.
#[derive(Default)]
struct ReconcileCounts {
    granted: AtomicU64,
    revoked: AtomicU64,
    failed: AtomicU64,
}

/// One outcome of the grant reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// A member's server got a grant it lacked (or had with another token).
    Granted,
    /// A server no longer a member lost a grant.
    Revoked,
    /// A grant, a revocation or a membership read failed (retried at the next pass).
    Failed,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Counts one RPC in flight until dropped (also when tonic drops the handler).
pub struct InFlight {
    map: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    rpc: &'static str,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = crate::sync::lock(&self.map, "rpc metrics");
        if let Some(n) = m.get_mut(self.rpc) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn started(&self, rpc: &'static str) -> InFlight {
        *crate::sync::lock(&self.in_flight, "rpc metrics")
            .entry(rpc)
            .or_default() += 1;
        InFlight {
            map: Arc::clone(&self.in_flight),
            rpc,
        }
    }

    pub fn record(&self, rpc: &'static str, code: tonic::Code, took: Duration) {
        let h = Arc::clone(
            crate::sync::lock(&self.rpcs, "rpc metrics")
                .entry((rpc, code_name(code)))
                .or_insert_with(|| Arc::new(Histogram::latency())),
        );
        h.observe(took);
    }

    pub fn reconciled(&self, what: Reconciled) {
        let c = &self.reconcile;
        let counter = match what {
            Reconciled::Granted => &c.granted,
            Reconciled::Revoked => &c.revoked,
            Reconciled::Failed => &c.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, servers: &Servers, ops: &Ops) -> String {
        let mut reg = Registry::default();
        let c = &self.reconcile;
        reg.register_collector(Box::new(Scrape {
            reconciled: [
                ("granted", c.granted.load(Ordering::Relaxed)),
                ("revoked", c.revoked.load(Ordering::Relaxed)),
            ],
            reconcile_failures: c.failed.load(Ordering::Relaxed),
            rpcs: crate::sync::lock(&self.rpcs, "rpc metrics").clone(),
            in_flight: crate::sync::lock(&self.in_flight, "rpc metrics").clone(),
            servers: servers.status(),
            operations: ops.in_progress(),
        }));
        prom::render(&reg)
    }
}

struct Scrape {
    reconciled: [(&'static str, u64); 2],
    reconcile_failures: u64,
    rpcs: BTreeMap<Key, Arc<Histogram>>,
    in_flight: BTreeMap<&'static str, u64>,
    servers: Vec<ServerStatus>,
    operations: usize,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("csi-driver metrics")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mc = |(m, c): &Key| -> Labels { vec![("method", (*m).into()), ("code", (*c).into())] };
        prom::counters(
            &mut enc,
            "enbd_csi_controller_rpcs",
            "CSI RPCs handled, by method and gRPC code.",
            self.rpcs.iter().map(|(k, h)| (mc(k), h.count())),
        )?;
        prom::histograms(
            &mut enc,
            "enbd_csi_controller_rpc_duration_seconds",
            "CSI RPC latency, by method and gRPC code.",
            self.rpcs.iter().map(|(k, h)| (mc(k), h.as_ref())),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_rpcs_in_flight",
            "CSI RPCs being handled now, by method.",
            self.in_flight
                .iter()
                .map(|(m, n)| (vec![("method", (*m).to_owned())], *n)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_operations_in_progress",
            "Volume and snapshot operations running now (one per object at most; they finish \
             even when their caller gave up).",
            [(Labels::new(), self.operations as u64)],
        )?;
        prom::counters(
            &mut enc,
            "enbd_csi_controller_grant_reconcile_changes",
            "Access grants the reconciliation made on a replica's server that lacked one \
             (action=granted) or withdrew from a server no longer a member (action=revoked).",
            self.reconciled
                .iter()
                .map(|(a, n)| (vec![("action", (*a).to_owned())], *n)),
        )?;
        prom::counters(
            &mut enc,
            "enbd_csi_controller_grant_reconcile_failures",
            "Grants, revocations and membership reads of the grant reconciliation that failed \
             (each is retried at the next pass).",
            [(Labels::new(), self.reconcile_failures)],
        )?;
        let sl = |s: &ServerStatus| -> Labels { vec![("server", s.id.to_string())] };
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_server_up",
            "Whether an enbd-server answered its last health check.",
            self.servers
                .iter()
                .map(|s| (sl(s), u64::from(matches!(s.health, Health::Live { .. })))),
        )?;
        let space = |f: fn(&crate::servers::Capacity) -> u64| {
            self.servers
                .iter()
                .filter_map(move |s| s.capacity.as_ref().map(|c| (sl(s), f(c))))
        };
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_server_free_bytes",
            "Bytes available in a server's data directory, as of its last successful probe.",
            space(|c| c.available_bytes),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_server_size_bytes",
            "Size of a server's data directory filesystem, as of its last successful probe.",
            space(|c| c.total_bytes),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_csi_controller_server_provisioned_bytes",
            "Sum of the sizes of a server's volumes, as of its last successful probe.",
            space(|c| c.provisioned_bytes),
        )
    }
}
