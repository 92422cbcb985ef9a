//! `enbd.v1.ReplicaService` against the real binary: the membership contract (generations,
//! idempotency, refusals), write intent on the NBD data path (WRITE, TRIM, WRITE_ZEROES, FUA,
//! both IO engines), durability across kill -9, clearing, extra_dirty, expansion, deletion,
//! snapshots and clones, and damaged metadata.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::TestServer;
use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::{self as pb, ReplicaState};
use tonic::Code;
use tonic::transport::Channel;

const ME: &str = "test-server";
const RB: u32 = 64 * 1024;
const RBU: u64 = RB as u64;
const SIZE: u64 = 8 << 20; // 128 regions
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;

use ReplicaState::{InSync, Out, Resyncing};

async fn replicas(s: &TestServer) -> ReplicaServiceClient<Channel> {
    s.replica_client().await
}

async fn create(s: &TestServer, name: &str, size: u64) {
    s.mgmt_client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            source: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
}

fn record(generation: u64, members: &[(&str, ReplicaState)]) -> pb::Membership {
    pb::Membership {
        generation,
        region_bytes: RB,
        members: members
            .iter()
            .map(|(id, st)| pb::ReplicaMember {
                replica_id: (*id).into(),
                state: *st as i32,
                ..Default::default()
            })
            .collect(),
    }
}

fn set_req(volume: &str, m: pb::Membership) -> pb::SetMembershipRequest {
    pb::SetMembershipRequest {
        volume: volume.into(),
        membership: Some(m),
        extra_dirty: vec![],
    }
}

async fn set(
    r: &mut ReplicaServiceClient<Channel>,
    volume: &str,
    m: pb::Membership,
) -> Result<pb::Membership, tonic::Status> {
    r.set_membership(set_req(volume, m))
        .await
        .map(|x| x.into_inner().membership.unwrap())
}

async fn get(r: &mut ReplicaServiceClient<Channel>, volume: &str) -> pb::GetMembershipResponse {
    r.get_membership(pb::GetMembershipRequest {
        volume: volume.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// The set regions of a member's bitmap, checking the response's shape.
async fn dirty(
    r: &mut ReplicaServiceClient<Channel>,
    volume: &str,
    replica: &str,
) -> BTreeSet<u64> {
    let d = r
        .get_dirty_regions(pb::GetDirtyRegionsRequest {
            volume: volume.into(),
            replica_id: replica.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.region_bytes, RB);
    assert_eq!(d.bitmap.len() as u64, d.region_count.div_ceil(8));
    (0..d.region_count)
        .filter(|i| d.bitmap[(i / 8) as usize] >> (i % 8) & 1 == 1)
        .collect()
}

fn set_of(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

/// Runs NBD requests `(flags, cmd, offset, len)` on `export`, each acknowledged before the
/// next is sent; WRITE payloads are 0x5a bytes.
async fn nbd(addr: SocketAddr, export: &str, reqs: Vec<(u16, u16, u64, u32)>) {
    let export = export.to_owned();
    tokio::task::spawn_blocking(move || {
        let (mut c, _) = raw::Raw::open(addr, &export);
        for (i, (flags, cmd, offset, len)) in reqs.into_iter().enumerate() {
            let payload = if cmd == raw::CMD_WRITE {
                vec![0x5a; len as usize]
            } else {
                vec![]
            };
            c.request(flags, cmd, i as u64, offset, len, &payload);
            assert_eq!(
                c.simple_reply(),
                (0, i as u64),
                "request {i}: {cmd} at {offset}+{len}"
            );
        }
    })
    .await
    .unwrap();
}

/// The value of an unlabelled metric on the server's metrics port.
async fn metric(s: &TestServer, name: &str) -> u64 {
    let addr = s.metrics();
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut t = std::net::TcpStream::connect(addr).unwrap();
        t.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        t.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap();
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {body}"));
    line.parse().unwrap()
}

fn write(offset: u64, len: u32) -> (u16, u16, u64, u32) {
    (0, raw::CMD_WRITE, offset, len)
}

#[tokio::test]
async fn the_membership_contract_is_enforced() {
    let s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let mut r = replicas(&s).await;

    let none = get(&mut r, "v").await;
    assert_eq!(
        none.membership.unwrap(),
        pb::Membership::default(),
        "no record = generation 0"
    );
    for e in [
        r.get_membership(pb::GetMembershipRequest {
            volume: "nope".into(),
        })
        .await
        .unwrap_err(),
        set(&mut r, "nope", record(1, &[(ME, InSync)]))
            .await
            .unwrap_err(),
        r.get_dirty_regions(pb::GetDirtyRegionsRequest {
            volume: "nope".into(),
            replica_id: "b".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    assert_eq!(
        r.get_dirty_regions(pb::GetDirtyRegionsRequest {
            volume: "v".into(),
            replica_id: "b".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition,
        "no record yet"
    );

    let g1 = record(1, &[(ME, InSync), ("b", InSync)]);
    assert_eq!(set(&mut r, "v", g1.clone()).await.unwrap(), g1);
    assert_eq!(get(&mut r, "v").await.membership.unwrap(), g1);
    // Same generation, same members (any order): idempotent.
    let g1_reordered = record(1, &[("b", InSync), (ME, InSync)]);
    assert_eq!(set(&mut r, "v", g1_reordered).await.unwrap(), g1);
    // Same generation, different members: refused, naming the current generation.
    let e = set(&mut r, "v", record(1, &[(ME, InSync), ("b", Out)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("generation 1"), "{}", e.message());

    let mut changed_rb = record(2, &[(ME, InSync), ("b", Out)]);
    changed_rb.region_bytes = RB * 2;
    let bad_member = |id: &str| pb::ReplicaMember {
        replica_id: id.into(),
        state: InSync as i32,
        ..Default::default()
    };
    let mut unspecified = record(2, &[(ME, InSync)]);
    unspecified.members.push(pb::ReplicaMember {
        replica_id: "b".into(),
        state: 0,
        ..Default::default()
    });
    let mut bad_id = record(2, &[(ME, InSync)]);
    bad_id.members.push(bad_member("Not_A_Server"));
    for (what, m) in [
        ("generation 0", record(0, &[(ME, InSync)])),
        ("region_bytes changed", changed_rb),
        ("bad id", bad_id),
        (
            "duplicate",
            record(2, &[(ME, InSync), ("b", Out), ("b", Out)]),
        ),
        (
            "too many",
            record(2, &[(ME, InSync), ("b", Out), ("c", Out), ("d", Out)]),
        ),
        ("no IN_SYNC", record(2, &[(ME, Out), ("b", Out)])),
        (
            "this server missing",
            record(2, &[("a", InSync), ("b", Out)]),
        ),
        ("unspecified state", unspecified),
        ("no members", record(2, &[])),
    ] {
        let e = set(&mut r, "v", m).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    let e = r
        .set_membership(pb::SetMembershipRequest {
            volume: "v".into(),
            membership: None,
            extra_dirty: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // extra_dirty must name a tracked member and stay inside the volume.
    for extra in [
        pb::DirtyRanges {
            replica_id: "b".into(),
            ranges: vec![pb::ByteRange {
                offset: 0,
                length: 1,
            }],
        },
        pb::DirtyRanges {
            replica_id: "c".into(),
            ranges: vec![pb::ByteRange {
                offset: SIZE,
                length: 1,
            }],
        },
        pb::DirtyRanges {
            replica_id: "c".into(),
            ranges: vec![pb::ByteRange {
                offset: u64::MAX,
                length: 2,
            }],
        },
    ] {
        let mut req = set_req("v", record(2, &[(ME, InSync), ("b", InSync), ("c", Out)]));
        req.extra_dirty = vec![extra];
        assert_eq!(
            r.set_membership(req).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    assert_eq!(
        get(&mut r, "v").await.membership.unwrap(),
        g1,
        "refusals changed nothing"
    );
    let data_dir = s.data_dir().join("volumes/v");
    assert!(
        !data_dir.join("dirty-c.bitmap").exists(),
        "a refused call leaves no bitmap"
    );

    let g3 = record(3, &[(ME, InSync), ("b", InSync)]);
    set(&mut r, "v", g3.clone()).await.unwrap();
    let e = set(&mut r, "v", record(2, &[(ME, InSync), ("b", InSync)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "lower generation");
    assert!(e.message().contains("generation 3"), "{}", e.message());

    // An IN_SYNC member has no dirty regions; a non-member is refused; clearing needs RESYNCING.
    assert_eq!(dirty(&mut r, "v", "b").await, BTreeSet::new());
    let e = r
        .get_dirty_regions(pb::GetDirtyRegionsRequest {
            volume: "v".into(),
            replica_id: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = r
        .clear_dirty_regions(pb::ClearDirtyRegionsRequest {
            volume: "v".into(),
            replica_id: "b".into(),
            regions: vec![0],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Concurrent changes to one volume are serialized: of eight different records with the
    // same new generation, exactly one is taken.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut r = r.clone();
            tokio::spawn(async move {
                let id = format!("c{i}");
                set(
                    &mut r,
                    "v",
                    record(4, &[(ME, InSync), ("b", InSync), (&id, InSync)]),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(get(&mut r, "v").await.membership.unwrap().generation, 4);

    // region_bytes limits, on a volume without a record.
    create(&s, "w", SIZE).await;
    for rb in [0, 2048, 3000, 128 << 20] {
        let mut m = record(1, &[(ME, InSync)]);
        m.region_bytes = rb;
        assert_eq!(
            set(&mut r, "w", m).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{rb}"
        );
    }
    assert_eq!(get(&mut r, "w").await.membership.unwrap().generation, 0);
}

async fn writes_set_exactly_the_touched_regions(extra: &[&str]) {
    let s = common::start(extra);
    create(&s, "v", SIZE).await;
    let mut r = replicas(&s).await;
    set(
        &mut r,
        "v",
        record(1, &[(ME, InSync), ("b", InSync), ("c", InSync)]),
    )
    .await
    .unwrap();
    // b goes OUT: it was a member, so its bitmap starts empty.
    set(
        &mut r,
        "v",
        record(2, &[(ME, InSync), ("b", Out), ("c", InSync)]),
    )
    .await
    .unwrap();
    assert_eq!(dirty(&mut r, "v", "b").await, BTreeSet::new());
    nbd(
        s.nbd(),
        "v",
        vec![
            write(0, 4096),
            write(5 * RBU - 512, 1024), // spans regions 4 and 5
            (0, CMD_TRIM, 10 * RBU + 4096, 8192),
            (0, CMD_WRITE_ZEROES, 20 * RBU, RB), // exactly region 20
            (FLAG_FUA, raw::CMD_WRITE, 30 * RBU, 4096),
            write(SIZE - 4096, 4096),           // the last region
            write(0, 512),                      // region 0 again
            (0, raw::CMD_READ, 60 * RBU, 4096), // reads set nothing
        ],
    )
    .await;
    let want = set_of(&[0, 4, 5, 10, 20, 30, 127]);
    assert_eq!(dirty(&mut r, "v", "b").await, want);
    assert_eq!(
        get(&mut r, "v").await.dirty_regions,
        [("b".to_string(), 7u64)].into()
    );
    assert_eq!(
        dirty(&mut r, "v", "c").await,
        BTreeSet::new(),
        "IN_SYNC: nothing"
    );

    // b RESYNCING gets no new bits; c going OUT starts empty and gets the new writes.
    set(
        &mut r,
        "v",
        record(3, &[(ME, InSync), ("b", Resyncing), ("c", InSync)]),
    )
    .await
    .unwrap();
    nbd(s.nbd(), "v", vec![write(40 * RBU, 4096)]).await;
    set(
        &mut r,
        "v",
        record(4, &[(ME, InSync), ("b", Resyncing), ("c", Out)]),
    )
    .await
    .unwrap();
    nbd(
        s.nbd(),
        "v",
        vec![write(50 * RBU, 4096), (FLAG_FUA, CMD_TRIM, 51 * RBU, 4096)],
    )
    .await;
    assert_eq!(
        dirty(&mut r, "v", "b").await,
        want,
        "RESYNCING: kept, no new bits"
    );
    assert_eq!(dirty(&mut r, "v", "c").await, set_of(&[50, 51]));
    assert_eq!(
        metric(&s, "enbd_server_mirror_dirty_regions").await,
        9,
        "7 for b + 2 for c"
    );
    // Back to all IN_SYNC: writes are not tracked, bitmaps gone.
    set(
        &mut r,
        "v",
        record(5, &[(ME, InSync), ("b", InSync), ("c", InSync)]),
    )
    .await
    .unwrap();
    nbd(s.nbd(), "v", vec![write(70 * RBU, 4096)]).await;
    assert_eq!(get(&mut r, "v").await.dirty_regions, Default::default());
    let files: Vec<_> = std::fs::read_dir(s.data_dir().join("volumes/v"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("dirty-"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_set_exactly_the_touched_regions_pool_engine() {
    writes_set_exactly_the_touched_regions(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_set_exactly_the_touched_regions_uring_engine() {
    writes_set_exactly_the_touched_regions(&["--io-engine", "uring"]).await;
}

/// The ordering rule under load: while a client keeps writing (one request at a time, a new
/// region each), every write sent after SetMembership(b OUT) returned is marked.
async fn writes_after_the_change_are_marked(extra: &[&str]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    // One region per write, and room for many more writes than the 20 + 20 the test waits
    // for: on a loaded machine SetMembership (two fsyncs) can outlast hundreds of writes.
    const REGIONS: u64 = 2048;
    let s = common::start(extra);
    create(&s, "v", REGIONS * RBU).await;
    let mut r = replicas(&s).await;
    set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
        .await
        .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), s.nbd());
        tokio::task::spawn_blocking(move || {
            let (mut c, _) = raw::Raw::open(addr, "v");
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < REGIONS {
                let flags = if i.is_multiple_of(3) { FLAG_FUA } else { 0 };
                c.request(flags, raw::CMD_WRITE, i, i * RBU, 4096, &[7u8; 4096]);
                assert_eq!(c.simple_reply(), (0, i));
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    while acked.load(Ordering::SeqCst) < 20 {
        tokio::task::yield_now().await;
    }
    // Writes 0..before were done before the call: none of them may be marked.
    let before = acked.load(Ordering::SeqCst);
    set(&mut r, "v", record(2, &[(ME, InSync), ("b", Out)]))
        .await
        .unwrap();
    // Writes 0..k were acknowledged; k may have been in flight; k+1 on was sent after.
    let k = acked.load(Ordering::SeqCst);
    // Wait for 20 more, unless the writer already ran out of regions (then the check
    // below still covers every write it sent after the call).
    while acked.load(Ordering::SeqCst) < k + 20 && !writer.is_finished() {
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::SeqCst);
    let n = writer.await.unwrap();
    assert!(
        n > k + 1,
        "k={k} n={n}: no write was sent after the call returned"
    );
    let got = dirty(&mut r, "v", "b").await;
    let must: BTreeSet<u64> = (k + 1..n).collect();
    assert!(
        must.is_subset(&got),
        "k={k} n={n}: missing {:?}",
        must.difference(&got).collect::<Vec<_>>()
    );
    assert!(
        got.iter().all(|&i| i >= before),
        "only writes not finished before the call: before={before} {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_the_change_are_marked_pool_engine() {
    writes_after_the_change_are_marked(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_the_change_are_marked_uring_engine() {
    writes_after_the_change_are_marked(&["--io-engine", "uring"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_bits_survive_kill_minus_nine() {
    let mut s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let g2 = record(2, &[(ME, InSync), ("b", Out)]);
    {
        let mut r = replicas(&s).await;
        set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
            .await
            .unwrap();
        set(&mut r, "v", g2.clone()).await.unwrap();
    }
    let mut written = BTreeSet::new();
    for round in 0..5u64 {
        let region = 3 + round * 17;
        // Acknowledged, then the server dies at once: no flush, no clean shutdown.
        let fua = if round % 2 == 0 { 0 } else { FLAG_FUA };
        nbd(
            s.nbd(),
            "v",
            vec![(fua, raw::CMD_WRITE, region * RBU + 100, 200)],
        )
        .await;
        written.insert(region);
        let dir = s.crash();
        s = common::start_in(dir, &[]);
        let mut r = replicas(&s).await;
        assert_eq!(
            get(&mut r, "v").await.membership.unwrap(),
            g2,
            "round {round}"
        );
        assert_eq!(dirty(&mut r, "v", "b").await, written, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_and_extra_dirty() {
    let s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let mut r = replicas(&s).await;
    set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
        .await
        .unwrap();
    let mut req = set_req("v", record(2, &[(ME, InSync), ("b", Out)]));
    req.extra_dirty = vec![pb::DirtyRanges {
        replica_id: "b".into(),
        ranges: vec![
            pb::ByteRange {
                offset: 0,
                length: 1,
            },
            pb::ByteRange {
                offset: 7 * RBU + 1,
                length: RBU,
            }, // 7 and 8
            pb::ByteRange {
                offset: 9 * RBU,
                length: 0,
            }, // nothing
        ],
    }];
    r.set_membership(req.clone()).await.unwrap();
    assert_eq!(dirty(&mut r, "v", "b").await, set_of(&[0, 7, 8]));
    // An idempotent retry still sets its ranges.
    req.extra_dirty[0].ranges.push(pb::ByteRange {
        offset: 100 * RBU,
        length: 1,
    });
    r.set_membership(req).await.unwrap();
    assert_eq!(dirty(&mut r, "v", "b").await, set_of(&[0, 7, 8, 100]));
    nbd(s.nbd(), "v", vec![write(3 * RBU, 4096)]).await;

    let clear = |regions: Vec<u64>| pb::ClearDirtyRegionsRequest {
        volume: "v".into(),
        replica_id: "b".into(),
        regions,
    };
    let e = r.clear_dirty_regions(clear(vec![0])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "not while OUT");
    set(&mut r, "v", record(3, &[(ME, InSync), ("b", Resyncing)]))
        .await
        .unwrap();
    assert_eq!(
        dirty(&mut r, "v", "b").await,
        set_of(&[0, 3, 7, 8, 100]),
        "OUT -> RESYNCING keeps bits"
    );
    let e = r.clear_dirty_regions(clear(vec![128])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "past the last region");
    let left = r
        .clear_dirty_regions(clear(vec![0, 7, 50]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(left.remaining, 3, "clearing an unset region is fine");
    // RESYNCING -> OUT keeps the remaining bits too.
    set(&mut r, "v", record(4, &[(ME, InSync), ("b", Out)]))
        .await
        .unwrap();
    let s2 = {
        let dir = s.crash();
        common::start_in(dir, &[])
    };
    let mut r = replicas(&s2).await;
    assert_eq!(
        dirty(&mut r, "v", "b").await,
        set_of(&[3, 8, 100]),
        "clears survive a restart"
    );
    assert_eq!(
        get(&mut r, "v").await.dirty_regions,
        [("b".to_string(), 3u64)].into()
    );

    // A member new to the record starts with every region dirty (nothing says it has any data).
    set(
        &mut r,
        "v",
        record(5, &[(ME, InSync), ("b", Out), ("d", Resyncing)]),
    )
    .await
    .unwrap();
    assert_eq!(dirty(&mut r, "v", "d").await.len(), 128);
    // IN_SYNC drops the bitmap.
    set(
        &mut r,
        "v",
        record(6, &[(ME, InSync), ("b", InSync), ("d", InSync)]),
    )
    .await
    .unwrap();
    assert_eq!(dirty(&mut r, "v", "b").await, BTreeSet::new());
    assert!(!s2.data_dir().join("volumes/v/dirty-b.bitmap").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_delete_snapshots_and_clones() {
    let s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let mut r = replicas(&s).await;
    let mut m = s.mgmt_client().await;
    set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
        .await
        .unwrap();
    set(&mut r, "v", record(2, &[(ME, InSync), ("b", Out)]))
        .await
        .unwrap();
    nbd(s.nbd(), "v", vec![write(SIZE - 1, 1), write(5 * RBU, 1)]).await;
    m.expand_volume(pb::ExpandVolumeRequest {
        name: "v".into(),
        size_bytes: 2 * SIZE,
    })
    .await
    .unwrap();
    let d = r
        .get_dirty_regions(pb::GetDirtyRegionsRequest {
            volume: "v".into(),
            replica_id: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.region_count, 256, "the bitmap grew with the volume");
    assert_eq!(dirty(&mut r, "v", "b").await, set_of(&[5, 127]));
    nbd(s.nbd(), "v", vec![write(200 * RBU, 4096)]).await;
    assert_eq!(dirty(&mut r, "v", "b").await, set_of(&[5, 127, 200]));

    // Snapshots and clones carry no membership.
    m.create_snapshot(pb::CreateSnapshotRequest {
        name: "snap".into(),
        source_volume: "v".into(),
    })
    .await
    .unwrap();
    m.create_volume(pb::CreateVolumeRequest {
        name: "clone".into(),
        size_bytes: 0,
        source: Some(pb::ContentSource {
            kind: Some(pb::content_source::Kind::Volume("v".into())),
        }),
        labels: Default::default(),
    })
    .await
    .unwrap();
    assert_eq!(get(&mut r, "clone").await.membership.unwrap().generation, 0);
    for dir in ["volumes/clone", "snapshots/snap"] {
        let names: Vec<_> = std::fs::read_dir(s.data_dir().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("dirty-") || n.starts_with("membership")),
            "{dir}: {names:?}"
        );
    }

    // Delete removes everything; a new volume of the same name starts without a record.
    let vdir = s.data_dir().join("volumes/v");
    assert!(vdir.join("membership.json").exists() && vdir.join("dirty-b.bitmap").exists());
    m.delete_volume(pb::DeleteVolumeRequest {
        name: "v".into(),
        force: false,
    })
    .await
    .unwrap();
    assert!(!vdir.exists());
    assert_eq!(
        r.get_membership(pb::GetMembershipRequest { volume: "v".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    create(&s, "v", SIZE).await;
    assert_eq!(get(&mut r, "v").await.membership.unwrap().generation, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_metadata_is_reported_never_dropped() {
    let s = common::start(&[]);
    create(&s, "v", SIZE).await;
    create(&s, "w", SIZE).await;
    {
        let mut r = replicas(&s).await;
        for v in ["v", "w"] {
            set(&mut r, v, record(1, &[(ME, InSync), ("b", InSync)]))
                .await
                .unwrap();
            set(&mut r, v, record(2, &[(ME, InSync), ("b", Out)]))
                .await
                .unwrap();
        }
        nbd(s.nbd(), "w", vec![write(0, 4096)]).await;
    }
    let dir = s.crash();
    std::fs::write(
        dir.path().join("volumes/v/membership.json"),
        b"{\"format\":1,",
    )
    .unwrap();
    std::fs::write(dir.path().join("volumes/w/dirty-b.bitmap"), b"junk").unwrap();
    let s = common::start_in(dir, &[]);
    let mut r = replicas(&s).await;
    let e = r
        .get_membership(pb::GetMembershipRequest { volume: "v".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("membership.json"), "{}", e.message());
    let e = set(&mut r, "v", record(3, &[(ME, InSync)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    let addr = s.nbd();
    let refused = tokio::task::spawn_blocking(move || {
        let mut c = raw::Raw::connect(addr);
        c.send(&3u32.to_be_bytes());
        c.go("v")
    })
    .await
    .unwrap();
    assert!(
        refused.is_err(),
        "a volume with a damaged record is not served"
    );
    // A bitmap that cannot be trusted comes back with every region dirty.
    assert_eq!(dirty(&mut r, "w", "b").await.len(), 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_membership_changes_leaves_a_whole_record() {
    use rand::Rng;
    let mut s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let mut acked = 1;
    {
        let mut r = replicas(&s).await;
        set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
            .await
            .unwrap();
    }
    let states = [Out, Resyncing, InSync];
    for round in 0..8 {
        let mut r = replicas(&s).await;
        let start = acked;
        let changes = tokio::spawn(async move {
            let mut done = start;
            for g in start + 1..start + 200 {
                let st = states[(g % 3) as usize];
                if set(&mut r, "v", record(g, &[(ME, InSync), ("b", st)]))
                    .await
                    .is_err()
                {
                    break;
                }
                done = g;
            }
            done
        });
        let delay = rand::rng().random_range(10..150);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        let dir = s.crash();
        let done = changes.await.unwrap();
        assert!(
            done < start + 199,
            "round {round}: the kill must land mid-sequence"
        );
        eprintln!(
            "round {round}: {} changes acknowledged before the kill",
            done - start
        );
        s = common::start_in(dir, &[]);
        let mut r = replicas(&s).await;
        let m = get(&mut r, "v").await.membership.unwrap();
        // Every acknowledged change is there; at most the one in flight beyond it.
        assert!(
            m.generation == done || m.generation == done + 1,
            "round {round}: loaded {} after {done} acknowledged",
            m.generation
        );
        let b = m.members.iter().find(|x| x.replica_id == "b").unwrap();
        let names: BTreeSet<String> = std::fs::read_dir(s.data_dir().join("volumes/v"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut want: BTreeSet<String> = ["data", "meta.json", "membership.json"]
            .map(String::from)
            .into();
        if b.state != InSync as i32 {
            want.insert("dirty-b.bitmap".into());
            dirty(&mut r, "v", "b").await;
        }
        assert_eq!(names, want, "round {round}: no strays, every needed bitmap");
        acked = m.generation;
    }
}

/// Member endpoints are kept as given (the record alone names the replica set), survive a
/// crash, leave records without them working, and junk in them is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_endpoints_are_kept_and_checked() {
    let s = common::start(&[]);
    create(&s, "v", SIZE).await;
    let mut r = replicas(&s).await;
    let mut rec = record(1, &[(ME, InSync), ("b", InSync)]);
    rec.members[1].data_address = "10.0.0.2:10809".into();
    rec.members[1].mgmt_url = "http://10.0.0.2:10810".into();
    set(&mut r, "v", rec.clone()).await.unwrap();
    // The same generation with the same members and endpoints is an idempotent retry.
    set(&mut r, "v", rec.clone()).await.unwrap();
    let s2 = {
        let dir = s.crash();
        common::start_in(dir, &[])
    };
    let mut r = replicas(&s2).await;
    let got = get(&mut r, "v").await.membership.unwrap();
    assert_eq!(got, rec, "endpoints survive a restart");
    assert_eq!(got.members[0].data_address, "", "unknown stays empty");
    let mut bad = record(2, &[(ME, InSync), ("b", Out)]);
    bad.members[1].mgmt_url = "http://a b".into();
    let e = set(&mut r, "v", bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mgmt_url"), "{}", e.message());
    let mut long = record(2, &[(ME, InSync), ("b", Out)]);
    long.members[1].data_address = "x".repeat(513);
    assert_eq!(
        set(&mut r, "v", long).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(get(&mut r, "v").await.membership.unwrap().generation, 1);
}

async fn activity(r: &mut ReplicaServiceClient<Channel>, volume: &str) -> BTreeSet<u64> {
    let a = r
        .get_activity(pb::GetActivityRequest {
            volume: volume.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.region_bytes, RB);
    assert_eq!(a.region_count, SIZE / RBU);
    let mut out = BTreeSet::new();
    for (i, byte) in a.bitmap.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                out.insert(i as u64 * 8 + bit);
            }
        }
    }
    out
}

fn update(mark: &[u64], clear: &[u64]) -> pb::UpdateActivityRequest {
    pb::UpdateActivityRequest {
        volume: "v".into(),
        region_bytes: RB,
        mark: mark.to_vec(),
        clear: clear.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activity_log_is_durable_checked_and_kept_across_changes() {
    let mut s = common::start(&[]);
    create(&s, "v", SIZE).await;
    {
        let mut r = replicas(&s).await;
        // No record: no log.
        let e = r.update_activity(update(&[1], &[])).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        set(&mut r, "v", record(1, &[(ME, InSync), ("b", InSync)]))
            .await
            .unwrap();
        assert!(activity(&mut r, "v").await.is_empty(), "missing = empty");
        let active = r
            .update_activity(update(&[3, 4, 5, 90], &[]))
            .await
            .unwrap()
            .into_inner()
            .active;
        assert_eq!(active, 4);
        // Marks first, then clears, in one call.
        let active = r
            .update_activity(update(&[7], &[4, 90, 100]))
            .await
            .unwrap()
            .into_inner()
            .active;
        assert_eq!(active, 3);
        // Wrong region size or an index past the end: refused, nothing changes.
        let mut bad = update(&[8], &[]);
        bad.region_bytes = RB * 2;
        let e = r.update_activity(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = r
            .update_activity(update(&[SIZE / RBU], &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(activity(&mut r, "v").await, set_of(&[3, 5, 7]));
        // Not tied to a generation: a membership change keeps it.
        set(&mut r, "v", record(2, &[(ME, InSync), ("b", Out)]))
            .await
            .unwrap();
        assert_eq!(activity(&mut r, "v").await, set_of(&[3, 5, 7]));
    }
    // Acknowledged marks survive kill -9.
    let dir = s.crash();
    s = common::start_in(dir, &[]);
    let mut r = replicas(&s).await;
    assert_eq!(activity(&mut r, "v").await, set_of(&[3, 5, 7]));
    r.update_activity(update(&[], &[3, 5, 7])).await.unwrap();
    assert!(activity(&mut r, "v").await.is_empty());
}
