//! What every CSI service of the controller shares, passed down explicitly.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::ops::Ops;
use crate::pending::PendingReplacements;
use crate::publish::Publications;
use crate::servers::Servers;

pub struct State {
    pub driver_name: String,
    pub servers: Arc<Servers>,
    pub ops: Ops,
    pub publications: Publications,
    /// Replacement replicas prepared for a node's mirror, not recorded yet.
    pub replacements: PendingReplacements,
    pub nodes: Nodes,
    pub metrics: Arc<Metrics>,
}

impl State {
    pub fn new(
        driver_name: String,
        servers: Arc<Servers>,
        nodes: Nodes,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            driver_name,
            servers,
            ops: Ops::new(),
            publications: Publications::new(),
            replacements: PendingReplacements::default(),
            nodes,
            metrics,
        })
    }

    /// Runs one RPC's work, counts it (in flight while it runs, then its latency by gRPC
    /// code) and turns the outcome into the gRPC reply; errors are logged once here with
    /// the RPC name (never the request: it may hold secrets).
    pub async fn call<T>(
        &self,
        rpc: &'static str,
        work: impl std::future::Future<Output = Result<T, crate::error::CsiError>>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        let started = std::time::Instant::now();
        let result = {
            let _in_flight = self.metrics.started(rpc);
            work.await
        };
        let took = started.elapsed();
        match result {
            Ok(v) => {
                self.metrics.record(rpc, tonic::Code::Ok, took);
                Ok(tonic::Response::new(v))
            }
            Err(e) => {
                let status = tonic::Status::from(e);
                self.metrics.record(rpc, status.code(), took);
                match status.code() {
                    tonic::Code::Internal | tonic::Code::Unavailable => {
                        tracing::warn!(rpc, code = ?status.code(), message = status.message(), "CSI call failed")
                    }
                    _ => {
                        tracing::info!(rpc, code = ?status.code(), message = status.message(), "CSI call refused")
                    }
                }
                Err(status)
            }
        }
    }
}
