//! The mirror's membership rules, as pure functions over membership records: which record
//! is in force when a volume is opened, whether it may be served, and the records that drop,
//! resync, readmit or promote a replica. No IO here; `Mirror` applies the decisions.
//!
//! Invariants these rules keep:
//! - a record only ever changes by a strictly higher generation;
//! - a replica that reports an older generation than the record in force is never read and
//!   never a resync source;
//! - serving needs every member that the newest record lists in sync to be reachable and to
//!   report that same generation (an unreachable one may have moved on);
//! - no record produced here leaves a volume without an in-sync member.

use std::collections::BTreeMap;

use thiserror::Error;

/// A member's state in one record (the proto's `ReplicaState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Receives every write and may serve reads.
    InSync,
    /// Missed writes: receives none and serves no reads; the in-sync servers track its
    /// dirty regions.
    Out,
    /// Receives every write again and is being sent the regions it missed; serves no reads.
    Resyncing,
}

/// Where a member is reached, as its record says (either part may be empty: unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// NBD data address, `HOST:PORT`.
    pub nbd: String,
    /// Management address, `HOST:PORT`.
    pub mgmt: String,
}

/// One membership record: generation 0 with no members means "no record" (a single copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub members: Vec<(String, MemberState)>,
    pub region_bytes: u32,
    /// Endpoints by member id, as read from (or to be written into) the servers' records, so
    /// that the record alone names the replica set. Records from before the fields have none.
    pub endpoints: BTreeMap<String, Endpoint>,
}

impl Record {
    /// The absent record a server without one reports.
    pub fn none() -> Self {
        Self {
            generation: 0,
            members: Vec::new(),
            region_bytes: 0,
            endpoints: BTreeMap::new(),
        }
    }

    /// Member ids in record order.
    pub fn ids(&self) -> Vec<String> {
        self.members.iter().map(|(m, _)| m.clone()).collect()
    }

    pub fn state_of(&self, id: &str) -> Option<MemberState> {
        self.members.iter().find(|(m, _)| m == id).map(|(_, s)| *s)
    }

    pub fn ids_in(&self, state: MemberState) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, s)| *s == state)
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// The same members with `changes` applied, at `generation`.
    fn with(&self, generation: u64, changes: &[(&str, MemberState)]) -> Record {
        let members = self
            .members
            .iter()
            .map(|(id, s)| {
                let new = changes
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map_or(*s, |(_, n)| *n);
                (id.clone(), new)
            })
            .collect();
        Record {
            generation,
            members,
            region_bytes: self.region_bytes,
            endpoints: self.endpoints.clone(),
        }
    }
}

/// What a replica's server told us about the volume, size and freshness included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub record: Record,
    pub size: u64,
    /// Newly created: no content source and nothing written (nothing allocated).
    pub fresh: bool,
}

/// The answer (or the failure) of each configured replica, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Reached(Report),
    Unreachable(String),
}

/// What opening a volume must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenPlan {
    /// No record anywhere and every replica fresh: write this first record to all of them.
    Create(Record),
    /// Serve under `record`. If `rewrite` is set, write it first (to every reachable member):
    /// it marks OUT the members in `full_dirty`, which `record` lists in sync but which
    /// report an older generation; since nobody tracked what they missed, the whole volume
    /// is dirty for them.
    Serve {
        record: Record,
        rewrite: Option<Record>,
        full_dirty: Vec<String>,
    },
    /// IO must wait: members that `record` lists in sync cannot be asked (they may hold a
    /// newer record). Open again once they answer.
    Wait { record: Record, why: String },
    /// The volume cannot be served as configured.
    Refuse(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("replica {0} is not a member of generation {1}")]
    NotAMember(String, u64),
    #[error("replica {0} is already a member of generation {1}")]
    AlreadyAMember(String, u64),
    #[error("dropping {dropped:?} would leave generation {generation} with no in-sync replica")]
    LastInSync {
        dropped: Vec<String>,
        generation: u64,
    },
    #[error("replica {id} is {state:?} at generation {generation}, not {expected:?}")]
    WrongState {
        id: String,
        state: MemberState,
        expected: MemberState,
        generation: u64,
    },
}

/// Decides how to open a volume whose replicas are `ids` (configuration order) from what
/// each of them answered.
pub fn plan_open(ids: &[String], probes: &[Probe], region_bytes: u32) -> OpenPlan {
    let reached: Vec<(&String, &Report)> = ids
        .iter()
        .zip(probes)
        .filter_map(|(id, p)| match p {
            Probe::Reached(r) => Some((id, r)),
            Probe::Unreachable(_) => None,
        })
        .collect();
    let newest = reached
        .iter()
        .map(|(_, r)| &r.record)
        .max_by_key(|r| r.generation);
    let Some(newest) = newest.filter(|r| r.generation > 0) else {
        return plan_create(ids, probes, region_bytes);
    };
    let record = newest.clone();
    let mut listed: Vec<&str> = record.members.iter().map(|(m, _)| m.as_str()).collect();
    let mut configured: Vec<&str> = ids.iter().map(String::as_str).collect();
    listed.sort_unstable();
    configured.sort_unstable();
    if listed != configured {
        return OpenPlan::Refuse(format!(
            "generation {} lists replicas {listed:?} but the volume is configured with {configured:?}",
            record.generation
        ));
    }
    let mut waiting = Vec::new();
    let mut stale = Vec::new();
    for (id, probe) in ids.iter().zip(probes) {
        let state = record.state_of(id);
        match probe {
            Probe::Unreachable(why) => {
                if state == Some(MemberState::InSync) {
                    waiting.push(format!("{id} ({why})"));
                }
            }
            Probe::Reached(r) => {
                // An older generation means the member missed at least one change: whatever
                // the newest record says of it, it cannot be trusted as it says.
                if r.record.generation < record.generation
                    && matches!(
                        state,
                        Some(MemberState::InSync) | Some(MemberState::Resyncing)
                    )
                {
                    stale.push(id.clone());
                }
            }
        }
    }
    if !waiting.is_empty() {
        return OpenPlan::Wait {
            why: format!(
                "in-sync replicas of generation {} are unreachable and may hold a newer record: {}",
                record.generation,
                waiting.join(", ")
            ),
            record,
        };
    }
    if stale.is_empty() {
        return OpenPlan::Serve {
            record,
            rewrite: None,
            full_dirty: Vec::new(),
        };
    }
    let changes: Vec<(&str, MemberState)> = stale
        .iter()
        .map(|s| (s.as_str(), MemberState::Out))
        .collect();
    let rewrite = record.with(record.generation + 1, &changes);
    if rewrite.ids_in(MemberState::InSync).is_empty() {
        return OpenPlan::Refuse(format!(
            "every in-sync replica of generation {} reports an older generation ({stale:?}): \
             no copy is known to be current; promote one explicitly",
            record.generation
        ));
    }
    OpenPlan::Serve {
        record,
        rewrite: Some(rewrite),
        full_dirty: stale,
    }
}

fn plan_create(ids: &[String], probes: &[Probe], region_bytes: u32) -> OpenPlan {
    let mut sizes = Vec::new();
    for (id, p) in ids.iter().zip(probes) {
        match p {
            Probe::Unreachable(why) => {
                return OpenPlan::Refuse(format!(
                    "no membership record yet and replica {id} is unreachable ({why}): \
                     a first record needs every replica"
                ));
            }
            Probe::Reached(r) if !r.fresh => {
                return OpenPlan::Refuse(format!(
                    "no membership record yet and replica {id} is not a fresh volume \
                     (it has content): the copies may differ, refusing to declare them in sync"
                ));
            }
            Probe::Reached(r) => sizes.push(r.size),
        }
    }
    if sizes.windows(2).any(|w| w[0] != w[1]) {
        return OpenPlan::Refuse(format!(
            "no membership record yet and the replicas differ in size: {sizes:?}"
        ));
    }
    OpenPlan::Create(Record {
        generation: 1,
        members: ids
            .iter()
            .map(|id| (id.clone(), MemberState::InSync))
            .collect(),
        region_bytes,
        endpoints: BTreeMap::new(),
    })
}

/// The record that makes `failed` OUT at `generation` (> current). Members already OUT stay
/// so; refused if no in-sync member would remain.
pub fn drop_members(
    current: &Record,
    failed: &[String],
    generation: u64,
) -> Result<Record, MembershipError> {
    for f in failed {
        if current.state_of(f).is_none() {
            return Err(MembershipError::NotAMember(f.clone(), current.generation));
        }
    }
    let changes: Vec<(&str, MemberState)> = failed
        .iter()
        .map(|f| (f.as_str(), MemberState::Out))
        .collect();
    let next = current.with(generation, &changes);
    if next.ids_in(MemberState::InSync).is_empty() {
        return Err(MembershipError::LastInSync {
            dropped: failed.to_vec(),
            generation: current.generation,
        });
    }
    Ok(next)
}

/// The record that moves `id` from `from` to `to` at `generation`.
pub fn transition(
    current: &Record,
    id: &str,
    from: MemberState,
    to: MemberState,
    generation: u64,
) -> Result<Record, MembershipError> {
    match current.state_of(id) {
        None => Err(MembershipError::NotAMember(
            id.to_owned(),
            current.generation,
        )),
        Some(s) if s != from => Err(MembershipError::WrongState {
            id: id.to_owned(),
            state: s,
            expected: from,
            generation: current.generation,
        }),
        Some(_) => Ok(current.with(generation, &[(id, to)])),
    }
}

/// The record an operator's promote writes: `id` alone in sync, every other member OUT, at
/// `generation` (above every generation seen).
pub fn promote(ids: &[String], id: &str, generation: u64, region_bytes: u32) -> Record {
    Record {
        generation,
        members: ids
            .iter()
            .map(|m| {
                let s = if m == id {
                    MemberState::InSync
                } else {
                    MemberState::Out
                };
                (m.clone(), s)
            })
            .collect(),
        region_bytes,
        endpoints: BTreeMap::new(),
    }
}

/// The record an operator's replacement writes: `new` takes `old`'s place in the member list
/// (so member order, and with it every node's replica order, stays put), OUT — its server
/// then starts it with every region dirty on each in-sync server, so the resync gives it a
/// full copy — and `old` is no longer a member. Refused if `old` is not a member, `new`
/// already is, or no member other than `old` is in sync (promote one first).
pub fn replace(
    current: &Record,
    old: &str,
    new: &str,
    generation: u64,
) -> Result<Record, MembershipError> {
    if current.state_of(old).is_none() {
        return Err(MembershipError::NotAMember(
            old.to_owned(),
            current.generation,
        ));
    }
    if current.state_of(new).is_some() {
        return Err(MembershipError::AlreadyAMember(
            new.to_owned(),
            current.generation,
        ));
    }
    let members: Vec<(String, MemberState)> = current
        .members
        .iter()
        .map(|(id, s)| {
            if id == old {
                (new.to_owned(), MemberState::Out)
            } else {
                (id.clone(), *s)
            }
        })
        .collect();
    let mut endpoints = current.endpoints.clone();
    endpoints.remove(old);
    let next = Record {
        generation,
        members,
        region_bytes: current.region_bytes,
        endpoints,
    };
    if next.ids_in(MemberState::InSync).is_empty() {
        return Err(MembershipError::LastInSync {
            dropped: vec![old.to_owned()],
            generation: current.generation,
        });
    }
    Ok(next)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use MemberState::*;

    fn ids() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    fn rec(generation: u64, states: &[MemberState]) -> Record {
        Record {
            generation,
            members: ids().into_iter().zip(states.iter().copied()).collect(),
            region_bytes: 1 << 20,
            endpoints: BTreeMap::new(),
        }
    }

    fn reached(record: Record) -> Probe {
        Probe::Reached(Report {
            record,
            size: 1 << 30,
            fresh: false,
        })
    }

    fn fresh(size: u64) -> Probe {
        Probe::Reached(Report {
            record: Record::none(),
            size,
            fresh: true,
        })
    }

    #[test]
    fn first_record_needs_every_replica_fresh_and_same_size() {
        let all = [fresh(1 << 30), fresh(1 << 30), fresh(1 << 30)];
        match plan_open(&ids(), &all, 1 << 20) {
            OpenPlan::Create(r) => {
                assert_eq!(r.generation, 1);
                assert_eq!(r.ids_in(InSync), ids());
            }
            other => panic!("{other:?}"),
        }
        let one_down = [
            fresh(1 << 30),
            Probe::Unreachable("refused".into()),
            fresh(1 << 30),
        ];
        assert!(
            matches!(plan_open(&ids(), &one_down, 1 << 20), OpenPlan::Refuse(w) if w.contains("b is unreachable"))
        );
        let used = [
            fresh(1 << 30),
            Probe::Reached(Report {
                record: Record::none(),
                size: 1 << 30,
                fresh: false,
            }),
            fresh(1 << 30),
        ];
        assert!(
            matches!(plan_open(&ids(), &used, 1 << 20), OpenPlan::Refuse(w) if w.contains("not a fresh"))
        );
        let sizes = [fresh(1 << 30), fresh(1 << 30), fresh(1 << 29)];
        assert!(
            matches!(plan_open(&ids(), &sizes, 1 << 20), OpenPlan::Refuse(w) if w.contains("size"))
        );
    }

    #[test]
    fn newest_record_rules_and_unreachable_in_sync_member_waits() {
        let g5 = rec(5, &[InSync, Out, InSync]);
        let probes = [
            reached(g5.clone()),
            reached(rec(3, &[InSync, InSync, InSync])),
            Probe::Unreachable("timeout".into()),
        ];
        match plan_open(&ids(), &probes, 1 << 20) {
            OpenPlan::Wait { record, why } => {
                assert_eq!(record, g5);
                assert!(why.contains("c (timeout)"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // The OUT member being unreachable does not stop serving.
        let probes = [
            reached(g5.clone()),
            Probe::Unreachable("x".into()),
            reached(g5.clone()),
        ];
        assert_eq!(
            plan_open(&ids(), &probes, 1 << 20),
            OpenPlan::Serve {
                record: g5.clone(),
                rewrite: None,
                full_dirty: vec![]
            }
        );
    }

    #[test]
    fn in_sync_member_with_older_generation_is_stale_and_dropped_first() {
        let g5 = rec(5, &[InSync, InSync, Out]);
        let probes = [
            reached(g5.clone()),
            reached(rec(4, &[InSync, InSync, InSync])),
            reached(rec(4, &[InSync, InSync, InSync])),
        ];
        match plan_open(&ids(), &probes, 1 << 20) {
            OpenPlan::Serve {
                record,
                rewrite: Some(rw),
                full_dirty,
            } => {
                assert_eq!(record, g5);
                assert_eq!(rw, rec(6, &[InSync, Out, Out]));
                assert_eq!(full_dirty, vec!["b".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
        // c's generation 5 has b alone in sync, and b reports 4: no copy is known current.
        let probes = [
            reached(rec(4, &[InSync, Out, Out])),
            reached(rec(4, &[InSync, Out, Out])),
            reached(rec(5, &[Out, InSync, Out])),
        ];
        assert!(matches!(
            plan_open(&ids(), &probes, 1 << 20),
            OpenPlan::Refuse(w) if w.contains("older generation")
        ));
    }

    #[test]
    fn record_listing_other_replicas_is_refused() {
        let other = Record {
            generation: 2,
            members: vec![("a".into(), InSync), ("z".into(), InSync)],
            region_bytes: 1 << 20,
            endpoints: BTreeMap::new(),
        };
        let probes = [
            reached(other.clone()),
            reached(other.clone()),
            reached(other),
        ];
        assert!(matches!(
            plan_open(&ids(), &probes, 1 << 20),
            OpenPlan::Refuse(w) if w.contains("configured")
        ));
    }

    #[test]
    fn drop_never_removes_the_last_in_sync_member() {
        let g = rec(7, &[InSync, InSync, Out]);
        let next = drop_members(&g, &["b".into()], 8).expect("drop");
        assert_eq!(next, rec(8, &[InSync, Out, Out]));
        assert!(matches!(
            drop_members(&next, &["a".into()], 9),
            Err(MembershipError::LastInSync { .. })
        ));
        assert!(matches!(
            drop_members(&g, &["a".into(), "b".into()], 8),
            Err(MembershipError::LastInSync { .. })
        ));
        assert!(matches!(
            drop_members(&g, &["q".into()], 8),
            Err(MembershipError::NotAMember(..))
        ));
    }

    #[test]
    fn resync_transitions_check_the_current_state() {
        let g = rec(7, &[InSync, Out, InSync]);
        let r = transition(&g, "b", Out, Resyncing, 8).expect("resync");
        assert_eq!(r, rec(8, &[InSync, Resyncing, InSync]));
        let s = transition(&r, "b", Resyncing, InSync, 9).expect("in sync");
        assert_eq!(s, rec(9, &[InSync, InSync, InSync]));
        assert!(matches!(
            transition(&g, "a", Out, Resyncing, 8),
            Err(MembershipError::WrongState { .. })
        ));
    }

    #[test]
    fn replace_puts_the_new_member_in_the_old_ones_place_out() {
        let mut g = rec(7, &[InSync, Out, InSync]);
        g.endpoints.insert(
            "b".into(),
            Endpoint {
                nbd: "b:1".into(),
                mgmt: "b:2".into(),
            },
        );
        let r = replace(&g, "b", "d", 8).expect("replace");
        assert_eq!(r.generation, 8);
        assert_eq!(
            r.members,
            vec![
                ("a".into(), InSync),
                ("d".into(), Out),
                ("c".into(), InSync)
            ]
        );
        assert!(
            r.endpoints.is_empty(),
            "the old member's endpoint stays behind"
        );
        // An in-sync member may be replaced while another is in sync (decommissioning).
        assert!(replace(&g, "a", "d", 8).is_ok());
        assert!(matches!(
            replace(&g, "q", "d", 8),
            Err(MembershipError::NotAMember(..))
        ));
        assert!(matches!(
            replace(&g, "b", "c", 8),
            Err(MembershipError::AlreadyAMember(..))
        ));
        let alone = rec(9, &[InSync, Out, Out]);
        assert!(matches!(
            replace(&alone, "a", "d", 10),
            Err(MembershipError::LastInSync { .. })
        ));
    }

    #[test]
    fn promote_makes_one_member_the_only_in_sync_one() {
        let p = promote(&ids(), "c", 12, 1 << 20);
        assert_eq!(p, rec(12, &[Out, Out, InSync]));
    }
}
