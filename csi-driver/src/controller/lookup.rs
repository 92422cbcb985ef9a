//! Finding things for the operations: the live server behind an ID, a volume or
//! snapshot on one server, and an object by CSI name on every live server.

use enbd_proto::enbd as pb;
use enbd_proto::ids::{ObjectName, ServerId, VolumeId};

use super::{CALL_TIMEOUT, required};
use crate::error::CsiError;
use crate::mgmt;
use crate::names;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

impl State {
    /// The live server holding an object, `None` if the server is unknown, or
    /// `Unavailable` if it is known but down.
    pub(super) fn holder(
        &self,
        server: &ServerId,
        what: &str,
    ) -> Result<Option<LiveServer>, CsiError> {
        match self.servers.lookup(server) {
            Lookup::Live(s) => Ok(Some(s)),
            Lookup::Down(reason) => Err(CsiError::Unavailable(format!(
                "enbd-server {server} holding {what} is unavailable: {reason}"
            ))),
            Lookup::Unknown => Ok(None),
        }
    }

    pub(super) async fn get_volume(
        &self,
        server: &LiveServer,
        name: &ObjectName,
    ) -> Result<Option<pb::Volume>, CsiError> {
        mgmt::get_volume(server, name.as_str(), CALL_TIMEOUT).await
    }

    pub(super) async fn list_snapshots_on(
        &self,
        server: &LiveServer,
        name: &str,
        source_volume: &str,
    ) -> Result<Vec<pb::Snapshot>, CsiError> {
        let mut client = server.client.clone();
        let req = pb::ListSnapshotsRequest {
            max_entries: 0,
            starting_token: String::new(),
            name: name.to_owned(),
            source_volume: source_volume.to_owned(),
        };
        Ok(
            mgmt::call(&server.id, CALL_TIMEOUT, client.list_snapshots(req))
                .await?
                .snapshots,
        )
    }

    /// The snapshot `name` on `server`, `None` if that server has none.
    pub(super) async fn get_snapshot_on(
        &self,
        server: &LiveServer,
        name: &ObjectName,
    ) -> Result<Option<pb::Snapshot>, CsiError> {
        Ok(self
            .list_snapshots_on(server, name.as_str(), "")
            .await?
            .into_iter()
            .find(|s| s.name == name.as_str()))
    }

    /// The volume a CSI name stands for on any live server (see [`by_csi_name`]).
    pub(super) async fn find_volume_for(
        &self,
        csi_name: &str,
        name: &ObjectName,
    ) -> Result<Option<(ObjectName, LiveServer, pb::Volume)>, CsiError> {
        by_csi_name(
            csi_name,
            name,
            |n| async move { self.find_volume(&n).await },
        )
        .await
    }

    /// The snapshot a CSI name stands for on any live server (see [`by_csi_name`]).
    pub(super) async fn find_snapshot_for(
        &self,
        csi_name: &str,
        name: &ObjectName,
    ) -> Result<Option<(ObjectName, LiveServer, pb::Snapshot)>, CsiError> {
        by_csi_name(
            csi_name,
            name,
            |n| async move { self.find_snapshot(&n).await },
        )
        .await
    }

    /// A volume named `name` on any live server (CreateVolume's idempotency): the first
    /// server in order that has it; a server failing before that one is an error.
    async fn find_volume(
        &self,
        name: &ObjectName,
    ) -> Result<Option<(LiveServer, pb::Volume)>, CsiError> {
        for (server, result) in
            mgmt::volume_on_each(&self.servers, name.as_str(), CALL_TIMEOUT).await
        {
            if let Some(vol) = result? {
                return Ok(Some((server, vol)));
            }
        }
        Ok(None)
    }

    /// A snapshot named `name` on any live server (CreateSnapshot's idempotency).
    async fn find_snapshot(
        &self,
        name: &ObjectName,
    ) -> Result<Option<(LiveServer, pb::Snapshot)>, CsiError> {
        let live = self.servers.live();
        let found =
            futures::future::join_all(live.iter().map(|s| self.get_snapshot_on(s, name))).await;
        for (server, result) in live.into_iter().zip(found) {
            if let Some(snap) = result? {
                return Ok(Some((server, snap)));
            }
        }
        Ok(None)
    }

    /// The live server and volume for an existing-volume RPC; unknown or
    /// malformed IDs are NotFound.
    pub(super) async fn existing_volume(
        &self,
        volume_id: &str,
    ) -> Result<(VolumeId, LiveServer, pb::Volume), CsiError> {
        required(volume_id, "volume_id")?;
        let not_found = || CsiError::NotFound(format!("volume {volume_id} not found"));
        let id = VolumeId::parse(volume_id).map_err(|_| not_found())?;
        // A replacement may have moved a mirrored volume off the server its id names.
        let server = replicas::acting_home(
            &self.servers,
            id.server(),
            id.name().as_str(),
            &format!("volume {id}"),
        )
        .await?
        .ok_or_else(not_found)?;
        let vol = self
            .get_volume(&server, id.name())
            .await?
            .ok_or_else(not_found)?;
        Ok((id, server, vol))
    }

    /// Every volume on every live server, keyed by volume ID. A server that
    /// fails to list is left out (and logged): a partial answer during an
    /// outage beats none, and the attacher only re-publishes what is missing.
    pub(super) async fn all_volumes(&self) -> Vec<(VolumeId, pb::Volume)> {
        let live = self.servers.live();
        let lists = futures::future::join_all(live.iter().map(|s| {
            let mut client = s.client.clone();
            async move {
                let req = pb::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: String::new(),
                };
                mgmt::call(&s.id, CALL_TIMEOUT, client.list_volumes(req)).await
            }
        }))
        .await;
        let mut out = Vec::new();
        for (server, list) in live.iter().zip(lists) {
            match list {
                Ok(list) => out.extend(list.volumes.into_iter().filter_map(|v| {
                    let name = ObjectName::parse(&v.name).ok()?;
                    Some((VolumeId::new(server.id.clone(), name).ok()?, v))
                })),
                Err(e) => {
                    tracing::warn!(server = %server.id, error = %e, "ListVolumes left this server out")
                }
            }
        }
        out
    }
}

/// The object a CSI name stands for, found by `find` on any live server: under its name
/// (see [`names`]), or under the name an earlier version gave it, if that name still makes
/// a valid ID on the server holding it. Volumes and snapshots share the ID rule (the
/// length of `<server>/<name>`), so one check serves both.
async fn by_csi_name<T, F>(
    csi_name: &str,
    name: &ObjectName,
    find: impl Fn(ObjectName) -> F,
) -> Result<Option<(ObjectName, LiveServer, T)>, CsiError>
where
    F: Future<Output = Result<Option<(LiveServer, T)>, CsiError>>,
{
    if let Some((server, found)) = find(name.clone()).await? {
        return Ok(Some((name.clone(), server, found)));
    }
    if let Some(old) = names::legacy_name(csi_name)
        && let Some((server, found)) = find(old.clone()).await?
        && VolumeId::new(server.id.clone(), old.clone()).is_ok()
    {
        return Ok(Some((old, server, found)));
    }
    Ok(None)
}
