//! Shared property of every wire-codec fuzz target: decoding arbitrary bytes never panics,
//! and whatever a decoder accepts is self-consistent — it consumed no more than it was
//! given, decoding just the consumed bytes gives the same value, and encoding the value
//! produces bytes that decode to the same value again.

use enbd_proto::wire::WireError;

/// Checks the decode/encode properties of one decoder on `data`. Panics (which libFuzzer
/// reports as a crash) on any violation.
pub fn check<T, D, E>(data: &[u8], decode: D, encode: E)
where
    T: PartialEq + std::fmt::Debug,
    D: Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>,
    E: Fn(&T) -> Result<Vec<u8>, WireError>,
{
    let Ok(Some((value, used))) = decode(data) else {
        return;
    };
    assert!(
        used <= data.len(),
        "consumed {used} of {} bytes",
        data.len()
    );
    match decode(&data[..used]) {
        Ok(Some((again, again_used))) => {
            assert_eq!(
                again, value,
                "decoding only the consumed bytes changed the value"
            );
            assert_eq!(again_used, used);
        }
        other => panic!("decoding only the consumed bytes gave {other:?}"),
    }
    let bytes = match encode(&value) {
        Ok(bytes) => bytes,
        Err(error) => panic!("decoded {value:?} but cannot encode it: {error}"),
    };
    match decode(&bytes) {
        Ok(Some((round, round_used))) => {
            assert_eq!(
                round, value,
                "encode(decode(x)) decodes to a different value"
            );
            assert_eq!(
                round_used,
                bytes.len(),
                "re-encoded message not fully consumed"
            );
        }
        other => panic!("encode(decode(x)) of {value:?} does not decode: {other:?}"),
    }
}

/// Encodes with an infallible encoder into a fresh buffer.
pub fn encoded(write: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    write(&mut out);
    Ok(out)
}

/// Encodes with a fallible encoder into a fresh buffer.
pub fn try_encoded(
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    write(&mut out)?;
    Ok(out)
}
