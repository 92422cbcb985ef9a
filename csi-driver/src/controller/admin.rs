//! The tonic service of the controller's operator actions (`enbd.v1.ControllerAdminService`),
//! served on the CSI socket beside Identity and Controller: reachable only from inside the
//! controller's pod, with the same one error mapping as the CSI RPCs.

use std::sync::Arc;

use enbd_proto::enbd::controller_admin_service_server::ControllerAdminService;
use enbd_proto::enbd::{PrepareReplacementRequest, PrepareReplacementResponse};
use tonic::{Request, Response, Status};

use crate::state::State;

pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl ControllerAdminService for AdminService {
    async fn prepare_replacement(
        &self,
        req: Request<PrepareReplacementRequest>,
    ) -> Result<Response<PrepareReplacementResponse>, Status> {
        let s = Arc::clone(&self.state);
        self.state
            .call(
                "PrepareReplacement",
                s.prepare_replacement(req.into_inner()),
            )
            .await
    }
}
