//! `helm upgrade` during IO on a kind cluster (run by e2e/kind/run.sh and e2e/cluster/run.sh;
//! `#[ignore]` elsewhere): the way users roll the node plugin. The release is upgraded with
//! its own chart and values plus a new node pod annotation, so the DaemonSet really rolls
//! and the new enbd-node pod takes the writer's ublk device over while the writer writes.
//! The writer must see no error and every file it wrote must read back in a second pod.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use kind_common::*;

/// The node pod annotation the upgrade changes (`node.podAnnotations` in values.yaml).
const ROLLOUT_ANNOTATION: &str = "enbd.io/rollout";

/// How long the writer writes.
const WRITE_SECS: u32 = 240;

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn helm_upgrade_rolls_the_node_plugin_under_io_and_loses_nothing() {
    let helm = HelmRelease::from_env();
    let ctx = Ctx::new("helm-upgrade").await;
    ctx.create_claim("data", FS_CLASS, "2Gi", Mode::Filesystem)
        .await;
    // Long enough to outlast the rollout (helm renders, the old pod's grace period, the new
    // pod's start), so the takeover happens under IO; checked below.
    let node = ctx.start_writer("data", WRITE_SECS).await;

    let old_name = ctx.driver_pod("node", Some(&node)).await;
    let old = ctx
        .driver_pods()
        .get(&old_name)
        .await
        .expect("get node pod");
    let old_uid = old.metadata.uid.clone().unwrap_or_default();

    // A value no earlier install or upgrade has used: the pod template changes for sure.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
        .to_string();
    // helm's --set path syntax: the dots inside the annotation key are escaped.
    let key = ROLLOUT_ANNOTATION.replace('.', "\\.");
    helm.upgrade(&[format!("node.podAnnotations.{key}={nonce}")])
        .await;

    let new = ctx
        .wait_driver_pod_replaced("node", &old_uid, Some(&node))
        .await;
    let annotation = new
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROLLOUT_ANNOTATION))
        .cloned();
    assert_eq!(
        annotation.as_deref(),
        Some(nonce.as_str()),
        "the node pod that replaced {old_name} is not from the upgraded template"
    );

    // The premise, not a timing claim: a writer already done would make this a plain
    // restart test. A machine this slow needs a longer WRITE_SECS.
    let writer = ctx
        .api::<k8s_openapi::api::core::v1::Pod>()
        .get("writer")
        .await
        .expect("get writer");
    // (A failed writer is reported with its logs just below.)
    assert_ne!(
        phase(Some(&writer)).as_deref(),
        Some("Succeeded"),
        "the writer finished before the new node pod was Ready: raise WRITE_SECS"
    );

    ctx.assert_writer_lost_nothing("data", "helm upgrade of the node plugin")
        .await;
    ctx.finish().await;
}
