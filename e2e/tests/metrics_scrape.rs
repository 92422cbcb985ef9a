//! Metrics of the three binaries, scraped as Prometheus would while IO runs, parsed with the
//! strict text-format parser of the test harness (`enbd_test_harness::prom`), and the
//! chart's alert rules and dashboard queries checked against what the binaries export.
//!
//! Real processes on 127.0.0.1: an `enbd-server`, `enbd-node bench --metrics-listen` (the
//! node's engine and device-side target without a ublk device, which this machine lacks:
//! the same volume series the daemon exports for an attachment), and `csi-driver` with a
//! static server list. The binaries are found beside this test (`cargo build -p
//! enbd-server -p enbd-node -p csi-driver` first, or a workspace build).
//!
//! Each exposition also goes through `promtool check metrics` (Debian's `prometheus`
//! package, which e2e/setup-host.sh --test installs; `$PROMTOOL` names another). The chart's
//! rules go through `promtool check rules` in e2e/chart/check.sh; here every alert and
//! dashboard expression is checked to name only metrics the binaries export.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use enbd_proto::csi::controller_client::ControllerClient;
use enbd_proto::csi::volume_capability::access_mode::Mode;
use enbd_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use enbd_proto::csi::{CapacityRange, CreateVolumeRequest, VolumeCapability};
use enbd_test_harness::lines::{field, wait_for_line};
use enbd_test_harness::prom::{self, Exposition};
use enbd_test_harness::{EnbdServer, bin, unix_channel};
use tokio::process::{Child, Command};

const READY: Duration = Duration::from_secs(60);

/// Scrapes `addr` until `ok` holds for the parsed exposition (each scrape must parse);
/// panics with the last one if it never does within a minute.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + READY;
    loop {
        let e = tokio::task::spawn_blocking(move || prom::scrape_parsed(addr))
            .await
            .unwrap();
        if ok(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen on {addr}: {e:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn raw_scrape(addr: SocketAddr) -> String {
    let (ctype, body) = prom::scrape(addr);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    body
}

struct Bench {
    _child: Child,
    metrics: SocketAddr,
}

/// `enbd-node bench` doing random 4 KiB reads and writes on two channels until killed.
async fn start_bench(server: &EnbdServer) -> Bench {
    let mut child = Command::new(bin::built("enbd-node", "ENBD_NODE_BIN"))
        .arg("bench")
        .arg(format!("--server={}", server.nbd()))
        .args(["--export=demo", "--rw=randrw", "--bs=4k", "--range=64m"])
        .args(["--channels=2", "--depth=2", "--seconds=600", "--ramp=0"])
        .arg("--metrics-listen=127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn enbd-node bench");
    let line = wait_for_line(&mut child, "enbd-node bench ready", READY).await;
    Bench {
        metrics: field(&line, "metrics").parse().unwrap(),
        _child: child,
    }
}

struct Controller {
    _child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    metrics: SocketAddr,
}

async fn start_controller(server: &EnbdServer) -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(bin::built("csi-driver", "CSI_DRIVER_BIN"))
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .args(["--discovery=static", "--nodes=node-1"])
        .arg(format!("--servers={}={}", server.id(), server.mgmt_url()))
        .arg("--metrics-listen=127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn csi-driver");
    let line = wait_for_line(&mut child, "csi-driver ready", READY).await;
    Controller {
        metrics: field(&line, "metrics").parse().unwrap(),
        socket,
        _child: child,
        _dir: dir,
    }
}

/// The three expositions, scraped while IO runs, after the checks that IO moves them.
struct Scrapes {
    node: Exposition,
    server: Exposition,
    controller: Exposition,
    node_body: String,
    /// Raw bodies of the three, for promtool.
    bodies: Vec<(&'static str, String)>,
}

/// `promtool check metrics` on `body`: panics with its findings unless it is clean.
fn promtool_check_metrics(what: &str, body: &str) {
    use std::io::Write;
    let tool = std::env::var_os("PROMTOOL").unwrap_or_else(|| "promtool".into());
    let mut child = std::process::Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {tool:?}: {e} (Debian package prometheus: e2e/setup-host.sh --test \
                 installs it; or set PROMTOOL)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on the {what} exposition: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn scrape_all() -> Scrapes {
    let server = EnbdServer::builder().demo().start();
    let bench = start_bench(&server).await;
    let vol = [("volume", "demo")];

    // Node: the volume's series move while the bench runs.
    let first = scrape_until(bench.metrics, "node IO", |e| {
        e.sum("enbd_node_volume_bytes_total", &[("op", "write")]) > 0.0
            && e.sum("enbd_node_volume_bytes_total", &[("op", "read")]) > 0.0
    })
    .await;
    let w0 = first.value("enbd_node_volume_bytes_total", &[vol[0], ("op", "write")]);
    let r0 = first.value("enbd_node_volume_bytes_total", &[vol[0], ("op", "read")]);
    let node = scrape_until(bench.metrics, "node bytes growing", |e| {
        e.value("enbd_node_volume_bytes_total", &[vol[0], ("op", "write")]) > w0
            && e.value("enbd_node_volume_bytes_total", &[vol[0], ("op", "read")]) > r0
    })
    .await;
    assert_eq!(node.kind("enbd_node_volume_bytes_total"), Some("counter"));
    assert_eq!(
        node.kind("enbd_node_volume_request_duration_seconds"),
        Some("histogram")
    );
    let writes = node.value(
        "enbd_node_volume_requests_total",
        &[vol[0], ("op", "write")],
    );
    assert!(writes > 0.0);
    // Bytes per write are 4 KiB exactly: the byte counter and the request counter agree
    // (both counted at completion; a scrape can fall between the two additions of one
    // request, hence the small slack).
    let wbytes = node.value("enbd_node_volume_bytes_total", &[vol[0], ("op", "write")]);
    assert!(
        (wbytes / 4096.0 - writes).abs() <= 8.0,
        "{wbytes} bytes for {writes} writes"
    );
    assert!(
        node.value(
            "enbd_node_volume_request_duration_seconds_count",
            &[vol[0], ("op", "read")]
        ) > 0.0
    );
    assert!(
        node.value(
            "enbd_node_volume_request_duration_seconds_sum",
            &[vol[0], ("op", "read")]
        ) > 0.0
    );
    assert_eq!(node.sum("enbd_node_volume_errors_total", &vol), 0.0);
    assert_eq!(node.value("enbd_node_volume_eio_total", &vol), 0.0);
    assert_eq!(
        node.value("enbd_node_volume_size_bytes", &vol),
        (1u64 << 30) as f64
    );
    assert_eq!(
        node.value("enbd_node_engine_state", &[vol[0], ("state", "healthy")]),
        1.0
    );
    assert_eq!(
        node.sum("enbd_node_engine_state", &vol),
        1.0,
        "one state at a time"
    );
    assert_eq!(
        node.sum("enbd_node_channel_state", &[vol[0], ("state", "up")]),
        2.0
    );
    for ch in ["0", "1"] {
        let l = [vol[0], ("channel", ch)];
        assert!(node.value("enbd_node_channel_connects_total", &l) >= 1.0);
        assert!(node.value("enbd_node_channel_completed_requests_total", &l) > 0.0);
        assert_eq!(
            node.value("enbd_node_channel_reissued_requests_total", &l),
            0.0
        );
    }
    assert!(node.value("enbd_node_journal_capacity_bytes", &vol) > 0.0);
    assert_eq!(node.value("enbd_node_brownout_seconds_total", &vol), 0.0);
    assert_eq!(node.value("enbd_node_brownout_current_seconds", &vol), 0.0);
    let node_body = raw_scrape(bench.metrics);

    // Server: the export's series move too.
    let ex = ("export", "demo");
    let s0 = scrape_until(server.metrics(), "server IO", |e| {
        e.sum("enbd_server_export_written_bytes_total", &[ex]) > 0.0
    })
    .await;
    let sw0 = s0.value("enbd_server_export_written_bytes_total", &[ex]);
    let srv = scrape_until(server.metrics(), "server bytes growing", |e| {
        e.value("enbd_server_export_written_bytes_total", &[ex]) > sw0
    })
    .await;
    assert!(srv.value("enbd_server_export_read_bytes_total", &[ex]) > 0.0);
    assert!(
        srv.value(
            "enbd_server_export_requests_total",
            &[ex, ("command", "read")]
        ) > 0.0
    );
    assert!(
        srv.value(
            "enbd_server_export_request_duration_seconds_count",
            &[ex, ("command", "write")]
        ) > 0.0
    );
    assert_eq!(srv.value("enbd_server_export_connections", &[ex]), 2.0);
    assert_eq!(srv.sum("enbd_server_export_errors_total", &[ex]), 0.0);
    assert_eq!(srv.value("enbd_server_volumes", &[]), 1.0);
    assert!(srv.value("enbd_server_data_dir_free_bytes", &[]) > 0.0);
    assert!(srv.value("enbd_server_connections_total", &[]) >= 2.0);

    // Controller: a CreateVolume is counted with its latency; the server's health and
    // space come from the prober.
    let ctl = start_controller(&server).await;
    scrape_until(ctl.metrics, "server probed", |e| {
        e.samples("enbd_csi_controller_server_up", &[("server", server.id())])
            .any(|s| s.value == 1.0)
            && e.sum("enbd_csi_controller_server_free_bytes", &[]) > 0.0
    })
    .await;
    let channel = unix_channel(&ctl.socket).await.expect("CSI socket");
    let mut client = ControllerClient::new(channel);
    client
        .create_volume(CreateVolumeRequest {
            name: "pvc-metrics".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }],
            ..Default::default()
        })
        .await
        .expect("CreateVolume");
    let ok = [("method", "CreateVolume"), ("code", "OK")];
    let controller = scrape_until(ctl.metrics, "CreateVolume counted", |e| {
        e.sum("enbd_csi_controller_rpcs_total", &ok) == 1.0
    })
    .await;
    assert_eq!(
        controller.value("enbd_csi_controller_rpc_duration_seconds_count", &ok),
        1.0
    );
    assert!(controller.value("enbd_csi_controller_rpc_duration_seconds_sum", &ok) > 0.0);
    assert_eq!(
        controller.value(
            "enbd_csi_controller_rpcs_in_flight",
            &[("method", "CreateVolume")]
        ),
        0.0
    );
    assert_eq!(
        controller.value("enbd_csi_controller_operations_in_progress", &[]),
        0.0
    );
    let srv_exp = scrape_until(server.metrics(), "the new volume counted", |e| {
        e.value("enbd_server_volumes", &[]) == 2.0
    })
    .await;
    let bodies = vec![
        ("node", node_body.clone()),
        ("server", raw_scrape(server.metrics())),
        ("controller", raw_scrape(ctl.metrics)),
    ];
    Scrapes {
        node,
        server: srv_exp,
        controller,
        node_body,
        bodies,
    }
}

/// Every sample name the expositions can contain (histograms with their three series).
fn exported_names(all: &[&Exposition]) -> HashSet<String> {
    let mut names = HashSet::new();
    for e in all {
        for (name, f) in &e.families {
            names.insert(name.clone());
            if f.kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        }
    }
    names
}

/// Checks one PromQL expression as far as this test can: brackets and quotes balance, no
/// template hole is left, and every `enbd_*` identifier is an exported metric.
fn check_expr(expr: &str, names: &HashSet<String>, whence: &str) {
    let mut stack = Vec::new();
    let mut in_str = false;
    let mut prev = ' ';
    for c in expr.chars() {
        if in_str {
            if c == '"' && prev != '\\' {
                in_str = false;
            }
        } else {
            match c {
                '"' => in_str = true,
                '(' | '[' | '{' => stack.push(c),
                ')' | ']' | '}' => {
                    let open = stack.pop();
                    let want = match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    };
                    assert_eq!(open, Some(want), "{whence}: unbalanced {c:?} in {expr:?}");
                }
                _ => {}
            }
        }
        prev = c;
    }
    assert!(
        stack.is_empty() && !in_str,
        "{whence}: unclosed bracket or quote in {expr:?}"
    );
    let mut used = 0;
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("enbd_") {
            used += 1;
            assert!(
                names.contains(word),
                "{whence}: {word} is not exported by any binary (expr {expr:?})"
            );
        }
    }
    assert!(used > 0, "{whence}: names no enbd metric: {expr:?}");
}

/// The `expr:` values of a PrometheusRule template, with Helm's `{{ ... }}` holes filled by
/// a number (the thresholds are values).
fn rule_exprs(template: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    let lines: Vec<&str> = template.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(a) = t.strip_prefix("- alert:") {
            alert = a.trim().to_owned();
        }
        if let Some(e) = t.strip_prefix("expr:") {
            let mut expr = e.trim().to_owned();
            if expr == "|" || expr == ">" {
                let indent = lines[i].len() - t.len();
                expr.clear();
                while i + 1 < lines.len() {
                    let n = lines[i + 1];
                    let nt = n.trim_start();
                    if !nt.is_empty() && n.len() - nt.len() <= indent {
                        break;
                    }
                    expr.push_str(nt);
                    expr.push(' ');
                    i += 1;
                }
            }
            out.push((alert.clone(), fill_holes(&expr)));
        }
        i += 1;
    }
    out
}

fn fill_holes(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(a) = rest.find("{{") {
        out.push_str(&rest[..a]);
        let b = rest[a..].find("}}").expect("unclosed template hole") + a;
        out.push('1');
        rest = &rest[b + 2..];
    }
    out.push_str(rest);
    out
}

fn collect_json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "expr"
                    && let Some(s) = x.as_str()
                {
                    out.push(s.to_owned());
                }
                collect_json_exprs(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_json_exprs(x, out)),
        _ => {}
    }
}

fn chart_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/enbd-csi")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test]
async fn each_binary_exports_well_formed_metrics_that_follow_io() {
    let s = scrape_all().await;
    for (what, body) in &s.bodies {
        promtool_check_metrics(what, body);
    }

    // The parser refuses a malformed sample taken from the real output.
    let line = s
        .node_body
        .lines()
        .find(|l| l.starts_with("enbd_node_volume_bytes_total{"))
        .expect("a volume bytes sample")
        .to_owned();
    for broken in [
        line.replacen("} ", " ", 1),             // unterminated label set
        line.replacen("=\"", "=", 1),            // unquoted label value
        format!("{line}\n{line}"),               // the same series twice
        line.replacen("_total{", "_total {", 1), // space before the labels
    ] {
        let body = s.node_body.replacen(&line, &broken, 1);
        assert!(
            prom::parse(&body).is_err(),
            "malformed sample accepted: {broken:?}"
        );
    }
    // A counter reported without its _total suffix is refused too.
    let renamed = s
        .node_body
        .replace("enbd_node_volume_eio_total", "enbd_node_volume_eio");
    assert!(prom::parse(&renamed).is_err());
    // And the unmodified body passes (the comparison above is meaningful).
    prom::parse(&s.node_body).unwrap();

    // Alert rules and dashboard queries only name what the binaries export.
    let names = exported_names(&[&s.node, &s.server, &s.controller]);
    let rules = rule_exprs(&chart_file("templates/metrics-prometheusrule.yaml"));
    let alerts: HashSet<&str> = rules.iter().map(|(a, _)| a.as_str()).collect();
    for want in [
        "EnbdServerDown",
        "EnbdVolumeDegraded",
        "EnbdVolumeBrownout",
        "EnbdJournalFull",
        "EnbdResyncStalled",
    ] {
        assert!(alerts.contains(want), "alert {want} missing: {alerts:?}");
    }
    for (alert, expr) in &rules {
        check_expr(expr, &names, alert);
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&chart_file("files/grafana-dashboard.json")).unwrap();
    let mut queries = Vec::new();
    collect_json_exprs(&dashboard, &mut queries);
    assert!(
        queries.len() >= 8,
        "dashboard has {} queries",
        queries.len()
    );
    for q in &queries {
        check_expr(q, &names, "dashboard");
    }
}

#[test]
fn expression_checks_refuse_unknown_metrics_and_broken_brackets() {
    let names: HashSet<String> = ["enbd_a_total".to_owned()].into();
    check_expr("rate(enbd_a_total[5m]) > 0", &names, "ok");
    for bad in [
        "rate(enbd_b_total[5m]) > 0",
        "rate(enbd_a_total[5m] > 0",
        "enbd_a_total{x=\"y} > 0",
    ] {
        let r = std::panic::catch_unwind(|| check_expr(bad, &names, "bad"));
        assert!(r.is_err(), "accepted {bad:?}");
    }
    let rules = rule_exprs(
        "  - alert: A\n    expr: |\n      sum(enbd_a_total)\n        > {{ .Values.x }}\n    for: 1m\n  - alert: B\n    expr: enbd_a_total > 0\n",
    );
    assert_eq!(
        rules,
        vec![
            ("A".into(), "sum(enbd_a_total) > 1 ".into()),
            ("B".into(), "enbd_a_total > 0".into())
        ]
    );
}
