//! Shared by the kind suite (`tests/kind_*.rs`, all `#[ignore]`: e2e/kind/run.sh runs them
//! against a kind cluster with the chart installed; they never run or pass elsewhere).
//!
//! Each test works in its own namespace, creates claims and short-lived busybox pods that
//! do the IO and print what they saw, waits on the API (watches, never fixed sleeps), and
//! asserts on pod phase and logs. Data is always verified by a *second* pod after the first
//! is gone, so the read comes through a fresh stage/attach rather than a page cache.
//! The helm tests (`kind_upgrade`, `kind_uninstall`) drive the release itself through the
//! helm binary, chart and values files the run scripts name in `ENBD_E2E_HELM`,
//! `ENBD_E2E_CHART` and `ENBD_E2E_VALUES`.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, Volume, VolumeDevice, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, LogParams, Patch, PatchParams, PostParams,
};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

pub const FS_CLASS: &str = "enbd";
pub const XFS_CLASS: &str = "enbd-xfs";
pub const BLOCK_CLASS: &str = "enbd-block";
pub const SNAPSHOT_CLASS: &str = "enbd-snapshots";
/// The chart's `driverName` in every values file the suite installs.
pub const DRIVER: &str = "csi.enbd.io";

/// Where the chart is installed (run.sh exports these).
pub fn driver_namespace() -> String {
    std::env::var("ENBD_E2E_NAMESPACE").unwrap_or_else(|_| "enbd-csi".into())
}
pub fn release() -> String {
    std::env::var("ENBD_E2E_RELEASE").unwrap_or_else(|_| "enbd-csi".into())
}
fn busybox_image() -> String {
    std::env::var("ENBD_E2E_BUSYBOX").unwrap_or_else(|_| "busybox:1.36".into())
}

/// A test's own namespace and client. `finish` deletes the namespace; a failing test
/// leaves it behind for run.sh's diagnostics (the cluster goes away anyway).
pub struct Ctx {
    pub client: Client,
    pub ns: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Filesystem,
    Block,
}

/// Where a pod's volume appears: a directory for filesystem claims, a device for block.
pub const DATA: &str = "/data";
pub const DEVICE: &str = "/dev/xvda";

impl Ctx {
    pub async fn new(test: &str) -> Ctx {
        let client = Client::try_default()
            .await
            .expect("kubeconfig (run through e2e/kind/run.sh)");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let ns = format!("e2e-{test}-{:05x}", nanos & 0xfffff);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                labels: Some(BTreeMap::from([(
                    "enbd.io/e2e".to_string(),
                    test.to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create test namespace");
        Ctx { client, ns }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn finish(self) {
        // Claims first and waited on, so the driver deletes the volumes while it still can.
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let pods: Api<Pod> = self.api();
        for pod in pods.list(&Default::default()).await.expect("list pods") {
            let name = pod.metadata.name.clone().unwrap_or_default();
            self.delete_and_wait(&pods, &name).await;
        }
        for pvc in pvcs.list(&Default::default()).await.expect("list claims") {
            let name = pvc.metadata.name.clone().unwrap_or_default();
            self.delete_and_wait(&pvcs, &name).await;
        }
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await
            .expect("delete test namespace");
    }

    /// [`Ctx::finish`], then waits until the claims' volumes (reclaim policy Delete) are
    /// deleted too: detached (the VolumeAttachment gone) and DeleteVolume done. A claim is
    /// gone before its volume is; a test that scales servers away next needs the volume gone
    /// first, or its detach waits for ever on a member server that no longer answers (the
    /// controller cannot revoke the node's grant there), and so does every later test that
    /// checks for leftovers.
    pub async fn finish_and_wait_for_volumes(self) {
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        let bound: Vec<String> = pvcs
            .list(&Default::default())
            .await
            .expect("list claims")
            .items
            .into_iter()
            .filter_map(|c| c.spec?.volume_name)
            .collect();
        let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
        self.finish().await;
        // Done when the volume is gone, or kept by its reclaim policy (nothing to wait for).
        for name in bound {
            wait_for(
                &volumes,
                &name,
                Duration::from_secs(600),
                |pv: Option<&PersistentVolume>| {
                    pv.is_none_or(|pv| {
                        pv.spec
                            .as_ref()
                            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                            != Some("Delete")
                    })
                },
            )
            .await;
        }
    }

    /// Deletes and waits until the object is gone.
    pub async fn delete_and_wait<K>(&self, api: &Api<K>, name: &str)
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let Ok(current) = api.get(name).await else {
            return;
        };
        let uid = current.meta().uid.clone().unwrap_or_default();
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
        wait_for(api, name, Duration::from_secs(300), move |o: Option<&K>| {
            o.is_none_or(|o| o.meta().uid.as_deref() != Some(uid.as_str()))
        })
        .await;
    }

    pub async fn create_claim(&self, name: &str, class: &str, size: &str, mode: Mode) {
        self.create_claim_from(name, class, size, mode, None).await;
    }

    /// A claim, optionally with a data source: `("VolumeSnapshot", name)` or
    /// `("PersistentVolumeClaim", name)`.
    pub async fn create_claim_from(
        &self,
        name: &str,
        class: &str,
        size: &str,
        mode: Mode,
        source: Option<(&str, &str)>,
    ) {
        let data_source =
            source.map(
                |(kind, src)| k8s_openapi::api::core::v1::TypedLocalObjectReference {
                    api_group: (kind == "VolumeSnapshot")
                        .then(|| "snapshot.storage.k8s.io".to_string()),
                    kind: kind.to_string(),
                    name: src.to_string(),
                },
            );
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some(class.into()),
                volume_mode: Some(
                    if mode == Mode::Block {
                        "Block"
                    } else {
                        "Filesystem"
                    }
                    .into(),
                ),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(size.into()),
                    )])),
                    ..Default::default()
                }),
                data_source,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &claim)
            .await
            .expect("create claim");
        wait_for(
            &self.api::<PersistentVolumeClaim>(),
            name,
            Duration::from_secs(180),
            |c: Option<&PersistentVolumeClaim>| {
                c.and_then(|c| c.status.as_ref()?.phase.as_deref()) == Some("Bound")
            },
        )
        .await;
    }

    /// Starts a busybox pod running `script` (sh -euc) with `claim` mounted at DATA or, for
    /// a block claim, as DEVICE. `node` pins it to a node.
    pub async fn start_pod(
        &self,
        name: &str,
        claim: &str,
        mode: Mode,
        script: &str,
        node: Option<&str>,
    ) {
        let (mounts, devices) = match mode {
            Mode::Filesystem => (
                Some(vec![VolumeMount {
                    name: "vol".into(),
                    mount_path: DATA.into(),
                    ..Default::default()
                }]),
                None,
            ),
            Mode::Block => (
                None,
                Some(vec![VolumeDevice {
                    name: "vol".into(),
                    device_path: DEVICE.into(),
                }]),
            ),
        };
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                node_name: node.map(str::to_string),
                termination_grace_period_seconds: Some(5),
                containers: vec![Container {
                    name: "io".into(),
                    image: Some(busybox_image()),
                    command: Some(vec!["sh".into(), "-euc".into(), script.into()]),
                    volume_mounts: mounts,
                    volume_devices: devices,
                    ..Default::default()
                }],
                volumes: Some(vec![Volume {
                    name: "vol".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.into(),
                        read_only: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }

    /// Waits for the pod to finish; panics with its logs unless it Succeeded. Returns logs.
    pub async fn wait_succeeded(&self, name: &str, timeout: Duration) -> String {
        let pods = self.api::<Pod>();
        let pod = wait_for(&pods, name, timeout, |p: Option<&Pod>| {
            matches!(phase(p).as_deref(), Some("Succeeded" | "Failed"))
        })
        .await;
        let logs = pods
            .logs(name, &LogParams::default())
            .await
            .unwrap_or_else(|e| format!("<no logs: {e}>"));
        assert_eq!(
            phase(pod.as_ref()).as_deref(),
            Some("Succeeded"),
            "pod {name} failed; logs:\n{logs}"
        );
        logs
    }

    /// Runs a pod to completion (within 5 min) and removes it; returns its logs.
    pub async fn run_pod(&self, name: &str, claim: &str, mode: Mode, script: &str) -> String {
        self.run_pod_within(name, claim, mode, script, Duration::from_secs(300))
            .await
    }

    /// [`Ctx::run_pod`] with its own time limit.
    pub async fn run_pod_within(
        &self,
        name: &str,
        claim: &str,
        mode: Mode,
        script: &str,
        limit: Duration,
    ) -> String {
        self.start_pod(name, claim, mode, script, None).await;
        let logs = self.wait_succeeded(name, limit).await;
        self.delete_and_wait(&self.api::<Pod>(), name).await;
        logs
    }

    /// Waits until the pod's log contains `marker` (the pod says it is in the middle of its IO).
    pub async fn wait_log(&self, name: &str, marker: &str, timeout: Duration) {
        let pods = self.api::<Pod>();
        wait_for(&pods, name, Duration::from_secs(180), |p: Option<&Pod>| {
            phase(p).as_deref() == Some("Running")
        })
        .await;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            last = pods
                .logs(name, &LogParams::default())
                .await
                .unwrap_or_default();
            if last.contains(marker) {
                return;
            }
            // Logs have no watch: poll them at a short interval.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("pod {name} never logged {marker:?}; logs:\n{last}");
    }

    /// Starts pod "writer" writing files to `claim` for `secs` seconds (`write_for`) and
    /// returns its node once IO is in flight.
    pub async fn start_writer(&self, claim: &str, secs: u32) -> String {
        self.start_pod("writer", claim, Mode::Filesystem, &write_for(secs), None)
            .await;
        self.wait_log("writer", "io-started", Duration::from_secs(180))
            .await;
        self.node_of("writer").await
    }

    /// Waits until "writer" finished with no failed write, removes it, and has a second pod
    /// verify every file it wrote; `cause` names what happened meanwhile.
    pub async fn assert_writer_lost_nothing(&self, claim: &str, cause: &str) {
        let logs = self
            .wait_succeeded("writer", Duration::from_secs(600))
            .await;
        let written: u32 = log_value(&logs, "written").parse().expect("count");
        self.delete_and_wait(&self.api::<Pod>(), "writer").await;
        // Checksumming everything a long writer wrote (up to a GiB) is slow on an emulated
        // node: seen at over 5 min under TCG. The time is not the point; the checksums are.
        let read = self
            .run_pod_within(
                "reader",
                claim,
                Mode::Filesystem,
                &verify_files(),
                Duration::from_secs(1200),
            )
            .await;
        assert_eq!(
            log_value(&read, "verified"),
            written.to_string(),
            "{cause} lost data"
        );
    }

    pub async fn node_of(&self, pod: &str) -> String {
        let p = self.api::<Pod>().get(pod).await.expect("get pod");
        p.spec.and_then(|s| s.node_name).expect("pod is scheduled")
    }

    pub async fn resize_claim(&self, name: &str, size: &str) {
        let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
        self.api::<PersistentVolumeClaim>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("resize claim");
    }

    /// Waits until the claim's PersistentVolume has at least `bytes`: ControllerExpandVolume
    /// is done (the claim itself reports the new size only after NodeExpandVolume).
    pub async fn wait_volume_expanded(&self, claim: &str, bytes: u64) {
        let pvc = self
            .api::<PersistentVolumeClaim>()
            .get(claim)
            .await
            .expect("get claim");
        let pv_name = pvc
            .spec
            .and_then(|s| s.volume_name)
            .expect("claim is bound");
        let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(self.client.clone());
        wait_for(
            &pvs,
            &pv_name,
            Duration::from_secs(300),
            move |pv: Option<&k8s_openapi::api::core::v1::PersistentVolume>| {
                pv.and_then(|pv| pv.spec.as_ref()?.capacity.as_ref()?.get("storage").cloned())
                    .and_then(|q| quantity_bytes(&q.0))
                    .is_some_and(|b| b >= bytes)
            },
        )
        .await;
    }

    /// Waits until the claim reports at least `bytes` of capacity.
    pub async fn wait_capacity(&self, name: &str, bytes: u64) {
        wait_for(
            &self.api::<PersistentVolumeClaim>(),
            name,
            Duration::from_secs(300),
            move |c: Option<&PersistentVolumeClaim>| {
                c.and_then(|c| {
                    c.status
                        .as_ref()?
                        .capacity
                        .as_ref()?
                        .get("storage")
                        .cloned()
                })
                .and_then(|q| quantity_bytes(&q.0))
                .is_some_and(|b| b >= bytes)
            },
        )
        .await;
    }

    pub fn snapshots(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &snapshot_resource())
    }

    pub async fn create_snapshot(&self, name: &str, claim: &str) {
        let mut snap = DynamicObject::new(name, &snapshot_resource());
        snap.data = json!({"spec": {
            "volumeSnapshotClassName": SNAPSHOT_CLASS,
            "source": {"persistentVolumeClaimName": claim},
        }});
        self.snapshots()
            .create(&PostParams::default(), &snap)
            .await
            .expect("create snapshot");
        wait_for(
            &self.snapshots(),
            name,
            Duration::from_secs(180),
            |s: Option<&DynamicObject>| {
                s.and_then(|s| s.data.pointer("/status/readyToUse")?.as_bool()) == Some(true)
            },
        )
        .await;
    }

    /// The driver's pods (server StatefulSet, node DaemonSet) in the release namespace.
    pub fn driver_pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &driver_namespace())
    }

    /// Name of the running pod of `component` (enbd-server / node), optionally on `node`.
    pub async fn driver_pod(&self, component: &str, node: Option<&str>) -> String {
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            release()
        );
        let pods = self
            .driver_pods()
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .expect("list driver pods");
        pods.items
            .into_iter()
            .filter(|p| phase(Some(p)).as_deref() == Some("Running"))
            .find(|p| {
                node.is_none() || p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == node
            })
            .and_then(|p| p.metadata.name)
            .unwrap_or_else(|| panic!("no running {component} pod (node {node:?})"))
    }

    /// Runs `command` in `container` of the driver's pod `pod` (as `kubectl exec` does) and
    /// returns whether it exited 0, with its stdout and stderr.
    pub async fn exec_driver(
        &self,
        pod: &str,
        container: &str,
        command: &[&str],
    ) -> (bool, String, String) {
        use tokio::io::AsyncReadExt;
        let params = kube::api::AttachParams::default()
            .container(container)
            .stdin(false)
            .stdout(true)
            .stderr(true);
        let mut run = self
            .driver_pods()
            .exec(pod, command.iter().copied(), &params)
            .await
            .unwrap_or_else(|e| panic!("exec {command:?} in {pod}/{container}: {e}"));
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = run.stdout().expect("stdout");
        let mut stderr = run.stderr().expect("stderr");
        let status = run.take_status().expect("status");
        let (o, e) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        o.expect("read stdout");
        e.expect("read stderr");
        let status = status.await;
        let _ = run.join().await;
        let ok = status.as_ref().and_then(|s| s.status.as_deref()) == Some("Success");
        (ok, out, err)
    }

    /// Deletes a driver pod and waits until its replacement of the same workload is Ready.
    pub async fn kill_driver_pod(&self, component: &str, name: &str, node: Option<&str>) {
        let pods = self.driver_pods();
        let old = pods.get(name).await.expect("get driver pod");
        let uid = old.metadata.uid.clone().unwrap_or_default();
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete driver pod");
        self.wait_driver_pod_replaced(component, &uid, node).await;
    }

    /// Waits until a Ready pod of `component` (on `node`, if given) other than the one with
    /// `old_uid` runs, and returns it.
    pub async fn wait_driver_pod_replaced(
        &self,
        component: &str,
        old_uid: &str,
        node: Option<&str>,
    ) -> Pod {
        let pods = self.driver_pods();
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            release()
        );
        eventually(
            &format!("a Ready {component} pod replacing {old_uid} (node {node:?})"),
            Duration::from_secs(300),
            || async {
                let list = pods
                    .list(&kube::api::ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| format!("list driver pods: {e}"))?;
                let states: Vec<String> = list
                    .items
                    .iter()
                    .map(|p| {
                        format!(
                            "{} uid {} ready {}",
                            p.metadata.name.as_deref().unwrap_or("?"),
                            p.metadata.uid.as_deref().unwrap_or("?"),
                            is_ready(p)
                        )
                    })
                    .collect();
                list.items
                    .into_iter()
                    .find(|p| {
                        p.metadata.uid.as_deref() != Some(old_uid)
                            && (node.is_none()
                                || p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == node)
                            && is_ready(p)
                    })
                    .ok_or_else(|| states.join("; "))
            },
        )
        .await
    }

    /// The kernel release the node reports (`status.nodeInfo.kernelVersion`, `uname -r`).
    pub async fn node_kernel(&self, node: &str) -> String {
        let n = Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .expect("get node");
        n.status
            .and_then(|s| s.node_info)
            .map(|i| i.kernel_version)
            .unwrap_or_else(|| panic!("node {node} reports no nodeInfo"))
    }

    /// Waits until the claim has a condition of `type_` with status True; returns its message.
    pub async fn wait_claim_condition(&self, claim: &str, type_: &str) -> String {
        let type_ = type_.to_string();
        let wanted = type_.clone();
        let pvc = wait_for(
            &self.api::<PersistentVolumeClaim>(),
            claim,
            Duration::from_secs(300),
            move |c: Option<&PersistentVolumeClaim>| claim_condition(c, &wanted).is_some(),
        )
        .await;
        claim_condition(pvc.as_ref(), &type_).unwrap_or_default()
    }

    /// Creates StorageClass `enbd-<kind>-<namespace>`: the chart's `enbd` class (provisioner,
    /// parameters, mount options, expansion, binding) with `extra` parameters added and
    /// `reclaim_policy`. It carries the label `enbd.io/e2e=<label>`, not the release's, so it
    /// is no object of the release. Returns its name.
    pub async fn create_class_like_chart(
        &self,
        kind: &str,
        label: &str,
        extra: &[(&str, &str)],
        reclaim_policy: &str,
    ) -> String {
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let chart = classes.get(FS_CLASS).await.expect("the chart's enbd class");
        let name = format!("enbd-{kind}-{}", self.ns);
        let mut parameters = chart.parameters.unwrap_or_default();
        for (k, v) in extra {
            parameters.insert((*k).to_string(), (*v).to_string());
        }
        let class = StorageClass {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "enbd.io/e2e".to_string(),
                    label.to_string(),
                )])),
                ..Default::default()
            },
            provisioner: chart.provisioner,
            parameters: Some(parameters),
            mount_options: chart.mount_options,
            allow_volume_expansion: chart.allow_volume_expansion,
            volume_binding_mode: chart.volume_binding_mode,
            reclaim_policy: Some(reclaim_policy.into()),
            allowed_topologies: None,
        };
        classes
            .create(&PostParams::default(), &class)
            .await
            .unwrap_or_else(|e| panic!("create StorageClass {name}: {e}"));
        name
    }

    /// The PersistentVolume a bound claim uses.
    pub async fn volume_of(&self, claim: &str) -> String {
        self.api::<PersistentVolumeClaim>()
            .get(claim)
            .await
            .expect("get claim")
            .spec
            .and_then(|s| s.volume_name)
            .expect("claim is bound")
    }
}

fn claim_condition(c: Option<&PersistentVolumeClaim>, type_: &str) -> Option<String> {
    c?.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| c.message.clone().unwrap_or_default())
}

/// Major and minor of a kernel release string such as "6.12.48+deb13-cloud-amd64".
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Calls `probe` about once a second until it returns `Ok`, for state that has no watch
/// (lists, logs). `Err` describes the state seen; the last one is in the panic after `timeout`.
pub async fn eventually<T, Fut>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(state) => state,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within {timeout:?}; last state: {last}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The pod's Ready condition is True.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn phase(p: Option<&Pod>) -> Option<String> {
    p?.status.as_ref()?.phase.clone()
}

fn snapshot_resource() -> ApiResource {
    ApiResource {
        group: "snapshot.storage.k8s.io".into(),
        version: "v1".into(),
        api_version: "snapshot.storage.k8s.io/v1".into(),
        kind: "VolumeSnapshot".into(),
        plural: "volumesnapshots".into(),
    }
}

/// Bytes of a Kubernetes quantity in the binary or plain form the API reports.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.parse::<u64>().ok()?.checked_mul(mult)
}

/// Watches `name` until `cond` holds; panics after `timeout`.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    cond: impl Condition<K>,
) -> Option<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(obj)) => obj,
        Ok(Err(e)) => panic!("watching {name}: {e}"),
        Err(_) => panic!(
            "{name}: condition not reached within {timeout:?}; last state: {:?}",
            api.get_opt(name).await
        ),
    }
}

// ---- the IO the pods run (busybox sh) ----------------------------------------------------

/// Writes `count` files of 4 MiB random data with fsync and records their checksums.
pub fn write_files(count: u32) -> String {
    format!(
        "i=0; while [ $i -lt {count} ]; do \
           dd if=/dev/urandom of={DATA}/f.$i bs=1M count=4 conv=fsync 2>/dev/null; \
           (cd {DATA} && sha256sum f.$i >> sums); i=$((i+1)); done; \
         sync; echo written $(wc -l < {DATA}/sums)"
    )
}

/// Verifies every file recorded in `sums`; prints "verified N".
pub fn verify_files() -> String {
    format!(
        "cd {DATA} && sha256sum -c sums >/tmp/check && echo verified $(grep -c ': OK$' /tmp/check)"
    )
}

/// The most files [`write_for`] writes: 1.5 GiB of 4 MiB files.
pub const WRITE_FOR_MAX_FILES: u32 = 384;

/// Writes 4 MiB files with fsync for `secs` seconds, logging "io-started" after the first
/// few so the test knows IO is in flight; any failed write fails the pod (sh -e). Prints
/// "written N"; `verify_files` checks them all. At most [`WRITE_FOR_MAX_FILES`] files, so a
/// fast node does not fill the tests' 2 GiB claims (240 s once wrote 1.8 GB there).
pub fn write_for(secs: u32) -> String {
    format!(
        "end=$(( $(date +%s) + {secs} )); i=0; \
         while {{ [ $(date +%s) -lt $end ] && [ $i -lt {WRITE_FOR_MAX_FILES} ]; }} || [ $i -lt 8 ]; do \
           dd if=/dev/urandom of={DATA}/f.$i bs=1M count=4 conv=fsync 2>/dev/null; \
           (cd {DATA} && sha256sum f.$i >> sums); i=$((i+1)); \
           [ $i -ne 4 ] || echo io-started; \
         done; sync; echo written $i"
    )
}

/// Prints "fstype <type>": the filesystem mounted at DATA as the kernel names it
/// (/proc/mounts), so an ext4 mount cannot pass for xfs.
pub fn mounted_fstype() -> String {
    format!("echo fstype $(awk '$2 == \"{DATA}\" {{print $3}}' /proc/mounts | head -n 1)")
}

/// A shell expression for the size of the filesystem at DATA in KiB, as df reports it.
pub fn df_kib() -> String {
    format!("$(df -k {DATA} | tail -n 1 | awk '{{print $2}}')")
}

/// Writes `mib` MiB of random data at offset 1 MiB of the block device, with its checksum
/// in the pod log, and prints the device size.
pub fn write_block(mib: u32) -> String {
    format!(
        "dd if=/dev/urandom of=/tmp/blk bs=1M count={mib} 2>/dev/null; \
         dd if=/tmp/blk of={DEVICE} bs=1M seek=1 conv=fsync 2>/dev/null; \
         echo sum $(sha256sum < /tmp/blk | cut -d' ' -f1); \
         echo size $(blockdev --getsize64 {DEVICE})"
    )
}

/// Reads the region `write_block` wrote and prints its checksum.
pub fn read_block(mib: u32) -> String {
    format!(
        "echo sum $(dd if={DEVICE} bs=1M skip=1 count={mib} 2>/dev/null | sha256sum | cut -d' ' -f1)"
    )
}

/// Value of the first `key <value>` line of a pod log.
pub fn log_value<'a>(logs: &'a str, key: &str) -> &'a str {
    logs.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {key:?} line in logs:\n{logs}"))
        .trim()
}

// ---- the release, driven through helm as a user would -------------------------------------

/// The helm binary, chart and values files the release was installed with, from the env
/// the run scripts export. Missing ones fail the test with a message naming them: a helm
/// test must never pass without running helm.
pub struct HelmRelease {
    helm: String,
    chart: String,
    values: Vec<String>,
    pub release: String,
    pub namespace: String,
}

impl HelmRelease {
    pub fn from_env() -> HelmRelease {
        let var = |name: &str, what: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| {
                    panic!(
                        "{name} is not set: it names {what}; e2e/kind/run.sh and \
                         e2e/cluster/run.sh export it"
                    )
                })
        };
        HelmRelease {
            helm: var("ENBD_E2E_HELM", "the helm binary"),
            chart: var("ENBD_E2E_CHART", "the chart directory (charts/enbd-csi)"),
            values: var(
                "ENBD_E2E_VALUES",
                "the values files the release was installed with (colon-separated)",
            )
            .split(':')
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect(),
            release: release(),
            namespace: driver_namespace(),
        }
    }

    /// `helm upgrade` of the release with the same chart and values files plus `set_string`
    /// (`--set-string` arguments), waiting until every workload has rolled.
    pub async fn upgrade(&self, set_string: &[String]) {
        let mut args: Vec<String> = vec![
            "upgrade".into(),
            self.release.clone(),
            self.chart.clone(),
            "--namespace".into(),
            self.namespace.clone(),
        ];
        for file in &self.values {
            args.extend(["-f".to_string(), file.clone()]);
        }
        for set in set_string {
            args.extend(["--set-string".to_string(), set.clone()]);
        }
        args.extend(["--wait".into(), "--timeout".into(), "15m".into()]);
        self.run(&args).await;
    }

    /// `helm uninstall` of the release, waiting until helm's own objects are deleted.
    pub async fn uninstall(&self) {
        let args: Vec<String> = vec![
            "uninstall".into(),
            self.release.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--wait".into(),
            "--timeout".into(),
            "10m".into(),
        ];
        self.run(&args).await;
    }

    /// Runs helm (KUBECONFIG from the environment, as the tests' client); panics with its
    /// output unless it exits 0.
    async fn run(&self, args: &[String]) {
        let out = tokio::process::Command::new(&self.helm)
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", self.helm));
        assert!(
            out.status.success(),
            "helm {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------- mirrors (kind_mirror, kind_replace)

/// The release's server StatefulSet.
pub async fn server_statefulset(client: &Client) -> String {
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), &driver_namespace());
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/component=enbd-server",
        release()
    );
    let list = sets
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .expect("list server StatefulSets");
    assert_eq!(list.items.len(), 1, "one server StatefulSet in the release");
    list.items[0].metadata.name.clone().expect("named")
}

/// Scales the server StatefulSet to `replicas` and waits until exactly that many of its pods
/// are Ready (ordinals 0..replicas; a removed one is gone, not just terminating).
pub async fn scale_servers(client: &Client, set: &str, replicas: i32) {
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), &driver_namespace());
    sets.patch(
        set,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("scale the server StatefulSet");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &driver_namespace());
    let wanted: Vec<String> = (0..replicas).map(|i| format!("{set}-{i}")).collect();
    eventually(
        &format!("{set} at {replicas} Ready pods"),
        Duration::from_secs(600),
        || async {
            let list = pods
                .list(&kube::api::ListParams::default())
                .await
                .map_err(|e| format!("list pods: {e}"))?;
            let mut ready = Vec::new();
            let mut others = Vec::new();
            for p in &list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                if !name.starts_with(&format!("{set}-")) {
                    continue;
                }
                if wanted.contains(&name) && is_ready(p) {
                    ready.push(name);
                } else {
                    others.push(name);
                }
            }
            if ready.len() == wanted.len() && others.is_empty() {
                Ok(())
            } else {
                Err(format!("ready {ready:?}, not ready or leaving {others:?}"))
            }
        },
    )
    .await;
}

/// Waits for an events.k8s.io Event with `reason` about claim `claim` in the test's
/// namespace; returns its note. Every Event about the claim seen so far is in the panic.
pub async fn wait_claim_event(ctx: &Ctx, claim: &str, reason: &str, timeout: Duration) -> String {
    let events: Api<k8s_openapi::api::events::v1::Event> = ctx.api();
    eventually(
        &format!("Event {reason} on claim {claim}"),
        timeout,
        || async {
            let list = events
                .list(&kube::api::ListParams::default())
                .await
                .map_err(|e| format!("list events: {e}"))?;
            let about: Vec<&k8s_openapi::api::events::v1::Event> = list
                .items
                .iter()
                .filter(|e| {
                    e.regarding.as_ref().is_some_and(|r| {
                        r.kind.as_deref() == Some("PersistentVolumeClaim")
                            && r.name.as_deref() == Some(claim)
                    })
                })
                .collect();
            about
                .iter()
                .find(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.clone().unwrap_or_default())
                .ok_or_else(|| {
                    about
                        .iter()
                        .map(|e| {
                            format!(
                                "{} {} ({}): {}",
                                e.type_.as_deref().unwrap_or("?"),
                                e.reason.as_deref().unwrap_or("?"),
                                e.reporting_controller.as_deref().unwrap_or("?"),
                                e.note.as_deref().unwrap_or("")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
        },
    )
    .await
}
