//! A small, versioned binary encoding for what crosses the wire or the disk: length-prefixed
//! fields, big-endian integers, no allocation beyond what the input itself holds, and typed
//! errors naming the offset. Hand-written so that the encoded size of every message is known
//! exactly before it is built (messages must stay below the mesh's 1 MiB limit).

use thiserror::Error;

use crate::hlc::{TIMESTAMP_LEN, Timestamp};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message ends at byte {at}: {need} more bytes needed for {what}")]
    Truncated {
        at: usize,
        need: usize,
        what: &'static str,
    },
    #[error("unknown {what} tag {tag} at byte {at}")]
    BadTag {
        what: &'static str,
        tag: u8,
        at: usize,
    },
    #[error("unsupported {what} version {version} (this node speaks {supported})")]
    Version {
        what: &'static str,
        version: u8,
        supported: u8,
    },
    #[error("{what} at byte {at} is not UTF-8")]
    NotUtf8 { what: &'static str, at: usize },
    #[error("{what}: {count} items announced, more than the limit {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("{trailing} unexpected bytes after the end of the {what}")]
    Trailing { what: &'static str, trailing: usize },
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn ts(&mut self, t: &Timestamp) {
        self.buf.extend_from_slice(&t.to_bytes());
    }
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// Short strings (keys, peer ids): u16 length. Callers bound them well below 64 KiB.
    pub fn str16(&mut self, s: &str) {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.buf
            .extend_from_slice(&s.as_bytes()[..usize::from(len)]);
    }
    /// Byte strings: u32 length. Callers bound them well below 4 GiB.
    pub fn bytes32(&mut self, b: &[u8]) {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(&b[..len as usize]);
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                at: self.pos,
                need: n - self.remaining(),
                what,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    pub fn ts(&mut self, what: &'static str) -> Result<Timestamp, DecodeError> {
        Ok(Timestamp::from_bytes(&self.array::<TIMESTAMP_LEN>(what)?))
    }
    pub fn id(&mut self, what: &'static str) -> Result<[u8; 32], DecodeError> {
        self.array(what)
    }
    pub fn str16(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(what)?);
        let at = self.pos;
        let b = self.take(len, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8 { what, at })
    }
    pub fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }
    /// A count of items each at least `min_item` bytes long: refused when the rest of the
    /// input cannot hold them, so a forged count never makes us reserve memory.
    pub fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)?;
        let fits = self.remaining() / min_item.max(1);
        if n as usize > fits {
            return Err(DecodeError::TooMany {
                what,
                count: u64::from(n),
                limit: fits as u64,
            });
        }
        Ok(n as usize)
    }
    pub fn end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::Trailing {
                what,
                trailing: self.remaining(),
            });
        }
        Ok(())
    }
}
