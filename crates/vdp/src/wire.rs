//! The 16-bit TLV header shared by LLDP (IEEE 802.1AB 8.4) and the VDP TLVs
//! carried over ECP (IEEE 802.1Qbg-2012 41.2): 7-bit type in the top bits,
//! 9-bit length of the value (header excluded) below. lldpad's
//! `ptlv_head`/`ptlv_type`/`ptlv_length` (qbg/vdp22sm.c) use the same split.

use crate::VdpError;

/// The largest value a 9-bit TLV length field can carry.
pub const MAX_TLV_VALUE_LEN: usize = 0x1ff;

pub(crate) fn header(tlv_type: u8, value_len: usize) -> [u8; 2] {
    // Callers check both bounds first; the masks keep a mistake from
    // corrupting the neighbouring field instead of being caught by tests.
    let word = (u16::from(tlv_type & 0x7f) << 9) | (value_len as u16 & 0x1ff);
    word.to_be_bytes()
}

/// Reads the header at `offset`; `base` is added to offsets in errors.
pub(crate) fn read_header(bytes: &[u8], base: usize) -> Result<(u8, usize), VdpError> {
    let mut r = Reader::new(bytes, base);
    let word = r.u16("TLV header")?;
    Ok(((word >> 9) as u8, usize::from(word & 0x1ff)))
}

/// Bounds-checked big-endian cursor whose errors name the field and its
/// absolute offset.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], VdpError> {
        let available = self.remaining();
        if n > available {
            return Err(VdpError::Truncated {
                field,
                offset: self.offset(),
                needed: n,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], VdpError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, VdpError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, VdpError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u24(&mut self, field: &'static str) -> Result<u32, VdpError> {
        let [a, b, c] = self.array(field)?;
        Ok(u32::from_be_bytes([0, a, b, c]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, VdpError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
}
