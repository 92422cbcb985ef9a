//! A RAM-backed block target: lets the device layer be exercised on a real kernel without a
//! network engine, and serves as the reference for what a target must do.

use std::sync::Mutex;

use bytes::Bytes;

use super::request::{BlockRequest, BlockTarget};

/// A zero-filled in-memory disk. The lock is fine here: it is a test target, not the engine.
pub struct RamTarget {
    data: Mutex<Vec<u8>>,
}

impl RamTarget {
    pub fn new(size_bytes: usize) -> Self {
        RamTarget {
            data: Mutex::new(vec![0; size_bytes]),
        }
    }

    fn serve(&self, req: BlockRequest) -> Result<Bytes, i32> {
        let mut data = crate::sync::lock(&self.data, "RAM target data");
        let range = |offset: u64, len: usize| -> Result<std::ops::Range<usize>, i32> {
            let start = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
            let end = start.checked_add(len).ok_or(libc::EINVAL)?;
            if end > data.len() {
                Err(libc::EINVAL)
            } else {
                Ok(start..end)
            }
        };
        match req {
            BlockRequest::Read { offset, len } => {
                let r = range(offset, len as usize)?;
                Ok(Bytes::copy_from_slice(&data[r]))
            }
            BlockRequest::Write {
                offset,
                data: payload,
                ..
            } => {
                let r = range(offset, payload.len())?;
                data[r].copy_from_slice(&payload);
                Ok(Bytes::new())
            }
            BlockRequest::Discard { offset, len }
            | BlockRequest::WriteZeroes { offset, len, .. } => {
                let r = range(offset, len as usize)?;
                data[r].fill(0);
                Ok(Bytes::new())
            }
            BlockRequest::Flush => Ok(Bytes::new()),
        }
    }
}

impl BlockTarget for RamTarget {
    async fn submit(&self, req: BlockRequest) -> Result<Bytes, i32> {
        self.serve(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_discard_round_trip() {
        let t = RamTarget::new(8192);
        let payload = Bytes::from(vec![0xab; 1024]);
        t.submit(BlockRequest::Write {
            offset: 512,
            data: payload.clone(),
            fua: false,
        })
        .await
        .expect("write");
        assert_eq!(
            t.submit(BlockRequest::Read {
                offset: 512,
                len: 1024
            })
            .await,
            Ok(payload)
        );
        t.submit(BlockRequest::Discard {
            offset: 512,
            len: 512,
        })
        .await
        .expect("discard");
        let back = t
            .submit(BlockRequest::Read {
                offset: 512,
                len: 1024,
            })
            .await
            .expect("read");
        assert!(back[..512].iter().all(|&b| b == 0) && back[512..].iter().all(|&b| b == 0xab));
        assert_eq!(
            t.submit(BlockRequest::Read {
                offset: 8000,
                len: 512
            })
            .await,
            Err(libc::EINVAL)
        );
    }
}
