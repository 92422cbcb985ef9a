use super::*;
use std::fs;
use std::os::unix::fs::FileExt;

fn store() -> (tempfile::TempDir, VolumeStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(dir.path(), None).unwrap();
    (dir, s)
}

#[test]
fn create_is_idempotent_and_rounds_size() {
    let (_d, s) = store();
    let (v, created) = s
        .create_volume("vol-a", 10_000, None, Default::default())
        .unwrap();
    assert!(created);
    assert_eq!(v.size_bytes, 12_288);
    let (again, created) = s
        .create_volume("vol-a", 10_000, None, Default::default())
        .unwrap();
    assert!(!created);
    assert_eq!(again.size_bytes, 12_288);
    assert_eq!(again.created_at_unix, v.created_at_unix);
    assert!(matches!(
        s.create_volume("vol-a", 1 << 20, None, Default::default()),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        s.create_volume("vol-b", 0, None, Default::default()),
        Err(StoreError::InvalidSize(_))
    ));
    assert!(matches!(
        s.create_volume("../x", 4096, None, Default::default()),
        Err(StoreError::InvalidName { .. })
    ));
}

#[test]
fn labels_are_kept_and_take_part_in_idempotency() {
    let (dir, s) = store();
    let labels: BTreeMap<String, String> = [
        ("fsType".into(), "xfs".into()),
        ("channels".into(), "4".into()),
    ]
    .into();
    let (v, created) = s.create_volume("lab", 4096, None, labels.clone()).unwrap();
    assert!(created);
    assert_eq!(v.labels, labels);
    // Same labels: the same volume. Other or no labels: AlreadyExists.
    let (again, created) = s.create_volume("lab", 4096, None, labels.clone()).unwrap();
    assert!(!created);
    assert_eq!(again.labels, labels);
    let mut other = labels.clone();
    other.insert("fsType".into(), "ext4".into());
    assert!(matches!(
        s.create_volume("lab", 4096, None, other),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        s.create_volume("lab", 4096, None, Default::default()),
        Err(StoreError::AlreadyExists { .. })
    ));
    // They survive a reopen of the store (they are in meta.json).
    drop(s);
    let s = VolumeStore::open(dir.path(), None).unwrap();
    assert_eq!(s.get_volume("lab").unwrap().labels, labels);
    // Metadata written before labels existed reads as no labels.
    let meta = dir.path().join("volumes/lab/meta.json");
    std::fs::write(&meta, br#"{"format":1,"source":null,"created_at_unix":1}"#).unwrap();
    assert!(s.get_volume("lab").unwrap().labels.is_empty());
    // Bad labels are refused before anything is created.
    let empty_key: BTreeMap<String, String> = [(String::new(), "x".into())].into();
    assert!(matches!(
        s.create_volume("bad", 4096, None, empty_key),
        Err(StoreError::InvalidLabels(_))
    ));
    let huge: BTreeMap<String, String> = [("k".into(), "v".repeat(5000))].into();
    assert!(matches!(
        s.create_volume("bad", 4096, None, huge),
        Err(StoreError::InvalidLabels(_))
    ));
    let many: BTreeMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), String::new())).collect();
    assert!(matches!(
        s.create_volume("bad", 4096, None, many),
        Err(StoreError::InvalidLabels(_))
    ));
    assert!(matches!(
        s.get_volume("bad"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn delete_is_idempotent_and_respects_open_connections() {
    let (_d, s) = store();
    s.create_volume("v", 1 << 20, None, Default::default())
        .unwrap();
    let export = ExportProvider::open(&s, "v").unwrap();
    assert_eq!(s.get_volume("v").unwrap().open_connections, 1);
    assert!(matches!(
        s.delete_volume("v", false),
        Err(StoreError::InUse { connections: 1, .. })
    ));
    assert!(
        s.get_volume("v").is_ok(),
        "a refused delete must change nothing"
    );
    s.delete_volume("v", true).unwrap();
    assert!(
        export.closed.is_cancelled(),
        "force delete closes connections"
    );
    assert!(matches!(
        s.get_volume("v"),
        Err(StoreError::NotFound { .. })
    ));
    s.delete_volume("v", false).unwrap();
    drop(export);
    assert!(matches!(
        ExportProvider::open(&s, "v"),
        Err(OpenError::NotFound(_))
    ));
}

#[test]
fn expand_grows_and_refuses_shrink() {
    let (_d, s) = store();
    s.create_volume("v", 1 << 20, None, Default::default())
        .unwrap();
    assert_eq!(
        s.expand_volume("v", (2 << 20) - 100).unwrap().size_bytes,
        2 << 20
    );
    assert_eq!(s.expand_volume("v", 2 << 20).unwrap().size_bytes, 2 << 20);
    assert!(matches!(
        s.expand_volume("v", 1 << 20),
        Err(StoreError::Shrink { .. })
    ));
    assert!(matches!(
        s.expand_volume("nope", 1 << 20),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(ExportProvider::open(&s, "v").unwrap().size, 2 << 20);
}

#[test]
fn snapshot_is_point_in_time_read_only_and_clonable() {
    let (_d, s) = store();
    s.create_volume("v", 4 << 20, None, Default::default())
        .unwrap();
    let e = ExportProvider::open(&s, "v").unwrap();
    e.backend.write_at(&[0xab; 4096], 1 << 20, false).unwrap();
    let (snap, created) = s.create_snapshot("snap1", "v").unwrap();
    assert!(created);
    assert_eq!(snap.size_bytes, 4 << 20);
    assert_eq!(snap.export_name, "snapshot/snap1");
    assert!(!s.create_snapshot("snap1", "v").unwrap().1);
    s.create_volume("other", 4096, None, Default::default())
        .unwrap();
    assert!(matches!(
        s.create_snapshot("snap1", "other"),
        Err(StoreError::AlreadyExists { .. })
    ));
    e.backend.write_at(&[0xcd; 4096], 1 << 20, false).unwrap();

    let se = ExportProvider::open(&s, "snapshot/snap1").unwrap();
    assert!(se.read_only);
    let mut buf = [0u8; 4096];
    se.backend.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [0xab; 4096], "snapshot must not see later writes");
    assert!(se.backend.write_at(&buf, 0, false).is_err());
    assert!(matches!(
        s.delete_snapshot("snap1"),
        Err(StoreError::InUse { .. })
    ));
    drop(se);

    let (clone, _) = s
        .create_volume(
            "c",
            8 << 20,
            Some(ContentSource::Snapshot("snap1".into())),
            Default::default(),
        )
        .unwrap();
    assert_eq!(clone.size_bytes, 8 << 20);
    let ce = ExportProvider::open(&s, "c").unwrap();
    ce.backend.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [0xab; 4096]);
    assert!(matches!(
        s.create_volume(
            "small",
            4096,
            Some(ContentSource::Volume("v".into())),
            Default::default()
        ),
        Err(StoreError::SmallerThanSource { .. })
    ));
    let (vc, _) = s
        .create_volume(
            "vc",
            0,
            Some(ContentSource::Volume("v".into())),
            Default::default(),
        )
        .unwrap();
    assert_eq!(vc.size_bytes, 4 << 20);
    assert!(matches!(
        s.create_volume(
            "x",
            0,
            Some(ContentSource::Snapshot("missing".into())),
            Default::default()
        ),
        Err(StoreError::NotFound { .. })
    ));
    s.delete_snapshot("snap1").unwrap();
    s.delete_snapshot("snap1").unwrap();
    assert_eq!(s.list_snapshots().unwrap().len(), 0);
}

#[test]
fn startup_scan_removes_interrupted_work_and_keeps_committed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = VolumeStore::open(dir.path(), None).unwrap();
        s.create_volume("kept", 8192, None, Default::default())
            .unwrap();
        let e = ExportProvider::open(&s, "kept").unwrap();
        e.backend.write_at(b"durable", 0, true).unwrap();
    }
    // What a kill -9 mid-create or mid-delete leaves behind.
    let half = dir.path().join("staging/create-half-1-0");
    fs::create_dir_all(&half).unwrap();
    fs::write(half.join("data"), b"x").unwrap();
    fs::write(dir.path().join("staging/delete-gone-1-1"), b"y").unwrap();
    let s = VolumeStore::open(dir.path(), None).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    let names: Vec<_> = s
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["kept"]);
    let f = File::open(dir.path().join("volumes/kept/data")).unwrap();
    let mut b = [0u8; 7];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"durable");
}

#[test]
fn capacity_and_listing() {
    let (_d, s) = store();
    s.create_volume("b", 8192, None, Default::default())
        .unwrap();
    s.create_volume("a", 4096, None, Default::default())
        .unwrap();
    let c = s.capacity().unwrap();
    assert_eq!(c.provisioned_bytes, 12288);
    assert!(c.total_bytes >= c.available_bytes && c.total_bytes > 0);
    let names: Vec<_> = ExportProvider::list(&s)
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
}
