//! Option negotiation (fixed newstyle): the greeting, client options and
//! the server's replies.

use super::*;

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
