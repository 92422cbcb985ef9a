//! Replacing a mirrored claim's replica on a kind cluster, the way an operator does it under
//! the chart's defaults (management mutual TLS, `--access published`): run by
//! e2e/kind/run.sh and e2e/cluster/run.sh; `#[ignore]` elsewhere.
//!
//! Two servers hold the claim's replicas; a third joins; while a pod writes, the replica on
//! `<set>-1` is retired by the two documented commands, each through `kubectl exec`:
//! `csi-driver prepare-replacement` in the controller's pod (it creates the new copy on the
//! third server and grants it to the node), then `enbd-node replace` in the node plugin's
//! pod (the swap and the full copy, while a third pod keeps the claim attached). The writer
//! gets no error, the node lists `<set>-0` and `<set>-2` in sync, and a second pod reads
//! every file back.
//!
//! The install has one server: the test scales the StatefulSet to two, then three, and back
//! to one at the end (after its claim and volume are deleted), so the other tests keep their
//! single server. The retired copy stays on `<set>-1`'s data directory, as the README says.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::DeleteParams;

use kind_common::*;

/// The node's `enbd-node list` replica lines for `volume_id`: `(id, state)` each.
fn replica_states(list: &str, volume_id: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut ours = false;
    for line in list.lines() {
        if !line.starts_with(' ') {
            ours = line.split_whitespace().nth(1) == Some(volume_id);
        } else if ours && let Some(rest) = line.trim_start().strip_prefix("replica ") {
            // `ID ADDRESS gen N STATE ...`
            let w: Vec<&str> = rest.split_whitespace().collect();
            if w.len() >= 5 {
                out.push((w[0].to_owned(), w[4].to_owned()));
            }
        }
    }
    out
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh"]
async fn a_mirrored_claims_replica_is_replaced_by_the_operator_commands() {
    let ctx = Ctx::new("replace").await;
    let set = server_statefulset(&ctx.client).await;
    scale_servers(&ctx.client, &set, 2).await;
    let class = ctx
        .create_class_like_chart(
            "replace",
            "replace",
            &[("replicas", "2"), ("replicaTimeout", "5s")],
            "Delete",
        )
        .await;
    ctx.create_claim("data", &class, "2Gi", Mode::Filesystem)
        .await;
    let node = ctx.start_writer("data", 90).await;
    scale_servers(&ctx.client, &set, 3).await;

    let pv = ctx.volume_of("data").await;
    let volume_id = Api::<PersistentVolume>::all(ctx.client.clone())
        .get(&pv)
        .await
        .expect("get the claim's PV")
        .spec
        .and_then(|s| s.csi)
        .map(|c| c.volume_handle)
        .expect("a CSI volume handle");
    let (old, new) = (format!("{set}-1"), format!("{set}-2"));

    // The controller's half.
    let controller = ctx.driver_pod("controller", None).await;
    let (ok, out, err) = ctx
        .exec_driver(
            &controller,
            "csi-driver",
            &[
                "/usr/local/bin/csi-driver",
                "prepare-replacement",
                "--volume-id",
                &volume_id,
                "--replica",
                &old,
            ],
        )
        .await;
    println!("prepare-replacement: {out}{err}");
    assert!(ok, "prepare-replacement failed: {out}{err}");
    let spec = out.lines().last().unwrap_or_default().to_owned();
    assert!(
        spec.starts_with(&format!("{new}@")) && spec.contains("https://"),
        "the new replica goes to the only server outside the set, over TLS: {out}"
    );

    // The node's half, on the node that has the claim attached.
    let plugin = ctx.driver_pod("node", Some(&node)).await;
    let (ok, out, err) = ctx
        .exec_driver(
            &plugin,
            "enbd-node",
            &[
                "/usr/local/bin/enbd-node",
                "replace",
                "--volume",
                &volume_id,
                "--replica",
                &old,
                "--with",
                &spec,
            ],
        )
        .await;
    println!("enbd-node replace: {out}{err}");
    assert!(ok, "enbd-node replace failed: {out}{err}");

    // The full copy runs in the node's mirror, so only while the claim is attached: a pod
    // holds it beside the writer, whose 90 s end before a 2 GiB copy does under TCG (the
    // first run here saw the copy stop with the writer's unstage).
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

    // The full copy to the new member, while the writer goes on. Under TCG with TLS on the
    // data path it copies about 2 MiB/s (measured here: 2 GiB in about 16 min).
    let states = eventually(
        &format!("{volume_id}: {set}-0 and {new} in sync"),
        Duration::from_secs(2400),
        || async {
            let (ok, out, err) = ctx
                .exec_driver(&plugin, "enbd-node", &["/usr/local/bin/enbd-node", "list"])
                .await;
            if !ok {
                return Err(format!("enbd-node list failed: {err}"));
            }
            let mut states = replica_states(&out, &volume_id);
            states.sort();
            let want = [format!("{set}-0"), new.clone()];
            if states.len() == 2
                && states
                    .iter()
                    .zip(&want)
                    .all(|((id, st), w)| id == w && st == "in-sync")
            {
                Ok(states)
            } else {
                Err(out)
            }
        },
    )
    .await;
    println!("after the replacement: {states:?}");
    ctx.delete_and_wait(&ctx.api::<Pod>(), "holder").await;
    ctx.assert_writer_lost_nothing("data", "replacing a replica")
        .await;

    // Claims and their volumes go first, while the members' servers can delete their
    // copies; then back to the install's single server.
    let client = ctx.client.clone();
    ctx.finish_and_wait_for_volumes().await;
    scale_servers(&client, &set, 1).await;
    Api::<StorageClass>::all(client)
        .delete(&class, &DeleteParams::default())
        .await
        .expect("delete the replace class");
}

#[test]
fn the_list_table_is_read_per_volume() {
    let list = "DEVICE VOLUME SIZE PHASE ENGINE BROWNOUT CHANNELS\n\
                /dev/ublkb0 s-0/pvc-1 1.0GiB attached Healthy wait 0:up\n  \
                replica s-0 10.0.0.1:10809 gen 3 in-sync\n  \
                replica s-2 10.0.0.3:10809 gen 3 resyncing 1.0MiB/1.0GiB at 2.0MiB/s\n\
                /dev/ublkb1 s-0/pvc-2 1.0GiB attached Healthy wait 0:up\n  \
                replica s-1 10.0.0.2:10809 gen 1 in-sync\n";
    assert_eq!(
        replica_states(list, "s-0/pvc-1"),
        [
            ("s-0".to_owned(), "in-sync".to_owned()),
            ("s-2".to_owned(), "resyncing".to_owned())
        ]
    );
}
