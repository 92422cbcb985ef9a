//! CreateVolume for mirrored volumes (`replicas` > 1): the controller's side of a replica
//! set is placing it and completing it (see [`crate::replicas`]).

use enbd_proto::csi::*;
use enbd_proto::enbd as pb;
use enbd_proto::ids::{ObjectName, VolumeId};
use enbd_proto::params::{CTX_REPLICAS, VolumeParams};

use super::source::{Source, source_of};
use crate::capability;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::names;
use crate::placement;
use crate::replicas;
use crate::servers::LiveServer;
use crate::state::State;

impl State {
    /// CreateVolume for `replicas` > 1 (see `replicas`): an existing complete set is judged
    /// like a single volume, a partial one (an interrupted earlier attempt) is completed, and
    /// otherwise the replicas are placed on distinct servers, the home first.
    pub(super) async fn create_replicated(
        &self,
        name: ObjectName,
        req: CreateVolumeRequest,
        params: VolumeParams,
        source: Option<Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        let range = req.capacity_range.as_ref();
        // As for a single copy: the full CSI name is recorded, so a (hashed) long name that
        // collides with another CSI name is AlreadyExists rather than the other's volume.
        let mut labels = names::volume_labels(params.to_context(), &req.name, &req.parameters);
        let n = params.replicas as usize;
        let (record, holders) = replicas::find(&self.servers, name.as_str()).await?;
        for (server, vol) in &holders {
            let differs = if !capacity::satisfies(vol.size_bytes, range) {
                Some("a size outside the requested capacity range")
            } else if names::comparable_labels(&vol.labels) != names::comparable_labels(&labels) {
                Some("other parameters")
            } else {
                None
            };
            if let Some(what) = differs {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists on {} with {what}",
                    server.id
                )));
            }
        }
        if let Some(record) = record {
            let members = replicas::member_servers(&self.servers, name.as_str(), &record)?;
            let Some((_, vol)) = members
                .first()
                .and_then(|home| holders.iter().find(|(s, _)| s.id == home.id))
            else {
                return Err(CsiError::Unavailable(format!(
                    "volume {name}: the home replica did not answer"
                )));
            };
            if source_of(&members[0].id, vol) != source {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists with a different content source"
                )));
            }
            return self.replicated_response(&members, &name, vol, params, source.as_ref());
        }

        let (content, size, pb_source) = self
            .resolve_source(
                source.as_ref(),
                range,
                capability::fs_floor(&req.volume_capabilities, params.fs_type),
            )
            .await?;
        // The home: the source's server (it holds the content), else the home a partial
        // set's copies name, else one of its copies.
        let labeled = holders
            .iter()
            .find_map(|(_, v)| v.labels.get(names::HOME_LABEL));
        let home = content.or_else(|| {
            let mut partial: Vec<_> = holders.iter().map(|(s, _)| s.clone()).collect();
            partial.sort_by_key(|s| {
                (
                    Some(s.id.as_str()) != labeled.map(String::as_str),
                    s.id.clone(),
                )
            });
            partial.into_iter().next()
        });
        let mut fixed: Vec<LiveServer> = home.into_iter().collect();
        for (server, _) in &holders {
            if fixed.iter().all(|f| f.id != server.id) && fixed.len() < n {
                fixed.push(server.clone());
            }
        }
        let placed = placement::place_replicas(&self.servers.live(), size, n, &fixed).await?;
        let home = &placed[0];
        VolumeId::new(home.id.clone(), name.clone()).map_err(|e| invalid(e.to_string()))?;
        labels.insert(names::HOME_LABEL.to_owned(), home.id.to_string());
        tracing::info!(volume = %name, home = %home.id, replicas = n, size, "creating mirrored volume");
        let create = pb::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            source: pb_source
                .clone()
                .map(|kind| pb::ContentSource { kind: Some(kind) }),
            labels: labels.clone(),
        };
        // The home's content first (a clone copies there in the background); the other
        // replicas are made and resynced from it only once it is complete.
        let vol = super::source::create_on(home, create).await?;
        replicas::complete_set(
            &placed,
            name.as_str(),
            vol.size_bytes,
            &labels,
            pb_source.is_some(),
        )
        .await?;
        self.replicated_response(&placed, &name, &vol, params, source.as_ref())
    }

    /// The response for a mirrored volume: the home's id and context, plus every replica.
    pub(super) fn replicated_response(
        &self,
        members: &[LiveServer],
        name: &ObjectName,
        vol: &pb::Volume,
        params: VolumeParams,
        source: Option<&Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        let mut resp = self.volume_response(&members[0], name, vol, params, source)?;
        if let Some(v) = resp.volume.as_mut() {
            let list: Vec<String> = members
                .iter()
                .map(|m| replicas::endpoint(m).to_string())
                .collect();
            v.volume_context
                .insert(CTX_REPLICAS.to_owned(), list.join(","));
        }
        Ok(resp)
    }
}
