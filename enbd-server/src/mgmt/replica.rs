//! `enbd.v1.ReplicaService`: mirror membership and dirty-region bitmaps, kept by the store
//! ([`crate::store::membership`] states the contract and its limits). Handlers only translate
//! between protobuf and the store; the work runs through [`Mgmt::run`] like every store call.
//! Every method names one volume, and a node caller must hold that volume's access token
//! when node scoping is on ([`super::scope`]).

use enbd_proto::enbd::replica_service_server::ReplicaService;
use enbd_proto::enbd::{self as pb, ReplicaState};
use tonic::{Request, Response, Status};

use super::Mgmt;
use crate::store::membership::{Member, MemberState, Membership, SetRequest};

fn membership_to_pb(m: Membership) -> pb::Membership {
    pb::Membership {
        generation: m.generation,
        region_bytes: m.region_bytes,
        members: m
            .members
            .into_iter()
            .map(|x| pb::ReplicaMember {
                replica_id: x.replica_id,
                state: match x.state {
                    MemberState::InSync => ReplicaState::InSync,
                    MemberState::Out => ReplicaState::Out,
                    MemberState::Resyncing => ReplicaState::Resyncing,
                } as i32,
                data_address: x.data_address,
                mgmt_url: x.mgmt_url,
            })
            .collect(),
    }
}

fn membership_from_pb(m: pb::Membership) -> Result<Membership, Status> {
    let members = m
        .members
        .into_iter()
        .map(|x| {
            let state = match ReplicaState::try_from(x.state) {
                Ok(ReplicaState::InSync) => MemberState::InSync,
                Ok(ReplicaState::Out) => MemberState::Out,
                Ok(ReplicaState::Resyncing) => MemberState::Resyncing,
                Ok(ReplicaState::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "invalid membership: member {:?} has no valid state ({})",
                        x.replica_id, x.state
                    )));
                }
            };
            Ok(Member {
                replica_id: x.replica_id,
                state,
                data_address: x.data_address,
                mgmt_url: x.mgmt_url,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Membership {
        generation: m.generation,
        region_bytes: m.region_bytes,
        members,
    })
}

#[tonic::async_trait]
impl ReplicaService for Mgmt {
    async fn get_membership(
        &self,
        req: Request<pb::GetMembershipRequest>,
    ) -> Result<Response<pb::GetMembershipResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let (m, dirty) = self.run(move |s| s.get_membership(&r.volume)).await?;
        Ok(Response::new(pb::GetMembershipResponse {
            membership: Some(membership_to_pb(m)),
            dirty_regions: dirty.into_iter().collect(),
        }))
    }

    async fn set_membership(
        &self,
        req: Request<pb::SetMembershipRequest>,
    ) -> Result<Response<pb::SetMembershipResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let membership = membership_from_pb(r.membership.ok_or_else(|| {
            Status::invalid_argument("invalid membership: the membership field is missing")
        })?)?;
        let extra_dirty = r
            .extra_dirty
            .into_iter()
            .flat_map(|d| {
                let id = d.replica_id;
                d.ranges
                    .into_iter()
                    .map(move |b| (id.clone(), b.offset, b.length))
            })
            .collect();
        let req = SetRequest {
            membership,
            extra_dirty,
        };
        let m = self.run(move |s| s.set_membership(&r.volume, req)).await?;
        Ok(Response::new(pb::SetMembershipResponse {
            membership: Some(membership_to_pb(m)),
        }))
    }

    async fn get_dirty_regions(
        &self,
        req: Request<pb::GetDirtyRegionsRequest>,
    ) -> Result<Response<pb::GetDirtyRegionsResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let (region_bytes, region_count, bitmap) = self
            .run(move |s| s.dirty_regions(&r.volume, &r.replica_id))
            .await?;
        Ok(Response::new(pb::GetDirtyRegionsResponse {
            region_bytes,
            region_count,
            bitmap,
        }))
    }

    async fn clear_dirty_regions(
        &self,
        req: Request<pb::ClearDirtyRegionsRequest>,
    ) -> Result<Response<pb::ClearDirtyRegionsResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let remaining = self
            .run(move |s| s.clear_dirty_regions(&r.volume, &r.replica_id, &r.regions))
            .await?;
        Ok(Response::new(pb::ClearDirtyRegionsResponse { remaining }))
    }

    async fn update_activity(
        &self,
        req: Request<pb::UpdateActivityRequest>,
    ) -> Result<Response<pb::UpdateActivityResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let active = self
            .run(move |s| s.update_activity(&r.volume, r.region_bytes, &r.mark, &r.clear))
            .await?;
        Ok(Response::new(pb::UpdateActivityResponse { active }))
    }

    async fn get_activity(
        &self,
        req: Request<pb::GetActivityRequest>,
    ) -> Result<Response<pb::GetActivityResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().volume)?;
        let r = req.into_inner();
        let (region_bytes, region_count, bitmap) = self.run(move |s| s.activity(&r.volume)).await?;
        Ok(Response::new(pb::GetActivityResponse {
            region_bytes,
            region_count,
            bitmap,
        }))
    }
}
