//! Snapshots and clones copied in the background with copy-before-write, against the real
//! server (on this machine's /tmp, a filesystem without reflink, so the background path
//! runs): the snapshot is the volume at the instant of the call while writers keep going,
//! it is not ready (nor served, nor a source) until copied, deleting it mid-copy cancels
//! the copy, and a restart mid-copy forgets it. `--copy-rate-bytes` stretches the copies so
//! that writes really race them. Timing is never asserted: the stall numbers are the
//! benchmark's (`e2e/bench/snapshot-stall.sh`).

mod common;

use std::time::{Duration, Instant, SystemTime};

use enbd_proto::enbd::{self as pb, content_source::Kind};
use enbd_test_harness::pit::{self, Nbd};
use tonic::Code;
use tonic::transport::Channel;

type Mgmt = pb::volume_service_client::VolumeServiceClient<Channel>;

async fn volume(m: &mut Mgmt, name: &str, size: u64) {
    m.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        source: None,
        labels: Default::default(),
    })
    .await
    .unwrap();
}

async fn snapshot(m: &mut Mgmt, name: &str, source: &str) -> Result<pb::Snapshot, tonic::Status> {
    m.create_snapshot(pb::CreateSnapshotRequest {
        name: name.into(),
        source_volume: source.into(),
    })
    .await
    .map(|r| r.into_inner().snapshot.unwrap())
}

async fn listed(m: &mut Mgmt, name: &str) -> Option<pb::Snapshot> {
    m.list_snapshots(pb::ListSnapshotsRequest {
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .snapshots
    .into_iter()
    .next()
}

/// Polls CreateSnapshot (the way the external-snapshotter does) until ready; checks progress
/// only ever grows meanwhile. Returns how many not-ready answers came first.
async fn until_ready(m: &mut Mgmt, name: &str, source: &str) -> usize {
    let mut not_ready = 0;
    let mut last = 0;
    loop {
        let s = snapshot(m, name, source).await.unwrap();
        if s.ready_to_use {
            assert!(s.copy.is_none(), "a ready snapshot has no copy progress");
            return not_ready;
        }
        let p = s
            .copy
            .expect("a snapshot that is not ready reports progress");
        assert_eq!(p.total_bytes, s.size_bytes);
        assert!(
            p.copied_bytes >= last && p.copied_bytes <= p.total_bytes,
            "{p:?}"
        );
        last = p.copied_bytes;
        not_ready += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn staging_is_empty(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_under_writes_is_the_instant_of_the_call() {
    // 64 MiB at 16 MiB/s: about four seconds of copying with the writers going.
    let s = common::start(&["--copy-rate-bytes=16777216"]);
    let mut m = s.mgmt_client().await;
    volume(&mut m, "v", 64 << 20).await;
    let addr = s.nbd();
    tokio::task::spawn_blocking(move || pit::fill(addr, "v"))
        .await
        .unwrap();

    let writers = pit::Writers::start(addr, "v", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let called = SystemTime::now();
    let first = snapshot(&mut m, "snap", "v").await.unwrap();
    let returned = SystemTime::now();
    assert!(!first.ready_to_use, "a 4 s copy cannot be ready at once");
    let instant = pit::instant_of(first.created_at_unix, first.created_at_nanos);
    assert!(
        called <= instant && instant <= returned,
        "the instant is within the call"
    );
    // While copying: not served, not a source.
    let e = tokio::task::spawn_blocking(move || Nbd::open(addr, "snapshot/snap").err())
        .await
        .unwrap();
    assert!(e.is_some(), "a snapshot still copying must not be served");
    let polls = until_ready(&mut m, "snap", "v").await;
    assert!(polls > 0);
    let writes = writers.stop();

    let content = tokio::task::spawn_blocking(move || pit::read_blocks(addr, "snapshot/snap"))
        .await
        .unwrap();
    let report = pit::check_point_in_time(&content, &writes, instant)
        .unwrap_or_else(|e| panic!("snapshot is not the point in time of its call: {e}"));
    assert!(report.before > 0 && report.after > 100, "{report:?}");
    // The writers did change the volume after the instant, and the copy kept none of it.
    let now = tokio::task::spawn_blocking(move || pit::read_blocks(addr, "v"))
        .await
        .unwrap();
    let changed = now.iter().zip(&content).filter(|(a, b)| a != b).count();
    assert!(
        changed > 100,
        "only {changed} blocks changed after the snapshot"
    );
    eprintln!(
        "{} writes before the call, {} after it returned, {} blocks changed since, {} ambiguous",
        report.before, report.after, changed, report.ambiguous_blocks
    );
    assert!(staging_is_empty(s.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn copying_snapshot_is_not_a_source_and_delete_cancels_it() {
    // 1 MiB/s: a 32 MiB copy would take half a minute; the test never waits for it.
    let s = common::start(&["--copy-rate-bytes=1048576"]);
    let mut m = s.mgmt_client().await;
    volume(&mut m, "v", 32 << 20).await;
    let addr = s.nbd();
    tokio::task::spawn_blocking(move || pit::fill(addr, "v"))
        .await
        .unwrap();

    let snap = snapshot(&mut m, "snap", "v").await.unwrap();
    assert!(!snap.ready_to_use);
    assert_eq!(snap.copy.unwrap().total_bytes, 32 << 20);
    let l = listed(&mut m, "snap").await.expect("listed while copying");
    assert!(!l.ready_to_use && l.copy.is_some());
    // Idempotent while copying; another source under the name is still AlreadyExists.
    assert!(!snapshot(&mut m, "snap", "v").await.unwrap().ready_to_use);
    assert_eq!(
        snapshot(&mut m, "snap", "demo").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    // A restore from it is refused until it is ready.
    let e = m
        .create_volume(pb::CreateVolumeRequest {
            name: "restored".into(),
            size_bytes: 0,
            source: Some(pb::ContentSource {
                kind: Some(Kind::Snapshot("snap".into())),
            }),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The copy holds the volume open, but that is not a connection.
    let v = m
        .get_volume(pb::GetVolumeRequest { name: "v".into() })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.open_connections, 0);

    // A clone copies the same way: not listed, not openable until copied.
    let clone = pb::CreateVolumeRequest {
        name: "c".into(),
        size_bytes: 0,
        source: Some(pb::ContentSource {
            kind: Some(Kind::Volume("v".into())),
        }),
        labels: Default::default(),
    };
    let c = m
        .create_volume(clone.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(c.copy.unwrap().total_bytes, 32 << 20);
    let again = m
        .create_volume(clone)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(again.copy.is_some(), "a retry reports the copy in progress");
    let names: Vec<String> = m
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(!names.contains(&"c".to_owned()), "{names:?}");
    let e = tokio::task::spawn_blocking(move || Nbd::open(addr, "c").err())
        .await
        .unwrap();
    assert!(e.is_some(), "a clone still copying must not be served");

    // Deletes cancel both copies promptly and leave nothing behind.
    let t = Instant::now();
    m.delete_volume(pb::DeleteVolumeRequest {
        name: "c".into(),
        force: false,
    })
    .await
    .unwrap();
    m.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "snap".into(),
    })
    .await
    .unwrap();
    eprintln!("both deletes took {:?}", t.elapsed());
    assert!(listed(&mut m, "snap").await.is_none());
    assert_eq!(staging_is_empty(s.data_dir()), Vec::<String>::new());
    // The volume's writes are back on the plain path and work.
    tokio::task::spawn_blocking(move || {
        let mut c = Nbd::open(addr, "v").unwrap();
        c.write(0, &pit::block(7, 0));
        assert_eq!(c.read(0, 4096), pit::block(7, 0));
    })
    .await
    .unwrap();
    // And a new snapshot under the name starts from scratch.
    assert!(!snapshot(&mut m, "snap", "v").await.unwrap().ready_to_use);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_mid_copy_forgets_the_snapshot_and_a_retry_makes_it_anew() {
    let s = common::start(&["--copy-rate-bytes=1048576"]);
    let mut m = s.mgmt_client().await;
    volume(&mut m, "v", 16 << 20).await;
    let addr = s.nbd();
    tokio::task::spawn_blocking(move || pit::fill(addr, "v"))
        .await
        .unwrap();
    assert!(!snapshot(&mut m, "snap", "v").await.unwrap().ready_to_use);
    assert!(
        !staging_is_empty(s.data_dir()).is_empty(),
        "the copy lives in staging"
    );
    drop(m);

    let dir = s.crash();
    let s = common::start_in(dir, &[]);
    let mut m = s.mgmt_client().await;
    assert!(
        listed(&mut m, "snap").await.is_none(),
        "an unfinished copy must not survive a restart"
    );
    assert_eq!(staging_is_empty(s.data_dir()), Vec::<String>::new());
    // The snapshotter's next poll takes it again, at that poll's instant.
    let addr = s.nbd();
    tokio::task::spawn_blocking(move || {
        let mut c = Nbd::open(addr, "v").unwrap();
        c.write(4096, &pit::block(42, 4096));
    })
    .await
    .unwrap();
    until_ready(&mut m, "snap", "v").await;
    let (snap, vol) = tokio::task::spawn_blocking(move || {
        (
            pit::read_blocks(addr, "snapshot/snap"),
            pit::read_blocks(addr, "v"),
        )
    })
    .await
    .unwrap();
    assert_eq!(snap[1], (42, 4096));
    assert!(
        snap == vol,
        "with no writes since, the snapshot equals the volume"
    );
}
