//! Interop with real NBD tools against the real binary: qemu-img / qemu-io, nbdinfo, nbdcopy
//! and fio's nbd engine. A missing tool fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::run;
use rand::RngCore;

fn sha(path: &std::path::Path, len: u64) -> String {
    let out = run(
        "sh",
        &[
            "-c",
            &format!("head -c {len} {} | sha256sum", path.display()),
        ],
    );
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn qemu_img_writes_a_pattern_and_reads_it_back() {
    let s = common::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("pattern.raw");
    let mut data = vec![0u8; 4 << 20];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&pattern, &data).unwrap();
    let uri = s.nbd_uri("demo");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            pattern.to_str().unwrap(),
            &uri,
        ],
    );
    let back = dir.path().join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 1 << 30);
    assert_eq!(sha(&back, 4 << 20), sha(&pattern, 4 << 20));
    // qemu-io: a pattern at an unaligned offset, checked by qemu-io itself (-P verifies).
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 6000k 300000", &uri],
    );
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 6000k 300000", &uri],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = run("qemu-img", &["info", "-f", "raw", &uri]);
    assert!(out.contains("virtual size: 1 GiB"), "{out}");
}

#[test]
fn nbdinfo_sees_size_exports_multi_conn_and_holes() {
    let s = common::start(&[]);
    let uri = s.nbd_uri("demo");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), "1073741824");
    let json: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &uri])).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_fast_zero"], true);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(json["structured"], true);

    // Data at 1 MiB..1 MiB+64 KiB; everything else is a hole.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 1M 64k", &uri],
    );
    let map = run("nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "65536", "0"], "{map}");
    assert_eq!(rows[2][2], "3", "{map}");

    let list = run(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", s.nbd())],
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo"]);
}

#[test]
fn nbdcopy_round_trip() {
    let s = common::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 8 << 20];
    rand::rng().fill_bytes(&mut data[..3 << 20]); // the tail stays zero (sparse)
    std::fs::write(&src, &data).unwrap();
    let uri = s.nbd_uri("demo");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let back = dir.path().join("back.raw");
    run(
        "nbdcopy",
        &["--connections=2", &uri, back.to_str().unwrap()],
    );
    assert_eq!(sha(&back, 8 << 20), sha(&src, 8 << 20));
    // The zero tail was written as zeroes (or skipped): the server still reads zero there.
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0 3M 5M", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

fn fio(uri: &str, args: &[&str]) -> String {
    let mut all = vec![
        "--name=t",
        "--ioengine=nbd",
        "--group_reporting",
        "--output-format=json",
    ];
    let u = format!("--uri={uri}");
    all.push(&u);
    all.extend_from_slice(args);
    let out = run("fio", &all);
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').unwrap()..]).expect("fio json");
    assert_eq!(v["jobs"][0]["error"], 0, "{out}");
    out
}

#[test]
fn fio_verify_randwrite_randread_trim_over_four_connections() {
    fio_verify_workload(&[]);
}

/// The same workload through the io_uring engine (ring reads and flushes, write lanes).
#[test]
fn fio_verify_through_the_uring_engine() {
    fio_verify_workload(&["--io-engine", "uring"]);
}

/// The same workload through a pool of one thread: every request kind must still finish
/// when reads that miss the cache and writes share nothing but one worker.
#[test]
fn fio_verify_with_a_single_io_thread() {
    fio_verify_workload(&["--io-threads", "1"]);
}

fn fio_verify_workload(server_args: &[&str]) {
    let s = common::start(server_args);
    let uri = s.nbd_uri("demo");
    // Big requests first (past the inline-read limit: they take the engine's own paths),
    // written and verified over 2 connections in the last 16 MiB of the export's first 48.
    fio(
        &uri,
        &[
            "--bsrange=256k-1m",
            "--rw=randwrite",
            "--size=8M",
            "--offset=32M",
            "--offset_increment=8M",
            "--numjobs=2",
            "--iodepth=4",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    // Each of 4 connections writes (and verifies) its own 8 MiB region, QD 8.
    let common = [
        "--bs=4k",
        "--size=8M",
        "--offset_increment=8M",
        "--numjobs=4",
        "--iodepth=8",
    ];
    let mut args = common.to_vec();
    args.extend(["--rw=randwrite", "--verify=crc32c", "--verify_fatal=1"]);
    fio(&uri, &args);
    // A fresh run only reads and verifies what the previous one left on the server.
    let mut args = common.to_vec();
    args.extend([
        "--rw=randwrite",
        "--verify=crc32c",
        "--verify_only",
        "--verify_fatal=1",
    ]);
    fio(&uri, &args);
    // Random TRIMs (64 KiB, 2 connections) over the first two regions, which then read back
    // as zeroes and show up as holes.
    fio(
        &uri,
        &[
            "--rw=randtrim",
            "--bs=64k",
            "--size=8M",
            "--offset_increment=8M",
            "--numjobs=2",
            "--iodepth=8",
        ],
    );
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0 0 16M", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let map = run("nbdinfo", &["--map", &uri]);
    let first: Vec<&str> = map.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(first[..3], ["0", "16777216", "3"], "{map}");
    // Random reads across the written area over 4 connections succeed.
    fio(
        &uri,
        &[
            "--rw=randread",
            "--bs=4k",
            "--size=32M",
            "--numjobs=4",
            "--iodepth=16",
            "--runtime=2",
        ],
    );
}
