//! Fuzzes the option reply decoder.
#![no_main]

use enbd_proto::wire::OptionReply;
use enbd_proto_fuzz::{check, try_encoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(
        data,
        |b| OptionReply::decode(b, 1 << 16),
        |v| try_encoded(|o| v.encode(o)),
    );
});
