//! A byte-level NBD client for bad-input tests, written from the protocol document on
//! purpose (independent of the codec under test).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;
pub const ERR_TOO_BIG: u32 = 0x8000_0009;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects and reads the 18-byte greeting.
    pub fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let g = r.read_exact(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read");
        b
    }

    /// True if the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue, // drain whatever was in flight
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }

    pub fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend(code.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_exact(20);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REP_MAGIC);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, ty, self.read_exact(len as usize))
    }

    /// NBD_OPT_GO on `export`; returns the size, or the error reply type.
    pub fn go(&mut self, export: &str) -> Result<u64, u32> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend(export.as_bytes());
        d.extend(0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (_, ty, data) = self.option_reply();
            match ty {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before ACK")),
                err => return Err(err),
            }
        }
    }

    /// Full handshake with fixed newstyle + no zeroes, then GO.
    pub fn open(addr: SocketAddr, export: &str) -> (Self, u64) {
        let mut r = Self::connect(addr);
        r.send(&3u32.to_be_bytes());
        let size = r.go(export).expect("GO");
        (r, size)
    }

    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(flags.to_be_bytes());
        b.extend(cmd.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.send(&b);
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_exact(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "{h:x?}"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// READ and return the data (simple replies); panics on an error reply.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len, &[]);
        let (err, c) = self.simple_reply();
        assert_eq!((err, c), (0, cookie));
        self.read_exact(len as usize)
    }
}
