//! Consistency checks over one render set: what the API server would refuse (names, enum
//! values, selectors, dangling port and env references) and what would deploy but not work
//! (driver names that disagree, a CSI socket one side cannot see, a kubelet registration path
//! kubelet never looks at, RBAC a sidecar lacks, a server selector that matches no server).
//! Every check returns problems as text so a failing set reports all of them at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, Service, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::{Object, RenderSet};

/// An ENBD image as the Dockerfile builds it: the build target (image name) and the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTarget {
    pub image: String,
    pub binary: String,
}

/// Reads deploy/Dockerfile: each `FROM ... AS <target>` stage with an
/// `ENTRYPOINT ["/usr/local/bin/<binary>"]`. The builder stage has no entrypoint.
pub fn dockerfile_targets(root: &Path) -> Vec<ImageTarget> {
    let path = root.join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut stage: Option<String> = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words
            .first()
            .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
        {
            stage = match words.as_slice() {
                [_, _, as_, name] if as_.eq_ignore_ascii_case("AS") => Some(name.to_string()),
                _ => None,
            };
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT") {
            let entry: Vec<String> = serde_json::from_str(rest.trim()).unwrap_or_else(|e| {
                panic!("Dockerfile ENTRYPOINT must be exec form ({e}): {line}")
            });
            let binary = entry
                .first()
                .and_then(|p| p.rsplit('/').next())
                .expect("ENTRYPOINT names a binary")
                .to_string();
            let image = stage.clone().expect("ENTRYPOINT inside a named stage");
            out.push(ImageTarget { image, binary });
        }
    }
    out
}

/// Image name without registry, repository path and tag: `a.b/c/enbd-node:1` -> `enbd-node`.
pub fn image_name(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split([':', '@']).next().unwrap_or(last)
}

/// `--name=value` of a container's args (the chart always uses the `=` form).
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

pub fn args(c: &Container) -> &[String] {
    c.args.as_deref().unwrap_or(&[])
}

fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

fn port_number(c: &Container, name: &str) -> Option<i32> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Volume> {
    spec.volumes.iter().flatten().find(|v| v.name == name)
}

/// The volume a container mounts at exactly `path`.
fn volume_at<'a>(c: &'a Container, path: &str) -> Option<&'a str> {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == path.trim_end_matches('/'))
        .map(|m| m.name.as_str())
}

fn host_path<'a>(spec: &'a PodSpec, volume_name: &str) -> Option<&'a str> {
    volume(spec, volume_name)?
        .host_path
        .as_ref()
        .map(|h| h.path.as_str())
}

/// Port of a HOST:PORT address (`[::]:10809` included).
pub fn listen_port(addr: &str) -> Option<i32> {
    addr.rsplit_once(':')?.1.parse().ok()
}

fn dirname(path: &str) -> &str {
    path.rsplit_once('/')
        .map(|(d, _)| if d.is_empty() { "/" } else { d })
        .unwrap_or(".")
}

/// Runs every check; the result lists all problems of the set.
pub fn check_set(set: &RenderSet, targets: &[ImageTarget]) -> Vec<String> {
    let mut p = Vec::new();
    names(set, &mut p);
    enum_values(set, &mut p);
    selectors(set, &mut p);
    pod_references(set, &mut p);
    images(set, targets, &mut p);
    driver_name(set, &mut p);
    csi_sockets(set, &mut p);
    node_plugin(set, &mut p);
    server(set, &mut p);
    discovery(set, &mut p);
    rbac(set, &mut p);
    monitoring(set, &mut p);
    defaults(set, &mut p);
    p.into_iter()
        .map(|m| format!("{}: {m}", set.name))
        .collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && is_dns_label(s)
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.contains("--")
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn names(set: &RenderSet, p: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for o in &set.objects {
        let name = o.name();
        if !is_dns_subdomain(name) {
            p.push(format!("{} name {name:?} is not a DNS subdomain", o.kind()));
        }
        let ns = o.metadata().namespace.clone();
        if o.is_namespaced() != ns.is_some() {
            p.push(format!(
                "{} {name}: namespace {ns:?} on a namespaced={} kind",
                o.kind(),
                o.is_namespaced()
            ));
        }
        if !seen.insert((o.kind(), ns, name.to_string())) {
            p.push(format!("{} {name} rendered twice", o.kind()));
        }
        for (k, v) in o.metadata().labels.iter().flatten() {
            if !is_label_value(v) {
                p.push(format!(
                    "{} {name}: label {k}={v:?} is not a valid label value",
                    o.kind()
                ));
            }
        }
    }
    for (w, spec) in set.workloads() {
        let mut container_names = BTreeSet::new();
        for c in containers(spec) {
            if !is_dns_label(&c.name) || !container_names.insert(c.name.as_str()) {
                p.push(format!(
                    "{w}: container name {:?} invalid or repeated",
                    c.name
                ));
            }
            let mut port_names = BTreeSet::new();
            for port in c.ports.iter().flatten() {
                if let Some(n) = &port.name
                    && (!is_port_name(n) || !port_names.insert(n.as_str()))
                {
                    p.push(format!(
                        "{w}/{}: port name {n:?} invalid or repeated",
                        c.name
                    ));
                }
                if !(1..=65535).contains(&port.container_port) {
                    p.push(format!(
                        "{w}/{}: containerPort {} out of range",
                        c.name, port.container_port
                    ));
                }
            }
            for m in c.volume_mounts.iter().flatten() {
                if volume(spec, &m.name).is_none() && !claim_template(set, w, &m.name) {
                    p.push(format!(
                        "{w}/{}: mounts undefined volume {:?}",
                        c.name, m.name
                    ));
                }
            }
        }
        for v in spec.volumes.iter().flatten() {
            if !is_dns_label(&v.name) {
                p.push(format!("{w}: volume name {:?} invalid", v.name));
            }
        }
    }
}

fn claim_template(set: &RenderSet, workload: &str, name: &str) -> bool {
    set.objects.iter().any(|o| match o {
        Object::StatefulSet(s) if s.metadata.name.as_deref() == Some(workload) => s
            .spec
            .volume_claim_templates
            .iter()
            .flatten()
            .any(|t| t.metadata.name.as_deref() == Some(name)),
        _ => false,
    })
}

/// Values k8s-openapi keeps as free strings but the API server checks against a set.
fn enum_values(set: &RenderSet, p: &mut Vec<String>) {
    fn allowed(parent: &str, key: &str) -> Option<&'static [&'static str]> {
        Some(match (parent, key) {
            (_, "imagePullPolicy") => &["Always", "IfNotPresent", "Never"],
            (_, "mountPropagation") => &["None", "HostToContainer", "Bidirectional"],
            (_, "protocol") => &["TCP", "UDP", "SCTP"],
            ("hostPath", "type") => &[
                "",
                "DirectoryOrCreate",
                "Directory",
                "FileOrCreate",
                "File",
                "Socket",
                "CharDevice",
                "BlockDevice",
            ],
            ("strategy", "type") => &["Recreate", "RollingUpdate"],
            ("updateStrategy", "type") => &["RollingUpdate", "OnDelete"],
            ("spec", "type") => &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
            (_, "reclaimPolicy") => &["Delete", "Retain"],
            (_, "volumeBindingMode") => &["Immediate", "WaitForFirstConsumer"],
            (_, "fsGroupPolicy") => &["None", "File", "ReadWriteOnceWithFSType"],
            (_, "fsGroupChangePolicy") => &["OnRootMismatch", "Always"],
            (_, "restartPolicy") => &["Always", "OnFailure", "Never"],
            (_, "dnsPolicy") => &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
            (_, "podManagementPolicy") => &["OrderedReady", "Parallel"],
            (_, "whenDeleted" | "whenScaled") => &["Retain", "Delete"],
            (_, "accessModes") => &[
                "ReadWriteOnce",
                "ReadOnlyMany",
                "ReadWriteMany",
                "ReadWriteOncePod",
            ],
            (_, "volumeLifecycleModes") => &["Persistent", "Ephemeral"],
            _ => return None,
        })
    }
    fn walk(v: &Value, parent: &str, path: &str, p: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    // Labels, annotations and parameters are free-form maps.
                    if matches!(
                        k.as_str(),
                        "labels" | "annotations" | "parameters" | "matchLabels" | "selector"
                    ) && child.is_object()
                        && child
                            .as_object()
                            .is_some_and(|o| o.values().all(Value::is_string))
                    {
                        continue;
                    }
                    let here = format!("{path}.{k}");
                    if let Some(ok) = allowed(parent, k) {
                        let values: Vec<&Value> = match child {
                            Value::Array(a) => a.iter().collect(),
                            other => vec![other],
                        };
                        for val in values {
                            if !val.as_str().is_some_and(|s| ok.contains(&s)) {
                                p.push(format!("{here}: {val} is not one of {ok:?}"));
                            }
                        }
                    }
                    walk(child, k, &here, p);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(child, parent, &format!("{path}[{i}]"), p);
                }
            }
            _ => {}
        }
    }
    for (o, raw) in set.objects.iter().zip(&set.raw) {
        walk(raw, "", &format!("{} {}", o.kind(), o.name()), p);
    }
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Workload selectors select their own template; Services select some pod.
fn selectors(set: &RenderSet, p: &mut Vec<String>) {
    let mut pod_labels: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for o in &set.objects {
        let sel_tmpl = match o {
            Object::Deployment(d) => Some((&d.spec.selector, &d.spec.template)),
            Object::DaemonSet(d) => Some((&d.spec.selector, &d.spec.template)),
            Object::StatefulSet(d) => Some((&d.spec.selector, &d.spec.template)),
            _ => None,
        };
        let Some((sel, tmpl)) = sel_tmpl else {
            continue;
        };
        let labels = tmpl
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let wanted = sel.match_labels.clone().unwrap_or_default();
        if sel.match_expressions.is_some() || !matches(&wanted, &labels) {
            p.push(format!(
                "{} {}: selector {wanted:?} does not select its template {labels:?}",
                o.kind(),
                o.name()
            ));
        }
        pod_labels.push((o.name().to_string(), labels));
    }
    // No two workloads may claim each other's pods.
    for (i, (a, la)) in pod_labels.iter().enumerate() {
        for (b, lb) in &pod_labels[i + 1..] {
            if la == lb {
                p.push(format!("workloads {a} and {b} have identical pod labels"));
            }
        }
    }
    for o in &set.objects {
        let Object::Service(s) = o else { continue };
        let sel = s
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        let selected: Vec<&str> = pod_labels
            .iter()
            .filter(|(_, l)| matches(&sel, l))
            .map(|(n, _)| n.as_str())
            .collect();
        if selected.is_empty() {
            p.push(format!(
                "Service {} selects no workload of this set ({sel:?})",
                o.name()
            ));
        }
        for port in s.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if let Some(IntOrString::String(target)) = &port.target_port {
                for w in &selected {
                    let defined = set.workloads().filter(|(n, _)| n == w).any(|(_, spec)| {
                        containers(spec).any(|c| port_number(c, target).is_some())
                    });
                    if !defined {
                        p.push(format!(
                            "Service {}: targetPort {target:?} is not a port of {w}",
                            o.name()
                        ));
                    }
                }
            }
        }
    }
}

/// Probes name real ports, `$(VAR)` in args is defined in env, service accounts exist.
fn pod_references(set: &RenderSet, p: &mut Vec<String>) {
    let accounts: BTreeSet<&str> = set
        .objects
        .iter()
        .filter(|o| matches!(o, Object::ServiceAccount(_)))
        .map(Object::name)
        .collect();
    for (w, spec) in set.workloads() {
        match spec.service_account_name.as_deref() {
            Some(sa) if accounts.contains(sa) => {}
            other => p.push(format!("{w}: serviceAccountName {other:?} is not rendered")),
        }
        for c in containers(spec) {
            for (what, probe) in [
                ("livenessProbe", &c.liveness_probe),
                ("readinessProbe", &c.readiness_probe),
                ("startupProbe", &c.startup_probe),
            ] {
                let Some(probe) = probe else { continue };
                for port in probe_ports(probe) {
                    let ok = match port {
                        IntOrString::String(name) => {
                            containers(spec).any(|x| port_number(x, name).is_some())
                        }
                        IntOrString::Int(n) => containers(spec)
                            .flat_map(|x| x.ports.iter().flatten())
                            .any(|x| x.container_port == *n),
                    };
                    if !ok {
                        p.push(format!(
                            "{w}/{}: {what} port {port:?} is not declared",
                            c.name
                        ));
                    }
                }
            }
            if liveness_via_sidecar(spec, c) && c.startup_probe.is_none() {
                p.push(format!(
                    "{w}/{}: its liveness is answered by the livenessprobe sidecar, which may \
                     start minutes later: it needs a startupProbe",
                    c.name
                ));
            }
            let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            for a in args(c) {
                let mut rest = a.as_str();
                while let Some(start) = rest.find("$(") {
                    let Some(end) = rest[start..].find(')') else {
                        break;
                    };
                    let var = &rest[start + 2..start + end];
                    if !env.contains(var) {
                        p.push(format!(
                            "{w}/{}: arg {a:?} uses $({var}) which is not in env",
                            c.name
                        ));
                    }
                    rest = &rest[start + end..];
                }
            }
        }
    }
}

/// Whether `c`'s livenessProbe goes to the port a livenessprobe sidecar of the same pod
/// serves (`--health-port`): then its answers depend on a container the kubelet may start
/// long after `c`.
fn liveness_via_sidecar(spec: &PodSpec, c: &Container) -> bool {
    let sidecar_ports: BTreeSet<i32> = containers(spec)
        .filter(|x| image_name(x.image.as_deref().unwrap_or("")) == "livenessprobe")
        .filter_map(|x| flag(args(x), "--health-port")?.parse().ok())
        .collect();
    let Some(probe) = &c.liveness_probe else {
        return false;
    };
    probe_ports(probe).into_iter().any(|port| match port {
        IntOrString::Int(n) => sidecar_ports.contains(n),
        IntOrString::String(name) => containers(spec)
            .filter_map(|x| port_number(x, name))
            .any(|n| sidecar_ports.contains(&n)),
    })
}

fn probe_ports(probe: &Probe) -> Vec<&IntOrString> {
    let mut out = Vec::new();
    if let Some(h) = &probe.http_get {
        out.push(&h.port);
    }
    if let Some(t) = &probe.tcp_socket {
        out.push(&t.port);
    }
    out
}

/// The long-running containers of an ENBD image, with the binary the image runs. Init steps
/// that use the same image (the server's prepare-data-dir) run another mode of the binary
/// and are checked where they matter ([`hostpath_prepared`]).
pub fn enbd_containers<'a>(
    set: &'a RenderSet,
    targets: &'a [ImageTarget],
) -> Vec<(&'a str, &'a PodSpec, &'a Container, &'a ImageTarget)> {
    let mut out = Vec::new();
    for (w, spec) in set.workloads() {
        for c in &spec.containers {
            let image = c.image.as_deref().unwrap_or("");
            if let Some(t) = targets.iter().find(|t| t.image == image_name(image)) {
                out.push((w, spec, c, t));
            }
        }
    }
    out
}

const SIDECARS: &[&str] = &[
    "csi-provisioner",
    "csi-attacher",
    "csi-resizer",
    "csi-snapshotter",
    "csi-external-health-monitor-controller",
    "livenessprobe",
    "csi-node-driver-registrar",
];

fn images(set: &RenderSet, targets: &[ImageTarget], p: &mut Vec<String>) {
    let wanted = ["enbd-server", "enbd-csi-driver", "enbd-node"];
    for w in wanted {
        if !targets.iter().any(|t| t.image == w) {
            p.push(format!("deploy/Dockerfile has no target {w}"));
        }
    }
    for (w, spec) in set.workloads() {
        for c in containers(spec) {
            let image = c.image.as_deref().unwrap_or("");
            let name = image_name(image);
            let tag = image
                .rsplit_once(':')
                .map(|(_, t)| t)
                .filter(|t| !t.contains('/'));
            if tag.is_none_or(|t| t.is_empty() || t == "latest") {
                p.push(format!("{w}/{}: image {image:?} has no pinned tag", c.name));
            }
            if targets.iter().any(|t| t.image == name) {
                continue;
            }
            if SIDECARS.contains(&name) {
                let ok = image.starts_with("registry.k8s.io/sig-storage/")
                    && tag.is_some_and(|t| t.starts_with('v') && t[1..].split('.').count() == 3);
                if !ok {
                    p.push(format!(
                        "{w}/{}: sidecar image {image:?} is not a released sig-storage tag",
                        c.name
                    ));
                }
            } else {
                p.push(format!(
                    "{w}/{}: image {image:?} is neither an ENBD image nor a CSI sidecar",
                    c.name
                ));
            }
        }
    }
    // Each ENBD workload runs its image: controller -> enbd-csi-driver, node -> enbd-node,
    // servers -> enbd-server.
    for o in &set.objects {
        let expect = match o {
            Object::Deployment(_) => "enbd-csi-driver",
            Object::DaemonSet(_) => "enbd-node",
            Object::StatefulSet(_) => "enbd-server",
            _ => continue,
        };
        let Some((w, spec)) = o.pod_spec() else {
            continue;
        };
        // Init steps may use the same image (the server's prepare-data-dir); only the
        // long-running containers count.
        let n = spec
            .containers
            .iter()
            .filter(|c| image_name(c.image.as_deref().unwrap_or("")) == expect)
            .count();
        if n != 1 {
            p.push(format!(
                "{w}: {n} containers run {expect}, expected exactly one"
            ));
        }
    }
    // The binaries' listen flags each have a declared containerPort.
    for (w, _, c, _) in enbd_containers(set, targets) {
        for a in args(c) {
            let Some((name, value)) = a.strip_prefix("--").and_then(|a| a.split_once('=')) else {
                continue;
            };
            if name.ends_with("listen") {
                match listen_port(value) {
                    Some(port) if c.ports.iter().flatten().any(|x| x.container_port == port) => {}
                    _ => p.push(format!(
                        "{w}/{}: --{name}={value} has no matching containerPort",
                        c.name
                    )),
                }
            }
        }
        if let Some(m) = flag(args(c), "--metrics-listen")
            && listen_port(m) != port_number(c, "metrics")
        {
            p.push(format!(
                "{w}/{}: port \"metrics\" is not --metrics-listen {m}",
                c.name
            ));
        }
    }
}

fn driver_name(set: &RenderSet, p: &mut Vec<String>) {
    let drivers: Vec<&str> = set
        .objects
        .iter()
        .filter(|o| matches!(o, Object::CsiDriver(_)))
        .map(Object::name)
        .collect();
    let [driver] = drivers.as_slice() else {
        p.push(format!("expected one CSIDriver, found {drivers:?}"));
        return;
    };
    for o in &set.objects {
        match o {
            Object::StorageClass(sc) if sc.provisioner != *driver => {
                p.push(format!(
                    "StorageClass {}: provisioner {} is not {driver}",
                    o.name(),
                    sc.provisioner
                ));
            }
            Object::VolumeSnapshotClass(c) if c.driver != *driver => {
                p.push(format!(
                    "VolumeSnapshotClass {}: driver {} is not {driver}",
                    o.name(),
                    c.driver
                ));
            }
            _ => {}
        }
    }
    let defaults: Vec<&str> = set
        .objects
        .iter()
        .filter(|o| matches!(o, Object::StorageClass(_)))
        .filter(|o| {
            o.metadata()
                .annotations
                .as_ref()
                .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                == Some(&"true".to_string())
        })
        .map(Object::name)
        .collect();
    if defaults.len() > 1 {
        p.push(format!("more than one default StorageClass: {defaults:?}"));
    }
    for (w, spec) in set.workloads() {
        for c in containers(spec) {
            if let Some(n) = flag(args(c), "--driver-name")
                && n != *driver
            {
                p.push(format!(
                    "{w}/{}: --driver-name={n} is not the CSIDriver {driver}",
                    c.name
                ));
            }
        }
    }
    let driver_spec = set.objects.iter().find_map(|o| match o {
        Object::CsiDriver(d) => Some(&d.spec),
        _ => None,
    });
    let has_attacher = set.workloads().any(|(_, s)| {
        containers(s).any(|c| image_name(c.image.as_deref().unwrap_or("")) == "csi-attacher")
    });
    if driver_spec.and_then(|s| s.attach_required) != Some(has_attacher) {
        p.push("CSIDriver attachRequired must be true exactly when the attacher runs".into());
    }
}

/// In each pod, the directory of every `--csi-address` is a volume that the driver
/// container (the one serving `--endpoint` / `--csi-endpoint`) mounts at the same path.
fn csi_sockets(set: &RenderSet, p: &mut Vec<String>) {
    for (w, spec) in set.workloads() {
        let server = containers(spec).find_map(|c| {
            flag(args(c), "--endpoint")
                .or_else(|| flag(args(c), "--csi-endpoint"))
                .map(|e| (c, e))
        });
        for c in containers(spec) {
            let Some(addr) = flag(args(c), "--csi-address") else {
                continue;
            };
            let Some((srv, endpoint)) = server else {
                p.push(format!(
                    "{w}/{}: --csi-address but no driver container serves CSI in the pod",
                    c.name
                ));
                continue;
            };
            let Some(sock) = endpoint.strip_prefix("unix://") else {
                p.push(format!(
                    "{w}/{}: CSI endpoint {endpoint} is not a unix socket",
                    srv.name
                ));
                continue;
            };
            let (here, there) = (volume_at(c, dirname(addr)), volume_at(srv, dirname(sock)));
            if here.is_none() || here != there {
                p.push(format!(
                    "{w}/{}: socket {addr} (volume {here:?}) is not the driver's {sock} (volume {there:?})",
                    c.name
                ));
            }
        }
    }
}

fn node_plugin(set: &RenderSet, p: &mut Vec<String>) {
    let driver = set
        .objects
        .iter()
        .find(|o| matches!(o, Object::CsiDriver(_)))
        .map(Object::name)
        .unwrap_or("");
    let daemonsets: Vec<_> = set
        .objects
        .iter()
        .filter(|o| matches!(o, Object::DaemonSet(_)))
        .collect();
    let [ds] = daemonsets.as_slice() else {
        p.push(format!(
            "expected one DaemonSet, found {}",
            daemonsets.len()
        ));
        return;
    };
    let Some((w, spec)) = ds.pod_spec() else {
        return;
    };
    let Some(node) =
        containers(spec).find(|c| image_name(c.image.as_deref().unwrap_or("")) == "enbd-node")
    else {
        return; // reported by images()
    };
    if args(node).first().map(String::as_str) != Some("daemon") {
        p.push(format!("{w}: enbd-node must run the `daemon` subcommand"));
    }
    if node.security_context.as_ref().and_then(|s| s.privileged) != Some(true) {
        p.push(format!(
            "{w}: enbd-node must be privileged (ublk, mkfs, mount)"
        ));
    }
    if spec.host_ipc == Some(true) || spec.host_network == Some(true) {
        p.push(format!(
            "{w}: hostIPC/hostNetwork are not needed and must stay off"
        ));
    }
    // The kubelet directory: Bidirectional, mounted at its host path.
    let kubelet_mounts: Vec<_> = node
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_propagation.as_deref() == Some("Bidirectional"))
        .collect();
    let kubelet_dir = match kubelet_mounts.as_slice() {
        [m] if host_path(spec, &m.name).map(|h| h.trim_end_matches('/'))
            == Some(m.mount_path.trim_end_matches('/')) =>
        {
            m.mount_path.trim_end_matches('/').to_string()
        }
        _ => {
            p.push(format!("{w}: enbd-node needs exactly one Bidirectional mount of the kubelet dir at its host path"));
            return;
        }
    };
    for dev in ["/dev", "/sys"] {
        let ok = volume_at(node, dev).and_then(|v| host_path(spec, v)) == Some(dev);
        if !ok {
            p.push(format!("{w}: enbd-node must mount the host's {dev}"));
        }
    }
    // State and control directories live on the host so a restarted pod finds them.
    let state = flag(args(node), "--state-dir").unwrap_or("/var/lib/enbd-node");
    if volume_at(node, state).and_then(|v| host_path(spec, v)) != Some(state) {
        p.push(format!(
            "{w}: --state-dir {state} must be a hostPath mounted at the same path"
        ));
    }
    let control = flag(args(node), "--control-socket").unwrap_or("/run/enbd-node/control.sock");
    if volume_at(node, dirname(control))
        .and_then(|v| host_path(spec, v))
        .is_none()
    {
        p.push(format!(
            "{w}: the directory of --control-socket {control} must be a hostPath"
        ));
    }
    // Registrar: tells kubelet the host path of the same socket the driver serves.
    let Some(reg) = containers(spec)
        .find(|c| image_name(c.image.as_deref().unwrap_or("")) == "csi-node-driver-registrar")
    else {
        p.push(format!("{w}: no node-driver-registrar"));
        return;
    };
    let plugin_dir = format!("{kubelet_dir}/plugins/{driver}");
    let sock_volume = flag(args(reg), "--csi-address").and_then(|a| volume_at(reg, dirname(a)));
    if sock_volume.and_then(|v| host_path(spec, v)) != Some(plugin_dir.as_str()) {
        p.push(format!(
            "{w}: the CSI socket volume must be the host's {plugin_dir}"
        ));
    }
    let expected = format!("{plugin_dir}/csi.sock");
    if flag(args(reg), "--kubelet-registration-path") != Some(expected.as_str()) {
        p.push(format!(
            "{w}: --kubelet-registration-path must be {expected}"
        ));
    }
    let registry = format!("{kubelet_dir}/plugins_registry");
    if volume_at(reg, "/registration").and_then(|v| host_path(spec, v)) != Some(registry.as_str()) {
        p.push(format!(
            "{w}: the registrar must mount {registry} at /registration"
        ));
    }
    if let Some(endpoint) = flag(args(reg), "--http-endpoint")
        && listen_port(endpoint) != reg.ports.iter().flatten().next().map(|x| x.container_port)
    {
        p.push(format!(
            "{w}: registrar --http-endpoint {endpoint} has no containerPort"
        ));
    }
    health_port(w, spec, p);
}

/// The livenessprobe sidecar's --health-port is the "healthz" port the driver container
/// is probed on.
fn health_port(w: &str, spec: &PodSpec, p: &mut Vec<String>) {
    let probe =
        containers(spec).find(|c| image_name(c.image.as_deref().unwrap_or("")) == "livenessprobe");
    let Some(probe) = probe else {
        p.push(format!("{w}: no livenessprobe sidecar"));
        return;
    };
    let port = flag(args(probe), "--health-port").and_then(|x| x.parse::<i32>().ok());
    let declared = containers(spec).find_map(|c| port_number(c, "healthz"));
    if port.is_none() || port != declared {
        p.push(format!(
            "{w}: livenessprobe --health-port {port:?} is not the healthz port {declared:?}"
        ));
    }
}

fn server(set: &RenderSet, p: &mut Vec<String>) {
    for o in &set.objects {
        let Object::StatefulSet(sts) = o else {
            continue;
        };
        let spec = &sts.spec;
        let w = o.name();
        let governing = set.objects.iter().find_map(|x| match x {
            Object::Service(s) if x.name() == spec.service_name.as_deref().unwrap_or("") => Some(s),
            _ => None,
        });
        let Some(svc) = governing else {
            p.push(format!(
                "{w}: serviceName {:?} has no Service",
                spec.service_name
            ));
            continue;
        };
        if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) != Some("None") {
            p.push(format!("{w}: the governing Service must be headless"));
        }
        let Some(pod) = &spec.template.spec else {
            continue;
        };
        let Some(c) = pod
            .containers
            .iter()
            .find(|c| image_name(c.image.as_deref().unwrap_or("")) == "enbd-server")
        else {
            continue;
        };
        let env_field = |var: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == var)
                .and_then(|e| {
                    e.value_from
                        .as_ref()?
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.clone())
                })
        };
        if flag(args(c), "--server-id") != Some("$(POD_NAME)")
            || env_field("POD_NAME").as_deref() != Some("metadata.name")
        {
            p.push(format!(
                "{w}: --server-id must be the pod name (stable across restarts)"
            ));
        }
        if env_field("POD_NAMESPACE").as_deref() != Some("metadata.namespace") {
            p.push(format!(
                "{w}: POD_NAMESPACE must come from metadata.namespace"
            ));
        }
        let nbd = flag(args(c), "--listen").and_then(listen_port);
        let advertise = flag(args(c), "--advertise-address").unwrap_or("");
        let svc_name = svc.metadata.name.as_deref().unwrap_or("");
        let prefix = format!("$(POD_NAME).{svc_name}.$(POD_NAMESPACE).svc.");
        let ok = advertise.strip_prefix(&prefix).is_some_and(|rest| {
            rest.rsplit_once(':')
                .is_some_and(|(domain, port)| is_dns_subdomain(domain) && port.parse().ok() == nbd)
        });
        if !ok || nbd != port_number(c, "nbd") {
            p.push(format!("{w}: --advertise-address {advertise:?} must be <pod>.{svc_name}.<ns>.svc.<domain>:<nbd port {nbd:?}>"));
        }
        let data = flag(args(c), "--data-dir").unwrap_or("");
        match volume_at(c, data) {
            Some(v)
                if volume(pod, v).is_some_and(|v| v.host_path.is_some())
                    || claim_template(set, w, v) => {}
            other => p.push(format!(
                "{w}: --data-dir {data} must be a hostPath or claim template volume, is {other:?}"
            )),
        }
        if let Some(v) = volume_at(c, data).filter(|v| host_path(pod, v).is_some()) {
            hostpath_prepared(pod, c, v, data, w, p);
        }
    }
}

/// A hostPath data directory is created by the kubelet as root (fsGroup does not apply to
/// hostPath): an init container must hand it to the server's user first, or the non-root
/// server cannot create its volumes (found by the real-cluster suite).
fn hostpath_prepared(
    pod: &PodSpec,
    server: &Container,
    volume: &str,
    data: &str,
    w: &str,
    p: &mut Vec<String>,
) {
    let id = |f: fn(&k8s_openapi::api::core::v1::SecurityContext) -> Option<i64>,
              g: fn(&k8s_openapi::api::core::v1::PodSecurityContext) -> Option<i64>| {
        server
            .security_context
            .as_ref()
            .and_then(f)
            .or_else(|| pod.security_context.as_ref().and_then(g))
    };
    let uid = id(|s| s.run_as_user, |s| s.run_as_user);
    let gid = id(|s| s.run_as_group, |s| s.run_as_group);
    let (Some(uid), Some(gid)) = (uid, gid) else {
        p.push(format!(
            "{w}: the server on a hostPath needs runAsUser and runAsGroup"
        ));
        return;
    };
    let want = format!("{uid}:{gid}");
    let prepared = pod.init_containers.iter().flatten().any(|i| {
        flag(args(i), "--prepare-data-dir-for") == Some(want.as_str())
            && flag(args(i), "--data-dir") == Some(data)
            && volume_at(i, data) == Some(volume)
    });
    if !prepared {
        p.push(format!(
            "{w}: the hostPath data directory {data} needs an init container running \
             --prepare-data-dir-for={want} with it mounted"
        ));
    }
}

/// `a=b,c=d` label selector.
fn parse_selector(s: &str) -> Option<BTreeMap<String, String>> {
    s.split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn discovery(set: &RenderSet, p: &mut Vec<String>) {
    let Some((w, spec)) = set
        .objects
        .iter()
        .find(|o| matches!(o, Object::Deployment(_)))
        .and_then(Object::pod_spec)
    else {
        p.push("no controller Deployment".into());
        return;
    };
    let Some(c) = containers(spec)
        .find(|c| image_name(c.image.as_deref().unwrap_or("")) == "enbd-csi-driver")
    else {
        return;
    };
    let a = args(c);
    match flag(a, "--discovery") {
        Some("static") => {
            let servers = flag(a, "--servers").unwrap_or("");
            if servers.is_empty() || servers.split(',').any(|s| !s.contains('=')) {
                p.push(format!(
                    "{w}: static discovery needs --servers ID=URL,..., got {servers:?}"
                ));
            }
        }
        Some("kubernetes") => {
            let ns = flag(a, "--namespace").unwrap_or("");
            let Some(selector) = flag(a, "--server-selector").and_then(parse_selector) else {
                p.push(format!("{w}: --server-selector missing or malformed"));
                return;
            };
            for o in &set.objects {
                let Object::StatefulSet(s) = o else { continue };
                if o.metadata().namespace.as_deref() != Some(ns) {
                    continue;
                }
                let labels = s
                    .spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default();
                if !matches(&selector, &labels) {
                    p.push(format!("{w}: --server-selector {selector:?} does not match the servers' pods {labels:?}"));
                }
            }
            let sa = spec.service_account_name.as_deref().unwrap_or("");
            // csi-driver's discovery is a kube-rs watch of the server pods.
            for verb in ["list", "watch"] {
                if !granted(set, sa, Some(ns), "", "pods", verb) {
                    p.push(format!(
                        "{w}: discovery needs {verb} pods in namespace {ns}"
                    ));
                }
            }
        }
        other => p.push(format!(
            "{w}: --discovery {other:?} is not kubernetes|static"
        )),
    }
}

/// Does service account `sa` (in the release namespace) hold `verb` on `group/resource`,
/// cluster-wide or (with `ns`) in that namespace?
fn granted(
    set: &RenderSet,
    sa: &str,
    ns: Option<&str>,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    let sa_ns = super::NAMESPACE;
    let subject_ok = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(sa_ns)
        })
    };
    let rule_ok = |rules: &Option<Vec<k8s_openapi::api::rbac::v1::PolicyRule>>| {
        rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    let role_rules = |kind: &str, name: &str, role_ns: Option<&str>| {
        set.objects.iter().any(|o| match o {
            Object::ClusterRole(r) if kind == "ClusterRole" && o.name() == name => {
                rule_ok(&r.rules)
            }
            Object::Role(r)
                if kind == "Role"
                    && o.name() == name
                    && o.metadata().namespace.as_deref() == role_ns =>
            {
                rule_ok(&r.rules)
            }
            _ => false,
        })
    };
    set.objects.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => {
            subject_ok(&b.subjects)
                && b.role_ref.kind == "ClusterRole"
                && role_rules("ClusterRole", &b.role_ref.name, None)
        }
        Object::RoleBinding(b) if ns.is_some() && o.metadata().namespace.as_deref() == ns => {
            subject_ok(&b.subjects) && role_rules(&b.role_ref.kind, &b.role_ref.name, ns)
        }
        _ => false,
    })
}

fn rbac(set: &RenderSet, p: &mut Vec<String>) {
    for o in &set.objects {
        let rules = match o {
            Object::ClusterRole(r) => &r.rules,
            Object::Role(r) => &r.rules,
            _ => continue,
        };
        for r in rules.iter().flatten() {
            let wild = |v: &Option<Vec<String>>| v.iter().flatten().any(|x| x == "*");
            if wild(&r.api_groups) || wild(&r.resources) || r.verbs.iter().any(|v| v == "*") {
                p.push(format!("{} {}: wildcard rule {r:?}", o.kind(), o.name()));
            }
        }
    }
    let Some((w, spec)) = set
        .objects
        .iter()
        .find(|o| matches!(o, Object::Deployment(_)))
        .and_then(Object::pod_spec)
    else {
        return;
    };
    let sa = spec.service_account_name.as_deref().unwrap_or("");
    let runs = |image: &str| {
        containers(spec).any(|c| image_name(c.image.as_deref().unwrap_or("")) == image)
    };
    // What each sidecar's controller loops call (cluster-wide).
    let mut needs: Vec<(&str, &str, &[&str])> = vec![
        (
            "",
            "persistentvolumes",
            &["get", "list", "watch", "create", "delete", "patch"],
        ),
        (
            "",
            "persistentvolumeclaims",
            &["get", "list", "watch", "update"],
        ),
        ("", "persistentvolumeclaims/status", &["patch"]),
        ("", "events", &["create", "patch"]),
        ("", "nodes", &["get", "list", "watch"]),
        ("", "pods", &["get", "list", "watch"]),
        (
            "storage.k8s.io",
            "storageclasses",
            &["get", "list", "watch"],
        ),
        ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
        (
            "storage.k8s.io",
            "volumeattachments",
            &["get", "list", "watch", "patch"],
        ),
        ("storage.k8s.io", "volumeattachments/status", &["patch"]),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshots",
            &["get", "list"],
        ),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list"],
        ),
    ];
    let driver_args = containers(spec)
        .find(|c| image_name(c.image.as_deref().unwrap_or("")) == "enbd-csi-driver")
        .map(args)
        .unwrap_or_default();
    if driver_args.iter().any(|a| a == "--events") {
        // kube-rs's Recorder writes events.k8s.io/v1 Events; the claims behind a server's
        // volumes are found through the PVs' volume handles.
        needs.extend([
            ("events.k8s.io", "events", &["create", "patch"][..]),
            ("", "persistentvolumes", &["list", "watch"][..]),
        ]);
    }
    if runs("csi-external-health-monitor-controller") {
        needs.extend([
            (
                "",
                "events",
                &["get", "list", "watch", "create", "patch"][..],
            ),
            ("", "persistentvolumeclaims", &["get", "list", "watch"][..]),
            ("", "nodes", &["get", "list", "watch"][..]),
            ("", "pods", &["get", "list", "watch"][..]),
        ]);
    }
    if runs("csi-snapshotter") {
        needs.extend([
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotclasses",
                &["get", "list", "watch"][..],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents",
                &["watch", "update", "patch"][..],
            ),
            (
                "snapshot.storage.k8s.io",
                "volumesnapshotcontents/status",
                &["update", "patch"][..],
            ),
        ]);
    }
    for (group, resource, verbs) in needs {
        for verb in verbs {
            if !granted(set, sa, None, group, resource, verb) {
                p.push(format!(
                    "{w}: service account {sa} lacks {verb} {group}/{resource}"
                ));
            }
        }
    }
    for verb in ["get", "create", "update"] {
        if !granted(
            set,
            sa,
            Some(super::NAMESPACE),
            "coordination.k8s.io",
            "leases",
            verb,
        ) {
            p.push(format!(
                "{w}: leader election needs {verb} leases in {}",
                super::NAMESPACE
            ));
        }
    }
    // The node plugin and the servers need no API access at all.
    for o in &set.objects {
        let Some((w, spec)) = o.pod_spec() else {
            continue;
        };
        if matches!(o, Object::Deployment(_)) {
            continue;
        }
        if spec.automount_service_account_token != Some(false) {
            p.push(format!("{w}: must not mount a service account token"));
        }
        let sa = spec.service_account_name.as_deref().unwrap_or("");
        let bound = set.objects.iter().any(|b| match b {
            Object::ClusterRoleBinding(b) => b.subjects.iter().flatten().any(|s| s.name == sa),
            Object::RoleBinding(b) => b.subjects.iter().flatten().any(|s| s.name == sa),
            _ => false,
        });
        if bound {
            p.push(format!(
                "{w}: service account {sa} is bound to a role but needs none"
            ));
        }
    }
}

/// ServiceMonitor/PodMonitor select this release's Services/pods and scrape ports they
/// have; PrometheusRule rules each have an alert name and an expression.
fn monitoring(set: &RenderSet, p: &mut Vec<String>) {
    let str_map = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    };
    for o in &set.objects {
        let Object::Monitoring(m) = o else { continue };
        let sel = str_map(&m.spec["selector"]["matchLabels"]);
        match m.kind.as_str() {
            "ServiceMonitor" => {
                let services: Vec<&Service> = set
                    .objects
                    .iter()
                    .filter_map(|x| match x {
                        Object::Service(s) => Some(s),
                        _ => None,
                    })
                    .filter(|s| {
                        matches(&sel, s.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
                    })
                    .collect();
                if services.is_empty() {
                    p.push(format!(
                        "ServiceMonitor {}: selects no Service ({sel:?})",
                        o.name()
                    ));
                }
                let ports: Vec<&str> = services
                    .iter()
                    .flat_map(|s| s.spec.iter().flat_map(|s| s.ports.iter().flatten()))
                    .filter_map(|port| port.name.as_deref())
                    .collect();
                for e in m.spec["endpoints"].as_array().into_iter().flatten() {
                    let port = e["port"].as_str().unwrap_or("");
                    if !ports.contains(&port) {
                        p.push(format!(
                            "ServiceMonitor {}: port {port:?} is on no selected Service",
                            o.name()
                        ));
                    }
                }
            }
            "PodMonitor" => {
                let pods: Vec<&PodSpec> = set
                    .objects
                    .iter()
                    .filter(|w| {
                        let labels = match w {
                            Object::Deployment(d) => d.spec.template.metadata.as_ref(),
                            Object::DaemonSet(d) => d.spec.template.metadata.as_ref(),
                            Object::StatefulSet(d) => d.spec.template.metadata.as_ref(),
                            _ => None,
                        }
                        .and_then(|m| m.labels.clone())
                        .unwrap_or_default();
                        matches(&sel, &labels)
                    })
                    .filter_map(|w| w.pod_spec().map(|(_, s)| s))
                    .collect();
                if pods.is_empty() {
                    p.push(format!("PodMonitor {}: selects no pod ({sel:?})", o.name()));
                }
                for e in m.spec["podMetricsEndpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let port = e["port"].as_str().unwrap_or("");
                    if !pods
                        .iter()
                        .any(|s| containers(s).any(|c| port_number(c, port).is_some()))
                    {
                        p.push(format!(
                            "PodMonitor {}: port {port:?} is on no selected pod",
                            o.name()
                        ));
                    }
                }
            }
            _ => {
                let rules: Vec<&Value> = m.spec["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .collect();
                if rules.is_empty() {
                    p.push(format!("PrometheusRule {}: no rules", o.name()));
                }
                for r in rules {
                    if r["alert"].as_str().is_none_or(str::is_empty)
                        || r["expr"].as_str().is_none_or(str::is_empty)
                    {
                        p.push(format!(
                            "PrometheusRule {}: a rule without alert or expr: {r}",
                            o.name()
                        ));
                    }
                }
            }
        }
    }
}

/// Memory quantity in bytes (`512Mi`, `2Gi`, `1G`, plain bytes); `None` if unparsable.
fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Defaults that must hold on real clusters: a syscall filter on every unprivileged
/// container, a --log-level on every ENBD binary, one controller replica (its publish
/// records are per process), servers with a priority class that exists or is named, the
/// node plugin's memory limit above what its journals may hold, and the snapshotter only
/// beside a VolumeSnapshotClass-capable cluster (both or neither).
fn defaults(set: &RenderSet, p: &mut Vec<String>) {
    for (w, spec) in set.workloads() {
        let pod_seccomp = spec
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref())
            .map(|s| s.type_.as_str());
        for c in containers(spec) {
            let sc = c.security_context.as_ref();
            if sc.and_then(|s| s.privileged) == Some(true) {
                continue;
            }
            let own = sc
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|s| s.type_.as_str());
            if own.or(pod_seccomp) != Some("RuntimeDefault") {
                p.push(format!(
                    "{w}/{}: unprivileged container without seccompProfile RuntimeDefault",
                    c.name
                ));
            }
        }
        for c in containers(spec) {
            let image = image_name(c.image.as_deref().unwrap_or(""));
            if matches!(image, "enbd-server" | "enbd-csi-driver" | "enbd-node")
                && flag(args(c), "--log-level").is_none()
            {
                p.push(format!("{w}/{}: no --log-level", c.name));
            }
        }
    }
    for o in &set.objects {
        match o {
            Object::Deployment(d) => {
                let replicas = d.spec.replicas.unwrap_or(1);
                if replicas > 1 {
                    p.push(format!(
                        "{}: {replicas} controller replicas; the publish records are per process",
                        o.name()
                    ));
                }
            }
            Object::StatefulSet(_) => {
                let Some((w, spec)) = o.pod_spec() else {
                    continue;
                };
                match spec.priority_class_name.as_deref() {
                    None | Some("") => {
                        p.push(format!("{w}: enbd-server pods without a priority class"))
                    }
                    Some(name) => {
                        let created = set
                            .objects
                            .iter()
                            .any(|pc| matches!(pc, Object::PriorityClass(_)) && pc.name() == name);
                        let system = name.starts_with("system-");
                        let chart_named = name.ends_with("-server");
                        if chart_named && !created && !system {
                            p.push(format!(
                                "{w}: priority class {name} is neither created nor named in values"
                            ));
                        }
                    }
                }
            }
            Object::PriorityClass(pc) => {
                if pc.value.unwrap_or(0) > 1_000_000_000 {
                    p.push(format!(
                        "{}: value {:?} above the non-system maximum",
                        o.name(),
                        pc.value
                    ));
                }
                if pc.global_default == Some(true) {
                    p.push(format!(
                        "{}: must not be the cluster's global default",
                        o.name()
                    ));
                }
            }
            _ => {}
        }
    }
    // The node plugin's memory limit holds every journal full.
    for (w, spec) in set.workloads() {
        let Some(node) =
            containers(spec).find(|c| image_name(c.image.as_deref().unwrap_or("")) == "enbd-node")
        else {
            continue;
        };
        let max_volumes: u64 = flag(args(node), "--max-volumes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let journal: u64 = flag(args(node), "--journal-bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(64 << 20);
        let limit = node
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| q.0.as_str());
        match (limit.map(quantity_bytes), max_volumes) {
            (None, _) => p.push(format!("{w}: enbd-node has no memory limit")),
            (Some(None), _) => p.push(format!("{w}: enbd-node memory limit {limit:?} unparsable")),
            (Some(Some(bytes)), n) if n > 0 && bytes < n * journal => p.push(format!(
                "{w}: enbd-node memory limit {bytes} B is below {n} volumes x {journal} B of journal"
            )),
            _ => {}
        }
    }
    // Snapshots: the sidecar and the class come together (both need the snapshot API).
    let runs_snapshotter = set.workloads().any(|(_, spec)| {
        containers(spec).any(|c| image_name(c.image.as_deref().unwrap_or("")) == "csi-snapshotter")
    });
    let has_class = set
        .objects
        .iter()
        .any(|o| matches!(o, Object::VolumeSnapshotClass(_)));
    if has_class && !runs_snapshotter {
        p.push("a VolumeSnapshotClass but no csi-snapshotter to serve it".to_string());
    }
}
