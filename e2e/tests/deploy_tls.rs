//! Management TLS as the chart deploys it: for every value set, the certificate Secrets (or
//! cert-manager Certificates) the pods mount exist, the binaries get the flags that use
//! them, and the NetworkPolicy admits exactly the intended peers. Then the certificates Helm
//! generated in the default render are used for real: an enbd-server started with the
//! server Secret accepts the controller Secret's certificate for everything and the node
//! Secret's only for what a node may call (the certificates rustls must accept are Helm's
//! own RSA/PKCS#1 ones, not test-made ones).
//!
//! What rendering cannot show: the `lookup` branch that keeps existing Secrets across
//! `helm upgrade` needs a cluster (`helm template` finds nothing, so every render issues new
//! material — checked below as "two renders differ"); README "Security" says how to check it
//! on a cluster.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod deploy_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use deploy_common::{Object, RenderSet, chart_renders};
use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{CreateVolumeRequest, GetMembershipRequest};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const TLS_DIR: &str = "/etc/enbd/tls";

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Container> {
    spec.containers.iter().find(|c| c.name == name)
}

/// Secret names the set provides: Secrets it renders and cert-manager Certificates' secretName.
fn provided_secrets(set: &RenderSet) -> Vec<String> {
    set.objects
        .iter()
        .filter_map(|o| match o {
            Object::Secret(s) => s.metadata.name.clone(),
            Object::CertManager(c) if c.kind == "Certificate" => {
                c.spec["secretName"].as_str().map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}

/// The Secret mounted at TLS_DIR in `c`, checked to be provided by the set.
fn tls_secret_of(
    set: &RenderSet,
    spec: &PodSpec,
    c: &Container,
    p: &mut Vec<String>,
) -> Option<String> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == TLS_DIR)?;
    let secret = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone());
    match &secret {
        Some(name) if provided_secrets(set).contains(name) => {}
        other => p.push(format!(
            "{}: {TLS_DIR} is not a Secret this set provides ({other:?})",
            c.name
        )),
    }
    secret
}

fn check_set(set: &RenderSet) -> Vec<String> {
    let mut p = Vec::new();
    let tls_on = !provided_secrets(set).is_empty();
    for (name, spec) in set.workloads() {
        let (cname, flags): (&str, &[&str]) = if let Some(_c) = container(spec, "enbd-server") {
            (
                "enbd-server",
                &[
                    "--mgmt-tls=require",
                    "--tls-cert=",
                    "--tls-key=",
                    "--mgmt-client-ca=",
                    "--tls=require",
                    "--tls-client-ca=",
                ],
            )
        } else if container(spec, "csi-driver").is_some() {
            (
                "csi-driver",
                &["--mgmt-tls-ca=", "--mgmt-tls-cert=", "--mgmt-tls-key="],
            )
        } else if container(spec, "enbd-node").is_some() {
            (
                "enbd-node",
                &["--tls-ca=", "--tls-cert=", "--tls-key=", "--tls=require"],
            )
        } else {
            continue;
        };
        let c = container(spec, cname).unwrap();
        let a = args(c);
        let secret = tls_secret_of(set, spec, c, &mut p);
        for f in flags {
            let found = a.iter().find(|x| x.starts_with(f));
            match (tls_on, found) {
                (true, None) => p.push(format!("{name}/{cname}: TLS on but no {f}")),
                (false, Some(x)) => p.push(format!("{name}/{cname}: TLS off but {x}")),
                (true, Some(x)) => {
                    if let Some((_, path)) = x.split_once('=').filter(|_| f.ends_with('='))
                        && !path.starts_with(TLS_DIR)
                    {
                        p.push(format!(
                            "{name}/{cname}: {x} is outside the mounted {TLS_DIR}"
                        ));
                    }
                }
                (false, None) => {}
            }
        }
        if tls_on && secret.is_none() {
            p.push(format!(
                "{name}/{cname}: TLS on but nothing mounted at {TLS_DIR}"
            ));
        }
        let who = match cname {
            "enbd-server" => "server",
            "csi-driver" => "controller",
            _ => "node",
        };
        if let Some(s) = &secret
            && !s.ends_with(&format!("-{who}-tls"))
        {
            p.push(format!(
                "{name}/{cname}: mounts {s}, not the {who} certificate"
            ));
        }
        if cname == "enbd-server" {
            // The kubelet's grpc probe speaks no TLS: it must target the plain health port.
            let health = a
                .iter()
                .find_map(|x| x.strip_prefix("--health-listen="))
                .and_then(|l| l.rsplit(':').next())
                .and_then(|port| port.parse::<i32>().ok());
            let probe = c.liveness_probe.as_ref().and_then(|pr| pr.grpc.as_ref());
            if probe.map(|g| g.port) != health || health.is_none() {
                p.push(format!(
                    "{name}: liveness grpc probe {probe:?} is not on --health-listen {health:?}"
                ));
            }
        }
    }
    // cert-manager: every Certificate's issuer exists in the set (or is an external one).
    let issuers: Vec<&str> = set
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::CertManager(c) if c.kind == "Issuer" => c.metadata.name.as_deref(),
            _ => None,
        })
        .collect();
    for o in &set.objects {
        if let Object::CertManager(c) = o
            && c.kind == "Certificate"
        {
            let issuer = c.spec["issuerRef"]["name"].as_str().unwrap_or("");
            if c.spec["issuerRef"]["kind"] == "Issuer" && !issuers.contains(&issuer) {
                p.push(format!(
                    "Certificate {}: Issuer {issuer:?} not rendered",
                    o.name()
                ));
            }
            let cn = c.spec["commonName"].as_str().unwrap_or("");
            if !o.name().ends_with("-ca")
                && !["enbd-server", "enbd-controller", "enbd-node"].contains(&cn)
            {
                p.push(format!(
                    "Certificate {}: CN {cn:?} is no management role",
                    o.name()
                ));
            }
        }
    }
    for o in &set.objects {
        if let Object::NetworkPolicy(np) = o {
            p.extend(check_network_policy(set, np));
        }
    }
    p.into_iter()
        .map(|m| format!("{}: {m}", set.name))
        .collect()
}

/// Labels that select the pods of a workload whose container is `name`.
fn pod_labels(set: &RenderSet, container_name: &str) -> Option<BTreeMap<String, String>> {
    set.objects.iter().find_map(|o| {
        let (_, spec) = o.pod_spec()?;
        container(spec, container_name)?;
        let template = match o {
            Object::Deployment(d) => &d.spec.template,
            Object::DaemonSet(d) => &d.spec.template,
            Object::StatefulSet(s) => &s.spec.template,
            _ => return None,
        };
        template.metadata.as_ref()?.labels.clone()
    })
}

fn selects(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn check_network_policy(set: &RenderSet, np: &NetworkPolicy) -> Vec<String> {
    let mut p = Vec::new();
    let spec = np.spec.as_ref().expect("NetworkPolicy spec");
    let labels = |c| pod_labels(set, c).unwrap_or_default();
    let (server, node, controller) = (
        labels("enbd-server"),
        labels("enbd-node"),
        labels("csi-driver"),
    );
    let sel = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    if !selects(&sel, &server) || selects(&sel, &node) {
        p.push(format!(
            "NetworkPolicy selects {sel:?}, not (only) the server pods"
        ));
    }
    // Port number → the pod label sets allowed (None: from anywhere).
    let mut allowed: BTreeMap<i32, Option<Vec<BTreeMap<String, String>>>> = BTreeMap::new();
    for rule in spec.ingress.iter().flatten() {
        let from: Option<Vec<BTreeMap<String, String>>> = rule.from.as_ref().map(|peers| {
            peers
                .iter()
                .filter_map(|peer| peer.pod_selector.as_ref()?.match_labels.clone())
                .collect()
        });
        for port in rule.ports.iter().flatten() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) =
                port.port
            {
                allowed.insert(n, from.clone());
            }
        }
    }
    let server_args: Vec<String> = set
        .workloads()
        .find_map(|(_, s)| container(s, "enbd-server"))
        .map(|c| args(c).iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    let port_of = |flag: &str, default: i32| {
        server_args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .and_then(|l| l.rsplit(':').next()?.parse().ok())
            .unwrap_or(default)
    };
    let admits = |port: i32, pods: &BTreeMap<String, String>| match allowed.get(&port) {
        None => false,
        Some(None) => true,
        Some(Some(sels)) => sels.iter().any(|s| selects(s, pods)),
    };
    let nbd = port_of("--listen=", 10809);
    let mgmt = port_of("--mgmt-listen=", 10810);
    if !admits(nbd, &node) || admits(nbd, &controller) || matches!(allowed.get(&nbd), Some(None)) {
        p.push(format!(
            "NBD port {nbd}: must admit node pods only ({allowed:?})"
        ));
    }
    if !admits(mgmt, &controller)
        || !admits(mgmt, &node)
        || matches!(allowed.get(&mgmt), Some(None))
    {
        p.push(format!(
            "management port {mgmt}: must admit the controller and node pods only"
        ));
    }
    let health = port_of("--health-listen=", 10811);
    if !matches!(allowed.get(&health), Some(None)) {
        p.push(format!(
            "health port {health}: kubelet probes must reach it"
        ));
    }
    p
}

#[test]
fn tls_flags_mounts_certificates_and_network_policies_agree() {
    let sets = chart_renders();
    let problems: Vec<String> = sets.iter().flat_map(check_set).collect();
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let by_name = |n: &str| {
        sets.iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("set {n}"))
    };
    // The defaults: TLS from Helm, NetworkPolicy on. The lab set: neither.
    let default = by_name("default");
    assert!(
        default
            .objects
            .iter()
            .any(|o| matches!(o, Object::NetworkPolicy(_)))
    );
    assert_eq!(
        provided_secrets(default).len(),
        4,
        "CA + server + controller + node"
    );
    let lab = by_name("notls");
    assert!(provided_secrets(lab).is_empty());
    assert!(
        !lab.objects
            .iter()
            .any(|o| matches!(o, Object::NetworkPolicy(_)))
    );
    let cm = by_name("certmanager");
    assert!(
        cm.objects
            .iter()
            .any(|o| matches!(o, Object::CertManager(_)))
    );
    assert!(!cm.objects.iter().any(|o| matches!(o, Object::Secret(_))));
}

/// The Secrets of a render: name → key → decoded bytes.
fn secrets(set: &RenderSet) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    set.objects
        .iter()
        .filter_map(|o| match o {
            Object::Secret(s) => Some((
                s.metadata.name.clone().unwrap(),
                s.data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn helm_certificates_chain_to_the_ca_and_two_renders_differ() {
    let sets = chart_renders();
    let default = sets.iter().find(|s| s.name == "default").unwrap();
    let s = secrets(default);
    let ca = &s["enbd-csi-ca"]["tls.crt"];
    for who in ["server", "controller", "node"] {
        let leaf = &s[&format!("enbd-csi-{who}-tls")];
        assert_eq!(
            &leaf["ca.crt"], ca,
            "{who}: ca.crt is not the CA's certificate"
        );
        for k in ["tls.crt", "tls.key"] {
            assert!(
                String::from_utf8_lossy(&leaf[k]).contains("-----BEGIN"),
                "{who} {k}"
            );
        }
    }
    // Without a cluster `lookup` finds nothing: the kind render (same release) has its own CA.
    let kind = secrets(sets.iter().find(|s| s.name == "kind").unwrap());
    assert_ne!(
        &kind["enbd-csi-ca"]["tls.crt"], ca,
        "two renders issued the same CA"
    );
}

fn enbd_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENBD_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("enbd-server");
    assert!(
        bin.exists(),
        "build enbd-server first (cargo build -p enbd-server): {}",
        bin.display()
    );
    bin
}

async fn channel(port: u16, ca: &[u8], leaf: &BTreeMap<String, Vec<u8>>) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(&leaf["tls.crt"], &leaf["tls.key"]))
        // The name pod 0 is dialled by (discovery under TLS); the certificate has the wildcard.
        .domain_name("enbd-csi-server-0.enbd-csi-server.enbd-csi.svc");
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn helm_generated_certificates_work_with_the_real_server() {
    let sets = chart_renders();
    let s = secrets(sets.iter().find(|s| s.name == "default").unwrap());
    let dir = tempfile_dir();
    let server = &s["enbd-csi-server-tls"];
    for (k, v) in server {
        std::fs::write(dir.join(k), v).unwrap();
    }
    let (mut child, ready) = enbd_server::ready::spawn_until_ready(
        Command::new(enbd_server_bin())
            .args([
                "--demo",
                "--server-id=enbd-csi-server-0",
                "--listen=127.0.0.1:0",
            ])
            .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg("--mgmt-tls=require")
            .arg(format!("--tls-cert={}", dir.join("tls.crt").display()))
            .arg(format!("--tls-key={}", dir.join("tls.key").display()))
            .arg(format!("--mgmt-client-ca={}", dir.join("ca.crt").display()))
            // The chart's data-path flags too: the same certificate, node certificates required.
            .arg("--tls=require")
            .arg(format!("--tls-client-ca={}", dir.join("ca.crt").display()))
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let port = ready.mgmt.port();
    let ca = &s["enbd-csi-ca"]["tls.crt"];
    let outcome = async {
        let c = channel(port, ca, &s["enbd-csi-controller-tls"]).await;
        VolumeServiceClient::new(c)
            .create_volume(CreateVolumeRequest {
                name: "from-helm-certs".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })
            .await
            .expect("controller certificate creates");
        let n = channel(port, ca, &s["enbd-csi-node-tls"]).await;
        ReplicaServiceClient::new(n.clone())
            .get_membership(GetMembershipRequest {
                volume: "demo".into(),
            })
            .await
            .expect("node certificate reads membership");
        let e = VolumeServiceClient::new(n)
            .create_volume(CreateVolumeRequest {
                name: "by-node".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A fresh directory under the system temp dir (e2e has no tempfile dependency).
fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("enbd-deploy-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
