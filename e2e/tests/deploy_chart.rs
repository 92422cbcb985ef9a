//! The Helm chart, rendered with its default values and with every e2e/chart/values-*.yaml:
//! every object parses strictly into its Kubernetes API type, and the set is consistent
//! (see deploy_common/checks.rs for what that covers).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod deploy_common;

use deploy_common::checks::{check_set, dockerfile_targets};
use deploy_common::{Object, chart_renders, repo_root, value_sets};

#[test]
fn every_value_set_renders_strictly_valid_consistent_objects() {
    let targets = dockerfile_targets(&repo_root());
    let sets = chart_renders();
    let mut expected: Vec<String> = value_sets().into_iter().map(|(n, _)| n).collect();
    expected.sort();
    let mut rendered: Vec<&str> = sets.iter().map(|s| s.name.as_str()).collect();
    rendered.sort();
    assert_eq!(rendered, expected, "one render per value set");
    let problems: Vec<String> = sets.iter().flat_map(|s| check_set(s, &targets)).collect();
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn default_values_deploy_the_whole_product() {
    let sets = chart_renders();
    let default = sets
        .iter()
        .find(|s| s.name == "default")
        .expect("default render");
    let mut kinds: Vec<&str> = default.objects.iter().map(Object::kind).collect();
    kinds.sort();
    kinds.dedup();
    for kind in [
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
        "Deployment",
        "DaemonSet",
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert!(
            kinds.contains(&kind),
            "default render lacks a {kind}: {kinds:?}"
        );
    }
    let classes: Vec<&str> = default
        .objects
        .iter()
        .filter(|o| matches!(o, Object::StorageClass(_)))
        .map(Object::name)
        .collect();
    assert_eq!(
        classes,
        ["enbd", "enbd-block"],
        "a filesystem default and a block example"
    );
    for o in &default.objects {
        if o.is_namespaced() {
            assert_eq!(
                o.metadata().namespace.as_deref(),
                Some(deploy_common::NAMESPACE),
                "{} {}",
                o.kind(),
                o.name()
            );
        }
    }
    // The controller runs every sidecar the features need.
    let (_, controller) = default
        .objects
        .iter()
        .find(|o| matches!(o, Object::Deployment(_)))
        .and_then(Object::pod_spec)
        .expect("controller");
    let names: Vec<&str> = controller
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "csi-driver",
            "csi-provisioner",
            "csi-attacher",
            "csi-resizer",
            "csi-snapshotter",
            "liveness-probe"
        ]
    );
}

#[test]
fn a_broken_object_is_reported_not_accepted() {
    // The strict parse must catch what k8s-openapi alone would silently drop or accept.
    let unknown_field = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: b\nautomountToken: false\n";
    let err = deploy_common::RenderSet::parse("t", unknown_field).expect_err("unknown field");
    assert!(err.contains("unknown field .automountToken"), "{err}");

    let wrong_type = "apiVersion: storage.k8s.io/v1\nkind: CSIDriver\nmetadata:\n  name: a\nspec:\n  attachRequired: \"yes\"\n";
    let err = deploy_common::RenderSet::parse("t", wrong_type).expect_err("string for a bool");
    assert!(err.contains("spec.attachRequired"), "{err}");

    let misplaced = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: a\n  namespace: b\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers:\n        - name: c\n          image: i:1\n          privileged: true\n";
    let err =
        deploy_common::RenderSet::parse("t", misplaced).expect_err("field at the wrong level");
    assert!(err.contains("containers[0].privileged"), "{err}");

    let snapshot_class = "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata:\n  name: a\ndriver: d\ndeletionPolicy: Keep\n";
    assert!(
        deploy_common::RenderSet::parse("t", snapshot_class).is_err(),
        "Keep is no deletion policy"
    );

    let unknown_kind = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n";
    assert!(
        deploy_common::RenderSet::parse("t", unknown_kind).is_err(),
        "kinds the chart never renders"
    );
}

#[test]
fn dockerfile_builds_what_the_images_run() {
    let root = repo_root();
    let dockerfile =
        std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let targets = dockerfile_targets(&root);
    let mut images: Vec<&str> = targets.iter().map(|t| t.image.as_str()).collect();
    images.sort();
    assert_eq!(images, ["enbd-csi-driver", "enbd-node", "enbd-server"]);
    let built: Vec<&str> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1])
        .collect();
    for t in &targets {
        assert!(
            built.contains(&t.binary.as_str()),
            "the builder does not build {} (builds {built:?})",
            t.binary
        );
        // A binary named like its package: <package dir>/src/main.rs with that package name.
        let member = std::fs::read_dir(&root)
            .expect("repo root")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|dir| {
                std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|m| {
                    m.lines()
                        .any(|l| l.trim() == format!("name = \"{}\"", t.binary))
                })
            })
            .unwrap_or_else(|| panic!("no workspace package named {}", t.binary));
        assert!(
            member.join("src/main.rs").is_file(),
            "{} has no src/main.rs",
            member.display()
        );
        let copied = format!("/out/{}", t.binary);
        assert!(
            dockerfile.contains(&copied),
            "the {} stage does not copy {copied}",
            t.image
        );
    }
    // The node image carries the filesystem and mount tools the node service runs.
    let node_stage = dockerfile
        .split("AS enbd-node")
        .nth(1)
        .expect("enbd-node stage");
    for package in ["e2fsprogs", "xfsprogs", "util-linux", "mount"] {
        assert!(
            node_stage.split_whitespace().any(|w| w == package),
            "enbd-node image lacks {package}"
        );
    }
    // The build context keeps every workspace member (the build needs all of them).
    let ignore =
        std::fs::read_to_string(root.join("deploy/Dockerfile.dockerignore")).expect("dockerignore");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members_line = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    for member in members_line.split('"').skip(1).step_by(2) {
        let kept = ignore
            .lines()
            .any(|l| l == format!("!{member}/**") || l == format!("!{member}/Cargo.toml"));
        assert!(
            kept,
            "deploy/Dockerfile.dockerignore drops workspace member {member}"
        );
    }
}

#[test]
fn kind_and_cluster_values_provide_the_classes_the_kind_tests_use() {
    // The kind tests name their classes in kind_common (a separate test crate): read them
    // from the source so the two cannot drift apart.
    let source = std::fs::read_to_string(repo_root().join("e2e/tests/kind_common/mod.rs"))
        .expect("kind_common");
    let used: Vec<(&str, &str)> = source
        .lines()
        .filter_map(|l| l.strip_prefix("pub const ")?.split_once(": &str = \""))
        .filter(|(name, _)| name.ends_with("_CLASS"))
        .map(|(name, rest)| (name, rest.trim_end_matches("\";")))
        .collect();
    assert!(used.len() >= 4, "class constants in kind_common: {used:?}");
    let sets = chart_renders();
    // The same test binaries run against kind and against e2e/cluster.
    for install in ["kind", "cluster"] {
        let set = sets
            .iter()
            .find(|s| s.name == install)
            .unwrap_or_else(|| panic!("{install} render"));
        for &(constant, class) in &used {
            let snapshot = constant == "SNAPSHOT_CLASS";
            let found = set.objects.iter().any(|o| {
                o.name() == class
                    && match o {
                        Object::VolumeSnapshotClass(_) => snapshot,
                        Object::StorageClass(_) => !snapshot,
                        _ => false,
                    }
            });
            assert!(found, "the {install} install lacks {constant} = {class}");
        }
    }
}
