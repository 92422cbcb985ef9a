//! The management API against the real binary: CSI-style idempotency, in-use protection,
//! expansion, snapshots and clones, listing with pagination, capacity and health.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use enbd_proto::enbd::{self as pb, content_source::Kind};
use tonic::Code;

fn create(name: &str, size: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        source: None,
        labels: Default::default(),
    }
}

#[tokio::test]
async fn create_and_delete_are_idempotent() {
    let s = common::start(&[]);
    let mut m = s.mgmt_client().await;
    let v = m
        .create_volume(create("pvc-1", 10 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (v.name.as_str(), v.size_bytes, v.export_name.as_str()),
        ("pvc-1", 10 << 20, "pvc-1")
    );
    let again = m
        .create_volume(create("pvc-1", 10 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);
    let odd = m
        .create_volume(create("pvc-2", 1000))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(odd.size_bytes, 4096, "sizes round up to 4 KiB");
    assert_eq!(
        m.create_volume(create("pvc-1", 20 << 20))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    // Labels are recorded and returned, and take part in idempotency.
    let mut labelled = create("pvc-l", 1 << 20);
    labelled.labels = [("fsType".to_string(), "xfs".to_string())].into();
    let l = m
        .create_volume(labelled.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(l.labels, labelled.labels);
    assert_eq!(
        m.create_volume(labelled.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        l
    );
    let mut relabelled = labelled.clone();
    relabelled.labels.insert("fsType".into(), "ext4".into());
    assert_eq!(
        m.create_volume(relabelled).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let mut bad = create("pvc-bad-labels", 1 << 20);
    bad.labels = [(String::new(), "x".to_string())].into();
    assert_eq!(
        m.create_volume(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        m.create_volume(create("../escape", 4096))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        m.create_volume(create("zero", 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    m.delete_volume(pb::DeleteVolumeRequest {
        name: "pvc-1".into(),
        force: false,
    })
    .await
    .unwrap();
    m.delete_volume(pb::DeleteVolumeRequest {
        name: "pvc-1".into(),
        force: false,
    })
    .await
    .unwrap();
    let e = m
        .get_volume(pb::GetVolumeRequest {
            name: "pvc-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!s.data_dir().join("volumes/pvc-1").exists());
}

#[tokio::test]
async fn volumes_in_use_are_not_deleted_without_force() {
    let s = common::start(&[]);
    let mut m = s.mgmt_client().await;
    m.create_volume(create("busy", 1 << 20)).await.unwrap();
    let addr = s.nbd();
    let mut c = tokio::task::spawn_blocking(move || raw::Raw::open(addr, "busy").0)
        .await
        .unwrap();
    let v = m
        .get_volume(pb::GetVolumeRequest {
            name: "busy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.open_connections, 1);
    let e = m
        .delete_volume(pb::DeleteVolumeRequest {
            name: "busy".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        m.get_volume(pb::GetVolumeRequest {
            name: "busy".into()
        })
        .await
        .is_ok()
    );
    m.delete_volume(pb::DeleteVolumeRequest {
        name: "busy".into(),
        force: true,
    })
    .await
    .unwrap();
    // The forced delete closed the client's connection.
    let closed = tokio::task::spawn_blocking(move || c.is_closed())
        .await
        .unwrap();
    assert!(closed);
    let e = m
        .get_volume(pb::GetVolumeRequest {
            name: "busy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn expand_snapshot_clone() {
    let s = common::start(&[]);
    let mut m = s.mgmt_client().await;
    m.create_volume(create("v", 4 << 20)).await.unwrap();
    let addr = s.nbd();
    tokio::task::spawn_blocking(move || {
        let (mut c, _) = raw::Raw::open(addr, "v");
        c.request(0, raw::CMD_WRITE, 1, 8192, 5, b"hello");
        assert_eq!(c.simple_reply(), (0, 1));
    })
    .await
    .unwrap();
    let grown = m
        .expand_volume(pb::ExpandVolumeRequest {
            name: "v".into(),
            size_bytes: 8 << 20,
        })
        .await
        .unwrap();
    assert_eq!(grown.into_inner().volume.unwrap().size_bytes, 8 << 20);
    let same = m
        .expand_volume(pb::ExpandVolumeRequest {
            name: "v".into(),
            size_bytes: 8 << 20,
        })
        .await
        .unwrap();
    assert_eq!(same.into_inner().volume.unwrap().size_bytes, 8 << 20);
    let e = m
        .expand_volume(pb::ExpandVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);

    let snap = pb::CreateSnapshotRequest {
        name: "snap".into(),
        source_volume: "v".into(),
    };
    let sn = m
        .create_snapshot(snap.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(sn.ready_to_use);
    assert_eq!(
        (sn.size_bytes, sn.export_name.as_str()),
        (8 << 20, "snapshot/snap")
    );
    assert_eq!(
        m.create_snapshot(snap)
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap(),
        sn
    );
    let e = m
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "snap".into(),
            source_volume: "demo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = m
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "x".into(),
            source_volume: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let from_snap = pb::CreateVolumeRequest {
        name: "restored".into(),
        size_bytes: 16 << 20,
        source: Some(pb::ContentSource {
            kind: Some(Kind::Snapshot("snap".into())),
        }),
        labels: Default::default(),
    };
    let r = m
        .create_volume(from_snap.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(r.size_bytes, 16 << 20);
    assert_eq!(
        m.create_volume(from_snap)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        r
    );
    let clone = pb::CreateVolumeRequest {
        name: "cloned".into(),
        size_bytes: 0,
        source: Some(pb::ContentSource {
            kind: Some(Kind::Volume("v".into())),
        }),
        labels: Default::default(),
    };
    assert_eq!(
        m.create_volume(clone)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .size_bytes,
        8 << 20
    );
    let too_small = pb::CreateVolumeRequest {
        name: "small".into(),
        size_bytes: 4096,
        source: Some(pb::ContentSource {
            kind: Some(Kind::Volume("v".into())),
        }),
        labels: Default::default(),
    };
    assert_eq!(
        m.create_volume(too_small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    for name in ["restored", "cloned"] {
        tokio::task::spawn_blocking(move || {
            let (mut c, _) = raw::Raw::open(addr, name);
            assert_eq!(c.read(1, 8192, 5), b"hello");
        })
        .await
        .unwrap();
    }

    let list = m
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots.len(), 1);
    m.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "snap".into(),
    })
    .await
    .unwrap();
    m.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "snap".into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn listing_pages_capacity_and_health() {
    let s = common::start(&["--advertise-address=enbd-0.enbd.svc:10809"]);
    let mut m = s.mgmt_client().await;
    for i in 0..5 {
        m.create_volume(create(&format!("vol-{i}"), 1 << 20))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = m
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.volumes.len() <= 2);
        names.extend(page.volumes.into_iter().map(|v| v.name));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(names, ["demo", "vol-0", "vol-1", "vol-2", "vol-3", "vol-4"]);
    let e = m
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 2,
            starting_token: "bad/token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let cap = m
        .get_capacity(pb::GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.provisioned_bytes, (1 << 30) + 5 * (1 << 20));
    assert!(cap.total_bytes >= cap.available_bytes && cap.available_bytes > 0);
    let h = m.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.server_id, "test-server");
    assert_eq!(h.data_address, "enbd-0.enbd.svc:10809");
    assert!(h.ready);
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
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("\nenbd_server_connections_total "), "{body}");
}
