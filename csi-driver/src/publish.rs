//! Which nodes a volume is published to (ControllerPublish/Unpublish), and the
//! access-mode rule that goes with it: a single-node volume is published to at
//! most one node at a time; a second node gets `FailedPrecondition`.
//!
//! The record lives in memory. That is deliberate: in Kubernetes the source of
//! truth is the VolumeAttachment objects, and the external-attacher reconciles
//! them against ListVolumes' `published_node_ids` (LIST_VOLUMES_PUBLISHED_NODES),
//! re-publishing what a restarted controller forgot; the attach/detach
//! controller already refuses a second attachment of an RWO/RWOP volume. The
//! enbd-server has no place for this record, and a second copy of the truth
//! elsewhere could only disagree with the VolumeAttachments.
//!
//! Each publication also keeps the access token handed to the node (once the servers
//! granted it), so that the grant reconciliation ([`crate::controller::run_grant_reconciler`])
//! can set exactly that token on a replica that missed the publish. It lives in memory only
//! and never shows in `Debug` output or logs.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::capability::Checked;
use crate::error::CsiError;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Publication {
    node_id: String,
    readonly: bool,
    multi_node: bool,
    /// The token the node was given; `None` until the servers granted it.
    token: Option<Token>,
}

/// A node's access token: compared and handed on, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: String) -> Self {
        Self(token)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// One node's publication of a volume whose token the servers granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub node_id: String,
    pub token: Token,
}

#[derive(Default)]
pub struct Publications {
    by_volume: Mutex<HashMap<String, Vec<Publication>>>,
}

impl Publications {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `node_id` may attach `volume_id`. Repeating an identical
    /// publish succeeds; the same node with a different read-only flag is
    /// `AlreadyExists`; another node on a single-node volume is
    /// `FailedPrecondition`.
    pub fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        readonly: bool,
        cap: Checked,
    ) -> Result<(), CsiError> {
        let mut map = crate::sync::lock(&self.by_volume, "publications");
        let list = map.entry(volume_id.to_owned()).or_default();
        if let Some(existing) = list.iter().find(|p| p.node_id == node_id) {
            if existing.readonly == readonly {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "volume {volume_id} is already published to node {node_id} with readonly={}",
                existing.readonly
            )));
        }
        if let Some(other) = list.iter().find(|p| !(p.multi_node && cap.multi_node())) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {volume_id} is published to node {}; its access mode allows one node at a time",
                other.node_id
            )));
        }
        list.push(Publication {
            node_id: node_id.to_owned(),
            readonly,
            multi_node: cap.multi_node(),
            token: None,
        });
        Ok(())
    }

    /// Records the token the servers granted `node_id` for `volume_id` (a publication that
    /// was forgotten meanwhile stays forgotten).
    pub fn set_token(&self, volume_id: &str, node_id: &str, token: Token) {
        let mut map = crate::sync::lock(&self.by_volume, "publications");
        if let Some(p) = map
            .get_mut(volume_id)
            .and_then(|l| l.iter_mut().find(|p| p.node_id == node_id))
        {
            p.token = Some(token);
        }
    }

    /// Every volume id with a granted publication, in id order.
    pub fn granted_volumes(&self) -> Vec<String> {
        let map = crate::sync::lock(&self.by_volume, "publications");
        let mut ids: Vec<String> = map
            .iter()
            .filter(|(_, l)| l.iter().any(|p| p.token.is_some()))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The granted publications of `volume_id` (nodes and their tokens).
    pub fn granted(&self, volume_id: &str) -> Vec<Granted> {
        let map = crate::sync::lock(&self.by_volume, "publications");
        map.get(volume_id)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(Granted {
                    node_id: p.node_id.clone(),
                    token: p.token.clone()?,
                })
            })
            .collect()
    }

    /// Forgets `node_id`'s publication (all nodes' when `None`). Forgetting
    /// what is not recorded succeeds.
    pub fn unpublish(&self, volume_id: &str, node_id: Option<&str>) {
        let mut map = crate::sync::lock(&self.by_volume, "publications");
        if let Some(list) = map.get_mut(volume_id) {
            match node_id {
                Some(node) => list.retain(|p| p.node_id != node),
                None => list.clear(),
            }
            if list.is_empty() {
                map.remove(volume_id);
            }
        }
    }

    pub fn nodes(&self, volume_id: &str) -> Vec<String> {
        let map = crate::sync::lock(&self.by_volume, "publications");
        map.get(volume_id)
            .map(|l| l.iter().map(|p| p.node_id.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use enbd_proto::csi::volume_capability::access_mode::Mode;

    use super::*;

    const RWO: Checked = Checked {
        block: false,
        mode: Mode::SingleNodeWriter,
    };
    const ROX: Checked = Checked {
        block: false,
        mode: Mode::MultiNodeReaderOnly,
    };

    #[test]
    fn single_node_volume_refuses_second_node() {
        let p = Publications::new();
        p.publish("s/v", "n1", false, RWO).unwrap();
        p.publish("s/v", "n1", false, RWO).unwrap();
        assert!(matches!(
            p.publish("s/v", "n1", true, RWO),
            Err(CsiError::AlreadyExists(_))
        ));
        assert!(matches!(
            p.publish("s/v", "n2", false, RWO),
            Err(CsiError::FailedPrecondition(_))
        ));
        assert!(matches!(
            p.publish("s/v", "n2", true, ROX),
            Err(CsiError::FailedPrecondition(_))
        ));
        assert_eq!(p.nodes("s/v"), ["n1"]);
        p.unpublish("s/v", Some("n1"));
        p.unpublish("s/v", Some("n1"));
        p.publish("s/v", "n2", false, RWO).unwrap();
        assert_eq!(p.nodes("s/v"), ["n2"]);
    }

    #[test]
    fn multi_node_volume_takes_many_nodes() {
        let p = Publications::new();
        p.publish("s/v", "n1", true, ROX).unwrap();
        p.publish("s/v", "n2", true, ROX).unwrap();
        assert!(matches!(
            p.publish("s/v", "n3", false, RWO),
            Err(CsiError::FailedPrecondition(_))
        ));
        p.unpublish("s/v", None);
        assert!(p.nodes("s/v").is_empty());
    }

    #[test]
    fn tokens_are_kept_for_granted_publications_only() {
        let p = Publications::new();
        p.publish("s/v", "n1", true, ROX).unwrap();
        p.publish("s/v", "n2", true, ROX).unwrap();
        p.publish("s/w", "n1", false, RWO).unwrap();
        assert!(p.granted_volumes().is_empty(), "no token yet");
        p.set_token("s/v", "n2", Token::new("t2".into()));
        p.set_token("s/gone", "n1", Token::new("tx".into()));
        assert_eq!(p.granted_volumes(), ["s/v"]);
        assert_eq!(
            p.granted("s/v"),
            [Granted {
                node_id: "n2".into(),
                token: Token::new("t2".into())
            }]
        );
        assert!(!format!("{:?}", p.granted("s/v")).contains("t2"));
        p.unpublish("s/v", Some("n2"));
        assert!(p.granted_volumes().is_empty());
    }
}
