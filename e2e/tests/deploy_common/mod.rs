//! Shared by the deployment checks (`tests/deploy_*.rs`): loads the chart renders and the
//! plain manifests, and turns every YAML document into its Kubernetes API type strictly.
//!
//! Strict means: the document deserialises into the k8s-openapi type (required fields
//! present, every field of the right shape, apiVersion/kind matching), and re-serialising
//! the typed value gives back exactly the input JSON. k8s-openapi ignores fields it does
//! not know, so the round-trip diff is what catches a misspelt or misplaced field.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod checks;

/// The release every render uses (check.sh and render-manifests.sh use the same).
pub const RELEASE: &str = "enbd-csi";
pub const NAMESPACE: &str = "enbd-csi";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits inside the repository")
        .to_path_buf()
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshotClass: a CRD, so not in k8s-openapi. The
/// fields are those of the external-snapshotter's v1 API; unknown ones are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub driver: String,
    pub deletion_policy: DeletionPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
}

/// A cert-manager `cert-manager.io/v1` object (Issuer or Certificate): a CRD, so not in
/// k8s-openapi. The envelope is strict; `spec` is checked field by field in checks.rs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertManagerObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Value,
}

/// A Prometheus Operator `monitoring.coreos.com/v1` object (ServiceMonitor, PodMonitor,
/// PrometheusRule): a CRD, so not in k8s-openapi. The envelope is strict; `spec` is
/// checked in checks.rs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MonitoringObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletionPolicy {
    Delete,
    Retain,
}

/// Every kind the chart may render; anything else is an error.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Service(Service),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    CsiDriver(CSIDriver),
    StorageClass(StorageClass),
    VolumeSnapshotClass(VolumeSnapshotClass),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    StatefulSet(StatefulSet),
    Secret(Secret),
    NetworkPolicy(NetworkPolicy),
    PriorityClass(PriorityClass),
    /// cert-manager Issuer or Certificate.
    CertManager(CertManagerObject),
    /// The Grafana dashboard.
    ConfigMap(ConfigMap),
    /// ServiceMonitor, PodMonitor or PrometheusRule.
    Monitoring(MonitoringObject),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => Namespace::KIND,
            Object::ServiceAccount(_) => ServiceAccount::KIND,
            Object::Service(_) => Service::KIND,
            Object::ClusterRole(_) => ClusterRole::KIND,
            Object::ClusterRoleBinding(_) => ClusterRoleBinding::KIND,
            Object::Role(_) => Role::KIND,
            Object::RoleBinding(_) => RoleBinding::KIND,
            Object::CsiDriver(_) => CSIDriver::KIND,
            Object::StorageClass(_) => StorageClass::KIND,
            Object::VolumeSnapshotClass(_) => "VolumeSnapshotClass",
            Object::Deployment(_) => Deployment::KIND,
            Object::DaemonSet(_) => DaemonSet::KIND,
            Object::StatefulSet(_) => StatefulSet::KIND,
            Object::Secret(_) => Secret::KIND,
            Object::NetworkPolicy(_) => NetworkPolicy::KIND,
            Object::PriorityClass(_) => PriorityClass::KIND,
            Object::CertManager(o) if o.kind == "Issuer" => "Issuer",
            Object::CertManager(_) => "Certificate",
            Object::ConfigMap(_) => ConfigMap::KIND,
            Object::Monitoring(o) if o.kind == "ServiceMonitor" => "ServiceMonitor",
            Object::Monitoring(o) if o.kind == "PodMonitor" => "PodMonitor",
            Object::Monitoring(_) => "PrometheusRule",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::Role(o) => &o.metadata,
            Object::RoleBinding(o) => &o.metadata,
            Object::CsiDriver(o) => &o.metadata,
            Object::StorageClass(o) => &o.metadata,
            Object::VolumeSnapshotClass(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::StatefulSet(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::PriorityClass(o) => &o.metadata,
            Object::CertManager(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::Monitoring(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    pub fn is_namespaced(&self) -> bool {
        !matches!(
            self,
            Object::Namespace(_)
                | Object::ClusterRole(_)
                | Object::ClusterRoleBinding(_)
                | Object::CsiDriver(_)
                | Object::StorageClass(_)
                | Object::VolumeSnapshotClass(_)
                | Object::PriorityClass(_)
        )
    }

    /// The pod template's spec of a workload, with the workload's name.
    pub fn pod_spec(&self) -> Option<(&str, &PodSpec)> {
        let spec = match self {
            Object::Deployment(o) => o.spec.template.spec.as_ref(),
            Object::DaemonSet(o) => o.spec.template.spec.as_ref(),
            Object::StatefulSet(o) => o.spec.template.spec.as_ref(),
            _ => None,
        }?;
        Some((self.name(), spec))
    }
}

/// One YAML stream (a render or a manifest file), parsed strictly.
#[derive(Debug, Clone)]
pub struct RenderSet {
    pub name: String,
    pub objects: Vec<Object>,
    /// The documents as parsed from YAML, index-aligned with `objects`.
    pub raw: Vec<Value>,
}

impl RenderSet {
    pub fn parse(name: &str, yaml: &str) -> Result<RenderSet, String> {
        let mut objects = Vec::new();
        let mut raw = Vec::new();
        let mut errors = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let value = match Value::deserialize(document) {
                Ok(Value::Null) => continue, // a template that rendered to nothing
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("document {index}: not YAML: {e}"));
                    continue;
                }
            };
            match parse_object(&value) {
                Ok(o) => {
                    objects.push(o);
                    raw.push(value);
                }
                Err(e) => errors.push(format!("document {index} ({}): {e}", describe(&value))),
            }
        }
        if errors.is_empty() {
            Ok(RenderSet {
                name: name.to_string(),
                objects,
                raw,
            })
        } else {
            Err(format!("{name}:\n  {}", errors.join("\n  ")))
        }
    }

    pub fn all<'a, T: 'a>(&'a self, pick: impl Fn(&'a Object) -> Option<&'a T>) -> Vec<&'a T> {
        self.objects.iter().filter_map(pick).collect()
    }

    pub fn workloads(&self) -> impl Iterator<Item = (&str, &PodSpec)> {
        self.objects.iter().filter_map(Object::pod_spec)
    }
}

fn describe(v: &Value) -> String {
    let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{} {} {name}", get("apiVersion"), get("kind"))
}

/// Dispatches on apiVersion/kind and parses strictly.
pub fn parse_object(v: &Value) -> Result<Object, String> {
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    macro_rules! typed {
        ($($ty:ty => $variant:ident),* $(,)?) => {
            $(if api_version == <$ty>::API_VERSION && kind == <$ty>::KIND {
                return strict::<$ty>(v).map(Object::$variant);
            })*
        };
    }
    typed!(
        Namespace => Namespace,
        ServiceAccount => ServiceAccount,
        Service => Service,
        ClusterRole => ClusterRole,
        ClusterRoleBinding => ClusterRoleBinding,
        Role => Role,
        RoleBinding => RoleBinding,
        CSIDriver => CsiDriver,
        StorageClass => StorageClass,
        Deployment => Deployment,
        DaemonSet => DaemonSet,
        StatefulSet => StatefulSet,
        Secret => Secret,
        NetworkPolicy => NetworkPolicy,
        ConfigMap => ConfigMap,
        PriorityClass => PriorityClass,
    );
    if api_version == "monitoring.coreos.com/v1"
        && matches!(kind, "ServiceMonitor" | "PodMonitor" | "PrometheusRule")
    {
        return strict::<MonitoringObject>(v).map(Object::Monitoring);
    }
    if api_version == "cert-manager.io/v1" && (kind == "Issuer" || kind == "Certificate") {
        return strict::<CertManagerObject>(v).map(Object::CertManager);
    }
    if api_version == "snapshot.storage.k8s.io/v1" && kind == "VolumeSnapshotClass" {
        return strict::<VolumeSnapshotClass>(v).map(Object::VolumeSnapshotClass);
    }
    Err(format!(
        "unexpected apiVersion/kind {api_version:?}/{kind:?}"
    ))
}

/// Deserialises `v` into `T` (error with the JSON path) and checks the round trip.
pub fn strict<T: DeserializeOwned + Serialize>(v: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(v.clone())
        .map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("re-serialising: {e}"))?;
    let mut problems = Vec::new();
    diff(v, &back, "", &mut problems);
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(problems.join("; "))
    }
}

/// Records every place where `input` and `typed` (its round trip) differ.
pub fn diff(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, av) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => diff(av, bv, &p, out),
                    None => out.push(format!("unknown field {p}")),
                }
            }
            // k8s-openapi writes apiVersion/kind of embedded resources (e.g. a StatefulSet's
            // volumeClaimTemplates) whether or not the input had them; the API accepts both.
            let added = b
                .keys()
                .filter(|k| !a.contains_key(*k) && !matches!(k.as_str(), "apiVersion" | "kind"));
            for k in added {
                out.push(format!("field {path}.{k} appeared in the round trip"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (av, bv)) in a.iter().zip(b).enumerate() {
                diff(av, bv, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Where the renders come from: `ENBD_CHART_RENDERED` (e2e/chart/check.sh sets it to the
/// directory it saved `helm template` output in), or else helm is run here for the
/// default values and every e2e/chart/values-*.yaml.
pub fn chart_renders() -> Vec<RenderSet> {
    let raw: Vec<(String, String)> = match std::env::var_os("ENBD_CHART_RENDERED") {
        Some(dir) => read_dir_yaml(Path::new(&dir)),
        None => render_with_helm(),
    };
    assert!(!raw.is_empty(), "no chart renders found");
    assert!(
        raw.iter().any(|(n, _)| n == "default"),
        "the default-values render is missing"
    );
    parse_all(raw)
}

/// The committed plain manifests, one set per file.
pub fn manifest_files() -> Vec<RenderSet> {
    let raw = read_dir_yaml(&repo_root().join("deploy/manifests"));
    assert!(
        raw.len() >= 2,
        "deploy/manifests holds too few files: {raw:?}"
    );
    parse_all(raw)
}

fn parse_all(raw: Vec<(String, String)>) -> Vec<RenderSet> {
    let mut sets = Vec::new();
    let mut errors = Vec::new();
    for (name, yaml) in raw {
        match RenderSet::parse(&name, &yaml) {
            Ok(s) => sets.push(s),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "objects failed strict validation:\n{}",
        errors.join("\n")
    );
    sets
}

fn read_dir_yaml(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((name, text));
        }
    }
    out.sort();
    out
}

pub fn helm_path() -> PathBuf {
    std::env::var_os("HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("e2e/.tools/helm"))
}

/// The value sets: "default", "kind" (e2e/kind/values-kind.yaml, what the kind suite
/// installs), "cluster" (e2e/cluster/values-cluster.yaml, what the real-cluster run installs)
/// and each e2e/chart/values-<name>.yaml. e2e/chart/check.sh renders the same.
/// The API version whose presence decides the VolumeSnapshotClass and the snapshotter.
pub const SNAPSHOT_API: &str = "snapshot.storage.k8s.io/v1";

/// A render without the snapshot API: the default values on a cluster without the
/// snapshot CRDs (every other set is rendered as for a cluster that has them).
pub const NO_SNAPSHOT_SET: &str = "default-nosnapshot";

/// Every value set with its values file, rendered with `--api-versions` [`SNAPSHOT_API`]
/// (a cluster with the snapshot CRDs), plus [`NO_SNAPSHOT_SET`] rendered without it.
/// e2e/chart/check.sh renders the same list.
pub fn value_sets() -> Vec<(String, Option<PathBuf>)> {
    let mut sets = vec![
        ("default".to_string(), None),
        (NO_SNAPSHOT_SET.to_string(), None),
        (
            "kind".to_string(),
            Some(repo_root().join("e2e/kind/values-kind.yaml")),
        ),
        (
            "cluster".to_string(),
            Some(repo_root().join("e2e/cluster/values-cluster.yaml")),
        ),
    ];
    let dir = repo_root().join("e2e/chart");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("values-") && n.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    for f in files {
        let stem = f.file_stem().expect("file name").to_string_lossy();
        sets.push((stem.trim_start_matches("values-").to_string(), Some(f)));
    }
    sets
}

fn render_with_helm() -> Vec<(String, String)> {
    let helm = helm_path();
    assert!(
        helm.is_file(),
        "helm not found at {} (run e2e/setup-host.sh, or set HELM=): the chart cannot be checked",
        helm.display()
    );
    let chart = repo_root().join("charts/enbd-csi");
    value_sets()
        .into_iter()
        .map(|(name, values)| {
            let mut cmd = Command::new(&helm);
            cmd.arg("template")
                .arg(RELEASE)
                .arg(&chart)
                .args(["--namespace", NAMESPACE]);
            if let Some(v) = &values {
                cmd.arg("-f").arg(v);
            }
            if name != NO_SNAPSHOT_SET {
                cmd.args(["--api-versions", SNAPSHOT_API]);
            }
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()));
            assert!(
                out.status.success(),
                "helm template for {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (
                name,
                String::from_utf8(out.stdout).expect("helm prints UTF-8"),
            )
        })
        .collect()
}
