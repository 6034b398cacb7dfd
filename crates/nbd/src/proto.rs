//! The NBD wire protocol as pure functions: encoders, decoders and the
//! decisions the server makes about each option and request. Nothing here
//! touches a socket, so every rule can be unit- and property-tested, and
//! the server's I/O loop stays a thin shell around it.
//!
//! Only the subset the tandem mirror target needs is served: fixed newstyle
//! negotiation, one named export, simple replies (no structured replies, no
//! metadata contexts, no extended headers), and the commands READ, WRITE,
//! DISC, FLUSH, TRIM, WRITE_ZEROES (CACHE is accepted as a no-op).

use thiserror::Error;

/// `NBDMAGIC`, the first eight bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent after `NBDMAGIC` by the server and before every option
/// by the client.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// The handshake flags this server offers.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags this server advertises. CAN_MULTI_CONN is honest:
/// every connection does its I/O on the one shared file descriptor with no
/// private cache, so a FLUSH on any connection covers writes from all.
pub const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Error values of the reply's error field.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Advertised minimum block size: a regular file can do byte-granular I/O.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size: the page size, below which the page
/// cache does read-modify-write.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised and enforced maximum payload of READ and WRITE: the size the
/// spec says no server should treat as a denial of service, and QEMU's own
/// cap, so honest clients never exceed it.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The longest option payload accepted during haggling. The largest honest
/// option is NBD_OPT_GO with a 4096-byte name; anything far beyond that is
/// a confused or hostile client, and buffering it would be the DoS.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest export name the spec allows.
pub const MAX_NAME_LEN: usize = 4096;

pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Violations that end a connection: after any of these the byte stream can
/// no longer be trusted to be framed where we think it is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client flags {0:#x} include bits the server did not offer")]
    ClientFlags(u32),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong { option: u32, len: u32 },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------------------
// Handshake

/// What the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn server_greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    g
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Decodes the client flags. The spec makes the server drop a client
    /// that sets a bit it did not offer, as the two ends would otherwise
    /// disagree about the framing of the EXPORT_NAME reply.
    pub fn parse(raw: [u8; 4]) -> Result<Self, ProtoError> {
        let v = u32::from_be_bytes(raw);
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if v & !known != 0 {
            return Err(ProtoError::ClientFlags(v));
        }
        Ok(Self {
            fixed_newstyle: v & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: v & FLAG_C_NO_ZEROES != 0,
        })
    }

    pub fn encode(self) -> [u8; 4] {
        let mut v = 0;
        if self.fixed_newstyle {
            v |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            v |= FLAG_C_NO_ZEROES;
        }
        v.to_be_bytes()
    }
}

/// The fixed 16-byte head of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Decodes an option head and enforces [`MAX_OPTION_LEN`] so the caller
    /// may allocate `len` bytes for the payload without further thought.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = be_u32(b, 8);
        let len = be_u32(b, 12);
        if len > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong { option, len });
        }
        Ok(Self { option, len })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The head of a server option reply (decoded by clients; used in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn parse(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        Ok(Self {
            option: be_u32(b, 8),
            reply: be_u32(b, 12),
            len: be_u32(b, 16),
        })
    }
}

/// Appends one option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    // Every payload built here is tiny (an export name of at most
    // MAX_NAME_LEN bytes at worst), so it always fits the 32-bit length.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// The reply that ends haggling after `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(10 + 124, 0);
    }
    b
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data; `None` when it is malformed, which the
    /// server answers with `NBD_REP_ERR_INVALID` (the option's own length
    /// already told us where the next option starts, so no framing is lost).
    pub fn parse(data: &[u8]) -> Option<Self> {
        if data.len() < 6 {
            return None;
        }
        let name_len = usize::try_from(be_u32(data, 0)).ok()?;
        if name_len > MAX_NAME_LEN || name_len > data.len() - 6 {
            return None;
        }
        let name = data[4..4 + name_len].to_vec();
        let rest = &data[4 + name_len..];
        let n = usize::from(be_u16(rest, 0));
        let list = &rest[2..];
        if list.len() != n * 2 {
            return None;
        }
        let requests = list
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some(Self { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// What the server offers a client: one export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo<'a> {
    pub name: &'a str,
    pub size: u64,
    pub flags: u16,
}

impl ExportInfo<'_> {
    /// The empty name selects the default export, which is our only one.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What to do after answering one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies and enter the transmission phase.
    Transmission,
    /// The client asked to abort: send the replies and close.
    Abort,
    /// The client cannot be served and the protocol leaves no way to say
    /// so but closing (an unknown name in `NBD_OPT_EXPORT_NAME`).
    Reject(&'static str),
}

/// Answers one option: appends the reply bytes to `out` and says what
/// comes next. Total over any `option` and `data`.
pub fn handle_option(
    option: u32,
    data: &[u8],
    export: &ExportInfo<'_>,
    client: ClientFlags,
    out: &mut Vec<u8>,
) -> OptionOutcome {
    match option {
        OPT_EXPORT_NAME => {
            if export.matches(data) {
                out.extend_from_slice(&export_name_reply(
                    export.size,
                    export.flags,
                    client.no_zeroes,
                ));
                OptionOutcome::Transmission
            } else {
                OptionOutcome::Reject("NBD_OPT_EXPORT_NAME names an unknown export")
            }
        }
        OPT_ABORT => {
            put_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                put_option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                return OptionOutcome::Continue;
            }
            let mut entry = Vec::with_capacity(4 + export.name.len());
            entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
            entry.extend_from_slice(export.name.as_bytes());
            put_option_reply(out, option, REP_SERVER, &entry);
            put_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_INFO | OPT_GO => {
            let Some(req) = InfoRequest::parse(data) else {
                put_option_reply(out, option, REP_ERR_INVALID, b"malformed info request");
                return OptionOutcome::Continue;
            };
            if !export.matches(&req.name) {
                put_option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
                return OptionOutcome::Continue;
            }
            put_option_reply(
                out,
                option,
                REP_INFO,
                &info_export(export.size, export.flags),
            );
            // Sent whether asked for or not: the values are the spec's
            // defaults, so a client that ignores them loses nothing, and
            // one that asked (QEMU does) learns the 32 MiB cap.
            put_option_reply(
                out,
                option,
                REP_INFO,
                &info_block_size(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD),
            );
            if req.requests.contains(&INFO_NAME) {
                let mut b = Vec::with_capacity(2 + export.name.len());
                b.extend_from_slice(&INFO_NAME.to_be_bytes());
                b.extend_from_slice(export.name.as_bytes());
                put_option_reply(out, option, REP_INFO, &b);
            }
            put_option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                OptionOutcome::Transmission
            } else {
                OptionOutcome::Continue
            }
        }
        OPT_STARTTLS => {
            put_option_reply(out, option, REP_ERR_UNSUP, b"TLS is not supported");
            OptionOutcome::Continue
        }
        // Structured replies, metadata contexts and extended headers are
        // deliberately refused: simple replies carry everything a mirror
        // target needs, and every client must fall back when told UNSUP.
        _ => {
            put_option_reply(out, option, REP_ERR_UNSUP, &[]);
            OptionOutcome::Continue
        }
    }
}

// ---------------------------------------------------------------------------
// Transmission

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXPORT: ExportInfo<'static> = ExportInfo {
        name: "disk",
        size: 1 << 20,
        flags: TRANSMISSION_FLAGS,
    };

    fn client() -> ClientFlags {
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        }
    }

    /// Splits a buffer of option replies into (reply type, data) pairs.
    fn replies(mut b: &[u8], option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let h = OptionReplyHeader::parse(b[..20].try_into().unwrap()).unwrap();
            assert_eq!(h.option, option);
            let len = h.len as usize;
            v.push((h.reply, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    #[test]
    fn greeting_layout() {
        let g = server_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 0b11);
    }

    #[test]
    fn client_flags() {
        assert_eq!(ClientFlags::parse([0, 0, 0, 3]).unwrap(), client());
        assert_eq!(
            ClientFlags::parse([0, 0, 0, 1]).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: false
            }
        );
        assert_eq!(
            ClientFlags::parse([0, 0, 0, 4]),
            Err(ProtoError::ClientFlags(4))
        );
        assert_eq!(ClientFlags::parse(client().encode()).unwrap(), client());
    }

    #[test]
    fn option_header_limits() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 10,
        };
        assert_eq!(OptionHeader::parse(&h.encode()).unwrap(), h);
        let big = OptionHeader {
            option: OPT_GO,
            len: MAX_OPTION_LEN + 1,
        };
        assert!(matches!(
            OptionHeader::parse(&big.encode()),
            Err(ProtoError::OptionTooLong { .. })
        ));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_known_export_enters_transmission() {
        let req = InfoRequest {
            name: b"disk".to_vec(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut out = Vec::new();
        let o = handle_option(OPT_GO, &req.encode(), &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Transmission);
        let r = replies(&out, OPT_GO);
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0],
            (REP_INFO, info_export(1 << 20, TRANSMISSION_FLAGS).to_vec())
        );
        assert_eq!(
            r[1],
            (REP_INFO, info_block_size(1, 4096, 32 << 20).to_vec())
        );
        assert_eq!(r[2].1, [&[0u8, 1][..], b"disk"].concat());
        assert_eq!(r[3], (REP_ACK, vec![]));
    }

    #[test]
    fn info_does_not_end_haggling_and_default_name_matches() {
        let req = InfoRequest {
            name: vec![],
            requests: vec![],
        };
        let mut out = Vec::new();
        let o = handle_option(OPT_INFO, &req.encode(), &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Continue);
        assert_eq!(replies(&out, OPT_INFO).last().unwrap().0, REP_ACK);
    }

    #[test]
    fn go_unknown_export_or_garbage() {
        let req = InfoRequest {
            name: b"other".to_vec(),
            requests: vec![],
        };
        let mut out = Vec::new();
        let o = handle_option(OPT_GO, &req.encode(), &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Continue);
        assert_eq!(replies(&out, OPT_GO)[0].0, REP_ERR_UNKNOWN);

        out.clear();
        let o = handle_option(OPT_GO, &[0, 0, 0, 9, 1], &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Continue);
        assert_eq!(replies(&out, OPT_GO)[0].0, REP_ERR_INVALID);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut out = Vec::new();
        let o = handle_option(OPT_EXPORT_NAME, b"disk", &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Transmission);
        assert_eq!(out.len(), 10);
        assert_eq!(&out[0..8], &(1u64 << 20).to_be_bytes());

        out.clear();
        let old = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        };
        handle_option(OPT_EXPORT_NAME, b"", &EXPORT, old, &mut out);
        assert_eq!(out.len(), 134);

        out.clear();
        let o = handle_option(OPT_EXPORT_NAME, b"nope", &EXPORT, client(), &mut out);
        assert!(matches!(o, OptionOutcome::Reject(_)));
        assert!(out.is_empty());
    }

    #[test]
    fn list_abort_and_unsupported() {
        let mut out = Vec::new();
        handle_option(OPT_LIST, &[], &EXPORT, client(), &mut out);
        let r = replies(&out, OPT_LIST);
        assert_eq!(r[0], (REP_SERVER, [&[0u8, 0, 0, 4][..], b"disk"].concat()));
        assert_eq!(r[1].0, REP_ACK);

        out.clear();
        handle_option(OPT_LIST, &[1], &EXPORT, client(), &mut out);
        assert_eq!(replies(&out, OPT_LIST)[0].0, REP_ERR_INVALID);

        out.clear();
        let o = handle_option(OPT_ABORT, &[], &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Abort);
        assert_eq!(replies(&out, OPT_ABORT), vec![(REP_ACK, vec![])]);

        for opt in [
            OPT_STRUCTURED_REPLY,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
            OPT_EXTENDED_HEADERS,
            OPT_STARTTLS,
            OPT_PEEK_EXPORT,
            0xdead_beef,
        ] {
            out.clear();
            let o = handle_option(opt, &[1, 2, 3], &EXPORT, client(), &mut out);
            assert_eq!(o, OptionOutcome::Continue);
            assert_eq!(replies(&out, opt)[0].0, REP_ERR_UNSUP, "option {opt}");
        }
    }

    fn req(command: Command, offset: u64, length: u32, flags: u16) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_checks() {
        let size = 1 << 20;
        let f = TRANSMISSION_FLAGS;
        let ok = |r| check_request(&r, size, f);
        assert_eq!(ok(req(Command::Read, 0, 4096, 0)), Verdict::Serve);
        assert_eq!(
            ok(req(Command::Write, size - 1, 1, CMD_FLAG_FUA)),
            Verdict::Serve
        );
        assert_eq!(
            ok(req(Command::Write, size - 1, 2, 0)),
            Verdict::Fail(ENOSPC)
        );
        assert_eq!(ok(req(Command::Read, size, 1, 0)), Verdict::Fail(EINVAL));
        assert_eq!(
            ok(req(Command::Trim, u64::MAX, 1, 0)),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(
            ok(req(Command::WriteZeroes, 0, u32::MAX, 0)),
            Verdict::Fail(ENOSPC)
        );
        assert_eq!(
            ok(req(Command::WriteZeroes, 0, 4096, CMD_FLAG_NO_HOLE)),
            Verdict::Serve
        );
        assert_eq!(
            ok(req(Command::Write, 0, 4096, CMD_FLAG_NO_HOLE)),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(
            ok(req(Command::WriteZeroes, 0, 4096, CMD_FLAG_FAST_ZERO)),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(
            check_request(&req(Command::Write, 0, MAX_PAYLOAD + 1, 0), u64::MAX, f),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(
            check_request(&req(Command::Write, 0, MAX_PAYLOAD, 0), u64::MAX, f),
            Verdict::Serve
        );
        assert_eq!(ok(req(Command::Flush, 5, 5, 0)), Verdict::Serve);
        assert_eq!(ok(req(Command::Disc, 0, 0, 0xffff)), Verdict::Disconnect);
        assert_eq!(
            ok(req(Command::BlockStatus, 0, 1, 0)),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(
            ok(req(Command::Unknown(99), 0, 1, 0)),
            Verdict::Fail(EINVAL)
        );
        assert_eq!(ok(req(Command::Read, 0, 0, 0)), Verdict::Serve);
        assert_eq!(
            check_request(&req(Command::Flush, 0, 0, 0), size, FLAG_HAS_FLAGS),
            Verdict::Fail(EINVAL)
        );
    }

    #[test]
    fn request_bad_magic() {
        let mut b = req(Command::Read, 0, 1, 0).encode();
        b[3] = 0;
        assert!(matches!(
            Request::parse(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn simple_reply_round_trip() {
        let r = SimpleReply {
            error: EINVAL,
            cookie: 0x0102_0304_0506_0708,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(SimpleReply::parse(&b).unwrap(), r);
    }

    fn any_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_u16)
    }

    proptest! {
        #[test]
        fn request_round_trips(
            flags in any::<u16>(),
            command in any_command(),
            cookie in any::<u64>(),
            offset in any::<u64>(),
            length in any::<u32>(),
        ) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(Request::parse(&r.encode()).unwrap(), r);
            prop_assert_eq!(Command::from_u16(command.as_u16()), command);
        }

        #[test]
        fn random_request_bytes_never_panic(b in any::<[u8; REQUEST_LEN]>(), size in any::<u64>()) {
            if let Ok(r) = Request::parse(&b) {
                let _ = check_request(&r, size, TRANSMISSION_FLAGS);
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn random_options_never_panic(
            option in prop_oneof![0u32..16, any::<u32>()],
            data in proptest::collection::vec(any::<u8>(), 0..64),
            no_zeroes in any::<bool>(),
        ) {
            let c = ClientFlags { fixed_newstyle: true, no_zeroes };
            let mut out = Vec::new();
            let o = handle_option(option, &data, &EXPORT, c, &mut out);
            // Everything but EXPORT_NAME answers in framed replies.
            if option != OPT_EXPORT_NAME {
                let r = replies(&out, option);
                prop_assert!(!r.is_empty());
                if o == OptionOutcome::Transmission {
                    prop_assert_eq!(r.last().unwrap().0, REP_ACK);
                }
            }
        }

        #[test]
        fn info_request_round_trips(
            name in proptest::collection::vec(any::<u8>(), 0..64),
            requests in proptest::collection::vec(any::<u16>(), 0..8),
        ) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::parse(&r.encode()), Some(r));
        }

        #[test]
        fn random_info_request_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::parse(&data);
        }

        #[test]
        fn random_headers_never_panic(
            a in any::<[u8; OPTION_HEADER_LEN]>(),
            b in any::<[u8; OPTION_REPLY_HEADER_LEN]>(),
            c in any::<[u8; SIMPLE_REPLY_LEN]>(),
            d in any::<[u8; 4]>(),
        ) {
            let _ = OptionHeader::parse(&a);
            let _ = OptionReplyHeader::parse(&b);
            let _ = SimpleReply::parse(&c);
            let _ = ClientFlags::parse(d);
        }
    }
}
