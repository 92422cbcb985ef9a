//! kill -9 at arbitrary moments of management work leaves a consistent store: after a restart
//! every listed volume and snapshot is complete (right size, right content), nothing is left
//! in staging, and retrying the interrupted operations succeeds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::time::Duration;

use enbd_proto::enbd::{self as pb, content_source::Kind};
use rand::Rng;

const SRC_BYTES: u64 = 32 << 20;

fn pattern(block: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| ((block * 31 + i) % 251) as u8)
        .collect()
}

/// Every 64th 4 KiB block of `export` holds `pattern(block)`.
fn check_content(addr: std::net::SocketAddr, export: &str) {
    let (mut c, size) = raw::Raw::open(addr, export);
    assert!(size >= SRC_BYTES, "{export}: size {size}");
    for b in (0..SRC_BYTES / 4096).step_by(64) {
        assert_eq!(c.read(b, b * 4096, 4096), pattern(b), "{export}: block {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_management_work_leaves_a_consistent_store() {
    let mut s = common::start(&[]);
    {
        let mut m = s.mgmt_client().await;
        m.create_volume(pb::CreateVolumeRequest {
            name: "src".into(),
            size_bytes: SRC_BYTES,
            source: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
        let addr = s.nbd();
        tokio::task::spawn_blocking(move || {
            let (mut c, _) = raw::Raw::open(addr, "src");
            for b in (0..SRC_BYTES / 4096).step_by(64) {
                c.request(0, raw::CMD_WRITE, b, b * 4096, 4096, &pattern(b));
                assert_eq!(c.simple_reply(), (0, b));
            }
            c.request(0, raw::CMD_FLUSH, 0, 0, 0, &[]);
            assert_eq!(c.simple_reply(), (0, 0));
        })
        .await
        .unwrap();
    }
    let mut rng = rand::rng();
    for round in 0..6 {
        let mut m = s.mgmt_client().await;
        let work = tokio::spawn(async move {
            for i in 0..4 {
                let name = format!("clone-{round}-{i}");
                let src = Some(pb::ContentSource {
                    kind: Some(Kind::Volume("src".into())),
                });
                let _ = m
                    .create_volume(pb::CreateVolumeRequest {
                        name,
                        size_bytes: SRC_BYTES,
                        source: src,
                        labels: Default::default(),
                    })
                    .await;
                let _ = m
                    .create_snapshot(pb::CreateSnapshotRequest {
                        name: format!("snap-{round}-{i}"),
                        source_volume: "src".into(),
                    })
                    .await;
                if i % 2 == 1 {
                    let _ = m
                        .delete_volume(pb::DeleteVolumeRequest {
                            name: format!("clone-{round}-{}", i - 1),
                            force: false,
                        })
                        .await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..60))).await;
        let dir = s.crash();
        work.abort();
        let _ = work.await;
        s = common::start_in(dir, &[]);
        assert_eq!(
            std::fs::read_dir(s.data_dir().join("staging"))
                .unwrap()
                .count(),
            0,
            "staging not cleaned"
        );
        let mut m = s.mgmt_client().await;
        let vols = m
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let on_disk = std::fs::read_dir(s.data_dir().join("volumes"))
            .unwrap()
            .count();
        assert_eq!(
            vols.len(),
            on_disk,
            "every volume directory is a listed, complete volume"
        );
        let snaps = m
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        let addr = s.nbd();
        let exports: Vec<String> = vols
            .iter()
            .filter(|v| v.name != "demo")
            .map(|v| v.export_name.clone())
            .chain(snaps.iter().map(|s| s.export_name.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            for e in exports {
                check_content(addr, &e);
            }
        })
        .await
        .unwrap();
        // Retrying what may have been interrupted succeeds (idempotent).
        let src = Some(pb::ContentSource {
            kind: Some(Kind::Volume("src".into())),
        });
        m.create_volume(pb::CreateVolumeRequest {
            name: format!("clone-{round}-0"),
            size_bytes: SRC_BYTES,
            source: src,
            labels: Default::default(),
        })
        .await
        .unwrap();
    }
}
