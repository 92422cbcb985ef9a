//! `helm uninstall` on a kind cluster (run by e2e/kind/run.sh and e2e/cluster/run.sh LAST
//! and alone: it removes the driver; `#[ignore]` elsewhere). After the release's volumes are
//! deleted (one claim of a Delete class, one of a Retain class), uninstalling leaves nothing
//! of the release behind but what is kept on purpose (README, "Uninstalling"):
//! - the Retain class's PersistentVolume, Released, pointing at data still on its server;
//! - the server StatefulSet's data claims when `server.storage.type` is `pvc` (the chart's
//!   `persistentVolumeClaimRetentionPolicy` keeps them); a hostPath data directory is not an
//!   API object and stays on its node;
//! - in the release namespace (helm never deletes a namespace), the controller sidecars'
//!   leader-election Leases, which the sidecars create at run time, not the chart.
//!
//! Everything the chart renders carries `app.kubernetes.io/instance=<release>`; the test
//! lists that label over every kind the chart can make, namespaced and cluster-scoped.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod kind_common;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass, VolumeAttachment};
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};

use kind_common::*;

/// Every kind the chart can render (some only with optional values or APIs: cert-manager's,
/// the Prometheus Operator's, the snapshot class), plus what its workloads own and
/// Kubernetes garbage-collects after them (ReplicaSets, ControllerRevisions, Pods,
/// EndpointSlices). An API the cluster does not serve holds nothing.
fn release_kinds() -> Vec<(ApiResource, bool)> {
    let crd = |group: &str, kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
    };
    vec![
        (ApiResource::erase::<Pod>(&()), true),
        (ApiResource::erase::<Service>(&()), true),
        (ApiResource::erase::<Endpoints>(&()), true),
        (ApiResource::erase::<EndpointSlice>(&()), true),
        (ApiResource::erase::<ServiceAccount>(&()), true),
        (ApiResource::erase::<Secret>(&()), true),
        (ApiResource::erase::<ConfigMap>(&()), true),
        (ApiResource::erase::<PersistentVolumeClaim>(&()), true),
        (ApiResource::erase::<Deployment>(&()), true),
        (ApiResource::erase::<ReplicaSet>(&()), true),
        (ApiResource::erase::<DaemonSet>(&()), true),
        (ApiResource::erase::<StatefulSet>(&()), true),
        (ApiResource::erase::<ControllerRevision>(&()), true),
        (ApiResource::erase::<Role>(&()), true),
        (ApiResource::erase::<RoleBinding>(&()), true),
        (ApiResource::erase::<NetworkPolicy>(&()), true),
        (ApiResource::erase::<PodDisruptionBudget>(&()), true),
        (crd("cert-manager.io", "Certificate", "certificates"), true),
        (crd("cert-manager.io", "Issuer", "issuers"), true),
        (
            crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
            true,
        ),
        (
            crd("monitoring.coreos.com", "PodMonitor", "podmonitors"),
            true,
        ),
        (
            crd("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
            true,
        ),
        (ApiResource::erase::<CSIDriver>(&()), false),
        (ApiResource::erase::<StorageClass>(&()), false),
        (ApiResource::erase::<ClusterRole>(&()), false),
        (ApiResource::erase::<ClusterRoleBinding>(&()), false),
        (ApiResource::erase::<PriorityClass>(&()), false),
        (
            crd(
                "snapshot.storage.k8s.io",
                "VolumeSnapshotClass",
                "volumesnapshotclasses",
            ),
            false,
        ),
    ]
}

/// "Kind namespace/name" (or "Kind name") of every object labelled as the release's.
async fn release_objects(client: &Client) -> Result<BTreeSet<String>, String> {
    let selector = format!("app.kubernetes.io/instance={}", release());
    let mut found = BTreeSet::new();
    for (res, namespaced) in release_kinds() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &res);
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list,
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => return Err(format!("list {}: {e}", res.plural)),
        };
        for obj in list {
            let name = obj.metadata.name.unwrap_or_default();
            found.insert(match (namespaced, obj.metadata.namespace) {
                (true, Some(ns)) => format!("{} {ns}/{name}", res.kind),
                _ => format!("{} {name}", res.kind),
            });
        }
    }
    Ok(found)
}

/// The data claims the server StatefulSets' volumeClaimTemplates made, as `release_objects`
/// names them: Kubernetes keeps them when the StatefulSet goes (the chart asks it to).
async fn server_data_claims(client: &Client) -> BTreeSet<String> {
    let ns = driver_namespace();
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/component=enbd-server",
        release()
    );
    let sets = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list server StatefulSets");
    let mut claims = BTreeSet::new();
    for set in sets {
        let name = set.metadata.name.clone().unwrap_or_default();
        let spec = set.spec;
        for template in spec.volume_claim_templates.unwrap_or_default() {
            let claim = template.metadata.name.unwrap_or_default();
            for ordinal in 0..spec.replicas.unwrap_or(1) {
                claims.insert(format!(
                    "PersistentVolumeClaim {ns}/{claim}-{name}-{ordinal}"
                ));
            }
        }
    }
    claims
}

/// The leader-election Lease names of the sidecars end in the driver name with every
/// character outside [a-zA-Z0-9-] replaced by '-' (e.g. external-attacher-leader-csi-enbd-io).
fn sidecar_lease_suffix() -> String {
    DRIVER
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the kind cluster: e2e/kind/run.sh (run last: it uninstalls the driver)"]
async fn helm_uninstall_leaves_only_what_the_reclaim_policy_keeps() {
    let helm = HelmRelease::from_env();
    let ctx = Ctx::new("uninstall").await;
    // None of the suite's values files has a Retain class.
    let retain_class = ctx
        .create_class_like_chart("retain", "uninstall", &[], "Retain")
        .await;

    ctx.create_claim("kept", &retain_class, "1Gi", Mode::Filesystem)
        .await;
    ctx.create_claim("gone", FS_CLASS, "1Gi", Mode::Filesystem)
        .await;
    for claim in ["kept", "gone"] {
        let wrote = ctx
            .run_pod(
                &format!("writer-{claim}"),
                claim,
                Mode::Filesystem,
                &write_files(4),
            )
            .await;
        assert_eq!(log_value(&wrote, "written"), "4", "{claim}");
    }
    let kept_pv = ctx.volume_of("kept").await;
    let gone_pv = ctx.volume_of("gone").await;

    // The volumes are released while the driver still runs: the Delete one is deleted on
    // its server, the Retain one is only let go, and nothing stays attached.
    let claims = ctx.api::<PersistentVolumeClaim>();
    ctx.delete_and_wait(&claims, "kept").await;
    ctx.delete_and_wait(&claims, "gone").await;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    wait_for(
        &pvs,
        &gone_pv,
        Duration::from_secs(300),
        |pv: Option<&PersistentVolume>| pv.is_none(),
    )
    .await;
    wait_for(
        &pvs,
        &kept_pv,
        Duration::from_secs(300),
        |pv: Option<&PersistentVolume>| {
            pv.and_then(|pv| pv.status.as_ref()?.phase.as_deref()) == Some("Released")
        },
    )
    .await;
    let attachments: Api<VolumeAttachment> = Api::all(ctx.client.clone());
    let ours = |list: Vec<VolumeAttachment>| -> Vec<String> {
        list.into_iter()
            .filter(|a| a.spec.attacher == DRIVER)
            .map(|a| a.metadata.name.unwrap_or_default())
            .collect()
    };
    eventually(
        "no VolumeAttachment of the driver",
        Duration::from_secs(300),
        || async {
            let list = attachments
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("list VolumeAttachments: {e}"))?;
            let left = ours(list.items);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;

    // What the release is before: the listing must see it, or "nothing left" proves nothing.
    let before = release_objects(&ctx.client)
        .await
        .expect("list the release");
    for must in [
        format!("CSIDriver {DRIVER}"),
        format!("StorageClass {FS_CLASS}"),
    ] {
        assert!(before.contains(&must), "{must} not found among {before:#?}");
    }
    assert!(
        before.iter().any(|o| o.starts_with("DaemonSet ")),
        "no DaemonSet among {before:#?}"
    );
    let kept_claims = server_data_claims(&ctx.client).await;
    let plugin_nodes: BTreeSet<String> = ctx
        .driver_pods()
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component=node",
            release()
        )))
        .await
        .expect("list node plugin pods")
        .items
        .into_iter()
        .filter_map(|p| p.spec?.node_name)
        .collect();
    assert!(!plugin_nodes.is_empty(), "no node plugin pod runs");

    helm.uninstall().await;

    // Garbage collection of what the workloads owned (ReplicaSets, Pods, ...) follows helm's
    // deletes, so the listing converges rather than being empty at once.
    let left = eventually(
        "only the documented leftovers of the release",
        Duration::from_secs(300),
        || async {
            let now = release_objects(&ctx.client).await?;
            if now == kept_claims {
                Ok(now)
            } else {
                Err(format!("{now:#?}, expected {kept_claims:#?}"))
            }
        },
    )
    .await;
    assert_eq!(left, kept_claims);

    let helm_records = Api::<Secret>::namespaced(ctx.client.clone(), &helm.namespace)
        .list(&ListParams::default().labels(&format!("owner=helm,name={}", helm.release)))
        .await
        .expect("list helm release records");
    assert!(
        helm_records.items.is_empty(),
        "helm kept release records: {:?}",
        helm_records
            .items
            .iter()
            .map(|s| s.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let attached = ours(
        attachments
            .list(&ListParams::default())
            .await
            .expect("list VolumeAttachments")
            .items,
    );
    assert!(attached.is_empty(), "VolumeAttachments left: {attached:?}");

    // The registrar removes its socket when its pod stops; kubelet then drops the driver
    // from the node's CSINode.
    let csinodes: Api<CSINode> = Api::all(ctx.client.clone());
    for node in &plugin_nodes {
        wait_for(
            &csinodes,
            node,
            Duration::from_secs(300),
            |n: Option<&CSINode>| {
                n.is_none_or(|n| !n.spec.drivers.iter().any(|d| d.name == DRIVER))
            },
        )
        .await;
    }

    let suffix = sidecar_lease_suffix();
    let leases: Vec<String> = Api::<Lease>::namespaced(ctx.client.clone(), &helm.namespace)
        .list(&ListParams::default())
        .await
        .expect("list Leases")
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .collect();
    assert!(
        leases.iter().all(|l| l.ends_with(&suffix)),
        "Leases in {} other than the sidecars' leader elections (*{suffix}): {leases:?}",
        helm.namespace
    );

    let kept = pvs.get(&kept_pv).await.expect("the Retain volume is kept");
    let spec = kept.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Retain")
    );
    assert_eq!(spec.csi.map(|c| c.driver).as_deref(), Some(DRIVER));
    assert_eq!(
        kept.status.and_then(|s| s.phase).as_deref(),
        Some("Released"),
        "{kept_pv}"
    );

    // The Retain volume stays (that is the point); the test's own class goes.
    Api::<StorageClass>::all(ctx.client.clone())
        .delete(&retain_class, &DeleteParams::default())
        .await
        .expect("delete the Retain class");
    ctx.finish().await;
}
