//! Kubernetes Events for what an operator must see on a volume's PV and PVC (`--events`):
//! its server unreachable and back, a mirrored volume degraded, resyncing and recovered.
//!
//! Every poll observes each of this driver's PVs ([`Observed`]); an Event is recorded only
//! when a volume's state changes ([`decide`]), so a server that stays down for an hour
//! gives one Warning, not one per poll. (kube-rs's Recorder also folds repeats of the same
//! event into a series, but only for six minutes.) The first observation of a healthy
//! volume records nothing; a restarted controller re-announces problems it finds, once.
//! The decisions are pure functions, tested here; the loop that feeds them ([`run`]) only
//! reads the API and the server registry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use enbd_proto::enbd::ReplicaState;
use enbd_proto::ids::VolumeId;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume};
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::replicas::{self, MirrorHealth};
use crate::servers::{LiveServer, Lookup, Servers};

/// How often every PV is observed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);

/// What the controller sees of one volume at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Its server answers and every replica is in sync.
    Serving,
    /// The server holding it (and, for a mirror, every replica that could answer for it)
    /// does not answer: nodes' IO to it waits or fails per the brownout policy.
    Unreachable { server: String, reason: String },
    /// A mirror with a replica out of sync or unreachable (still serving from the others).
    Degraded { detail: String },
    /// A mirror copying missed regions back to a replica.
    Resyncing { detail: String },
}

impl Observed {
    /// From a mirror's health (a single copy's is always healthy).
    pub fn from_health(health: &MirrorHealth) -> Self {
        match health.abnormal() {
            None => Observed::Serving,
            Some(detail) if health.resyncing => Observed::Resyncing { detail },
            Some(detail) => Observed::Degraded { detail },
        }
    }

    fn same_state(&self, other: &Observed) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// An Event to record on the volume's PV and PVC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The Event a state change calls for: `None` when the state is the one last seen (only
/// its wording changed), or when a volume first seen is healthy.
pub fn decide(previous: Option<&Observed>, now: &Observed) -> Option<Notice> {
    if previous.is_some_and(|p| p.same_state(now)) {
        return None;
    }
    let warn = |reason, note: String| Notice {
        warning: true,
        reason,
        note,
    };
    let normal = |reason, note: String| Notice {
        warning: false,
        reason,
        note,
    };
    match (previous, now) {
        (None, Observed::Serving) => None,
        (_, Observed::Unreachable { server, reason }) => Some(warn(
            "ServerUnreachable",
            format!(
                "enbd-server {server} holding this volume is unreachable ({reason}); IO on \
                 nodes waits, or fails per the brownout policy, until it answers again"
            ),
        )),
        (_, Observed::Degraded { detail }) => Some(warn("VolumeDegraded", detail.clone())),
        (_, Observed::Resyncing { detail }) => Some(normal("VolumeResyncing", detail.clone())),
        (Some(Observed::Unreachable { server, .. }), Observed::Serving) => Some(normal(
            "ServerReachable",
            format!("enbd-server {server} is serving this volume again"),
        )),
        (Some(_), Observed::Serving) => Some(normal(
            "VolumeRecovered",
            "every replica is in sync again".to_owned(),
        )),
    }
}

/// The last state seen per volume id, so that only changes become Events.
#[derive(Debug, Default)]
pub struct Tracker {
    last: HashMap<String, Observed>,
}

impl Tracker {
    /// Records what a poll saw of `volume`; the Event it calls for, if any.
    pub fn observe(&mut self, volume: &str, now: Observed) -> Option<Notice> {
        let notice = decide(self.last.get(volume), &now);
        self.last.insert(volume.to_owned(), now);
        notice
    }

    /// Forgets volumes no longer listed (their PVs were deleted).
    pub fn retain(&mut self, listed: &HashSet<String>) {
        self.last.retain(|v, _| listed.contains(v));
    }
}

/// What the registry and the volume's servers say of volume `id`; `None` when the
/// controller cannot tell yet (discovery not complete).
pub async fn observe(servers: &Servers, id: &VolumeId) -> Option<Observed> {
    if !servers.is_synced() {
        return None;
    }
    let name = id.name().as_str();
    let server = match servers.lookup(id.server()) {
        Lookup::Live(s) => s,
        // Down, or gone from discovery altogether (its pod deleted or scaled away): a
        // single copy is unreachable, a mirror is served by its other replicas.
        home => {
            let reason = match home {
                Lookup::Down(reason) => reason,
                _ => "not among the discovered enbd-servers".to_owned(),
            };
            match replica_answering_for(servers, id).await {
                Some(s) => s,
                None => {
                    return Some(Observed::Unreachable {
                        server: id.server().to_string(),
                        reason,
                    });
                }
            }
        }
    };
    Some(match replicas::health(servers, &server, name).await {
        Ok(h) => Observed::from_health(&h),
        Err(detail) => Observed::Degraded { detail },
    })
}

/// A live server holding a replica of a mirrored volume whose home is not live: the live
/// holder of the newest membership record, an in-sync member first (after a replacement
/// moved the volume off its home, that is the member `replicas::acting_home` would pick). The
/// record names the home as unreachable, so the volume is reported degraded (or waiting, if
/// no in-sync replica is live), never healthy. `None` for a single copy, or when no replica's
/// server is live.
async fn replica_answering_for(servers: &Servers, id: &VolumeId) -> Option<LiveServer> {
    let (record, holders) = replicas::find(servers, id.name().as_str()).await.ok()?;
    let record = record.filter(|r| r.generation > 0)?;
    let in_sync = |s: &LiveServer| {
        record
            .members
            .iter()
            .any(|m| m.replica_id == s.id.as_str() && m.state == ReplicaState::InSync as i32)
    };
    let mut live: Vec<LiveServer> = holders.into_iter().map(|(s, _)| s).collect();
    // Stable: among in-sync members (then the others) the holders keep their order.
    live.sort_by_key(|s| !in_sync(s));
    live.into_iter().next()
}

fn pv_reference(pv: &PersistentVolume) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: pv.metadata.name.clone(),
        uid: pv.metadata.uid.clone(),
        ..Default::default()
    }
}

fn pvc_reference(pv: &PersistentVolume) -> Option<ObjectReference> {
    let claim = pv.spec.as_ref()?.claim_ref.as_ref()?;
    claim.name.as_ref()?;
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        ..claim.clone()
    })
}

/// The volume handle of a PV of this driver.
fn handle<'a>(pv: &'a PersistentVolume, driver: &str) -> Option<&'a str> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == driver).then_some(csi.volume_handle.as_str())
}

/// Observes this driver's PVs every [`POLL_INTERVAL`] and records the Events state changes
/// call for, on the PV and on its bound PVC, until cancelled.
pub async fn run(client: Client, driver: String, servers: Arc<Servers>, cancel: CancellationToken) {
    let recorder = Recorder::new(client.clone(), Reporter::from("enbd-csi-controller"));
    let pvs: Api<PersistentVolume> = Api::all(client);
    let mut tracker = Tracker::default();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut list_failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let list = match pvs.list(&ListParams::default()).await {
            Ok(l) => {
                list_failing = false;
                l
            }
            Err(e) => {
                // Once per outage of the API, not once per poll.
                if !list_failing {
                    tracing::warn!(error = %e, "events: cannot list PersistentVolumes");
                }
                list_failing = true;
                continue;
            }
        };
        let mut listed = HashSet::new();
        for pv in &list.items {
            let Some(handle) = handle(pv, &driver) else {
                continue;
            };
            let Ok(id) = VolumeId::parse(handle) else {
                continue;
            };
            listed.insert(handle.to_owned());
            let Some(now) = observe(&servers, &id).await else {
                continue;
            };
            let Some(notice) = tracker.observe(handle, now) else {
                continue;
            };
            let event = Event {
                type_: if notice.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: notice.reason.to_owned(),
                note: Some(notice.note.clone()),
                action: "MonitorVolume".to_owned(),
                secondary: None,
            };
            let targets = std::iter::once(pv_reference(pv)).chain(pvc_reference(pv));
            for target in targets {
                if let Err(e) = recorder.publish(&event, &target).await {
                    tracing::warn!(volume_id = handle, reason = notice.reason, error = %e,
                        "events: recording failed");
                }
            }
            tracing::info!(
                volume_id = handle,
                reason = notice.reason,
                note = notice.note,
                "volume state changed"
            );
        }
        tracker.retain(&listed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn down(reason: &str) -> Observed {
        Observed::Unreachable {
            server: "enbd-server-0".into(),
            reason: reason.into(),
        }
    }

    fn degraded(d: &str) -> Observed {
        Observed::Degraded { detail: d.into() }
    }

    #[test]
    fn a_healthy_volume_first_seen_is_quiet() {
        assert_eq!(decide(None, &Observed::Serving), None);
        assert_eq!(decide(Some(&Observed::Serving), &Observed::Serving), None);
    }

    #[test]
    fn outage_and_return_are_one_event_each() {
        let mut t = Tracker::default();
        assert_eq!(t.observe("s/v", Observed::Serving), None);
        let n = t.observe("s/v", down("health check timed out")).unwrap();
        assert!(n.warning);
        assert_eq!(n.reason, "ServerUnreachable");
        assert!(
            n.note.contains("enbd-server-0") && n.note.contains("timed out"),
            "{}",
            n.note
        );
        // Every later poll of the same outage is quiet, even with other wording.
        for reason in ["health check timed out", "connection refused"] {
            assert_eq!(t.observe("s/v", down(reason)), None, "no event storm");
        }
        let back = t.observe("s/v", Observed::Serving).unwrap();
        assert_eq!((back.warning, back.reason), (false, "ServerReachable"));
        assert_eq!(t.observe("s/v", Observed::Serving), None);
    }

    #[test]
    fn a_problem_found_at_start_is_announced_once() {
        let mut t = Tracker::default();
        let n = t.observe("s/v", down("refused")).unwrap();
        assert_eq!(n.reason, "ServerUnreachable");
        assert_eq!(t.observe("s/v", down("refused")), None);
    }

    #[test]
    fn mirror_degraded_resyncing_recovered() {
        let mut t = Tracker::default();
        t.observe("s/m", Observed::Serving);
        let n = t
            .observe("s/m", degraded("replica b is out of sync (missed writes)"))
            .unwrap();
        assert_eq!((n.warning, n.reason), (true, "VolumeDegraded"));
        assert!(n.note.contains("replica b"));
        assert_eq!(t.observe("s/m", degraded("replica b is out of sync")), None);
        let n = t
            .observe(
                "s/m",
                Observed::Resyncing {
                    detail: "replica b is resyncing".into(),
                },
            )
            .unwrap();
        assert_eq!((n.warning, n.reason), (false, "VolumeResyncing"));
        let n = t.observe("s/m", Observed::Serving).unwrap();
        assert_eq!((n.warning, n.reason), (false, "VolumeRecovered"));
        // The home's server going away later is its own event.
        assert_eq!(
            t.observe("s/m", down("refused")).map(|n| n.reason),
            Some("ServerUnreachable")
        );
        // ... and a mirror answering through another replica is degraded, not recovered.
        assert_eq!(
            t.observe("s/m", degraded("enbd-server s is unreachable"))
                .map(|n| n.reason),
            Some("VolumeDegraded")
        );
    }

    #[test]
    fn volumes_are_tracked_apart_and_forgotten_when_gone() {
        let mut t = Tracker::default();
        assert!(t.observe("s/a", down("x")).is_some());
        assert!(
            t.observe("s/b", down("x")).is_some(),
            "another volume, its own event"
        );
        t.retain(&HashSet::from(["s/b".to_owned()]));
        assert!(
            t.observe("s/a", down("x")).is_some(),
            "a PV re-created under the same handle is new"
        );
        assert!(t.observe("s/b", down("x")).is_none());
    }

    #[test]
    fn mirror_health_classifies() {
        let healthy = MirrorHealth {
            generation: 3,
            problems: vec![],
            resyncing: false,
            in_sync_live: true,
        };
        assert_eq!(Observed::from_health(&healthy), Observed::Serving);
        let out = MirrorHealth {
            generation: 4,
            problems: vec!["replica b is out of sync (missed writes)".into()],
            resyncing: false,
            in_sync_live: true,
        };
        assert!(
            matches!(Observed::from_health(&out), Observed::Degraded { detail } if detail.contains("generation 4"))
        );
        let copying = MirrorHealth {
            resyncing: true,
            ..out
        };
        assert!(matches!(
            Observed::from_health(&copying),
            Observed::Resyncing { .. }
        ));
    }

    #[test]
    fn pv_and_claim_references() {
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1", "uid": "u1"},
            "spec": {
                "csi": {"driver": "csi.enbd.io", "volumeHandle": "s0/pvc-1"},
                "claimRef": {"name": "data", "namespace": "db", "uid": "u2"}
            }
        }))
        .unwrap();
        assert_eq!(handle(&pv, "csi.enbd.io"), Some("s0/pvc-1"));
        assert_eq!(handle(&pv, "other.driver"), None);
        let pvc = pvc_reference(&pv).unwrap();
        assert_eq!(pvc.kind.as_deref(), Some("PersistentVolumeClaim"));
        assert_eq!(pvc.namespace.as_deref(), Some("db"));
        assert_eq!(pv_reference(&pv).kind.as_deref(), Some("PersistentVolume"));
    }
}
