//! Golden tests for the errno ↔ NBD error mapping that the server and the client engine both
//! use: the whole table for every errno a Linux backend can return, and the bytes a reply
//! carries for the cases the NBD protocol document names.

use enbd_proto::wire::{Cookie, NbdError, SimpleReply};

/// Linux errno → NBD error value, as the protocol document's "Error values" section asks
/// (written out by hand from the document, not from the code under test).
const SERVER_TABLE: &[(i32, &str, u32)] = &[
    (1, "EPERM", 1),
    (5, "EIO", 5),
    (12, "ENOMEM", 12),
    (13, "EACCES", 1),
    (22, "EINVAL", 22),
    (27, "EFBIG", 28),
    (28, "ENOSPC", 28),
    (30, "EROFS", 1),
    (75, "EOVERFLOW", 22),
    (95, "EOPNOTSUPP", 95),
    (108, "ESHUTDOWN", 108),
    (122, "EDQUOT", 28),
];

#[test]
fn every_backend_errno_maps_as_the_document_says() {
    for errno in 0..=200 {
        let want = SERVER_TABLE
            .iter()
            .find(|(e, _, _)| *e == errno)
            .map_or(5, |(_, _, nbd)| *nbd);
        let name = SERVER_TABLE
            .iter()
            .find(|(e, _, _)| *e == errno)
            .map_or("other", |(_, n, _)| n);
        assert_eq!(
            NbdError::from_errno(errno).raw(),
            want,
            "errno {errno} ({name})"
        );
    }
}

#[test]
fn every_reply_value_reads_back_as_the_document_says() {
    // Defined values are their own Linux errno; anything else reads as EINVAL.
    let defined = [1u32, 5, 12, 22, 28, 75, 95, 108];
    for raw in 1..=300u32 {
        let want = if defined.contains(&raw) {
            raw as i32
        } else {
            22
        };
        assert_eq!(NbdError::from_raw(raw).to_errno(), want, "NBD value {raw}");
    }
    assert_eq!(NbdError::from_raw(0x8000_0001).to_errno(), 22);
}

/// A write that fails with EFBIG (the file may not grow) reaches the client as NBD_ENOSPC,
/// byte for byte, and the client reports ENOSPC upward.
#[test]
fn efbig_goes_on_the_wire_as_enospc() {
    let reply = SimpleReply {
        error: Some(NbdError::from_errno(27)),
        cookie: Cookie(0x0102_0304_0506_0708),
    };
    let mut wire = Vec::new();
    reply.encode(&mut wire);
    assert_eq!(
        wire,
        [
            0x67, 0x44, 0x66, 0x98, // NBD_SIMPLE_REPLY_MAGIC
            0x00, 0x00, 0x00, 0x1c, // NBD_ENOSPC (28)
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
        ]
    );
    let back = NbdError::from_raw(u32::from_be_bytes([wire[4], wire[5], wire[6], wire[7]]));
    assert_eq!(back.to_errno(), 28);
}
