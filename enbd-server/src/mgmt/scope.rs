//! Node-scoped management calls. A node certificate (role `enbd-node`) is the same for every
//! node of a cluster, so the role alone would let any node read or rewrite any volume's
//! mirror membership and bitmaps. Under `--access published` with management TLS, such a
//! caller must also present, in the metadata key [`ACCESS_TOKEN_METADATA`], the access token
//! granted for the volume the call names: the capability its NBD connections already carry.
//! The controller and admin roles are not scoped (they are the control plane).
//!
//! Invariants: the token is compared by digest (`Grants::opens`), never logged and never
//! named in a refusal; a refusal is PERMISSION_DENIED and names the volume and the method's
//! rule only; a revoked grant stops the next call, as it stops new NBD connections.

use enbd_proto::enbd::ACCESS_TOKEN_METADATA;
use enbd_proto::wire::AccessToken;
use tonic::{Request, Status};

use super::auth::{Peer, Role};
use crate::access::Grants;

/// Allows the call unless its caller has the `enbd-node` role and no token granted on `volume`.
pub fn check_node_access<T>(grants: &Grants, req: &Request<T>, volume: &str) -> Result<(), Status> {
    let role = req
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.identity.as_deref())
        .and_then(Role::from_name);
    if role != Some(Role::Node) {
        return Ok(());
    }
    let Some(sent) = req.metadata().get(ACCESS_TOKEN_METADATA) else {
        return Err(Status::permission_denied(format!(
            "certificate CN enbd-node needs the access token of volume {volume:?} \
             (metadata {ACCESS_TOKEN_METADATA}) for this call: none was sent"
        )));
    };
    let opens = sent
        .to_str()
        .ok()
        .and_then(|t| AccessToken::new(t.as_bytes().to_vec()).ok())
        .is_some_and(|token| grants.opens(&token, volume));
    if opens {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the access token sent does not open volume {volume:?} \
             (not published to this node, or revoked)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(identity: Option<&str>, token: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(Peer {
            addr: None,
            identity: identity.map(str::to_owned),
            tls: true,
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert(ACCESS_TOKEN_METADATA, t.parse().unwrap());
        }
        req
    }

    #[test]
    fn a_node_needs_the_token_of_the_volume_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let grants = Grants::open(dir.path()).unwrap();
        let granted = grants.grant("vol-a", "node-1", None).unwrap();
        grants.grant("vol-b", "node-2", None).unwrap();
        let token = granted.token.clone();

        // The right token for the volume named.
        assert!(
            check_node_access(&grants, &request(Some("enbd-node"), Some(&token)), "vol-a").is_ok()
        );
        // No token, a made-up one, the token of another volume.
        for (sent, volume) in [
            (None, "vol-a"),
            (Some("f".repeat(64)), "vol-a"),
            (Some(token.clone()), "vol-b"),
        ] {
            let err = check_node_access(
                &grants,
                &request(Some("enbd-node"), sent.as_deref()),
                volume,
            )
            .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{volume}: {err}");
            assert!(
                !err.message().contains(&token),
                "the refusal names no token: {err}"
            );
        }
        // Revoked: refused from the next call on.
        grants.revoke("vol-a", Some("node-1")).unwrap();
        let err = check_node_access(&grants, &request(Some("enbd-node"), Some(&token)), "vol-a")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_control_plane_roles_are_not_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let grants = Grants::open(dir.path()).unwrap();
        for role in ["enbd-controller", "enbd-admin"] {
            assert!(check_node_access(&grants, &request(Some(role), None), "vol-a").is_ok());
        }
    }
}
