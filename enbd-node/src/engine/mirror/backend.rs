//! What the mirror needs from one replica, as two small traits so the mirror's rules can be
//! tested against in-memory fakes: [`ReplicaControl`] (the server's `ReplicaService` and
//! volume facts, over the management gRPC) and [`ReplicaData`] (the NBD data path, a
//! [`Client`]). The production implementations are [`GrpcControl`] and [`Client`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use enbd_proto::enbd::ACCESS_TOKEN_METADATA;
use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{
    ByteRange, ClearDirtyRegionsRequest, CreateVolumeRequest, DirtyRanges, GetActivityRequest,
    GetDirtyRegionsRequest, GetMembershipRequest, GetVolumeRequest, Membership, ReplicaMember,
    ReplicaState, SetMembershipRequest, UpdateActivityRequest, Volume,
};
use futures::future::BoxFuture;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::membership::{Endpoint as MemberEndpoint, MemberState, Record};
use crate::engine::access::AccessCredential;
use crate::engine::{Client, ClientConfig, EngineError, EngineStatus, Geometry, IoError};

/// A management call that failed (the replica counts as unreachable for it).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ControlError(pub String);

/// Ranges to mark dirty for one member: `(member, [(offset, length)])`.
pub type ExtraDirty = Vec<(String, Vec<(u64, u64)>)>;

/// Facts about the volume on one replica's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeFacts {
    pub size: u64,
    /// No content source and nothing allocated: newly created.
    pub fresh: bool,
}

/// One replica's management side.
pub trait ReplicaControl: Send + Sync {
    fn get_membership(&self) -> BoxFuture<'_, Result<Record, ControlError>>;
    /// Writes `record` (durably) with `extra` dirty ranges; returns the record in force.
    fn set_membership(
        &self,
        record: Record,
        extra: ExtraDirty,
    ) -> BoxFuture<'_, Result<Record, ControlError>>;
    /// Region indexes set in `member`'s bitmap on this server.
    fn dirty_regions<'a>(
        &'a self,
        member: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, ControlError>>;
    /// Clears regions of `member`'s bitmap; returns how many remain set.
    fn clear_dirty<'a>(
        &'a self,
        member: &'a str,
        regions: Vec<u64>,
    ) -> BoxFuture<'a, Result<u64, ControlError>>;
    fn volume(&self) -> BoxFuture<'_, Result<VolumeFacts, ControlError>>;
    /// Sets `mark` (durably) then clears `clear` in the activity log (indexes in
    /// `region_bytes` regions); returns how many regions stay set.
    fn update_activity(
        &self,
        region_bytes: u32,
        mark: Vec<u64>,
        clear: Vec<u64>,
    ) -> BoxFuture<'_, Result<u64, ControlError>>;
    /// The activity log: its region size and the regions set.
    fn activity(&self) -> BoxFuture<'_, Result<(u32, Vec<u64>), ControlError>>;
}

/// One replica's data path.
pub trait ReplicaData: Send + Sync {
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, IoError>>;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), IoError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), IoError>>;
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<(), IoError>>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> BoxFuture<'_, Result<(), IoError>>;
    fn geometry(&self) -> Geometry;
    /// Some channel is connected.
    fn is_up(&self) -> bool;
    fn engine_status(&self) -> Option<EngineStatus>;
    /// Re-reads the export's size and serves up to it (only grows); returns the size now.
    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, EngineError>>;
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Opens a replica's data path (again, after it failed).
pub trait DataConnector: Send + Sync {
    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn ReplicaData>, EngineError>>;
}

impl ReplicaData for Client {
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, IoError>> {
        Box::pin(Client::read(self, offset, len))
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(Client::write(self, offset, data, fua))
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(Client::flush(self))
    }
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(Client::trim(self, offset, len))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(Client::write_zeroes(self, offset, len, no_hole))
    }
    fn geometry(&self) -> Geometry {
        Client::geometry(self)
    }
    fn is_up(&self) -> bool {
        let st = Client::status(self);
        st.failure.is_none()
            && st
                .channels
                .iter()
                .any(|c| c.state == crate::engine::ChannelState::Up)
    }
    fn engine_status(&self) -> Option<EngineStatus> {
        Some(Client::status(self))
    }
    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, EngineError>> {
        Box::pin(Client::refresh_size(self))
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(Client::shutdown(self))
    }
}

/// Connects a [`Client`] with a fixed configuration.
pub struct ClientConnector(pub ClientConfig);

impl DataConnector for ClientConnector {
    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn ReplicaData>, EngineError>> {
        Box::pin(async move {
            let c = Client::connect(self.0.clone()).await?;
            Ok(Arc::new(c) as Arc<dyn ReplicaData>)
        })
    }
}

/// `ReplicaService` + `VolumeService` of one enbd-server, each call bounded by `timeout`.
pub struct GrpcControl {
    volume: String,
    replicas: ReplicaServiceClient<Channel>,
    volumes: VolumeServiceClient<Channel>,
    /// The volume's access token, sent on every call over TLS (servers at `--access
    /// published` refuse node callers without it); marked sensitive, so it is never indexed
    /// by HPACK nor shown by `Debug`.
    token: Option<MetadataValue<Ascii>>,
}

impl GrpcControl {
    /// A lazily connected client of the server at `mgmt`: `HOST:PORT` (plain text) or
    /// `https://HOST:PORT` (TLS with `tls`, the node's client certificate).
    /// `access`: the volume's token, sent only with TLS.
    pub fn new(
        mgmt: &str,
        volume: &str,
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
        access: Option<&AccessCredential>,
    ) -> Result<Self, ControlError> {
        let url = match mgmt.strip_prefix("https://") {
            Some(_) => mgmt.to_owned(),
            None => format!("http://{mgmt}"),
        };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| ControlError(format!("management address {mgmt:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if mgmt.starts_with("https://") {
            let tls = tls.ok_or_else(|| {
                ControlError(format!(
                    "management address {mgmt} is https but the node has no --tls-ca/--tls-cert/--tls-key"
                ))
            })?;
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| ControlError(format!("management TLS for {mgmt}: {e}")))?;
        }
        let token = match access {
            Some(a) if mgmt.starts_with("https://") => {
                let text = std::str::from_utf8(a.token().as_bytes())
                    .map_err(|_| ControlError("the access token is not ASCII".to_owned()))?;
                let mut v = MetadataValue::try_from(text).map_err(|_| {
                    ControlError("the access token is not valid metadata".to_owned())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        let channel = endpoint.connect_lazy();
        Ok(Self {
            volume: volume.to_owned(),
            replicas: ReplicaServiceClient::new(channel.clone()),
            volumes: VolumeServiceClient::new(channel),
            token,
        })
    }

    /// The volume on this server (`None`: it has none), with everything GetVolume says.
    pub async fn find_volume(&self) -> Result<Option<Volume>, tonic::Status> {
        let got = self
            .volumes
            .clone()
            .get_volume(self.request(GetVolumeRequest {
                name: self.volume.clone(),
            }))
            .await;
        match got {
            Ok(resp) => Ok(resp.into_inner().volume),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// Creates the volume on this server, empty, with `size` bytes and `labels` (a role
    /// that may not create volumes gets PERMISSION_DENIED: see `Mirror::replace`).
    pub async fn create_volume(
        &self,
        size: u64,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        self.volumes
            .clone()
            .create_volume(self.request(CreateVolumeRequest {
                name: self.volume.clone(),
                size_bytes: size,
                source: None,
                labels,
            }))
            .await
            .map(drop)
    }

    /// A request carrying the access token, if there is one.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert(ACCESS_TOKEN_METADATA, t.clone());
        }
        req
    }
}

fn status_err(s: tonic::Status) -> ControlError {
    ControlError(format!("{:?}: {}", s.code(), s.message()))
}

pub(crate) fn to_proto(r: &Record) -> Membership {
    Membership {
        generation: r.generation,
        members: r
            .members
            .iter()
            .map(|(id, s)| {
                let ep = r.endpoints.get(id);
                ReplicaMember {
                    replica_id: id.clone(),
                    state: match s {
                        MemberState::InSync => ReplicaState::InSync,
                        MemberState::Out => ReplicaState::Out,
                        MemberState::Resyncing => ReplicaState::Resyncing,
                    } as i32,
                    data_address: ep.map(|e| e.nbd.clone()).unwrap_or_default(),
                    // An https:// address keeps its scheme; a bare one is plain text.
                    mgmt_url: ep
                        .filter(|e| !e.mgmt.is_empty())
                        .map(|e| {
                            if e.mgmt.starts_with("https://") {
                                e.mgmt.clone()
                            } else {
                                format!("http://{}", e.mgmt)
                            }
                        })
                        .unwrap_or_default(),
                }
            })
            .collect(),
        region_bytes: r.region_bytes,
    }
}

pub(crate) fn from_proto(m: Option<Membership>) -> Result<Record, ControlError> {
    let Some(m) = m else {
        return Ok(Record::none());
    };
    let mut members = Vec::with_capacity(m.members.len());
    let mut endpoints = BTreeMap::new();
    for mem in m.members {
        let state = match ReplicaState::try_from(mem.state) {
            Ok(ReplicaState::InSync) => MemberState::InSync,
            Ok(ReplicaState::Out) => MemberState::Out,
            Ok(ReplicaState::Resyncing) => MemberState::Resyncing,
            _ => {
                return Err(ControlError(format!(
                    "member {} has unknown state {}",
                    mem.replica_id, mem.state
                )));
            }
        };
        if !mem.data_address.is_empty() || !mem.mgmt_url.is_empty() {
            let mgmt = mem
                .mgmt_url
                .strip_prefix("http://")
                .unwrap_or(&mem.mgmt_url)
                .trim_end_matches('/')
                .to_owned();
            endpoints.insert(
                mem.replica_id.clone(),
                MemberEndpoint {
                    nbd: mem.data_address,
                    mgmt,
                },
            );
        }
        members.push((mem.replica_id, state));
    }
    Ok(Record {
        generation: m.generation,
        members,
        region_bytes: m.region_bytes,
        endpoints,
    })
}

/// Region indexes whose bits are set (bit i = byte i/8, bit i%8, least significant first).
pub fn bitmap_regions(bitmap: &[u8], region_count: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (byte_idx, byte) in bitmap.iter().enumerate() {
        if *byte == 0 {
            continue;
        }
        for bit in 0..8 {
            let r = byte_idx as u64 * 8 + bit;
            if r < region_count && byte & (1 << bit) != 0 {
                out.push(r);
            }
        }
    }
    out
}

impl ReplicaControl for GrpcControl {
    fn get_membership(&self) -> BoxFuture<'_, Result<Record, ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .get_membership(self.request(GetMembershipRequest {
                    volume: self.volume.clone(),
                }))
                .await
                .map_err(status_err)?;
            from_proto(resp.into_inner().membership)
        })
    }

    fn set_membership(
        &self,
        record: Record,
        extra: ExtraDirty,
    ) -> BoxFuture<'_, Result<Record, ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .set_membership(
                    self.request(SetMembershipRequest {
                        volume: self.volume.clone(),
                        membership: Some(to_proto(&record)),
                        extra_dirty: extra
                            .into_iter()
                            .map(|(id, ranges)| DirtyRanges {
                                replica_id: id,
                                ranges: ranges
                                    .into_iter()
                                    .map(|(offset, length)| ByteRange { offset, length })
                                    .collect(),
                            })
                            .collect(),
                    }),
                )
                .await
                .map_err(status_err)?;
            from_proto(resp.into_inner().membership)
        })
    }

    fn dirty_regions<'a>(
        &'a self,
        member: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .get_dirty_regions(self.request(GetDirtyRegionsRequest {
                    volume: self.volume.clone(),
                    replica_id: member.to_owned(),
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            Ok(bitmap_regions(&resp.bitmap, resp.region_count))
        })
    }

    fn clear_dirty<'a>(
        &'a self,
        member: &'a str,
        regions: Vec<u64>,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .clear_dirty_regions(self.request(ClearDirtyRegionsRequest {
                    volume: self.volume.clone(),
                    replica_id: member.to_owned(),
                    regions,
                }))
                .await
                .map_err(status_err)?;
            Ok(resp.into_inner().remaining)
        })
    }

    fn volume(&self) -> BoxFuture<'_, Result<VolumeFacts, ControlError>> {
        Box::pin(async move {
            let resp = self
                .volumes
                .clone()
                .get_volume(self.request(GetVolumeRequest {
                    name: self.volume.clone(),
                }))
                .await
                .map_err(status_err)?;
            let v = resp
                .into_inner()
                .volume
                .ok_or_else(|| ControlError("GetVolume returned no volume".into()))?;
            Ok(VolumeFacts {
                size: v.size_bytes,
                fresh: v.source.is_none() && v.allocated_bytes == 0,
            })
        })
    }

    fn update_activity(
        &self,
        region_bytes: u32,
        mark: Vec<u64>,
        clear: Vec<u64>,
    ) -> BoxFuture<'_, Result<u64, ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .update_activity(self.request(UpdateActivityRequest {
                    volume: self.volume.clone(),
                    region_bytes,
                    mark,
                    clear,
                }))
                .await
                .map_err(status_err)?;
            Ok(resp.into_inner().active)
        })
    }

    fn activity(&self) -> BoxFuture<'_, Result<(u32, Vec<u64>), ControlError>> {
        Box::pin(async move {
            let resp = self
                .replicas
                .clone()
                .get_activity(self.request(GetActivityRequest {
                    volume: self.volume.clone(),
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            Ok((
                resp.region_bytes,
                bitmap_regions(&resp.bitmap, resp.region_count),
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_are_least_significant_first() {
        assert_eq!(
            bitmap_regions(&[0b0000_0101, 0b1000_0000], 16),
            vec![0, 2, 15]
        );
        // Bits past region_count are padding.
        assert_eq!(bitmap_regions(&[0xff], 3), vec![0, 1, 2]);
        assert!(bitmap_regions(&[], 0).is_empty());
    }

    #[test]
    fn records_round_trip_through_the_proto() {
        let r = Record {
            generation: 4,
            members: vec![
                ("a".into(), MemberState::InSync),
                ("b".into(), MemberState::Out),
                ("c".into(), MemberState::Resyncing),
            ],
            region_bytes: 1 << 20,
            endpoints: [(
                "b".to_owned(),
                MemberEndpoint {
                    nbd: "10.0.0.2:10809".into(),
                    mgmt: "10.0.0.2:10810".into(),
                },
            )]
            .into(),
        };
        let p = to_proto(&r);
        assert_eq!(p.members[1].mgmt_url, "http://10.0.0.2:10810");
        assert_eq!(
            p.members[0].data_address, "",
            "unknown endpoints stay empty"
        );
        assert_eq!(from_proto(Some(p)), Ok(r));
        assert_eq!(from_proto(None), Ok(Record::none()));
    }
}
