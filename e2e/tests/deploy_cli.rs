//! The chart's container args against the binaries' real command lines: each ENBD
//! container's args, with `$(VAR)` filled in as kubelet would, are parsed by that binary's
//! own `Cli` and validated into its config; the ports it would bind must be the ports the
//! pod declares. StorageClass parameters go through the controller's own validation.

mod deploy_common;

use std::collections::HashMap;

use clap::Parser;
use deploy_common::checks::{ImageTarget, args, dockerfile_targets, enbd_containers};
use deploy_common::{Object, RenderSet, chart_renders, manifest_files, repo_root};
use k8s_openapi::api::core::v1::{Container, PodSpec};

/// What kubelet substitutes for `$(VAR)`: the downward-API fields the chart uses.
fn expand(arg: &str, workload: &str, c: &Container) -> String {
    let mut out = arg.to_string();
    for e in c.env.iter().flatten() {
        let value = match e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()) {
            Some("metadata.name") => format!("{workload}-0"),
            Some("metadata.namespace") => deploy_common::NAMESPACE.to_string(),
            Some("spec.nodeName") => "kind-worker".to_string(),
            Some(other) => panic!("{workload}/{}: env {} from unexpected field {other}", c.name, e.name),
            None => e.value.clone().unwrap_or_default(),
        };
        out = out.replace(&format!("$({})", e.name), &value);
    }
    assert!(!out.contains("$("), "{workload}/{}: unexpanded variable in {arg:?}", c.name);
    out
}

fn argv(binary: &str, workload: &str, c: &Container) -> Vec<String> {
    std::iter::once(binary.to_string()).chain(args(c).iter().map(|a| expand(a, workload, c))).collect()
}

fn declared(c: &Container, name: &str) -> Option<u16> {
    c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).and_then(|p| u16::try_from(p.container_port).ok())
}

fn mount_of(c: &Container, path: &std::path::Path) -> bool {
    c.volume_mounts.iter().flatten().any(|m| std::path::Path::new(&m.mount_path) == path)
}

fn check_server(set: &str, w: &str, spec: &PodSpec, c: &Container) -> Vec<String> {
    let argv = argv("enbd-server", w, c);
    let cli = match enbd_server::cli::Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return vec![format!("{set}: {w}: enbd-server rejects {argv:?}: {e}")],
    };
    let cfg = match cli.into_config() {
        Ok(cfg) => cfg,
        Err(e) => return vec![format!("{set}: {w}: enbd-server config from {argv:?}: {e}")],
    };
    let mut p = Vec::new();
    for (what, bound, port) in [
        ("--listen", cfg.listen.port(), "nbd"),
        ("--mgmt-listen", cfg.mgmt_listen.port(), "mgmt"),
        ("--metrics-listen", cfg.metrics_listen.port(), "metrics"),
    ] {
        if declared(c, port) != Some(bound) {
            p.push(format!("{set}: {w}: {what} binds {bound}, port {port:?} is {:?}", declared(c, port)));
        }
    }
    if cfg.server_id.to_string() != format!("{w}-0") {
        p.push(format!("{set}: {w}: server id {} is not the pod name", cfg.server_id));
    }
    if !mount_of(c, &cfg.data_dir) {
        p.push(format!("{set}: {w}: data dir {} is not a volume mount", cfg.data_dir.display()));
    }
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    if u64::try_from(grace).unwrap_or(0) <= cfg.shutdown_grace.as_secs() {
        p.push(format!(
            "{set}: {w}: terminationGracePeriodSeconds {grace} does not exceed the server's shutdown grace {:?}",
            cfg.shutdown_grace
        ));
    }
    p
}

fn check_binaries(sets: &[RenderSet], targets: &[ImageTarget]) -> (Vec<String>, HashMap<String, usize>) {
    let mut problems = Vec::new();
    let mut checked: HashMap<String, usize> = HashMap::new();
    for set in sets {
        for (w, spec, c, target) in enbd_containers(set, targets) {
            let found = match target.binary.as_str() {
                "enbd-server" => check_server(&set.name, w, spec, c),
                _ => continue,
            };
            *checked.entry(target.binary.clone()).or_default() += 1;
            problems.extend(found);
        }
    }
    (problems, checked)
}

#[test]
fn server_args_parse_with_the_real_enbd_server_cli() {
    let targets = dockerfile_targets(&repo_root());
    let mut sets = chart_renders();
    sets.extend(manifest_files());
    let (problems, checked) = check_binaries(&sets, &targets);
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    // Default, hostpath, servers-custom-ports and the manifests run servers.
    assert!(checked.get("enbd-server").copied().unwrap_or(0) >= 4, "server containers checked: {checked:?}");
}

#[test]
fn storage_class_parameters_pass_the_controllers_validation() {
    let mut sets = chart_renders();
    sets.extend(manifest_files());
    let mut problems = Vec::new();
    let mut classes = 0;
    for set in &sets {
        for o in &set.objects {
            let Object::StorageClass(sc) = o else { continue };
            classes += 1;
            let params: HashMap<String, String> = sc.parameters.clone().unwrap_or_default().into_iter().collect();
            if let Err(e) = enbd_proto::params::VolumeParams::from_map(&params) {
                problems.push(format!("{}: StorageClass {}: {e}", set.name, o.name()));
            }
            let fs = params.get("csi.storage.k8s.io/fstype").map(String::as_str).unwrap_or("");
            if !["", "ext4", "xfs"].contains(&fs) {
                problems.push(format!("{}: StorageClass {}: fstype {fs} has no mkfs in the node image", set.name, o.name()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(classes >= 5, "only {classes} StorageClasses checked");
    // The validation is real: an unknown key is refused.
    let bogus = HashMap::from([("chanels".to_string(), "4".to_string())]);
    assert!(enbd_proto::params::VolumeParams::from_map(&bogus).is_err());
}
