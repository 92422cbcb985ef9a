//! GetCapacity: the free space of the live servers, as placement sees it.

use enbd_proto::csi::*;
use enbd_proto::params::VolumeParams;

use super::to_i64;
use crate::capability;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::placement;
use crate::state::State;

impl State {
    pub(super) async fn get_capacity(
        &self,
        req: GetCapacityRequest,
    ) -> Result<GetCapacityResponse, CsiError> {
        VolumeParams::from_map(&req.parameters).map_err(|e| invalid(e.to_string()))?;
        if !req.volume_capabilities.is_empty()
            && capability::check_all(&req.volume_capabilities).is_err()
        {
            // No storage can hold a volume with capabilities we do not support.
            return Ok(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            });
        }
        let free = placement::free_space(&self.servers.live()).await;
        let total: u64 = free.iter().map(|(_, f)| *f).sum();
        let largest = free.iter().map(|(_, f)| *f).max().unwrap_or(0);
        Ok(GetCapacityResponse {
            available_capacity: to_i64(total),
            maximum_volume_size: Some(to_i64(largest - largest % capacity::BLOCK)),
            minimum_volume_size: Some(to_i64(capacity::BLOCK)),
        })
    }
}
