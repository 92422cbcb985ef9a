//! A mirrored claim on a kind cluster (run by e2e/kind/run.sh and e2e/cluster/run.sh;
//! `#[ignore]` elsewhere): a class with `replicas: "2"` on two enbd-servers, one of them
//! taken away while a pod writes and brought back.
//!
//! The install has one server: the test scales the server StatefulSet to two for its claim
//! and back to one at the end, so the other tests keep their single server. What it checks
//! is what users and operators see: the writer gets no error while a replica is gone, the
//! controller records `VolumeDegraded` and later `VolumeRecovered` Events on the claim
//! (`kubectl describe pvc`), a second pod reads every file back while the replica is still
//! away, and, after the resync (done while a third pod holds the claim), a fourth reads
//! them again (its reads balanced over both replicas).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::DeleteParams;

use kind_common::*;

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn mirrored_claim_keeps_writing_without_a_replica_and_resyncs_it() {
    let ctx = Ctx::new("mirror").await;
    let set = server_statefulset(&ctx.client).await;
    scale_servers(&ctx.client, &set, 2).await;
    // The chart's ext4 class with two replicas and a 5 s replica timeout.
    let class = ctx
        .create_class_like_chart(
            "mirror",
            "mirror",
            &[("replicas", "2"), ("replicaTimeout", "5s")],
            "Delete",
        )
        .await;
    // The controller places the two replicas once it has seen the second server; until
    // then CreateVolume is ResourceExhausted and the provisioner retries.
    ctx.create_claim("data", &class, "2Gi", Mode::Filesystem)
        .await;

    // One replica's server goes away (scaled down: its pod is stopped and not replaced)
    // while the writer runs.
    ctx.start_writer("data", 120).await;
    scale_servers(&ctx.client, &set, 1).await;
    let degraded = wait_claim_event(&ctx, "data", "VolumeDegraded", Duration::from_secs(300)).await;
    println!("VolumeDegraded: {degraded}");
    assert!(
        degraded.contains(&format!("{set}-1")),
        "the Degraded event names the missing replica's server: {degraded}"
    );
    ctx.assert_writer_lost_nothing("data", "a replica's server going away")
        .await;

    // It comes back: the mirror copies what it missed. The mirror lives in the node that
    // has the volume attached, so a pod holds the claim meanwhile (a detached volume stays
    // degraded until its next attach). Then a fresh pod reads every file back, its reads
    // balanced over both replicas.
    scale_servers(&ctx.client, &set, 2).await;
    ctx.start_pod(
        "holder",
        "data",
        Mode::Filesystem,
        "echo holding; sleep 3600",
        None,
    )
    .await;
    ctx.wait_log("holder", "holding", Duration::from_secs(300))
        .await;
    let recovered =
        wait_claim_event(&ctx, "data", "VolumeRecovered", Duration::from_secs(1200)).await;
    println!("VolumeRecovered: {recovered}");
    ctx.delete_and_wait(&ctx.api::<Pod>(), "holder").await;
    let read = ctx
        .run_pod_within(
            "after-resync",
            "data",
            Mode::Filesystem,
            &format!("{}; echo files $(wc -l < {DATA}/sums)", verify_files()),
            Duration::from_secs(1200),
        )
        .await;
    assert_eq!(
        log_value(&read, "verified"),
        log_value(&read, "files"),
        "files lost or corrupt after the resync"
    );

    // Claims and their volumes go first, while both servers can delete their copies; then
    // back to the install's single server, and the class goes with the test.
    let client = ctx.client.clone();
    ctx.finish_and_wait_for_volumes().await;
    scale_servers(&client, &set, 1).await;
    Api::<StorageClass>::all(client)
        .delete(&class, &DeleteParams::default())
        .await
        .expect("delete the mirror class");
}
