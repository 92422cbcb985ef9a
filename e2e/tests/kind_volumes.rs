//! Volumes on a kind cluster (run by e2e/kind/run.sh; `#[ignore]` everywhere else):
//! filesystem claims outliving their pods, raw block claims, and offline expansion.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::time::Duration;

use kind_common::*;

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn filesystem_data_written_by_one_pod_is_read_by_the_next() {
    for class in [FS_CLASS, XFS_CLASS] {
        let ctx = Ctx::new(&format!("fs-{class}")).await;
        ctx.create_claim("data", class, "1Gi", Mode::Filesystem)
            .await;
        let wrote = ctx
            .run_pod("writer", "data", Mode::Filesystem, &write_files(16))
            .await;
        assert_eq!(log_value(&wrote, "written"), "16", "{class}");
        // The writer is deleted: the volume is unpublished, unstaged and detached before the
        // reader's pod stages it again, so the reader sees the server's data.
        let read = ctx
            .run_pod("reader", "data", Mode::Filesystem, &verify_files())
            .await;
        assert_eq!(log_value(&read, "verified"), "16", "{class}");
        ctx.finish().await;
    }
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn block_claim_is_a_raw_device_that_keeps_its_data() {
    let ctx = Ctx::new("block").await;
    ctx.create_claim("raw", BLOCK_CLASS, "256Mi", Mode::Block)
        .await;
    let wrote = ctx
        .run_pod("writer", "raw", Mode::Block, &write_block(32))
        .await;
    assert_eq!(
        log_value(&wrote, "size"),
        (256u64 << 20).to_string(),
        "device size is the claim size"
    );
    let read = ctx
        .run_pod("reader", "raw", Mode::Block, &read_block(32))
        .await;
    assert_eq!(log_value(&read, "sum"), log_value(&wrote, "sum"));
    ctx.finish().await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn expanded_claim_grows_its_filesystem_and_keeps_the_data() {
    let ctx = Ctx::new("expand").await;
    ctx.create_claim("grow", FS_CLASS, "1Gi", Mode::Filesystem)
        .await;
    ctx.run_pod("writer", "grow", Mode::Filesystem, &write_files(8))
        .await;
    ctx.resize_claim("grow", "2Gi").await;
    // Offline: ControllerExpandVolume while no pod uses the claim, then NodeExpandVolume
    // when the next pod stages it (online ublk resize needs a 6.16+ host kernel).
    ctx.wait_volume_expanded("grow", 2 << 30).await;
    let script = format!(
        "{}; echo kib $(df -k {DATA} | tail -1 | awk '{{print $2}}')",
        verify_files()
    );
    ctx.start_pod("reader", "grow", Mode::Filesystem, &script, None)
        .await;
    let logs = ctx.wait_succeeded("reader", Duration::from_secs(300)).await;
    assert_eq!(log_value(&logs, "verified"), "8");
    let kib: u64 = log_value(&logs, "kib").parse().expect("df size");
    assert!(
        kib > 1_800_000,
        "filesystem is {kib} KiB after growing to 2Gi"
    );
    ctx.wait_capacity("grow", 2 << 30).await;
    ctx.finish().await;
}
