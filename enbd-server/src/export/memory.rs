//! The in-memory backend, for tests: a sparse map of 4 KiB pages. A page that was never
//! written, or was trimmed, is a hole and reads as zeroes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Backend, ExportError, Extent};

const PAGE: u64 = 4096;

#[derive(Default)]
pub struct MemoryBackend {
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    read_only: bool,
}

impl MemoryBackend {
    pub fn new(read_only: bool) -> Self {
        Self {
            pages: Mutex::new(BTreeMap::new()),
            read_only,
        }
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Zeroes `[offset, offset+len)`; whole pages become holes unless `keep`.
    fn zero(&self, offset: u64, len: u64, keep: bool) {
        let mut pages = self.pages();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let start = (pos % PAGE) as usize;
            let n = (PAGE - pos % PAGE).min(end - pos) as usize;
            if n as u64 == PAGE && !keep {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[start..start + n].fill(0);
            } else if keep {
                pages.insert(page, vec![0u8; PAGE as usize].into_boxed_slice());
            }
            pos += n as u64;
        }
    }
}

impl Backend for MemoryBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        let pages = self.pages();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = (pos % PAGE) as usize;
            let n = (PAGE as usize - start).min(buf.len() - done);
            match pages.get(&(pos / PAGE)) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[start..start + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let mut pages = self.pages();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let start = (pos % PAGE) as usize;
            let n = (PAGE as usize - start).min(data.len() - done);
            let page = pages
                .entry(pos / PAGE)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[start..start + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.write_zeroes(offset, len, false, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep: bool,
        _fast: bool,
    ) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.zero(offset, len, keep);
        Ok(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        let pages = self.pages();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let hole = !pages.contains_key(&(pos / PAGE));
            let n = (PAGE - pos % PAGE).min(end - pos);
            let full = out.len() == max.max(1);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += n,
                _ if full => break,
                _ => out.push(Extent { length: n, hole }),
            }
            pos += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_trim_map() {
        let m = MemoryBackend::new(false);
        m.write_at(b"hello", 4094, false).unwrap();
        let mut b = [0u8; 7];
        m.read_at(&mut b, 4093).unwrap();
        assert_eq!(&b, b"\0hello\0");
        assert_eq!(
            m.block_status(0, 16384, 8).unwrap(),
            vec![
                Extent {
                    length: 8192,
                    hole: false
                },
                Extent {
                    length: 8192,
                    hole: true
                }
            ]
        );
        m.trim(0, 8192).unwrap();
        assert_eq!(
            m.block_status(0, 16384, 8).unwrap(),
            vec![Extent {
                length: 16384,
                hole: true
            }]
        );
    }
}
