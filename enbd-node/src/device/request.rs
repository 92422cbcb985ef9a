//! One ublk IO descriptor decoded into a block request, and the target trait that serves it.
//! Invariant: FLUSH is recognised before any range check (its start sector is garbage), and
//! every data request that reaches a target lies inside the device.

use std::future::Future;

use bytes::Bytes;
use libublk::sys;

/// A block request, as the device hands it to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockRequest {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
}

/// What serves a device's IO: the client engine (through `backing::EngineTarget`).
/// Errors are positive errno values, passed to the kernel as the request's status.
pub trait BlockTarget: Send + Sync + 'static {
    /// Read data for `Read`, empty bytes for everything else.
    fn submit(&self, req: BlockRequest) -> impl Future<Output = Result<Bytes, i32>> + Send;
}

/// The fields of a ublk IO descriptor that matter here (copied out of the shared mapping).
#[derive(Debug, Clone, Copy)]
pub struct IoDesc {
    pub op_flags: u32,
    pub start_sector: u64,
    pub nr_sectors: u32,
}

impl From<&sys::ublksrv_io_desc> for IoDesc {
    fn from(d: &sys::ublksrv_io_desc) -> Self {
        IoDesc {
            op_flags: d.op_flags,
            start_sector: d.start_sector,
            nr_sectors: d.nr_sectors,
        }
    }
}

/// Decodes a descriptor. `buf` is the tag's IO buffer (write payload source);
/// `size_bytes` the device size. Errors are positive errno values.
pub fn decode(d: IoDesc, buf: &[u8], size_bytes: u64) -> Result<BlockRequest, i32> {
    let op = d.op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        return Ok(BlockRequest::Flush);
    }
    let offset = d.start_sector.checked_mul(512).ok_or(libc::EINVAL)?;
    let len = d.nr_sectors.checked_mul(512).ok_or(libc::EINVAL)?;
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size_bytes)
    {
        return Err(libc::EINVAL);
    }
    match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len as usize > buf.len() => {
            Err(libc::EINVAL)
        }
        sys::UBLK_IO_OP_READ => Ok(BlockRequest::Read { offset, len }),
        sys::UBLK_IO_OP_WRITE => Ok(BlockRequest::Write {
            offset,
            data: Bytes::copy_from_slice(&buf[..len as usize]),
            fua: d.op_flags & sys::UBLK_IO_F_FUA != 0,
        }),
        sys::UBLK_IO_OP_DISCARD => Ok(BlockRequest::Discard { offset, len }),
        sys::UBLK_IO_OP_WRITE_ZEROES => Ok(BlockRequest::WriteZeroes {
            offset,
            len,
            no_hole: d.op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
        }),
        _ => Err(libc::EOPNOTSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u32, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: op,
            start_sector,
            nr_sectors,
        }
    }

    #[test]
    fn flush_with_garbage_sector_is_a_flush() {
        let d = desc(sys::UBLK_IO_OP_FLUSH, u64::MAX, 77);
        assert_eq!(decode(d, &[], 4096), Ok(BlockRequest::Flush));
    }

    #[test]
    fn write_carries_payload_and_fua() {
        let buf = vec![7u8; 4096];
        let d = desc(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 2, 2);
        let req = decode(d, &buf, 1 << 20).expect("valid write");
        assert_eq!(
            req,
            BlockRequest::Write {
                offset: 1024,
                data: Bytes::from(vec![7u8; 1024]),
                fua: true
            }
        );
    }

    #[test]
    fn out_of_range_and_oversized_are_rejected() {
        let buf = vec![0u8; 4096];
        assert_eq!(
            decode(desc(sys::UBLK_IO_OP_READ, 8, 1), &buf, 4096),
            Err(libc::EINVAL)
        );
        assert_eq!(
            decode(desc(sys::UBLK_IO_OP_READ, 0, 16), &buf, 1 << 20),
            Err(libc::EINVAL)
        );
        assert_eq!(
            decode(desc(sys::UBLK_IO_OP_READ, u64::MAX / 2, 1), &buf, 4096),
            Err(libc::EINVAL)
        );
        // Discard carries no payload: it may exceed the IO buffer.
        assert_eq!(
            decode(desc(sys::UBLK_IO_OP_DISCARD, 0, 2048), &buf, 1 << 20),
            Ok(BlockRequest::Discard {
                offset: 0,
                len: 1 << 20
            })
        );
    }

    #[test]
    fn write_zeroes_honours_nounmap_and_unknown_ops_fail() {
        let d = desc(sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP, 0, 8);
        assert_eq!(
            decode(d, &[], 1 << 20),
            Ok(BlockRequest::WriteZeroes {
                offset: 0,
                len: 4096,
                no_hole: true
            })
        );
        assert_eq!(
            decode(desc(sys::UBLK_IO_OP_ZONE_OPEN, 0, 8), &[], 1 << 20),
            Err(libc::EOPNOTSUPP)
        );
    }
}
