//! The plain manifests in deploy/manifests: strictly valid and consistent like the chart's
//! renders, and object for object the chart's default render (render-manifests.sh output).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod deploy_common;

use deploy_common::checks::{check_set, dockerfile_targets};
use deploy_common::{Object, RenderSet, chart_renders, manifest_files, repo_root};

fn merged(sets: Vec<RenderSet>) -> RenderSet {
    let mut all = RenderSet {
        name: "deploy/manifests".into(),
        objects: Vec::new(),
        raw: Vec::new(),
    };
    for s in sets {
        all.objects.extend(s.objects);
        all.raw.extend(s.raw);
    }
    all
}

#[test]
fn manifests_are_strictly_valid_and_consistent() {
    let manifests = merged(manifest_files());
    let problems = check_set(&manifests, &dockerfile_targets(&repo_root()));
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let namespaces: Vec<&str> = manifests
        .objects
        .iter()
        .filter(|o| matches!(o, Object::Namespace(_)))
        .map(Object::name)
        .collect();
    assert_eq!(
        namespaces,
        [deploy_common::NAMESPACE],
        "the manifests create their namespace"
    );
}

/// The manifests are the defaults with `tls.source=cert-manager` (values-certmanager.yaml):
/// Helm-generated certificates would differ on every render and put a key in the repository.
#[test]
fn manifests_equal_the_default_chart_render() {
    let manifests = merged(manifest_files());
    let default = chart_renders()
        .into_iter()
        .find(|s| s.name == "certmanager")
        .expect("certmanager render");
    let from_manifests: Vec<&serde_json::Value> = manifests
        .objects
        .iter()
        .zip(&manifests.raw)
        .filter(|(o, _)| !matches!(o, Object::Namespace(_)))
        .map(|(_, v)| v)
        .collect();
    let from_chart: Vec<&serde_json::Value> = default.raw.iter().collect();
    assert_eq!(
        from_manifests.len(),
        from_chart.len(),
        "object count differs: run deploy/render-manifests.sh"
    );
    let mut differences = Vec::new();
    for (m, c) in from_manifests.iter().zip(&from_chart) {
        deploy_common::diff(m, c, &describe(m), &mut differences);
    }
    assert!(
        differences.is_empty(),
        "deploy/manifests differs from the chart (run deploy/render-manifests.sh):\n{}",
        differences.join("\n")
    );
}

fn describe(v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    let name = v
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("?");
    format!("{kind} {name}")
}
