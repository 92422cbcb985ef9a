//! CSI object names → names on an enbd-server.
//!
//! The CO names a volume or snapshot with any string of up to 128 bytes (the spec's limit);
//! the id we hand back is `<server-id>/<name>` and may itself be at most 128 bytes, and the
//! server name must be a store name (`[A-Za-z0-9._-]`, see [`ObjectName`]). So:
//!
//! - a CSI name that is a valid store name of at most [`KEEP_LEN`] bytes is used as it is
//!   (`pvc-<uuid>` is 40): it fits beside the longest server id;
//! - any other name maps to `<prefix>-<hash>`: up to 31 bytes of the name (characters a store
//!   name cannot hold become `-`) and 32 hex digits (128 bits) of the SHA-256 of the whole
//!   CSI name, at most [`KEEP_LEN`] bytes in all.
//!
//! The mapping depends on the CSI name alone, so a retry, or a restarted controller, finds
//! the same object. Volumes also record the full CSI name in the [`NAME_LABEL`] label, which
//! turns a (practically impossible) hash collision into `AlreadyExists` instead of a silent
//! match. Earlier versions used any valid name that fit beside its server's id;
//! [`legacy_name`] lets a lookup still find those.

use std::collections::HashMap;

use enbd_proto::ids::{MAX_ID_LEN, MAX_SERVER_ID_LEN, ObjectName};

use crate::error::CsiError;

/// Longest server-side name: what is left of an id beside the longest server id and `/`.
pub const KEEP_LEN: usize = MAX_ID_LEN - 1 - MAX_SERVER_ID_LEN;
/// Volume label holding the CSI name the volume was created for.
pub const NAME_LABEL: &str = "enbd.io/csi-name";
/// Label of every replica of a mirrored volume naming its home: the server in the CSI volume
/// id. A replacement copies a survivor's labels to the new replica, so every replica keeps
/// it even after the home itself was replaced; ListVolumes lists the volume once, under it.
pub const HOME_LABEL: &str = "enbd.io/home-server";
/// The external-provisioner's `--extra-create-metadata` parameters. CreateVolume stores
/// them as labels of the volume on its server, so that an operator looking at a server's
/// volumes (management `ListVolumes`, the volume's metadata file) sees which claim each is.
pub const METADATA_KEYS: [&str; 3] = [
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
];

/// The labels CreateVolume gives a volume: the validated parameters in canonical form
/// (`params_context`), the CSI name ([`NAME_LABEL`]) and the claim's metadata when the
/// provisioner passed it.
pub fn volume_labels(
    params_context: HashMap<String, String>,
    csi_name: &str,
    parameters: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut labels = params_context;
    labels.insert(NAME_LABEL.to_owned(), csi_name.to_owned());
    for key in METADATA_KEYS {
        if let Some(v) = parameters.get(key).filter(|v| !v.is_empty()) {
            labels.insert(key.to_owned(), v.clone());
        }
    }
    labels
}

/// The labels a repeated CreateVolume must match: all but the claim's metadata (a volume
/// made before the metadata was recorded, or by a provisioner without the flag, is still
/// the same volume) and the home label (placement's outcome, not the request's).
pub fn comparable_labels(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !METADATA_KEYS.contains(&k.as_str()) && k.as_str() != HOME_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Hex digits of the name's hash in a derived name.
const HASH_HEX: usize = 32;

/// The server-side name for a CSI name (see the module docs). Every CSI name, however long
/// or odd, has one; the error is for a bug in the derivation, never for the input.
pub fn object_name(csi_name: &str) -> Result<ObjectName, CsiError> {
    if csi_name.len() <= KEEP_LEN
        && let Ok(name) = ObjectName::parse(csi_name)
    {
        return Ok(name);
    }
    derived_name(csi_name)
}

/// The name an earlier version would have used for a long CSI name, if it had one.
pub fn legacy_name(csi_name: &str) -> Option<ObjectName> {
    (csi_name.len() > KEEP_LEN)
        .then(|| ObjectName::parse(csi_name).ok())
        .flatten()
}

fn derived_name(csi_name: &str) -> Result<ObjectName, CsiError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, csi_name.as_bytes());
    let hash: String = digest
        .as_ref()
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix: String = csi_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(KEEP_LEN - 1 - HASH_HEX)
        .collect();
    let joined = if prefix.is_empty() {
        hash.clone()
    } else {
        format!("{prefix}-{hash}")
    };
    // Only store-name characters, starting with a letter or digit: valid by construction.
    ObjectName::parse(&joined)
        .map_err(|e| CsiError::Internal(format!("derived name for {csi_name:?}: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use enbd_proto::ids::{ServerId, SnapshotId, VolumeId};

    use super::*;

    fn longest_server() -> ServerId {
        ServerId::parse(&"s".repeat(MAX_SERVER_ID_LEN)).unwrap()
    }

    #[test]
    fn ordinary_names_are_kept() {
        let pvc = "pvc-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab";
        assert_eq!(object_name(pvc).unwrap().as_str(), pvc);
        let edge = "a".repeat(KEEP_LEN);
        assert_eq!(object_name(&edge).unwrap().as_str(), edge);
        assert_eq!(legacy_name(pvc), None);
    }

    #[test]
    fn every_spec_name_yields_a_valid_id() {
        let names = [
            "x".repeat(128),
            "x".repeat(KEEP_LEN + 1),
            format!("pvc-{}", "9".repeat(124)),
            "Ünïcödé name with spaces/and/slashes".to_string(),
            "---".to_string(),
            "a/b".to_string(),
            "é".repeat(64),
        ];
        for n in &names {
            assert!(n.len() <= 128, "test name within the spec: {}", n.len());
            let obj = object_name(n).unwrap();
            assert!(obj.as_str().len() <= KEEP_LEN, "{obj}");
            VolumeId::new(longest_server(), obj.clone()).expect("volume id fits");
            SnapshotId::new(longest_server(), obj).expect("snapshot id fits");
        }
    }

    #[test]
    fn derived_names_are_stable_distinct_and_readable() {
        let a = "a".repeat(128);
        let b = format!("{}b", "a".repeat(127));
        assert_eq!(object_name(&a).unwrap(), object_name(&a.clone()).unwrap());
        assert_ne!(object_name(&a).unwrap(), object_name(&b).unwrap());
        // Known answer: the mapping must never change between versions.
        assert_eq!(
            object_name(&a).unwrap().as_str(),
            format!("{}-{}", "a".repeat(31), &sha256_hex(&a)[..32])
        );
        assert!(object_name("a/b").unwrap().as_str().starts_with("a-b-"));
        assert_eq!(object_name("---").unwrap().as_str().len(), HASH_HEX);
        assert_eq!(legacy_name(&a).unwrap().as_str(), a);
        assert_eq!(legacy_name("a/b"), None);
    }

    fn sha256_hex(s: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn known_sha256_answer() {
        // FIPS 180-2 test vector, so the hash itself is pinned, not just self-consistent.
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn claim_metadata_is_recorded_but_not_compared() {
        let params = HashMap::from([("fsType".to_owned(), "ext4".to_owned())]);
        let given = HashMap::from([
            ("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned()),
            (
                "csi.storage.k8s.io/pvc/namespace".to_owned(),
                "db".to_owned(),
            ),
            (
                "csi.storage.k8s.io/pv/name".to_owned(),
                "pvc-1234".to_owned(),
            ),
            ("fsType".to_owned(), "ext4".to_owned()),
        ]);
        let labels = volume_labels(params.clone(), "pvc-1234", &given);
        assert_eq!(
            labels
                .get("csi.storage.k8s.io/pvc/namespace")
                .map(String::as_str),
            Some("db")
        );
        assert_eq!(labels.get(NAME_LABEL).map(String::as_str), Some("pvc-1234"));
        assert_eq!(labels.len(), 5);
        // Without the provisioner flag: same volume as far as idempotency goes.
        let bare = volume_labels(params, "pvc-1234", &HashMap::new());
        assert_eq!(bare.len(), 2);
        assert_eq!(comparable_labels(&labels), comparable_labels(&bare));
    }
}
