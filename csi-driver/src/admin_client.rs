//! The client side of the operator subcommands: one call to the controller's
//! `ControllerAdminService` on its unix socket, its answer printed for a person (and the
//! `--with` argument of the node's command on a line of its own, for scripts).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use enbd_proto::enbd::controller_admin_service_client::ControllerAdminServiceClient;
use enbd_proto::enbd::{PrepareReplacementRequest, PrepareReplacementResponse};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cli::PrepareReplacementArgs;

/// Creating the volume and granting it may wait on two servers' management calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

async fn connect(socket: PathBuf) -> anyhow::Result<Channel> {
    let shown = socket.display().to_string();
    // The URI is required by tonic and ignored: the connector dials the socket.
    Endpoint::from_static("http://controller.local")
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .with_context(|| format!("no csi-driver answers on {shown} (is this its pod?)"))
}

/// Asks the controller at `socket` to prepare a replacement.
pub async fn prepare_replacement(
    socket: PathBuf,
    args: &PrepareReplacementArgs,
) -> anyhow::Result<PrepareReplacementResponse> {
    let mut client = ControllerAdminServiceClient::new(connect(socket).await?);
    let req = PrepareReplacementRequest {
        volume_id: args.volume_id.clone(),
        replica: args.replica.clone(),
        target: args.target.clone().unwrap_or_default(),
    };
    let resp = client.prepare_replacement(req).await.map_err(|s| {
        anyhow::anyhow!(
            "PrepareReplacement refused ({:?}): {}",
            s.code(),
            s.message()
        )
    })?;
    Ok(resp.into_inner())
}

/// What `csi-driver prepare-replacement` prints: a sentence, then the `--with` argument
/// alone on the last line.
pub fn describe(args: &PrepareReplacementArgs, r: &PrepareReplacementResponse) -> String {
    let made = if r.created {
        "volume created there"
    } else {
        "volume found there"
    };
    format!(
        "{}: replacement for replica {} prepared on {} ({made}; granted to {}).\n\
         Now, in the node plugin's pod on that node: enbd-node replace --volume {} --replica {} --with {}\n{}\n",
        args.volume_id,
        args.replica,
        r.server_id,
        r.granted_nodes.join(", "),
        args.volume_id,
        args.replica,
        r.replica_spec,
        r.replica_spec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_is_the_node_commands_with_argument() {
        let args = PrepareReplacementArgs {
            volume_id: "s-0/pvc-1".into(),
            replica: "s-1".into(),
            target: None,
        };
        let r = PrepareReplacementResponse {
            server_id: "s-2".into(),
            replica_spec: "s-2@10.0.0.3:10809@https://10.0.0.3:10810".into(),
            created: true,
            granted_nodes: vec!["node-a".into()],
            ..Default::default()
        };
        let text = describe(&args, &r);
        assert_eq!(text.lines().last(), Some(r.replica_spec.as_str()));
        assert!(
            text.contains("enbd-node replace --volume s-0/pvc-1 --replica s-1 --with s-2@"),
            "{text}"
        );
        assert!(
            text.contains("volume created there; granted to node-a"),
            "{text}"
        );
    }
}
