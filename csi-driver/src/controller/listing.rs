//! ListVolumes' view of the servers' volumes: one entry per CSI volume. A single copy is
//! listed under its server; the replicas of a mirrored volume (every copy of that name whose
//! labels say `replicas` > 1, members or stale copies alike) are one entry under the volume
//! id CreateVolume returned, `<home>/<name>`.
//!
//! The home comes from the replicas' [`HOME_LABEL`]; replicas made before that label existed
//! name it by the first member of the newest membership record their servers hold (the
//! home, unless a replacement put another server in its place), else by the lowest server
//! id among the copies.

use std::collections::BTreeMap;

use enbd_proto::enbd as pb;
use enbd_proto::ids::{ObjectName, ServerId, VolumeId};
use enbd_proto::params::REPLICAS;

use crate::names::HOME_LABEL;
use crate::replicas;
use crate::servers::{Lookup, Servers};

/// One CSI volume as ListVolumes shows it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Listed {
    pub id: VolumeId,
    /// The home's copy if a live server listed it, else another replica's.
    pub volume: pb::Volume,
    /// The servers holding a copy (one for a single copy).
    pub copies: Vec<ServerId>,
}

impl Listed {
    pub fn mirrored(&self) -> bool {
        is_mirrored(&self.volume)
    }
}

fn is_mirrored(v: &pb::Volume) -> bool {
    v.labels
        .get(REPLICAS)
        .and_then(|r| r.parse::<u16>().ok())
        .is_some_and(|r| r > 1)
}

fn labeled_home(copies: &[(ServerId, pb::Volume)]) -> Option<ServerId> {
    copies
        .iter()
        .find_map(|(_, v)| ServerId::parse(v.labels.get(HOME_LABEL)?).ok())
}

/// Groups `all` (every copy every live server listed) into CSI volumes; `home_of` names the
/// home of a mirrored volume whose copies carry no [`HOME_LABEL`].
pub(super) async fn one_per_volume<F, Fut>(
    all: Vec<(VolumeId, pb::Volume)>,
    home_of: F,
) -> Vec<Listed>
where
    F: Fn(ObjectName, Vec<ServerId>) -> Fut,
    Fut: Future<Output = Option<ServerId>>,
{
    let mut out = Vec::new();
    let mut mirrors: BTreeMap<ObjectName, Vec<(ServerId, pb::Volume)>> = BTreeMap::new();
    for (id, v) in all {
        if is_mirrored(&v) {
            mirrors
                .entry(id.name().clone())
                .or_default()
                .push((id.server().clone(), v));
        } else {
            out.push(Listed {
                copies: vec![id.server().clone()],
                id,
                volume: v,
            });
        }
    }
    for (name, mut copies) in mirrors {
        copies.sort_by(|a, b| a.0.cmp(&b.0));
        let servers: Vec<ServerId> = copies.iter().map(|(s, _)| s.clone()).collect();
        let home = match labeled_home(&copies) {
            Some(h) => h,
            None => match home_of(name.clone(), servers.clone()).await {
                Some(h) => h,
                None => copies[0].0.clone(),
            },
        };
        let Ok(id) = VolumeId::new(home.clone(), name) else {
            continue;
        };
        let shown = copies
            .iter()
            .position(|(s, _)| *s == home)
            .unwrap_or_default();
        out.push(Listed {
            id,
            volume: copies.swap_remove(shown).1,
            copies: servers,
        });
    }
    out
}

/// The first member of the newest record the live servers among `copies` hold for `name`.
pub(super) async fn home_from_records(
    servers: &Servers,
    name: ObjectName,
    copies: Vec<ServerId>,
) -> Option<ServerId> {
    let mut best: Option<pb::Membership> = None;
    for id in copies {
        if let Lookup::Live(s) = servers.lookup(&id)
            && let Ok(r) = replicas::membership(&s, name.as_str()).await
            && r.generation > best.as_ref().map_or(0, |b| b.generation)
        {
            best = Some(r);
        }
    }
    ServerId::parse(&best?.members.first()?.replica_id).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn copy(
        server: &str,
        name: &str,
        labels: &[(&str, &str)],
        size: u64,
    ) -> (VolumeId, pb::Volume) {
        let id = VolumeId::parse(&format!("{server}/{name}")).unwrap();
        let labels: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let v = pb::Volume {
            name: name.into(),
            size_bytes: size,
            labels,
            ..Default::default()
        };
        (id, v)
    }

    #[tokio::test]
    async fn a_mirror_is_listed_once_under_its_home() {
        let all = vec![
            copy("a", "single", &[], 1),
            copy("a", "m", &[(REPLICAS, "2"), (HOME_LABEL, "b")], 2),
            copy("b", "m", &[(REPLICAS, "2"), (HOME_LABEL, "b")], 3),
            // The home itself was replaced away: its id stays the volume's.
            copy("c", "gone-home", &[(REPLICAS, "2"), (HOME_LABEL, "x")], 4),
            copy("d", "gone-home", &[(REPLICAS, "2"), (HOME_LABEL, "x")], 4),
            // Made before the label: the records name the home.
            copy("c", "old", &[(REPLICAS, "3")], 5),
            copy("e", "old", &[(REPLICAS, "3")], 5),
        ];
        let asked = std::sync::Mutex::new(Vec::new());
        let listed = one_per_volume(all, |name, copies| {
            asked.lock().unwrap().push((name.to_string(), copies.len()));
            async { Some(ServerId::parse("e").unwrap()) }
        })
        .await;
        let ids: Vec<String> = listed.iter().map(|l| l.id.to_string()).collect();
        assert_eq!(ids, ["a/single", "x/gone-home", "b/m", "e/old"]);
        let m = &listed[2];
        assert_eq!(m.volume.size_bytes, 3, "the home's copy is shown");
        assert_eq!(m.copies.len(), 2);
        assert!(m.mirrored() && !listed[0].mirrored());
        assert_eq!(*asked.lock().unwrap(), [("old".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn without_label_or_record_the_lowest_server_names_it() {
        let all = vec![
            copy("z", "p", &[(REPLICAS, "2")], 1),
            copy("k", "p", &[(REPLICAS, "2")], 1),
        ];
        let listed = one_per_volume(all, |_, _| async { None }).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id.to_string(), "k/p");
    }
}
