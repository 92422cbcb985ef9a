//! Hostile and broken clients: the server answers with the right NBD error or closes that one
//! connection, and keeps serving everyone else (checked with a second connection each time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::net::SocketAddr;

use raw::*;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EPERM: u32 = 1;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// A second, well-behaved client still gets served.
fn still_serving(addr: SocketAddr) {
    let (mut c, size) = Raw::open(addr, "demo");
    assert_eq!(size, 1 << 30);
    c.request(0, CMD_WRITE, 1, 4096, 4, b"live");
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read(2, 4096, 4), b"live");
}

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let s = common::start(&[]);
    // Unknown client flag bits.
    let mut c = Raw::connect(s.nbd());
    c.send(&0xffff_ffffu32.to_be_bytes());
    assert!(c.is_closed());
    // Garbage where an option header belongs.
    let mut c = Raw::connect(s.nbd());
    c.send(&3u32.to_be_bytes());
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(c.is_closed());
    // An option length no server should buffer.
    let mut c = Raw::connect(s.nbd());
    c.send(&3u32.to_be_bytes());
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend(OPT_GO.to_be_bytes());
    h.extend((1u32 << 30).to_be_bytes());
    c.send(&h);
    assert!(c.is_closed());
    // Client leaves in the middle of the greeting exchange.
    let c = Raw::connect(s.nbd());
    drop(c);
    still_serving(s.nbd());
}

#[test]
fn unknown_and_malformed_options_get_errors_and_the_session_goes_on() {
    let s = common::start(&[]);
    let mut c = Raw::connect(s.nbd());
    c.send(&3u32.to_be_bytes());
    c.option(99, b"whatever");
    assert_eq!(c.option_reply().1, ERR_UNSUP);
    // GO whose data is too short to hold its own name length.
    c.option(OPT_GO, &[0, 0, 0]);
    assert_eq!(c.option_reply().1, ERR_INVALID);
    // STRUCTURED_REPLY must not carry data.
    c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply().1, ERR_INVALID);
    // Too long to be an option we would ever accept, but small enough to skip.
    c.option(OPT_GO, &vec![0u8; 100 * 1024]);
    assert_eq!(c.option_reply().1, ERR_TOO_BIG);
    assert_eq!(c.go("no-such-volume"), Err(ERR_UNKNOWN));
    assert_eq!(c.go("../../etc/passwd"), Err(ERR_UNKNOWN));
    assert_eq!(c.go("demo"), Ok(1 << 30));
    c.request(0, CMD_FLUSH, 7, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 7));
    still_serving(s.nbd());
}

#[test]
fn bad_requests_get_nbd_errors_and_change_nothing() {
    let s = common::start(&["--max-request-bytes=65536"]);
    let (mut c, size) = Raw::open(s.nbd(), "demo");
    // Read past the end, and a range whose end overflows u64.
    c.request(0, CMD_READ, 1, size - 512, 1024, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    // Write past the end: ENOSPC, and its payload is consumed (the stream stays in sync).
    c.request(0, CMD_WRITE, 3, size - 2, 4, b"abcd");
    assert_eq!(c.simple_reply(), (ENOSPC, 3));
    // The document: WRITE_ZEROES past the end is ENOSPC like a write, TRIM is EINVAL like a read.
    c.request(0, CMD_WRITE_ZEROES, 31, size - 512, 1024, &[]);
    assert_eq!(c.simple_reply(), (ENOSPC, 31));
    c.request(0, CMD_TRIM, 32, size - 512, 1024, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 32));
    // Read over the request-size limit.
    c.request(0, CMD_READ, 4, 0, 65536 + 1, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    // Unknown command, unknown flag, flag not valid for the command.
    c.request(0, 42, 5, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 5));
    c.request(0x8000, CMD_READ, 6, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 6));
    c.request(1 << 1, CMD_READ, 7, 0, 512, &[]); // NO_HOLE on READ
    assert_eq!(c.simple_reply(), (EINVAL, 7));
    // BLOCK_STATUS without a negotiated metadata context.
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 8));
    // None of that touched the data.
    assert_eq!(c.read(9, size - 512, 512), vec![0u8; 512]);
    // A WRITE payload over the limit cannot be skipped cheaply: that connection closes...
    c.request(0, CMD_WRITE, 10, 0, 1 << 20, &[]);
    assert!(c.is_closed());
    // ...and everybody else carries on.
    still_serving(s.nbd());
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let s = common::start(&[]);
    let (mut c, _) = Raw::open(s.nbd(), "demo");
    c.send(&[
        0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ]);
    assert!(c.is_closed());
    still_serving(s.nbd());
}

#[test]
fn abrupt_disconnect_mid_request_leaves_the_server_serving() {
    let s = common::start(&[]);
    for cut in [3usize, 20, 28 + 1000] {
        let (mut c, _) = Raw::open(s.nbd(), "demo");
        let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
        req.extend(0u16.to_be_bytes());
        req.extend(CMD_WRITE.to_be_bytes());
        req.extend(1u64.to_be_bytes());
        req.extend(0u64.to_be_bytes());
        req.extend(65536u32.to_be_bytes());
        req.extend(vec![0xee; 65536]);
        c.send(&req[..cut]);
        drop(c);
    }
    // A client that vanishes with requests in flight.
    let (mut c, _) = Raw::open(s.nbd(), "demo");
    for i in 0..64 {
        c.request(0, CMD_READ, i, i * 4096, 4096, &[]);
    }
    drop(c);
    still_serving(s.nbd());
    // The partial write never happened.
    let (mut c, _) = Raw::open(s.nbd(), "demo");
    assert_eq!(c.read(1, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn pipelined_requests_all_get_exactly_one_reply_matched_by_cookie() {
    let s = common::start(&[]);
    let (mut c, _) = Raw::open(s.nbd(), "demo");
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        let (cmd, len): (u16, u32) = match i % 3 {
            0 => (CMD_WRITE, 4096),
            1 => (CMD_READ, 4096),
            _ => (CMD_FLUSH, 0),
        };
        r.extend(0u16.to_be_bytes());
        r.extend(cmd.to_be_bytes());
        r.extend((1000 + i).to_be_bytes());
        r.extend(
            if cmd == CMD_FLUSH {
                0
            } else {
                (i * 8192) % (1 << 28)
            }
            .to_be_bytes(),
        );
        r.extend(len.to_be_bytes());
        if cmd == CMD_WRITE {
            r.extend(vec![i as u8; 4096]);
        }
        batch.extend(r);
    }
    c.send(&batch);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        assert!(
            (1000..1000 + n).contains(&cookie),
            "unknown cookie {cookie}"
        );
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        if (cookie - 1000) % 3 == 1 {
            c.read_exact(4096);
        }
    }
    // DISC: the server finishes and closes.
    c.request(0, CMD_DISC, 9, 0, 0, &[]);
    assert!(c.is_closed());
}

#[test]
fn graceful_shutdown_answers_requests_in_flight() {
    let s = common::start(&[]);
    let (mut c, _) = Raw::open(s.nbd(), "demo");
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend(REQUEST_MAGIC.to_be_bytes());
        batch.extend(1u16.to_be_bytes()); // FUA: slow enough to still be running
        batch.extend(CMD_WRITE.to_be_bytes());
        batch.extend(i.to_be_bytes());
        batch.extend((i * 65536).to_be_bytes());
        batch.extend(65536u32.to_be_bytes());
        batch.extend(vec![0x42; 65536]);
    }
    c.send(&batch);
    // Wait until the server has read at least one request, so it is mid-work.
    let first = c.simple_reply();
    assert_eq!(first.0, 0);
    let status = s.terminate(std::time::Duration::from_secs(6));
    let mut answered = 1;
    while answered < 64 {
        let (err, _) = c.simple_reply();
        assert_eq!(err, 0);
        answered += 1;
    }
    assert!(c.is_closed());
    assert!(status.success(), "exit status {status}");
}

#[test]
fn snapshots_are_served_read_only() {
    let s = common::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut m = s.mgmt_client().await;
        m.create_snapshot(enbd_proto::enbd::CreateSnapshotRequest {
            name: "s1".into(),
            source_volume: "demo".into(),
        })
        .await
        .unwrap();
    });
    let (mut c, size) = Raw::open(s.nbd(), "snapshot/s1");
    assert_eq!(size, 1 << 30);
    c.request(0, CMD_WRITE, 1, 0, 4, b"nope");
    assert_eq!(c.simple_reply(), (EPERM, 1));
    assert_eq!(c.read(2, 0, 4), vec![0u8; 4]);
}
