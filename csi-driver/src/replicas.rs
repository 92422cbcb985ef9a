//! Mirrored volumes, the controller's part: placing the replicas, creating them and writing
//! their first membership record, and applying delete and expand to every replica.
//!
//! The replica set of a volume is its membership record, kept by every replica's server
//! (`enbd.v1.ReplicaService`); the controller keeps nothing of its own. The record's first
//! member is the volume's *home*: the server named in its CSI volume id. Every replica has
//! the same name (the CSI name is unique), so a retried CreateVolume finds the replicas an
//! earlier attempt made and completes the set instead of placing new ones.
//!
//! Once generation 1 is written, the node's mirror layer owns membership: it drops, resyncs
//! and re-admits replicas and bumps the generation. A volume filled from a snapshot or a clone
//! starts with only its home in sync (it holds the content) and the others `OUT` with every
//! region dirty, so the node's mirror copies the content to them as its first resync.

use std::time::Duration;

use enbd_proto::enbd::{self as pb, ReplicaState};
use enbd_proto::ids::ServerId;
use enbd_proto::params::ReplicaEndpoint;
use tonic::{Response, Status};

use crate::error::CsiError;
use crate::mgmt;
use crate::servers::{LiveServer, Lookup, Servers};

/// Write-intent granularity of every mirrored volume this controller creates.
pub const REGION_BYTES: u32 = 1 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn call<T>(
    server: &ServerId,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, CsiError> {
    mgmt::call(server, CALL_TIMEOUT, call).await
}

/// The membership record one server holds for `name` (generation 0: none).
pub async fn membership(server: &LiveServer, name: &str) -> Result<pb::Membership, CsiError> {
    let mut client = server.replica.clone();
    let req = pb::GetMembershipRequest {
        volume: name.to_owned(),
    };
    Ok(call(&server.id, client.get_membership(req))
        .await?
        .membership
        .unwrap_or_default())
}

/// Most hops when following records to newer ones (each may name other members).
const FOLLOW_ROUNDS: usize = 4;

/// The newest record of `name`, starting from `home`'s and following the members it names
/// to any newer record they hold (a replacement writes its record on the survivors and the
/// new member, never on the replaced one). Members that are down are skipped; the home's
/// own record must be readable.
pub async fn newest(
    servers: &Servers,
    home: &LiveServer,
    name: &str,
) -> Result<pb::Membership, CsiError> {
    let mut best = membership(home, name).await?;
    if best.generation == 0 {
        return Ok(best);
    }
    for _ in 0..FOLLOW_ROUNDS {
        let mut next: Option<pb::Membership> = None;
        for m in &best.members {
            let Ok(id) = ServerId::parse(&m.replica_id) else {
                continue;
            };
            if id == home.id {
                continue;
            }
            if let Lookup::Live(s) = servers.lookup(&id)
                && let Ok(r) = membership(&s, name).await
                && r.generation > next.as_ref().map_or(best.generation, |n| n.generation)
            {
                next = Some(r);
            }
        }
        match next {
            Some(n) => best = n,
            None => break,
        }
    }
    Ok(best)
}

/// The server that answers for volume `name` whose id names `home`.
///
/// The home while it is live. When it is down or unknown, a replacement may have moved the
/// volume off it for good: then a live in-sync member of the newest record that the live
/// servers hold *and that no longer lists the home* answers instead. Otherwise the home's
/// own state decides: `Unavailable` while it is down (it may come back), `None` when it is
/// unknown (nothing of it exists as far as discovery can tell).
pub async fn acting_home(
    servers: &Servers,
    home: &ServerId,
    name: &str,
    what: &str,
) -> Result<Option<LiveServer>, CsiError> {
    let down = match servers.lookup(home) {
        Lookup::Live(s) => return Ok(Some(s)),
        Lookup::Down(reason) => Some(reason),
        Lookup::Unknown => None,
    };
    let (record, holders) = find(servers, name).await?;
    if let Some(rec) = record.filter(|r| r.members.iter().all(|m| m.replica_id != home.as_str())) {
        let in_sync = |id: &ServerId| {
            rec.members
                .iter()
                .any(|m| m.replica_id == id.as_str() && m.state == ReplicaState::InSync as i32)
        };
        if let Some((s, _)) = holders.iter().find(|(s, _)| in_sync(&s.id)) {
            tracing::info!(volume = %name, %home, acting = %s.id, generation = rec.generation,
                "the volume's home was replaced away: its in-sync replica answers for it");
            return Ok(Some(s.clone()));
        }
        return Err(CsiError::Unavailable(format!(
            "volume {name}: its home {home} was replaced and no in-sync replica of generation {} is live",
            rec.generation
        )));
    }
    match down {
        Some(reason) => Err(CsiError::Unavailable(format!(
            "enbd-server {home} holding {what} is unavailable: {reason}"
        ))),
        None => Ok(None),
    }
}

/// The endpoint nodes use for a replica on `server`.
pub fn endpoint(server: &LiveServer) -> ReplicaEndpoint {
    ReplicaEndpoint {
        id: server.id.clone(),
        data: server.data_address.clone(),
        mgmt: server.mgmt_url.clone(),
    }
}

/// Live servers for every member of `record`, in member order; a member whose server is
/// down or unknown makes the set unusable for now (`Unavailable`).
pub fn member_servers(
    servers: &Servers,
    name: &str,
    record: &pb::Membership,
) -> Result<Vec<LiveServer>, CsiError> {
    record
        .members
        .iter()
        .map(|m| {
            let id = ServerId::parse(&m.replica_id).map_err(|e| {
                CsiError::Internal(format!("volume {name}: membership names a bad id: {e}"))
            })?;
            match servers.lookup(&id) {
                Lookup::Live(s) => Ok(s),
                Lookup::Down(reason) => Err(CsiError::Unavailable(format!(
                    "enbd-server {id} holding a replica of {name} is unavailable: {reason}"
                ))),
                Lookup::Unknown => Err(CsiError::Unavailable(format!(
                    "enbd-server {id} holding a replica of {name} is not known (yet)"
                ))),
            }
        })
        .collect()
}

/// The record with the highest generation among the live servers holding `name`, with the
/// servers that hold a copy of the volume at all (a partial set left by an interrupted
/// create has copies but no record). Unlike a single copy's lookup, an error from any live
/// server is the answer: the set is only judged with every holder heard.
pub async fn find(
    servers: &Servers,
    name: &str,
) -> Result<(Option<pb::Membership>, Vec<(LiveServer, pb::Volume)>), CsiError> {
    let mut holders = Vec::new();
    for (server, found) in mgmt::volume_on_each(servers, name, CALL_TIMEOUT).await {
        if let Some(vol) = found? {
            holders.push((server, vol));
        }
    }
    let mut best: Option<pb::Membership> = None;
    for (server, _) in &holders {
        let record = membership(server, name).await?;
        if record.generation > best.as_ref().map_or(0, |b| b.generation) {
            best = Some(record);
        }
    }
    Ok((best, holders))
}

/// Creates the replicas `placed` lacks (empty, `size` bytes, the same labels) and writes
/// generation 1 on every one. `placed[0]` is the home; `home_has_content` says it was filled
/// from a snapshot or clone, so the others start OUT with every region dirty.
pub async fn complete_set(
    placed: &[LiveServer],
    name: &str,
    size: u64,
    labels: &std::collections::HashMap<String, String>,
    home_has_content: bool,
) -> Result<pb::Membership, CsiError> {
    for server in &placed[1..] {
        let mut client = server.client.clone();
        let req = pb::CreateVolumeRequest {
            name: name.to_owned(),
            size_bytes: size,
            source: None,
            labels: labels.clone(),
        };
        call(&server.id, client.create_volume(req)).await?;
    }
    let state = |i: usize| {
        if i == 0 || !home_has_content {
            ReplicaState::InSync
        } else {
            ReplicaState::Out
        }
    };
    let record = pb::Membership {
        generation: 1,
        members: placed
            .iter()
            .enumerate()
            .map(|(i, s)| pb::ReplicaMember {
                replica_id: s.id.to_string(),
                state: state(i) as i32,
                data_address: s.data_address.clone(),
                mgmt_url: s.mgmt_url.clone(),
            })
            .collect(),
        region_bytes: REGION_BYTES,
    };
    // No extra_dirty: a member that enters a record OUT starts with every region dirty on
    // each in-sync server, which is exactly "copy all of the content to it".
    // The home last: a record on the home is what makes the set visible as complete.
    for server in placed[1..].iter().chain(&placed[..1]) {
        let mut client = server.replica.clone();
        let req = pb::SetMembershipRequest {
            volume: name.to_owned(),
            membership: Some(record.clone()),
            extra_dirty: Vec::new(),
        };
        call(&server.id, client.set_membership(req)).await?;
    }
    tracing::info!(volume = %name, replicas = placed.len(), content = home_has_content,
        "replica set recorded at generation 1");
    Ok(record)
}

/// Deletes every replica named by the home's record, the home last (so a retry after a
/// partial delete still finds the record).
///
/// The members are the newest record's (followed from the home's): a replica added by a
/// replacement is deleted too, and one replaced away is not a member — if its server is
/// gone it does not hold the delete up (if it comes back, its stale copy stays until an
/// operator deletes it, or it is the home, deleted last here when live).
pub async fn delete_all(servers: &Servers, home: &LiveServer, name: &str) -> Result<(), CsiError> {
    let record = newest(servers, home, name).await?;
    let members = member_servers(servers, name, &record)?;
    for server in members.iter().filter(|s| s.id != home.id) {
        delete_one(server, name).await?;
    }
    delete_one(home, name).await
}

async fn delete_one(server: &LiveServer, name: &str) -> Result<(), CsiError> {
    let mut client = server.client.clone();
    let req = pb::DeleteVolumeRequest {
        name: name.to_owned(),
        force: false,
    };
    match call(&server.id, client.delete_volume(req)).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Grows every replica to `size` (before any node is told of the new size); returns the
/// smallest size now in force across them.
pub async fn expand_all(
    servers: &Servers,
    home: &LiveServer,
    name: &str,
    size: u64,
) -> Result<u64, CsiError> {
    let record = newest(servers, home, name).await?;
    let members = member_servers(servers, name, &record)?;
    let mut smallest = u64::MAX;
    for server in &members {
        let mut client = server.client.clone();
        let req = pb::ExpandVolumeRequest {
            name: name.to_owned(),
            size_bytes: size,
        };
        let vol = call(&server.id, client.expand_volume(req)).await?;
        smallest = smallest.min(vol.volume.map_or(size, |v| v.size_bytes));
    }
    Ok(smallest)
}

/// How a volume's replica set stands, as the controller sees it (a single copy has no
/// members and is always healthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorHealth {
    pub generation: u64,
    /// One line per member that is not in sync, or whose server does not answer.
    pub problems: Vec<String>,
    /// Some member is copying missed regions back (it will be in sync when done).
    pub resyncing: bool,
}

impl MirrorHealth {
    /// ControllerGetVolume's condition message: `None` when every member is in sync.
    pub fn abnormal(&self) -> Option<String> {
        (!self.problems.is_empty()).then(|| {
            format!(
                "degraded at generation {}: {}",
                self.generation,
                self.problems.join("; ")
            )
        })
    }
}

/// The replica set of `name` read from its servers (the newest record reached from `home`).
pub async fn health(
    servers: &Servers,
    home: &LiveServer,
    name: &str,
) -> Result<MirrorHealth, String> {
    let record = newest(servers, home, name)
        .await
        .map_err(|e| format!("replica membership unreadable on {}: {e}", home.id))?;
    let mut problems = Vec::new();
    let mut resyncing = false;
    for m in &record.members {
        let state = ReplicaState::try_from(m.state).unwrap_or(ReplicaState::Unspecified);
        if state != ReplicaState::InSync {
            problems.push(format!("replica {} is {}", m.replica_id, state_name(state)));
        }
        resyncing |= state == ReplicaState::Resyncing;
        if let Ok(id) = ServerId::parse(&m.replica_id)
            && !matches!(servers.lookup(&id), Lookup::Live(_))
        {
            problems.push(format!("enbd-server {id} is unreachable"));
        }
    }
    Ok(MirrorHealth {
        generation: record.generation,
        problems,
        resyncing,
    })
}

/// A one-line account of the replicas for ControllerGetVolume's condition: `None` when every
/// member is in sync at the record's generation.
pub async fn abnormal(servers: &Servers, home: &LiveServer, name: &str) -> Option<String> {
    match health(servers, home, name).await {
        Ok(h) => h.abnormal(),
        Err(message) => Some(message),
    }
}

fn state_name(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::InSync => "in sync",
        ReplicaState::Out => "out of sync (missed writes)",
        ReplicaState::Resyncing => "resyncing",
        ReplicaState::Unspecified => "in an unknown state",
    }
}

/// Where a snapshot of volume `name` (home `home`) is taken: the home for a single copy;
/// for a mirrored volume a replica that is in sync in the newest record *and* holds that
/// record itself (a replica that missed writes would give a stale point in time).
pub async fn snapshot_source(
    servers: &Servers,
    home: &LiveServer,
    name: &str,
) -> Result<LiveServer, CsiError> {
    let record = newest(servers, home, name).await?;
    if record.generation == 0 {
        return Ok(home.clone());
    }
    // The newest record among the members that answer.
    let mut records = Vec::new();
    for m in &record.members {
        let Ok(id) = ServerId::parse(&m.replica_id) else {
            continue;
        };
        if let Lookup::Live(s) = servers.lookup(&id)
            && let Ok(r) = membership(&s, name).await
        {
            records.push((s, r));
        }
    }
    let newest = records.iter().map(|(_, r)| r.generation).max().unwrap_or(0);
    let Some((_, best)) = records.iter().find(|(_, r)| r.generation == newest) else {
        return Err(CsiError::Unavailable(format!(
            "volume {name}: no replica answered"
        )));
    };
    let in_sync = |id: &ServerId| {
        best.members
            .iter()
            .any(|m| m.replica_id == id.as_str() && m.state == ReplicaState::InSync as i32)
    };
    // Prefer the home: the snapshot then sits where restores of it are placed first.
    let mut candidates: Vec<&(LiveServer, pb::Membership)> = records
        .iter()
        .filter(|(s, r)| r.generation == newest && in_sync(&s.id))
        .collect();
    candidates.sort_by_key(|(s, _)| s.id != home.id);
    candidates.first().map(|(s, _)| s.clone()).ok_or_else(|| {
        CsiError::Unavailable(format!(
            "volume {name}: no in-sync replica at generation {newest} is reachable"
        ))
    })
}

/// Whether `server` holds a replica of `name` according to the home's record (a snapshot of
/// a mirrored volume may sit on any in-sync replica).
pub async fn is_member(
    servers: &Servers,
    home: &LiveServer,
    name: &str,
    server: &ServerId,
) -> bool {
    newest(servers, home, name)
        .await
        .is_ok_and(|r| r.members.iter().any(|m| m.replica_id == server.as_str()))
}
