//! Faults on a kind cluster (run by e2e/kind/run.sh; `#[ignore]` elsewhere): the enbd-server
//! pod and the node-plugin pod are deleted while a pod writes. The writer must see no error
//! (IO waits through the outage and resumes), and every file it wrote must read back intact
//! in a second pod.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::time::Duration;

use kind_common::*;

/// Writes 4 MiB files with fsync for `secs` seconds, logging "io-started" after the first
/// few so the test knows IO is in flight; any failed write fails the pod (sh -e).
fn write_for(secs: u32) -> String {
    format!(
        "end=$(( $(date +%s) + {secs} )); i=0; \
         while [ $(date +%s) -lt $end ] || [ $i -lt 8 ]; do \
           dd if=/dev/urandom of={DATA}/f.$i bs=1M count=4 conv=fsync 2>/dev/null; \
           (cd {DATA} && sha256sum f.$i >> sums); i=$((i+1)); \
           [ $i -ne 4 ] || echo io-started; \
         done; sync; echo written $i"
    )
}

async fn survive(component: &str) {
    let ctx = Ctx::new(&format!("kill-{component}")).await;
    ctx.create_claim("data", FS_CLASS, "2Gi", Mode::Filesystem)
        .await;
    ctx.start_pod("writer", "data", Mode::Filesystem, &write_for(90), None)
        .await;
    ctx.wait_log("writer", "io-started", Duration::from_secs(180))
        .await;

    let node = ctx.node_of("writer").await;
    let on_node = (component == "node").then_some(node.as_str());
    let victim = ctx.driver_pod(component, on_node).await;
    ctx.kill_driver_pod(component, &victim, on_node).await;

    let logs = ctx.wait_succeeded("writer", Duration::from_secs(600)).await;
    let written: u32 = log_value(&logs, "written").parse().expect("count");
    ctx.delete_and_wait(&ctx.api::<k8s_openapi::api::core::v1::Pod>(), "writer")
        .await;
    let read = ctx
        .run_pod("reader", "data", Mode::Filesystem, &verify_files())
        .await;
    assert_eq!(
        log_value(&read, "verified"),
        written.to_string(),
        "{component} restart lost data"
    );
    ctx.finish().await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn server_pod_deleted_during_io_loses_nothing() {
    survive("enbd-server").await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn node_plugin_pod_deleted_during_io_loses_nothing() {
    survive("node").await;
}
