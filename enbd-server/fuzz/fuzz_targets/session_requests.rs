//! Fuzzes the session's request path: arbitrary client bytes through a whole NBD session
//! (handshake, request decoding, validation, backend ops, reply encoding) on in-memory exports.
//! The first input byte picks a prefix so most inputs reach the transmission phase:
//! 0 = raw bytes from the start, 1 = GO with simple replies, 2 = structured replies +
//! base:allocation, 3 = extended headers + base:allocation, 4 = GO on a read-only export.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend(IHAVEOPT.to_be_bytes());
    out.extend(code.to_be_bytes());
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(data);
}

fn named(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(tail);
    d
}

fn prefix(mode: u8) -> Vec<u8> {
    let mut p = Vec::new();
    if mode == 0 {
        return p;
    }
    p.extend(3u32.to_be_bytes());
    let export = if mode == 4 { "ro" } else { "demo" };
    match mode {
        2 => option(&mut p, 8, &[]),
        3 => option(&mut p, 11, &[]),
        _ => {}
    }
    if mode == 2 || mode == 3 {
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend(named("base:allocation", &[]));
        option(&mut p, 10, &named(export, &q));
    }
    option(&mut p, 7, &named(export, &0u16.to_be_bytes()));
    p
}

fuzz_target!(|data: &[u8]| {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = prefix(mode % 5);
    input.extend_from_slice(rest);
    enbd_server::testkit::run_session_on_bytes(rt, &input, 64 * 1024);
});
