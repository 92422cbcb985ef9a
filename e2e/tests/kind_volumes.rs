//! Volumes on a kind cluster (run by e2e/kind/run.sh; `#[ignore]` everywhere else):
//! filesystem claims (ext4 and xfs) outliving their pods, raw block claims, and expansion
//! offline and while mounted (online where the node's kernel has ublk UPDATE_SIZE).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kind_common::*;

/// A claim of `class` written by one pod and verified by the next, which also reports the
/// filesystem it mounted: it must be `fstype`, the class's `csi.storage.k8s.io/fstype`.
async fn data_outlives_its_pod(class: &str, fstype: &str) {
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
        .run_pod(
            "reader",
            "data",
            Mode::Filesystem,
            &format!("{}; {}", verify_files(), mounted_fstype()),
        )
        .await;
    assert_eq!(log_value(&read, "verified"), "16", "{class}");
    assert_eq!(
        log_value(&read, "fstype"),
        fstype,
        "class {class} mounted the wrong filesystem"
    );
    ctx.finish().await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn ext4_data_written_by_one_pod_is_read_by_the_next() {
    data_outlives_its_pod(FS_CLASS, "ext4").await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn xfs_data_written_by_one_pod_is_read_by_the_next() {
    data_outlives_its_pod(XFS_CLASS, "xfs").await;
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
    let script = format!("{}; echo kib {}", verify_files(), df_kib());
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

/// Linux release from which ublk has UPDATE_SIZE, i.e. enbd-node can resize a live device.
const ONLINE_RESIZE_KERNEL: (u32, u32) = (6, 16);

/// KiB above which a 1Gi claim's ext4 has grown to (about) 2Gi.
const GROWN_KIB: u64 = 1_800_000;

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn claim_grown_while_mounted_follows_the_node_kernel() {
    let ctx = Ctx::new("expand-online").await;
    ctx.create_claim("grow", FS_CLASS, "1Gi", Mode::Filesystem)
        .await;
    // The pod writes, reports its size, then waits (in the pod) for the filesystem it has
    // mounted to grow, and checks its files: it only succeeds if it saw the growth itself.
    let df = df_kib();
    let script = format!(
        "{}; echo before-kib {df}; \
         while [ {df} -lt {GROWN_KIB} ]; do sleep 1; done; \
         echo grown-kib {df}; {}",
        write_files(8),
        verify_files()
    );
    ctx.start_pod("user", "grow", Mode::Filesystem, &script, None)
        .await;
    ctx.wait_log("user", "before-kib", Duration::from_secs(300))
        .await;
    let node = ctx.node_of("user").await;
    let kernel = ctx.node_kernel(&node).await;
    let online = kernel_version(&kernel)
        .unwrap_or_else(|| panic!("node {node} reports kernel {kernel:?}, not N.M..."))
        >= ONLINE_RESIZE_KERNEL;

    ctx.resize_claim("grow", "2Gi").await;
    // ControllerExpandVolume grows the volume on its server on every kernel.
    ctx.wait_volume_expanded("grow", 2 << 30).await;

    if online {
        // NodeExpandVolume resizes the live device and the filesystem: the same pod (restart
        // policy Never, so the same container) sees the new size and its files.
        let logs = ctx.wait_succeeded("user", Duration::from_secs(300)).await;
        let kib: u64 = log_value(&logs, "grown-kib").parse().expect("df size");
        assert!(
            kib > GROWN_KIB,
            "kernel {kernel}: {kib} KiB after growing to 2Gi"
        );
        assert_eq!(log_value(&logs, "verified"), "8", "kernel {kernel}");
        ctx.wait_capacity("grow", 2 << 30).await;
    } else {
        // Before 6.16 (README, "Online resize"): NodeExpandVolume is FAILED_PRECONDITION while
        // the volume is published; kubelet records it on the claim and does not retry on the
        // mounted volume; the claim keeps its old size and the pod keeps running.
        let message = ctx.wait_claim_condition("grow", "NodeResizeError").await;
        assert!(
            message.contains("FailedPrecondition")
                && message.contains("online resize is not supported"),
            "kernel {kernel}: NodeResizeError is not the documented refusal: {message}"
        );
        let claim = ctx
            .api::<PersistentVolumeClaim>()
            .get("grow")
            .await
            .expect("get claim");
        let capacity = claim
            .status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").cloned())
            .and_then(|q| quantity_bytes(&q.0))
            .expect("claim capacity");
        assert!(
            capacity < 2 << 30,
            "kernel {kernel}: the claim reports {capacity} bytes before the filesystem grew"
        );
        let pods = ctx.api::<Pod>();
        let user = pods.get("user").await.expect("get pod");
        assert_eq!(
            phase(Some(&user)).as_deref(),
            Some("Running"),
            "kernel {kernel}: the refused resize stopped the pod"
        );
        // The resize completes offline: the next pod stages a device of the server's new size
        // and only the filesystem grows.
        ctx.delete_and_wait(&pods, "user").await;
        let logs = ctx
            .run_pod(
                "reader",
                "grow",
                Mode::Filesystem,
                &format!("{}; echo kib {df}", verify_files()),
            )
            .await;
        assert_eq!(log_value(&logs, "verified"), "8", "kernel {kernel}");
        let kib: u64 = log_value(&logs, "kib").parse().expect("df size");
        assert!(
            kib > GROWN_KIB,
            "kernel {kernel}: {kib} KiB after the offline completion"
        );
        ctx.wait_capacity("grow", 2 << 30).await;
    }
    ctx.finish().await;
}

#[test]
fn kernel_versions_parse_as_the_kubelet_reports_them() {
    assert_eq!(kernel_version("6.12.48+deb13-cloud-amd64"), Some((6, 12)));
    assert_eq!(kernel_version("6.16.0-1-amd64"), Some((6, 16)));
    assert_eq!(kernel_version("7.0"), Some((7, 0)));
    assert_eq!(kernel_version("6.16-rc3"), Some((6, 16)));
    assert_eq!(kernel_version("unknown"), None);
    assert!(kernel_version("6.9.1").expect("parses") < ONLINE_RESIZE_KERNEL);
    assert!(kernel_version("6.16.1").expect("parses") >= ONLINE_RESIZE_KERNEL);
}
