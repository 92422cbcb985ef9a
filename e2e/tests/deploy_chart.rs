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
        "PriorityClass",
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
            "csi-external-health-monitor-controller",
            "liveness-probe"
        ]
    );
}

fn controller_containers(set: &deploy_common::RenderSet) -> Vec<String> {
    set.objects
        .iter()
        .find(|o| matches!(o, Object::Deployment(_)))
        .and_then(Object::pod_spec)
        .map(|(_, s)| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn the_snapshot_api_decides_the_snapshot_class_and_sidecar() {
    let sets = chart_renders();
    let find = |name: &str| {
        sets.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} render"))
    };
    let with = find("default");
    let without = find(deploy_common::NO_SNAPSHOT_SET);
    let classes = |s: &deploy_common::RenderSet| {
        s.objects
            .iter()
            .filter(|o| matches!(o, Object::VolumeSnapshotClass(_)))
            .count()
    };
    assert_eq!(classes(with), 1, "the API is served: the class is created");
    assert_eq!(
        classes(without),
        0,
        "no snapshot API: no class, install succeeds"
    );
    let mut expected = controller_containers(with);
    expected.retain(|c| c != "csi-snapshotter");
    assert_eq!(
        controller_containers(without),
        expected,
        "without the API only the snapshotter is left out"
    );
    // Everything else is the same install.
    let others = |s: &deploy_common::RenderSet| {
        let mut v: Vec<String> = s
            .objects
            .iter()
            .filter(|o| !matches!(o, Object::VolumeSnapshotClass(_)))
            .map(|o| format!("{} {}", o.kind(), o.name()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(others(with), others(without));
}

#[test]
fn default_values_hold_on_real_clusters() {
    use deploy_common::checks::{args, flag};
    let sets = chart_renders();
    let default = sets.iter().find(|s| s.name == "default").expect("default");
    let pod = |kind: &str| {
        default
            .objects
            .iter()
            .find(|o| o.kind() == kind)
            .and_then(Object::pod_spec)
            .unwrap_or_else(|| panic!("a {kind}"))
            .1
    };
    // Priority: servers get the chart's own class, the node plugin system-node-critical.
    let server = pod("StatefulSet");
    let class = server
        .priority_class_name
        .as_deref()
        .expect("server priority");
    let pc = default
        .objects
        .iter()
        .find_map(|o| match o {
            Object::PriorityClass(pc) if o.name() == class => Some(pc),
            _ => None,
        })
        .expect("the chart creates the servers' PriorityClass");
    assert_eq!(pc.value, Some(1_000_000_000));
    assert_eq!(
        pod("DaemonSet").priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    for kind in ["StatefulSet", "Deployment"] {
        let seccomp = pod(kind)
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref())
            .map(|s| s.type_.clone());
        assert_eq!(seccomp.as_deref(), Some("RuntimeDefault"), "{kind}");
    }
    // One controller, no PodDisruptionBudget (the kinds the chart renders have none).
    let d = default
        .objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) => Some(d),
            _ => None,
        })
        .expect("controller");
    assert_eq!(d.spec.replicas, Some(1));
    // The provisioner passes the claim's names; the driver records events.
    let controller = pod("Deployment");
    let c = |name: &str| {
        controller
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("container {name}"))
    };
    assert!(
        args(c("csi-provisioner"))
            .iter()
            .any(|a| a == "--extra-create-metadata")
    );
    assert!(args(c("csi-driver")).iter().any(|a| a == "--events"));
    assert_eq!(flag(args(c("csi-driver")), "--log-level"), Some("info"));
    // The node's memory limit: 256 Mi + 16 volumes x (64 Mi journal + 128 Mi buffers).
    let node_pod = pod("DaemonSet");
    let node = node_pod
        .containers
        .iter()
        .find(|c| c.name == "enbd-node")
        .expect("enbd-node");
    assert_eq!(flag(args(node), "--max-volumes"), Some("16"));
    assert_eq!(flag(args(node), "--journal-bytes"), Some("67108864"));
    let limit = node
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| q.0.clone());
    assert_eq!(limit.as_deref(), Some("3328Mi"));
    // No topology: the provisioner runs without the Topology feature gate.
    assert!(
        !args(c("csi-provisioner"))
            .iter()
            .any(|a| a.contains("Topology")),
        "volumes are reachable from every node"
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
