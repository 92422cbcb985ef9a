//! Access grants that follow the replicas: a background pass that makes every server holding
//! a member of a published volume's current replica set hold the node's grant, with the
//! token the node was given, and withdraws it from servers that hold a copy but are no longer
//! members.
//!
//! Publishing grants on the members it can reach; a member whose server was down then, or a
//! member added later by a replacement (`enbd-node replace`), has no grant, and with
//! `--access published` the node cannot open it, so the mirror could never resync it. The
//! pass repairs that:
//! - the members are the newest membership record reached from the volume's acting home
//!   ([`replicas::newest`]), a single copy's member is its home;
//! - it runs when a probe finds a server live again, and every `--grant-reconcile-interval`;
//! - it works under each volume's operation guard (a volume being published or unpublished is
//!   left to that operation, and the next pass looks again), and only on publications the
//!   controller granted itself (their tokens are in [`crate::publish::Publications`]);
//! - a replacement the controller prepared ([`super::replacement`]) counts as a member
//!   until a record names it or its hold expires ([`crate::pending`]);
//! - it is idempotent: the servers say whether a call changed anything, and only a change is
//!   logged and counted ([`Reconciled`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use enbd_proto::ids::{ServerId, VolumeId};
use tokio_util::sync::CancellationToken;

use super::publication::{grant, revoke};
use super::volume_key;
use crate::error::CsiError;
use crate::metrics::Reconciled;
use crate::publish::Granted;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

/// What one pass changed and how often it failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub granted: u32,
    pub revoked: u32,
    pub failed: u32,
}

impl Pass {
    fn count(&mut self, state: &State, what: Reconciled) {
        match what {
            Reconciled::Granted => self.granted += 1,
            Reconciled::Revoked => self.revoked += 1,
            Reconciled::Failed => self.failed += 1,
        }
        state.metrics.reconciled(what);
    }
}

/// Runs a pass at start, whenever a server becomes live, and every `interval`, until
/// cancelled.
pub async fn run_grant_reconciler(
    state: Arc<State>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = state.servers.server_became_live() => {}
            _ = tick.tick() => {}
        }
        let pass = tokio::select! {
            () = cancel.cancelled() => return,
            pass = state.reconcile_grants() => pass,
        };
        if pass != Pass::default() {
            tracing::debug!(
                granted = pass.granted,
                revoked = pass.revoked,
                failed = pass.failed,
                "grant reconciliation pass"
            );
        }
    }
}

impl State {
    /// One pass over every granted publication (see the module docs).
    pub async fn reconcile_grants(&self) -> Pass {
        let mut pass = Pass::default();
        let volumes = self.publications.granted_volumes();
        if volumes.is_empty() {
            return pass;
        }
        // Which live servers hold a copy of which volume: one listing per server per pass.
        let mut copies: BTreeMap<String, Vec<ServerId>> = BTreeMap::new();
        for (id, _) in self.all_volumes().await {
            copies
                .entry(id.name().to_string())
                .or_default()
                .push(id.server().clone());
        }
        for volume_id in volumes {
            let Ok(id) = VolumeId::parse(&volume_id) else {
                continue;
            };
            // Publish and unpublish hold the guard while they change grants: leave the
            // volume to them this time (and a call arriving now waits for this pass).
            let Some(_guard) = self.ops.try_begin_background(&volume_key(&volume_id)) else {
                continue;
            };
            let nodes = self.publications.granted(&volume_id);
            if nodes.is_empty() {
                continue;
            }
            let name = id.name().as_str();
            let copies = copies.get(name).map(Vec::as_slice).unwrap_or_default();
            if let Err(e) = self.reconcile_volume(&id, &nodes, copies, &mut pass).await {
                tracing::debug!(volume_id = %id, error = %e,
                    "grant reconciliation: the volume's membership is unreadable now");
                pass.count(self, Reconciled::Failed);
            }
        }
        pass
    }

    async fn reconcile_volume(
        &self,
        id: &VolumeId,
        nodes: &[Granted],
        copies: &[ServerId],
        pass: &mut Pass,
    ) -> Result<(), CsiError> {
        let name = id.name().as_str();
        let what = format!("volume {id}");
        let Some(home) = replicas::acting_home(&self.servers, id.server(), name, &what).await?
        else {
            return Ok(());
        };
        let record = replicas::newest(&self.servers, &home, name).await?;
        let members: BTreeSet<ServerId> = if record.generation == 0 {
            BTreeSet::from([home.id.clone()])
        } else {
            record
                .members
                .iter()
                .filter_map(|m| ServerId::parse(&m.replica_id).ok())
                .collect()
        };
        // A replacement prepared for the node's mirror is granted like a member until a
        // record names it (then it is one) or its hold expires.
        let volume_id = id.to_string();
        let mut keep = members.clone();
        for held in self.replacements.held(&volume_id) {
            if members.contains(&held) {
                self.replacements.release(&volume_id, &held);
            } else {
                keep.insert(held);
            }
        }
        for member in &keep {
            // A member whose server is down is granted when it is live again.
            if let Lookup::Live(server) = self.servers.lookup(member) {
                for node in nodes {
                    self.grant_one(id, &server, node, pass).await;
                }
            }
        }
        for holder in copies.iter().filter(|s| !keep.contains(s)) {
            if let Lookup::Live(server) = self.servers.lookup(holder) {
                for node in nodes {
                    self.revoke_one(id, &server, &node.node_id, pass).await;
                }
            }
        }
        Ok(())
    }

    async fn grant_one(&self, id: &VolumeId, server: &LiveServer, node: &Granted, pass: &mut Pass) {
        let name = id.name().as_str();
        match grant(server, name, &node.node_id, node.token.as_str()).await {
            Ok(r) if r.changed => {
                tracing::info!(volume_id = %id, server = %server.id, node_id = node.node_id,
                    "access granted on a replica's server that lacked it");
                pass.count(self, Reconciled::Granted);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume_id = %id, server = %server.id, node_id = node.node_id,
                    error = %e, "grant reconciliation could not grant access (retried next pass)");
                pass.count(self, Reconciled::Failed);
            }
        }
    }

    async fn revoke_one(&self, id: &VolumeId, server: &LiveServer, node_id: &str, pass: &mut Pass) {
        match revoke(server, id.name().as_str(), node_id).await {
            Ok(r) if r.revoked_grants > 0 => {
                tracing::info!(volume_id = %id, server = %server.id, node_id,
                    closed = r.closed_connections,
                    "access revoked on a server that is no longer a member of the replica set");
                pass.count(self, Reconciled::Revoked);
            }
            Ok(_) => {}
            // Deleted meanwhile: nothing is granted there.
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(volume_id = %id, server = %server.id, node_id, error = %e,
                    "grant reconciliation could not revoke access (retried next pass)");
                pass.count(self, Reconciled::Failed);
            }
        }
    }
}
