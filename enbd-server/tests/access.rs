//! Node-scoped access (`--access published`) against the real server: a client without a
//! grant gets nothing (empty LIST, GO/INFO refused with NBD_REP_ERR_POLICY, EXPORT_NAME
//! closed), a granted token opens exactly its volume, revoking closes the open connection,
//! grants survive a restart and go with a deleted volume, standard clients (nbdinfo) are
//! refused; `--access open` serves as before and acknowledges ENBD_OPT_ACCESS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::process::Command;

use common::TestServer;
use enbd_proto::enbd as pb;
use raw::{CMD_WRITE, ERR_UNSUP, REP_ACK, Raw};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_ACCESS: u32 = 0x454e_4244;
const REP_SERVER: u32 = 2;
const ERR_POLICY: u32 = 0x8000_0002;

fn published() -> TestServer {
    common::start(&["--access=published"])
}

async fn create(s: &TestServer, name: &str) {
    s.mgmt_client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .expect("create");
}

async fn grant(s: &TestServer, volume: &str, node: &str) -> String {
    s.mgmt_client()
        .await
        .grant_access(pb::GrantAccessRequest {
            volume: volume.into(),
            node_id: node.into(),
            token: String::new(),
        })
        .await
        .expect("grant")
        .into_inner()
        .token
}

async fn revoke(s: &TestServer, volume: &str, node: &str) -> u32 {
    s.mgmt_client()
        .await
        .revoke_access(pb::RevokeAccessRequest {
            volume: volume.into(),
            node_id: node.into(),
        })
        .await
        .expect("revoke")
        .into_inner()
        .closed_connections
}

/// Connected, client flags sent (fixed newstyle + no zeroes).
fn connect(s: &TestServer) -> Raw {
    let mut r = Raw::connect(s.nbd());
    r.send(&3u32.to_be_bytes());
    r
}

/// The export names a LIST returns.
fn list(r: &mut Raw) -> Vec<String> {
    r.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, ty, data) = r.option_reply();
        assert_eq!(opt, OPT_LIST);
        match ty {
            REP_SERVER => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
            }
            REP_ACK => return names,
            other => panic!("LIST reply {other:#x}"),
        }
    }
}

/// ENBD_OPT_ACCESS; the reply type.
fn access(r: &mut Raw, token: &str) -> u32 {
    r.option(OPT_ACCESS, token.as_bytes());
    let (opt, ty, data) = r.option_reply();
    assert_eq!(opt, OPT_ACCESS);
    if ty != REP_ACK {
        let msg = String::from_utf8_lossy(&data);
        assert!(!msg.contains(token), "the error names the token: {msg}");
    }
    ty
}

fn info(r: &mut Raw, export: &str) -> u32 {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend(export.as_bytes());
    d.extend(0u16.to_be_bytes());
    r.option(OPT_INFO, &d);
    loop {
        let (_, ty, _) = r.option_reply();
        if ty != 3 {
            return ty; // ACK or an error; INFO replies (3) come before the ACK
        }
    }
}

#[tokio::test]
async fn a_client_without_a_grant_gets_nothing() {
    let s = published();
    create(&s, "vol-a").await;

    let mut r = connect(&s);
    assert!(
        list(&mut r).is_empty(),
        "LIST shows nothing without a grant"
    );
    assert_eq!(r.go("vol-a"), Err(ERR_POLICY));
    // The same answer for a volume that does not exist: nothing is learnt.
    assert_eq!(r.go("no-such-volume"), Err(ERR_POLICY));
    assert_eq!(r.go(""), Err(ERR_POLICY), "not the default export either");
    assert_eq!(info(&mut r, "vol-a"), ERR_POLICY);
    assert_eq!(
        access(&mut r, &"0".repeat(64)),
        ERR_POLICY,
        "a made-up token"
    );
    assert_eq!(r.go("vol-a"), Err(ERR_POLICY));

    // EXPORT_NAME has no error reply: the connection ends.
    let mut r = connect(&s);
    r.option(OPT_EXPORT_NAME, b"vol-a");
    assert!(r.is_closed());

    // A standard client gets neither the list nor the volume.
    let uri = format!("nbd://127.0.0.1:{}/vol-a", s.nbd().port());
    let out = Command::new("nbdinfo").arg(&uri).output().expect("nbdinfo");
    assert!(
        !out.status.success(),
        "nbdinfo opened an unpublished volume"
    );
    eprintln!("nbdinfo refused: {}", String::from_utf8_lossy(&out.stderr));
    let listed = Command::new("nbdinfo")
        .args([
            "--list",
            "--json",
            &format!("nbd://127.0.0.1:{}", s.nbd().port()),
        ])
        .output()
        .expect("nbdinfo --list");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !text.contains("vol-a"),
        "nbdinfo --list shows vol-a: {text}"
    );
    assert!(!text.contains("demo"), "nbdinfo --list shows demo: {text}");
}

#[tokio::test]
async fn a_grant_opens_its_volume_only_and_revoking_closes_the_connection() {
    let s = published();
    create(&s, "vol-a").await;
    create(&s, "vol-b").await;
    let token = grant(&s, "vol-a", "node-1").await;
    assert_eq!(token.len(), 64);
    assert_eq!(grant(&s, "vol-a", "node-1").await, token, "idempotent");
    let other = grant(&s, "vol-b", "node-2").await;
    assert_ne!(other, token);

    let mut r = connect(&s);
    assert_eq!(access(&mut r, &token), REP_ACK);
    assert_eq!(list(&mut r), vec!["vol-a".to_owned()]);
    assert_eq!(info(&mut r, "vol-b"), ERR_POLICY, "another node's volume");
    assert_eq!(r.go("vol-a"), Ok(1 << 20));
    r.request(0, CMD_WRITE, 1, 0, 4096, &[7u8; 4096]);
    assert_eq!(r.simple_reply(), (0, 1));
    assert_eq!(r.read(2, 0, 4096), vec![7u8; 4096]);

    // Unpublish: the open connection is closed, a new one is refused.
    assert_eq!(revoke(&s, "vol-a", "node-1").await, 1);
    assert!(r.is_closed(), "the revoked connection stayed open");
    let mut r = connect(&s);
    assert_eq!(access(&mut r, &token), ERR_POLICY);
    assert_eq!(r.go("vol-a"), Err(ERR_POLICY));
    assert_eq!(revoke(&s, "vol-a", "node-1").await, 0, "idempotent");

    // node-2's grant was untouched.
    let mut r = connect(&s);
    assert_eq!(access(&mut r, &other), REP_ACK);
    assert_eq!(r.go("vol-b"), Ok(1 << 20));
}

#[tokio::test]
async fn grants_survive_a_restart_and_go_with_their_volume() {
    let mut s = published();
    create(&s, "vol-a").await;
    let token = grant(&s, "vol-a", "node-1").await;
    let mode = std::fs::metadata(s.data_dir().join("grants.json")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    s.restart();
    let mut r = connect(&s);
    assert_eq!(
        access(&mut r, &token),
        REP_ACK,
        "the grant outlived the restart"
    );
    assert_eq!(r.go("vol-a"), Ok(1 << 20));
    drop(r);
    assert_eq!(
        grant(&s, "vol-a", "node-1").await,
        token,
        "same token after restart"
    );

    s.mgmt_client()
        .await
        .delete_volume(pb::DeleteVolumeRequest {
            name: "vol-a".into(),
            force: true,
        })
        .await
        .expect("delete");
    create(&s, "vol-a").await;
    let mut r = connect(&s);
    assert_eq!(
        access(&mut r, &token),
        ERR_POLICY,
        "a re-created volume has no grants"
    );

    let missing = s
        .mgmt_client()
        .await
        .grant_access(pb::GrantAccessRequest {
            volume: "nope".into(),
            node_id: "node-1".into(),
            token: String::new(),
        })
        .await
        .expect_err("grant on a missing volume");
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn open_access_serves_everyone_and_acknowledges_tokens() {
    let s = common::start(&[]);
    let mut r = connect(&s);
    assert_eq!(access(&mut r, &"ab".repeat(32)), REP_ACK);
    assert!(list(&mut r).contains(&"demo".to_owned()));
    assert_eq!(r.go("demo"), Ok(1 << 30));
    // A token that is not printable ASCII is malformed, whatever the mode.
    let mut r = connect(&s);
    r.option(OPT_ACCESS, &[0u8; 4]);
    let (_, ty, _) = r.option_reply();
    assert_ne!(ty, REP_ACK);
    assert_ne!(ty, ERR_UNSUP);
}
