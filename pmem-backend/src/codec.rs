//! Little-endian encoding helpers for on-pool structures. The reader is bounds-checked
//! everywhere: the bytes come from a file that may be corrupt or hostile.

/// Decoding ran past the end of the buffer, or found a value that cannot be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The structure is longer than the bytes holding it.
    #[error("{0}: unexpected end of data")]
    Short(&'static str),
    /// A field has an impossible value.
    #[error("{0}")]
    Invalid(String),
}

/// Appends little-endian values to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded bytes.
    pub buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(cap),
        }
    }
    /// Append a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append raw bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Append a string with a u16 length prefix. Callers validate lengths first.
    pub fn str16(&mut self, s: &str) {
        let len = u16::try_from(s.len()).expect("string lengths are validated to fit u16");
        self.u16(len);
        self.bytes(s.as_bytes());
    }
}

/// Reads little-endian values from a byte slice, never past its end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Read `buf`; `what` names the structure in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Take `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Short(self.what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// Read a byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>()?[0])
    }
    /// Read a u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    /// Read a u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    /// Read a u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// Read a u16-length-prefixed UTF-8 string.
    pub fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| DecodeError::Invalid(format!("{}: string is not UTF-8", self.what)))
    }
    /// Read a count of items each at least `item_size` bytes, refusing counts the
    /// remaining bytes cannot hold (so a corrupt count cannot make us allocate wildly).
    pub fn count(&mut self, item_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_size.max(1)) > self.remaining() {
            return Err(DecodeError::Short(self.what));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bounds() {
        let mut w = Writer::default();
        w.u8(7);
        w.u16(0x1234);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.str16("héllo");
        let mut r = Reader::new(&w.buf, "t");
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u16(), Ok(0x1234));
        assert_eq!(r.u32(), Ok(0xdead_beef));
        assert_eq!(r.u64(), Ok(u64::MAX - 1));
        assert_eq!(r.str16().as_deref(), Ok("héllo"));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), Err(DecodeError::Short("t")));
    }

    #[test]
    fn count_refuses_impossible_lengths() {
        let mut w = Writer::default();
        w.u32(1000);
        w.u64(1);
        let mut r = Reader::new(&w.buf, "t");
        assert!(r.count(8).is_err());
        let mut r = Reader::new(&w.buf, "t");
        assert!(r.u32().is_ok());
        let mut w2 = Writer::default();
        w2.u32(1);
        w2.u64(5);
        assert_eq!(Reader::new(&w2.buf, "t").count(8), Ok(1));
    }

    #[test]
    fn str16_rejects_bad_utf8() {
        let mut r = Reader::new(&[2, 0, 0xff, 0xfe], "t");
        assert!(matches!(r.str16(), Err(DecodeError::Invalid(_))));
    }
}
