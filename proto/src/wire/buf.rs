//! Bounds-checked big-endian reading over a fully received message, and string checks.
//! Invariant: no method panics or allocates more than the bytes it was given; a short buffer
//! is reported as `WireError::Truncated`.

use super::consts::MAX_STRING_LEN;
use super::error::WireError;

/// A cursor over one complete message (header already framed, so short input is malformed).
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < len {
            return Err(WireError::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], WireError> {
        let bytes = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// Reads a string whose length is a 32-bit prefix.
    pub(crate) fn string_u32(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32(what)?;
        if u64::from(len) > self.remaining() as u64 {
            return Err(WireError::BadLength {
                what,
                len: len.into(),
                reason: "longer than the rest of the message",
            });
        }
        let bytes = self.bytes(len as usize, what)?;
        decode_string(bytes, what)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::BadLength {
                what,
                len: self.buf.len() as u64,
                reason: "trailing bytes after the last field",
            })
        }
    }
}

/// Checks the protocol's string rules (UTF-8, no NUL, at most 4096 bytes) and copies.
pub(crate) fn decode_string(bytes: &[u8], what: &'static str) -> Result<String, WireError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(WireError::TooLong {
            what,
            len: bytes.len() as u64,
            limit: MAX_STRING_LEN as u64,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8 { what })?;
    check_str(text, what)?;
    Ok(text.to_owned())
}

/// Checks a string before encoding it.
pub(crate) fn check_str(text: &str, what: &'static str) -> Result<(), WireError> {
    if text.len() > MAX_STRING_LEN {
        return Err(WireError::TooLong {
            what,
            len: text.len() as u64,
            limit: MAX_STRING_LEN as u64,
        });
    }
    if text.as_bytes().contains(&0) {
        return Err(WireError::NulInString { what });
    }
    Ok(())
}

/// End of a frame whose 32-bit data length follows a header of `header_len` bytes; fails
/// instead of wrapping where `usize` is narrower than the sum (32-bit targets).
pub(crate) fn frame_end(
    header_len: usize,
    length: u32,
    what: &'static str,
) -> Result<usize, WireError> {
    usize::try_from(length)
        .ok()
        .and_then(|len| len.checked_add(header_len))
        .ok_or(WireError::TooLong {
            what,
            len: length.into(),
            limit: (usize::MAX - header_len) as u64,
        })
}
