//! The transmission phase: request headers, the server's verdict on each,
//! and simple replies.

use super::*;

/// A request's command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::Cache => CMD_CACHE,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque to the server; echoed in the reply (older specs: "handle").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a request header. Only the magic can be wrong here; what the
    /// fields mean is judged by [`check_request`].
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(Self {
            flags: be_u16(b, 4),
            command: Command::from_u16(be_u16(b, 6)),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.as_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes that follow the header on the wire. Only WRITE carries a
    /// payload; the server must consume it even when it rejects the request,
    /// or the next header would be read from the middle of the data.
    pub fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }

    /// End of the byte range, if it does not overflow.
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }
}

/// What the server does with a well-framed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it out.
    Serve,
    /// Consume any payload, reply with this NBD error, keep the connection.
    Fail(u32),
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
}

/// Judges a request against the export and the flags advertised to the
/// client. Errors follow the spec's "Error values" section: a write past
/// the end is ENOSPC, a read or trim past the end EINVAL, an unknown
/// command or flag EINVAL. None of them disconnects: a client bug should
/// fail one I/O, not the mirror job.
pub fn check_request(req: &Request, export_size: u64, tflags: u16) -> Verdict {
    let fua = if tflags & FLAG_SEND_FUA != 0 {
        CMD_FLAG_FUA
    } else {
        0
    };
    let in_range = req.end().is_some_and(|end| end <= export_size);
    let (allowed_flags, out_of_range_err) = match req.command {
        Command::Disc => return Verdict::Disconnect,
        Command::Read => {
            if req.length > MAX_PAYLOAD {
                return Verdict::Fail(EINVAL);
            }
            (fua, EINVAL)
        }
        Command::Write => {
            if req.length > MAX_PAYLOAD {
                return Verdict::Fail(EINVAL);
            }
            (fua, ENOSPC)
        }
        Command::Flush => {
            if tflags & FLAG_SEND_FLUSH == 0 {
                return Verdict::Fail(EINVAL);
            }
            // Offset and length are reserved for FLUSH; a non-zero value is
            // a client bug that costs nothing to tolerate.
            return if req.flags & !fua != 0 {
                Verdict::Fail(EINVAL)
            } else {
                Verdict::Serve
            };
        }
        Command::Trim => {
            if tflags & FLAG_SEND_TRIM == 0 {
                return Verdict::Fail(EINVAL);
            }
            (fua, EINVAL)
        }
        Command::WriteZeroes => {
            if tflags & FLAG_SEND_WRITE_ZEROES == 0 {
                return Verdict::Fail(EINVAL);
            }
            (fua | CMD_FLAG_NO_HOLE, ENOSPC)
        }
        Command::Cache => (fua, EINVAL),
        Command::BlockStatus | Command::Unknown(_) => return Verdict::Fail(EINVAL),
    };
    if req.flags & !allowed_flags != 0 {
        return Verdict::Fail(EINVAL);
    }
    if !in_range {
        return Verdict::Fail(out_of_range_err);
    }
    Verdict::Serve
}

/// A simple reply header; READ's data follows it on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(Self {
            error: be_u32(b, 4),
            cookie: be_u64(b, 8),
        })
    }
}
