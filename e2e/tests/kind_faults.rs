//! Faults on a kind cluster (run by e2e/kind/run.sh; `#[ignore]` elsewhere): the enbd-server
//! pod and the node-plugin pod are deleted while a pod writes. The writer must see no error
//! (IO waits through the outage and resumes), and every file it wrote must read back intact
//! in a second pod.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use kind_common::*;

async fn survive(component: &str) {
    let ctx = Ctx::new(&format!("kill-{component}")).await;
    ctx.create_claim("data", FS_CLASS, "2Gi", Mode::Filesystem)
        .await;
    let node = ctx.start_writer("data", 90).await;

    let on_node = (component == "node").then_some(node.as_str());
    let victim = ctx.driver_pod(component, on_node).await;
    ctx.kill_driver_pod(component, &victim, on_node).await;

    ctx.assert_writer_lost_nothing("data", &format!("{component} restart"))
        .await;
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
