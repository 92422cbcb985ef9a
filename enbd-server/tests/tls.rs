//! TLS on the data path (NBD_OPT_STARTTLS) against standard NBD TLS clients: libnbd's
//! `nbdinfo`/`nbdcopy` (`nbds://` URIs) and `qemu-img` (`tls-creds-x509`), with the server
//! requiring TLS, offering it, or requiring client certificates; a plain-text client refused;
//! certificates rotated by replacing their files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, run};
use enbd_e2e::testcerts::{Ca, ToolDir, Usage};
use raw::{ERR_UNSUP, IHAVEOPT, OPT_GO, REP_ACK, Raw};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const ERR_TLS_REQD: u32 = 0x8000_0005;

fn tls_args(d: &ToolDir, mode: &str) -> Vec<String> {
    vec![
        format!("--tls={mode}"),
        format!("--tls-cert={}", d.server.cert.display()),
        format!("--tls-key={}", d.server.key.display()),
    ]
}

fn start(args: &[String]) -> TestServer {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    common::start(&a)
}

fn nbds(s: &TestServer, export: &str, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        s.nbd().port(),
        dir.display()
    )
}

/// Runs a tool that is expected to fail; returns its stderr.
fn run_fails(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd} {args:?} succeeded but should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{cmd} failed as expected: {err}");
    err
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_when_required_and_plain_text_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let s = start(&tls_args(&certs, "require"));
    let uri = nbds(&s, "demo", &certs.dir);
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), "1073741824");
    let json: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(json["TLS"], true, "{json}");

    // Data through TLS: 8 MiB in, the same 8 MiB out.
    let src = tmp.path().join("src.img");
    let pattern: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    // The whole export comes back (a sparse file: holes are skipped by extent).
    let back = tmp.path().join("back.img");
    run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    let mut head = vec![0u8; pattern.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&back).unwrap(), &mut head).unwrap();
    assert!(head == pattern, "data read back over TLS differs");
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 1 << 30);

    // libnbd in plain text: refused (its GO gets NBD_REP_ERR_TLS_REQD).
    let err = run_fails("nbdinfo", &["--size", &s.nbd_uri("demo")]);
    assert!(err.to_lowercase().contains("tls"), "{err}");
    // Byte-level: every option but STARTTLS/ABORT is refused before TLS, EXPORT_NAME ends
    // the connection.
    let mut r = Raw::connect(s.nbd());
    r.send(&3u32.to_be_bytes());
    r.option(OPT_LIST, &[]);
    assert_eq!(r.option_reply().1, ERR_TLS_REQD);
    assert_eq!(r.go("demo"), Err(ERR_TLS_REQD));
    r.option(OPT_EXPORT_NAME, b"demo");
    assert!(
        r.is_closed(),
        "EXPORT_NAME before TLS must end the connection"
    );
}

#[test]
fn qemu_img_over_tls_creds() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let s = start(&tls_args(&certs, "require"));
    let port = s.nbd().port().to_string();
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.dir.display()
    );
    let image = format!("driver=nbd,host=127.0.0.1,port={port},export=demo,tls-creds=tls0");
    let out = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &obj,
            "--image-opts",
            &image,
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["virtual-size"], 1u64 << 30, "{out}");
    // Without tls-creds, qemu is refused.
    let plain = format!("driver=nbd,host=127.0.0.1,port={port},export=demo");
    run_fails("qemu-img", &["info", "--image-opts", &plain]);
}

#[test]
fn optional_tls_serves_both_and_off_refuses_starttls() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let s = start(&tls_args(&certs, "optional"));
    let tls: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &nbds(&s, "demo", &certs.dir)])).unwrap();
    assert_eq!(tls["TLS"], true);
    let plain: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &s.nbd_uri("demo")])).unwrap();
    assert_eq!(plain["TLS"], false);
    drop(s);

    let off = common::start(&[]);
    let mut r = Raw::connect(off.nbd());
    r.send(&3u32.to_be_bytes());
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.option_reply().1, ERR_UNSUP);
    // nbds:// against a server without TLS fails rather than going on in plain text.
    run_fails("nbdinfo", &["--size", &nbds(&off, "demo", &certs.dir)]);
}

#[test]
fn client_certificates_from_the_client_ca_only() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let mut args = tls_args(&certs, "require");
    args.push(format!("--tls-client-ca={}", certs.ca.cert.display()));
    let s = start(&args);
    // Our CA's client certificate: in.
    assert_eq!(
        run("nbdinfo", &["--size", &nbds(&s, "demo", &certs.dir)]).trim(),
        "1073741824"
    );
    // No client certificate: refused.
    let ca_only = certs.ca_only(&tmp.path().join("ca-only"));
    run_fails("nbdinfo", &["--size", &nbds(&s, "demo", &ca_only)]);
    // A client certificate from another CA: refused.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_ca = Ca::new(&other_dir, "other-ca");
    let stranger = other_ca.issue(&other_dir, "stranger", Usage::Client);
    let mixed = certs.ca_only(&tmp.path().join("mixed"));
    std::fs::copy(&stranger.cert, mixed.join("client-cert.pem")).unwrap();
    std::fs::copy(&stranger.key, mixed.join("client-key.pem")).unwrap();
    run_fails("nbdinfo", &["--size", &nbds(&s, "demo", &mixed)]);
}

/// Replaces `to` by `from` the way a rotation does: write beside it, rename over it.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn rotated_certificate_files_serve_the_next_connection_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let old = ToolDir::new(&tmp.path().join("old"));
    let new = ToolDir::new(&tmp.path().join("new"));
    // The server reads its own copies, which the "rotation" replaces.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (cert, key) = (live.join("tls.crt"), live.join("tls.key"));
    replace(&old.server.cert, &cert);
    replace(&old.server.key, &key);
    let s = start(&[
        "--tls=require".into(),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]);
    run("nbdinfo", &["--size", &nbds(&s, "demo", &old.dir)]);
    run_fails("nbdinfo", &["--size", &nbds(&s, "demo", &new.dir)]);

    // A half-done rotation (new certificate, old key) keeps the old pair in use.
    replace(&new.server.cert, &cert);
    run("nbdinfo", &["--size", &nbds(&s, "demo", &old.dir)]);
    replace(&new.server.key, &key);
    run("nbdinfo", &["--size", &nbds(&s, "demo", &new.dir)]);
    run_fails("nbdinfo", &["--size", &nbds(&s, "demo", &old.dir)]);
}

#[test]
fn handshake_timeout_holds_after_starttls_and_injected_plain_text_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let mut args = tls_args(&certs, "require");
    args.push("--handshake-timeout-secs=1".into());
    let s = start(&args);

    // STARTTLS acknowledged, then the client never starts its TLS handshake.
    let mut r = Raw::connect(s.nbd());
    r.send(&3u32.to_be_bytes());
    r.option(OPT_STARTTLS, &[]);
    let (opt, ty, _) = r.option_reply();
    assert_eq!((opt, ty), (OPT_STARTTLS, REP_ACK));
    let t = Instant::now();
    assert!(r.is_closed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // STARTTLS with a plain-text option right behind it (an injection): closed, no ACK.
    let mut r = Raw::connect(s.nbd());
    let mut b = 3u32.to_be_bytes().to_vec();
    for code in [OPT_STARTTLS, OPT_GO] {
        b.extend(IHAVEOPT.to_be_bytes());
        b.extend(code.to_be_bytes());
        b.extend(0u32.to_be_bytes());
    }
    r.send(&b);
    assert!(r.is_closed());
}

/// Resident set of `pid` in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A byte-level TLS client: STARTTLS, then GO over TLS (rustls, trusting `ca`).
fn tls_open(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut r = Raw::connect(addr);
    r.send(&3u32.to_be_bytes());
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.option_reply().1, REP_ACK);
    let mut roots = rustls::RootCertStore::empty();
    for c in enbd_server::tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, r.s);
    let mut go = IHAVEOPT.to_be_bytes().to_vec();
    go.extend(OPT_GO.to_be_bytes());
    go.extend(10u32.to_be_bytes());
    go.extend(4u32.to_be_bytes());
    go.extend(b"demo");
    go.extend(0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        match ty {
            REP_ACK => return s,
            3 => {}
            e => panic!("GO over TLS refused: {e:#x}"),
        }
    }
}

/// A TLS client pipelining valid 1 MiB READs and never reading a reply, for 10 s: the
/// server's RSS stays under idle + 64 MiB (the per-connection budget holds over TLS: the
/// session stops reading, rustls stops decrypting, TCP pushes back), a plain-text client is
/// served meanwhile, and a new TLS client afterwards.
#[test]
fn hostile_tls_client_reading_no_replies_holds_bounded_memory() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&tmp.path().join("pki"));
    let a = tls_args(&certs, "optional");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let s = common::start_with_log(&a, "enbd_server=info");
    let pid = s.pid();
    drop(tls_open(s.nbd(), &certs.ca.cert));
    let idle = rss(pid);

    let until = Instant::now() + Duration::from_secs(10);
    let (addr, ca) = (s.nbd(), certs.ca.cert.clone());
    let hostile = std::thread::spawn(move || {
        let mut t = tls_open(addr, &ca);
        t.sock
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut batch = Vec::new();
        for i in 0..256u64 {
            batch.extend(raw::REQUEST_MAGIC.to_be_bytes());
            batch.extend(0u16.to_be_bytes());
            batch.extend(raw::CMD_READ.to_be_bytes());
            batch.extend(i.to_be_bytes());
            batch.extend(((i << 20) % (512 << 20)).to_be_bytes());
            batch.extend((1u32 << 20).to_be_bytes());
        }
        let mut sent = 0u64;
        while Instant::now() < until {
            match t.write(&batch) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("hostile client: {e}"),
            }
        }
        sent
    });
    let mut peak = idle;
    let mut good_rounds = 0u64;
    let (mut good, _) = Raw::open(s.nbd(), "demo");
    while Instant::now() < until {
        let block = vec![(good_rounds % 251) as u8; 4096];
        let off = (600 << 20) + (good_rounds % 1024) * 4096;
        good.request(0, raw::CMD_WRITE, 2 * good_rounds, off, 4096, &block);
        assert_eq!(good.simple_reply(), (0, 2 * good_rounds));
        assert_eq!(good.read(2 * good_rounds + 1, off, 4096), block);
        good_rounds += 1;
        if good_rounds.is_multiple_of(64) {
            peak = peak.max(rss(pid));
        }
    }
    let sent = hostile.join().unwrap();
    peak = peak.max(rss(pid));
    eprintln!(
        "TLS flood: idle {} MiB, peak {} MiB, hostile sent {sent} bytes of requests, good client {good_rounds} rounds",
        idle >> 20,
        peak >> 20
    );
    assert!(sent > 0);
    assert!(
        peak < idle + (64 << 20),
        "RSS grew from {} MiB to {} MiB",
        idle >> 20,
        peak >> 20
    );
    assert!(
        good_rounds >= 100,
        "good client starved: {good_rounds} rounds"
    );
    drop(tls_open(s.nbd(), &certs.ca.cert));
    let _ = std::io::stdout().flush();
}
