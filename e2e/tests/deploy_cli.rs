//! The chart's container args against the binaries' real command lines: each ENBD
//! container's args, with `$(VAR)` filled in as kubelet would, are parsed by that binary's
//! own `Cli` and validated into its config; the ports it would bind must be the ports the
//! pod declares. StorageClass parameters go through the controller's own validation.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

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
        let value = match e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
        {
            Some("metadata.name") => format!("{workload}-0"),
            Some("metadata.namespace") => deploy_common::NAMESPACE.to_string(),
            Some("spec.nodeName") => "kind-worker".to_string(),
            Some(other) => panic!(
                "{workload}/{}: env {} from unexpected field {other}",
                c.name, e.name
            ),
            None => e.value.clone().unwrap_or_default(),
        };
        out = out.replace(&format!("$({})", e.name), &value);
    }
    assert!(
        !out.contains("$("),
        "{workload}/{}: unexpanded variable in {arg:?}",
        c.name
    );
    out
}

fn argv(binary: &str, workload: &str, c: &Container) -> Vec<String> {
    std::iter::once(binary.to_string())
        .chain(args(c).iter().map(|a| expand(a, workload, c)))
        .collect()
}

fn declared(c: &Container, name: &str) -> Option<u16> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn mount_of(c: &Container, path: &std::path::Path) -> bool {
    c.volume_mounts
        .iter()
        .flatten()
        .any(|m| std::path::Path::new(&m.mount_path) == path)
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
            p.push(format!(
                "{set}: {w}: {what} binds {bound}, port {port:?} is {:?}",
                declared(c, port)
            ));
        }
    }
    if cfg.server_id.to_string() != format!("{w}-0") {
        p.push(format!(
            "{set}: {w}: server id {} is not the pod name",
            cfg.server_id
        ));
    }
    if !mount_of(c, &cfg.data_dir) {
        p.push(format!(
            "{set}: {w}: data dir {} is not a volume mount",
            cfg.data_dir.display()
        ));
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

/// The unix socket path of a CSI endpoint, if its directory is mounted into the container.
fn socket_mounted(c: &Container, socket: &std::path::Path) -> bool {
    socket.parent().is_some_and(|dir| mount_of(c, dir))
}

fn check_controller(set: &str, w: &str, c: &Container) -> Vec<String> {
    let argv = argv("csi-driver", w, c);
    let cli = match csi_driver::cli::Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return vec![format!("{set}: {w}: csi-driver rejects {argv:?}: {e}")],
    };
    let cfg = match csi_driver::config::Config::from_cli(&cli) {
        Ok(cfg) => cfg,
        Err(e) => return vec![format!("{set}: {w}: csi-driver config from {argv:?}: {e}")],
    };
    let mut p = Vec::new();
    if !socket_mounted(c, &cfg.socket_path) {
        p.push(format!(
            "{set}: {w}: CSI socket {} is not on a shared volume",
            cfg.socket_path.display()
        ));
    }
    if cfg.metrics_listen.map(|a| a.port()) != declared(c, "metrics") {
        p.push(format!(
            "{set}: {w}: metrics on {:?}, port \"metrics\" is {:?}",
            cfg.metrics_listen,
            declared(c, "metrics")
        ));
    }
    if let csi_driver::config::Discovery::Kubernetes {
        namespace,
        selector,
    } = &cfg.discovery
    {
        if namespace.is_none() {
            p.push(format!(
                "{set}: {w}: discovery namespace left to the driver's guess"
            ));
        }
        if selector.is_empty() {
            p.push(format!("{set}: {w}: empty server selector"));
        }
    }
    p
}

fn check_node(set: &str, w: &str, c: &Container) -> Vec<String> {
    use enbd_node::cli::{Cli, Command};
    let argv = argv("enbd-node", w, c);
    let daemon = match Cli::try_parse_from(&argv) {
        Ok(Cli {
            command: Command::Daemon(d),
        }) => d,
        Ok(other) => {
            return vec![format!(
                "{set}: {w}: enbd-node runs {:?}, not the daemon",
                other.command
            )];
        }
        Err(e) => return vec![format!("{set}: {w}: enbd-node rejects {argv:?}: {e}")],
    };
    let mut p = Vec::new();
    match daemon
        .csi_endpoint
        .as_deref()
        .and_then(|e| e.strip_prefix("unix://"))
    {
        Some(sock) if socket_mounted(c, std::path::Path::new(sock)) => {}
        other => p.push(format!(
            "{set}: {w}: CSI endpoint {other:?} is not a unix socket on a shared volume"
        )),
    }
    if daemon.node_id.as_deref() != Some("kind-worker") {
        p.push(format!(
            "{set}: {w}: --node-id {:?} is not the node name",
            daemon.node_id
        ));
    }
    if !mount_of(c, &daemon.state_dir) {
        p.push(format!(
            "{set}: {w}: state dir {} is not a volume mount",
            daemon.state_dir.display()
        ));
    }
    if !socket_mounted(c, &daemon.control.control_socket) {
        p.push(format!(
            "{set}: {w}: control socket {} is not on a mounted directory",
            daemon.control.control_socket.display()
        ));
    }
    if declared(c, "metrics") != Some(daemon.metrics_listen.port()) {
        p.push(format!(
            "{set}: {w}: metrics on {}, port \"metrics\" is {:?}",
            daemon.metrics_listen,
            declared(c, "metrics")
        ));
    }
    p
}

fn check_binaries(
    sets: &[RenderSet],
    targets: &[ImageTarget],
) -> (Vec<String>, HashMap<String, usize>) {
    let mut problems = Vec::new();
    let mut checked: HashMap<String, usize> = HashMap::new();
    for set in sets {
        for (w, spec, c, target) in enbd_containers(set, targets) {
            let found = match target.binary.as_str() {
                "enbd-server" => check_server(&set.name, w, spec, c),
                "csi-driver" => check_controller(&set.name, w, c),
                "enbd-node" => check_node(&set.name, w, c),
                other => vec![format!(
                    "{}: {w}: no CLI check for binary {other}",
                    set.name
                )],
            };
            *checked.entry(target.binary.clone()).or_default() += 1;
            problems.extend(found);
        }
    }
    (problems, checked)
}

#[test]
fn container_args_parse_with_the_binaries_real_clis() {
    let targets = dockerfile_targets(&repo_root());
    let mut sets = chart_renders();
    let renders = sets.len();
    sets.extend(manifest_files());
    let (problems, checked) = check_binaries(&sets, &targets);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // Every render and the manifests run a controller and a node plugin; default,
    // hostpath, servers-custom-ports and the manifests run servers.
    assert_eq!(
        checked.get("csi-driver").copied(),
        Some(renders + 1),
        "{checked:?}"
    );
    assert_eq!(
        checked.get("enbd-node").copied(),
        Some(renders + 1),
        "{checked:?}"
    );
    assert!(
        checked.get("enbd-server").copied().unwrap_or(0) >= 4,
        "{checked:?}"
    );
}

#[test]
fn the_cli_checks_reject_what_the_binaries_reject() {
    // Guards against a check that passes whatever it is given.
    let bad_server =
        enbd_server::cli::Cli::try_parse_from(["enbd-server", "--data-dir=/d", "--listen=nowhere"]);
    assert!(bad_server.is_err());
    let bad_node =
        enbd_node::cli::Cli::try_parse_from(["enbd-node", "daemon", "--metrics-listen=:x"]);
    assert!(bad_node.is_err());
    let cli = csi_driver::cli::Cli::try_parse_from(["csi-driver", "--discovery=static"])
        .expect("syntax is fine");
    assert!(
        csi_driver::config::Config::from_cli(&cli).is_err(),
        "static discovery without servers"
    );
}

#[test]
fn storage_class_parameters_pass_the_controllers_validation() {
    let mut sets = chart_renders();
    sets.extend(manifest_files());
    let mut problems = Vec::new();
    let mut classes = 0;
    for set in &sets {
        for o in &set.objects {
            let Object::StorageClass(sc) = o else {
                continue;
            };
            classes += 1;
            let params: HashMap<String, String> = sc
                .parameters
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            if let Err(e) = enbd_proto::params::VolumeParams::from_map(&params) {
                problems.push(format!("{}: StorageClass {}: {e}", set.name, o.name()));
            }
            let fs = params
                .get("csi.storage.k8s.io/fstype")
                .map(String::as_str)
                .unwrap_or("");
            if !["", "ext4", "xfs"].contains(&fs) {
                problems.push(format!(
                    "{}: StorageClass {}: fstype {fs} has no mkfs in the node image",
                    set.name,
                    o.name()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(classes >= 5, "only {classes} StorageClasses checked");
    // The validation is real: an unknown key is refused.
    let bogus = HashMap::from([("chanels".to_string(), "4".to_string())]);
    assert!(enbd_proto::params::VolumeParams::from_map(&bogus).is_err());
}

/// Every argument of `cmd` and its subcommands that has no help text, as `path --flag`.
fn args_without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    let path = format!("{path} {}", cmd.get_name()).trim().to_owned();
    for a in cmd.get_arguments() {
        let help = a.get_help().or(a.get_long_help());
        if help.is_none_or(|h| h.to_string().trim().is_empty()) {
            let name = a
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| format!("<{}>", a.get_id()));
            out.push(format!("{path} {name}"));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.get_about().is_none() {
            out.push(format!(
                "{path} {} (subcommand without about)",
                sub.get_name()
            ));
        }
        args_without_help(sub, &path, out);
    }
}

#[test]
fn every_flag_of_every_binary_has_help_text() {
    use clap::CommandFactory;
    let mut missing = Vec::new();
    for mut cmd in [
        enbd_server::cli::Cli::command(),
        enbd_node::cli::Cli::command(),
        csi_driver::cli::Cli::command(),
    ] {
        // Materialises the built-in --help/--version so that they are walked too.
        cmd.build();
        args_without_help(&cmd, "", &mut missing);
    }
    assert!(
        missing.is_empty(),
        "flags without help text:\n{}",
        missing.join("\n")
    );
}
