//! Snapshots and clones on a kind cluster (run by e2e/kind/run.sh; `#[ignore]` elsewhere):
//! a restored snapshot and a clone hold the source's data as it was, not as it became.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use kind_common::*;

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn snapshot_restores_the_data_as_it_was() {
    let ctx = Ctx::new("snap").await;
    ctx.create_claim("src", FS_CLASS, "1Gi", Mode::Filesystem)
        .await;
    ctx.run_pod("writer", "src", Mode::Filesystem, &write_files(8))
        .await;
    ctx.create_snapshot("snap", "src").await;
    // Change the source after the snapshot: the restore must not see it.
    ctx.run_pod(
        "scribbler",
        "src",
        Mode::Filesystem,
        &format!("rm {DATA}/f.0; echo changed > {DATA}/after"),
    )
    .await;
    ctx.create_claim_from(
        "restored",
        FS_CLASS,
        "1Gi",
        Mode::Filesystem,
        Some(("VolumeSnapshot", "snap")),
    )
    .await;
    let read = ctx
        .run_pod(
            "reader",
            "restored",
            Mode::Filesystem,
            &format!("{}; test ! -e {DATA}/after && echo clean", verify_files()),
        )
        .await;
    assert_eq!(log_value(&read, "verified"), "8");
    assert!(
        read.contains("clean"),
        "the restore saw a write made after the snapshot:\n{read}"
    );
    ctx.finish().await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn clone_is_an_independent_copy_of_its_source() {
    let ctx = Ctx::new("clone").await;
    ctx.create_claim("src", FS_CLASS, "1Gi", Mode::Filesystem)
        .await;
    ctx.run_pod("writer", "src", Mode::Filesystem, &write_files(8))
        .await;
    ctx.create_claim_from(
        "copy",
        FS_CLASS,
        "1Gi",
        Mode::Filesystem,
        Some(("PersistentVolumeClaim", "src")),
    )
    .await;
    // Writes to the clone do not reach the source.
    let read = ctx
        .run_pod(
            "reader",
            "copy",
            Mode::Filesystem,
            &format!("{}; echo mine > {DATA}/clone-only", verify_files()),
        )
        .await;
    assert_eq!(log_value(&read, "verified"), "8");
    let src = ctx
        .run_pod(
            "source",
            "src",
            Mode::Filesystem,
            &format!(
                "{}; test ! -e {DATA}/clone-only && echo separate",
                verify_files()
            ),
        )
        .await;
    assert!(
        src.contains("separate"),
        "a write to the clone reached the source:\n{src}"
    );
    ctx.finish().await;
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn block_snapshot_restores_the_device_contents() {
    let ctx = Ctx::new("blocksnap").await;
    ctx.create_claim("raw", BLOCK_CLASS, "256Mi", Mode::Block)
        .await;
    let wrote = ctx
        .run_pod("writer", "raw", Mode::Block, &write_block(16))
        .await;
    ctx.create_snapshot("snap", "raw").await;
    ctx.create_claim_from(
        "restored",
        BLOCK_CLASS,
        "256Mi",
        Mode::Block,
        Some(("VolumeSnapshot", "snap")),
    )
    .await;
    let read = ctx
        .run_pod("reader", "restored", Mode::Block, &read_block(16))
        .await;
    assert_eq!(log_value(&read, "sum"), log_value(&wrote, "sum"));
    ctx.finish().await;
}
