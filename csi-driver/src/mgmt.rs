//! One management call to one enbd-server under a deadline, and the volume lookups built on
//! it that the controller's services and the replica layer share.
//!
//! A call that outlives its deadline is `Unavailable` (the sidecars retry); a server's own
//! refusal keeps its code (see [`CsiError::server`]).

use std::time::Duration;

use enbd_proto::enbd as pb;
use enbd_proto::ids::ServerId;
use tonic::{Response, Status};

use crate::error::CsiError;
use crate::servers::{LiveServer, Servers};

/// Awaits one management call with a deadline, classifying the failure.
pub async fn call<T>(
    server: &ServerId,
    timeout: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, CsiError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(CsiError::Unavailable(format!(
            "enbd-server {server} did not answer within {}s",
            timeout.as_secs()
        ))),
        Ok(Err(status)) => Err(CsiError::server(server, status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

/// The volume `name` on `server`, `None` if that server has none.
pub async fn get_volume(
    server: &LiveServer,
    name: &str,
    timeout: Duration,
) -> Result<Option<pb::Volume>, CsiError> {
    let mut client = server.client.clone();
    let req = pb::GetVolumeRequest {
        name: name.to_owned(),
    };
    match call(&server.id, timeout, client.get_volume(req)).await {
        Ok(resp) => Ok(resp.volume),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every live server's answer, asked concurrently, to "do you hold volume `name`?", in the
/// order [`Servers::live`] gives them. Each caller decides what a failed answer means.
pub async fn volume_on_each(
    servers: &Servers,
    name: &str,
    timeout: Duration,
) -> Vec<(LiveServer, Result<Option<pb::Volume>, CsiError>)> {
    let live = servers.live();
    let found = futures::future::join_all(live.iter().map(|s| get_volume(s, name, timeout))).await;
    live.into_iter().zip(found).collect()
}
