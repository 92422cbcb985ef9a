//! CSI Controller service: volumes, snapshots, expansion and publication over
//! the enbd-servers' management API.
//!
//! Every RPC checks its arguments first (InvalidArgument, nothing touched),
//! then resolves the server from the ID (`<server-id>/<name>`), then works under
//! the per-object operation guard. IDs that cannot be ours are "not found" (and
//! deleting them succeeds); IDs naming a known server that is down are
//! `Unavailable`, so the sidecars retry instead of concluding the object is gone.
//!
//! [`service`] is the tonic service: it hands each request to one operation on
//! [`State`](crate::state::State) and maps the outcome once ([`State::reply`](crate::state::State::reply)).
//! The operations live by concern: [`volumes`] (create, delete, validate, list,
//! get), [`mirrored`] (create for `replicas` > 1), [`expand`], [`publication`],
//! [`snapshots`], [`capacity`]; [`lookup`] finds servers and objects for all of
//! them, [`listing`] makes ListVolumes' one entry per volume and [`source`] resolves
//! content sources. [`grants`] is no RPC: the background pass
//! that keeps the access grants of published volumes on their current replicas.
//! [`admin`] serves the operator actions beside the CSI services: [`replacement`]
//! (the controller's half of replacing a mirrored volume's replica).

mod admin;
mod capacity;
mod expand;
mod grants;
mod listing;
mod lookup;
mod mirrored;
mod publication;
mod replacement;
mod service;
mod snapshots;
mod source;
mod volumes;

use std::time::Duration;

use crate::error::{CsiError, invalid};

pub use admin::AdminService;
pub use grants::{Pass, run_grant_reconciler};
pub use service::ControllerService;

/// Creating may copy a whole snapshot or volume on the server.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Every other management call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn required(value: &str, field: &str) -> Result<(), CsiError> {
    if value.is_empty() {
        Err(invalid(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// The operation-guard key of the volume an ID names (empty for an ID that is not ours,
/// which the operation then reports as not found).
fn volume_key(volume_id: &str) -> String {
    format!(
        "volume:{}",
        enbd_proto::ids::VolumeId::parse(volume_id)
            .map(|i| i.name().to_string())
            .unwrap_or_default()
    )
}

/// First entry at or after `token` and the next page's token. Tokens are the
/// ID of the first entry of the next page; anything that is not an ID we could
/// have issued is `Aborted`, as the spec asks for an invalid starting_token.
fn paginate<T>(
    mut items: Vec<(String, T)>,
    max_entries: i32,
    token: &str,
    valid_token: impl Fn(&str) -> bool,
) -> Result<(Vec<T>, String), CsiError> {
    let max =
        usize::try_from(max_entries).map_err(|_| invalid("max_entries must not be negative"))?;
    if !token.is_empty() && !valid_token(token) {
        return Err(CsiError::Aborted(format!(
            "starting_token {token:?} (not a token this driver issued)"
        )));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rest: Vec<(String, T)> = items
        .into_iter()
        .filter(|(id, _)| token.is_empty() || id.as_str() >= token)
        .collect();
    let mut next = String::new();
    if max > 0 && rest.len() > max {
        next = rest[max].0.clone();
        rest.truncate(max);
    }
    Ok((rest.into_iter().map(|(_, v)| v).collect(), next))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use enbd_proto::ids::VolumeId;

    use super::*;

    fn items(ids: &[&str]) -> Vec<(String, String)> {
        ids.iter().map(|i| (i.to_string(), i.to_string())).collect()
    }

    #[test]
    fn pagination_walks_everything_once() {
        let all = items(&["s/c", "s/a", "t/a", "s/b"]);
        let ok = |t: &str| VolumeId::parse(t).is_ok();
        let (p1, t1) = paginate(all.clone(), 2, "", ok).unwrap();
        assert_eq!(p1, ["s/a", "s/b"]);
        assert_eq!(t1, "s/c");
        let (p2, t2) = paginate(all.clone(), 2, &t1, ok).unwrap();
        assert_eq!(p2, ["s/c", "t/a"]);
        assert_eq!(t2, "");
        let (p, t) = paginate(all.clone(), 0, "", ok).unwrap();
        assert_eq!((p.len(), t.as_str()), (4, ""));
        assert!(matches!(
            paginate(all.clone(), 1, "garbage", ok),
            Err(CsiError::Aborted(_))
        ));
        assert!(matches!(
            paginate(all, -1, "", ok),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
