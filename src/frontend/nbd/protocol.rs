//! The NBD wire format (fixed newstyle handshake, transmission requests and replies) as pure
//! encode/decode functions: no I/O, so the server and a fuzz target can share them.
//!
//! Written from the protocol description (`doc/proto.md` of the NetworkBlockDevice project).
//! All integers are big-endian.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefixes every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
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

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation state flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in `NBD_REP_META_CONTEXT` and block status replies (any non-zero value works).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Error values of the transmission phase: the protocol's own numbering (Linux values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload we accept, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read; bigger ones are skipped and refused.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_HEADER_LEN: usize = 28;

/// Maps an errno of the block stack to one the protocol defines.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

// ---------------------------------------------------------------------------------------
// Handshake

/// The server's opening: magic, newstyle magic and handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags after the greeting. Unknown bits mean the peer is not speaking our protocol:
/// the spec requires dropping the connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, FramingError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(FramingError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The peer broke the framing: the only safe answer is closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
}

/// Header of one client option; `len` bytes of data follow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, FramingError> {
    let magic = be_u64(&bytes[0..8]);
    if magic != IHAVEOPT {
        return Err(FramingError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(&bytes[8..12]),
        len: be_u32(&bytes[12..16]),
    })
}

/// A decoded client option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    Unknown(u32),
}

/// Why an option's data is refused (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub String);

/// Decodes the data of option `option` (already bounded by [`MAX_OPTION_LEN`]).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let mut r = Reader::new(data);
    let parsed = match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(r.string(data.len())?),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST => ClientOption::List,
        OPT_STARTTLS => ClientOption::StartTls,
        OPT_STRUCTURED_REPLY => ClientOption::StructuredReply,
        OPT_INFO | OPT_GO => {
            let name_len = r.u32()? as usize;
            let name = r.string(name_len)?;
            let count = r.u16()? as usize;
            // Bounded by the data length: no allocation before the bytes exist.
            if r.remaining() != count * 2 {
                return Err(InvalidOption(format!(
                    "information request count {count} does not match the option length"
                )));
            }
            let requests = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
            ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let name_len = r.u32()? as usize;
            let export = r.string(name_len)?;
            let count = r.u32()? as usize;
            // Each query takes at least 4 bytes: bound the count by the data before looping.
            if count > r.remaining() / 4 {
                return Err(InvalidOption(format!(
                    "meta context query count {count} exceeds the option length"
                )));
            }
            let mut queries = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r.u32()? as usize;
                queries.push(r.string(len)?);
            }
            ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                export,
                queries,
            }
        }
        other => return Ok(ClientOption::Unknown(other)),
    };
    if r.remaining() != 0 {
        return Err(InvalidOption(format!(
            "{} trailing bytes in option {option}",
            r.remaining()
        )));
    }
    Ok(parsed)
}

/// One option reply: header plus `data`.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_SERVER` data: an export name and a human-readable description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` data.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_INFO_EXPORT` data.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data.
pub fn encode_info_string(info: u16, text: &str) -> Vec<u8> {
    let mut out = info.to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for value in [minimum, preferred, maximum] {
        out.extend_from_slice(&value.to_be_bytes());
    }
    out
}

/// What the server sends after `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client
/// asked for none) 124 zero bytes.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + 124, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Transmission

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
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
    pub fn from_code(code: u16) -> Self {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// Command flags that are meaningful for this command. FUA is accepted everywhere (the
    /// spec lets servers ignore it where it means nothing).
    fn allowed_flags(self, structured: bool) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read if structured => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }

    fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// A decoded request header. For `Write`, `len` bytes of payload follow on the wire.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }
}

/// Decodes a request header. Only a bad magic is fatal: the rest is checked by
/// [`check_request`], which answers with an error while keeping the connection.
pub fn parse_request(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, FramingError> {
    let magic = be_u32(&bytes[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(FramingError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&bytes[4..6]),
        command: Command::from_code(be_u16(&bytes[6..8])),
        cookie: be_u64(&bytes[8..16]),
        offset: be_u64(&bytes[16..24]),
        len: be_u32(&bytes[24..28]),
    })
}

/// What the negotiated session allows; the input of [`check_request`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    pub export_size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
}

/// Validates a request against the session: `Err(errno)` is the error to reply with.
/// A `Write` with a bad header still has its payload on the wire: the caller must skip it.
pub fn check_request(req: &Request, limits: &SessionLimits) -> Result<(), u32> {
    if let Command::Unknown(_) = req.command {
        return Err(EINVAL);
    }
    if req.flags & !req.command.allowed_flags(limits.structured) != 0 {
        return Err(EINVAL);
    }
    if req.command.writes() && limits.read_only {
        return Err(EPERM);
    }
    match req.command {
        Command::Read | Command::Write if req.len > MAX_PAYLOAD => return Err(EOVERFLOW),
        Command::BlockStatus if !limits.base_allocation || req.len == 0 => return Err(EINVAL),
        Command::Disc | Command::Flush => {
            return if req.offset == 0 && req.len == 0 {
                Ok(())
            } else {
                Err(EINVAL)
            };
        }
        _ => {}
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= limits.export_size);
    if !in_range {
        // The spec asks for ENOSPC when a write runs past the end.
        return Err(
            if matches!(req.command, Command::Write | Command::WriteZeroes) {
                ENOSPC
            } else {
                EINVAL
            },
        );
    }
    Ok(())
}

pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Header of one structured reply chunk with `len` payload bytes.
pub fn encode_chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// Header and offset of an `OFFSET_DATA` chunk; the caller sends `data_len` bytes after it.
pub fn encode_data_chunk_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> Vec<u8> {
    let mut out = encode_chunk_header(
        cookie,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        data_len + 8,
    )
    .to_vec();
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// An `OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeros.
pub fn encode_hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut out = encode_chunk_header(cookie, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12).to_vec();
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A final `NONE` chunk (ends a structured reply whose last chunk could not carry DONE).
pub fn encode_none_chunk(cookie: u64) -> [u8; 20] {
    encode_chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
}

/// One extent of a block status reply.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A final `BLOCK_STATUS` chunk for context `context_id`.
pub fn encode_block_status_chunk(cookie: u64, context_id: u32, extents: &[Extent]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut out =
        encode_chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    out.extend_from_slice(&context_id.to_be_bytes());
    for extent in extents {
        out.extend_from_slice(&extent.len.to_be_bytes());
        out.extend_from_slice(&extent.flags.to_be_bytes());
    }
    out
}

/// A final `ERROR` chunk with a message for the user (cut to the protocol's string limit).
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let message = truncate_utf8(message, MAX_STRING);
    let len = 6 + message.len() as u32;
    let mut out = encode_chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---------------------------------------------------------------------------------------
// Byte helpers

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes.try_into().expect("2 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

/// Bounds-checked cursor over option data.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], InvalidOption> {
        if len > self.data.len() {
            return Err(InvalidOption(format!(
                "option data too short: need {len} more bytes, have {}",
                self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, InvalidOption> {
        self.take(2).map(be_u16)
    }

    fn u32(&mut self) -> Result<u32, InvalidOption> {
        self.take(4).map(be_u32)
    }

    fn string(&mut self, len: usize) -> Result<String, InvalidOption> {
        if len > MAX_STRING {
            return Err(InvalidOption(format!(
                "string of {len} bytes exceeds {MAX_STRING}"
            )));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| InvalidOption("string is not valid UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(
        magic: u32,
        flags: u16,
        cmd: u16,
        cookie: u64,
        off: u64,
        len: u32,
    ) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&off.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    const LIMITS: SessionLimits = SessionLimits {
        export_size: 1 << 20,
        read_only: false,
        structured: true,
        base_allocation: true,
    };

    fn check(cmd: u16, flags: u16, off: u64, len: u32, limits: &SessionLimits) -> Result<(), u32> {
        let req = parse_request(&request_bytes(REQUEST_MAGIC, flags, cmd, 7, off, len)).unwrap();
        check_request(&req, limits)
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_fixed_newstyle() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(FramingError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header_checks_magic() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 9
            }
        );
        b[0] = b'X';
        assert!(matches!(
            parse_option_header(&b),
            Err(FramingError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn go_option_decodes_name_and_requests() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vm1");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_option(OPT_GO, &data).unwrap(),
            ClientOption::Info {
                go: true,
                name: "vm1".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        // A count that does not match the length, or a name longer than the data, is invalid.
        let mut bad = data.clone();
        bad[8] = 0xff;
        assert!(parse_option(OPT_GO, &bad).is_err());
        let mut bad = data.clone();
        bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_option(OPT_INFO, &bad).is_err());
        assert!(parse_option(OPT_INFO, &data[..5]).is_err());
    }

    #[test]
    fn meta_context_option_decodes_queries_and_bounds_the_count() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        data.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &data).unwrap(),
            ClientOption::MetaContext {
                set: true,
                export: String::new(),
                queries: vec![BASE_ALLOCATION.into()]
            }
        );
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_LIST_META_CONTEXT, &huge).is_err());
    }

    #[test]
    fn simple_options_reject_trailing_data_and_unknown_pass_through() {
        assert_eq!(parse_option(OPT_LIST, &[]).unwrap(), ClientOption::List);
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, &[0, 0]).is_err());
        assert_eq!(
            parse_option(99, &[1, 2]).unwrap(),
            ClientOption::Unknown(99)
        );
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"disk").unwrap(),
            ClientOption::ExportName("disk".into())
        );
    }

    #[test]
    fn option_reply_layout() {
        let r = encode_option_reply(OPT_GO, REP_ACK, &[9, 9]);
        assert_eq!(&r[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&r[12..16], &REP_ACK.to_be_bytes());
        assert_eq!(&r[16..20], &2u32.to_be_bytes());
        assert_eq!(&r[20..], &[9, 9]);
        assert_eq!(encode_info_export(1 << 30, 0x10d).len(), 12);
        assert_eq!(encode_info_block_size(1, 4096, MAX_PAYLOAD).len(), 14);
        assert_eq!(encode_export_name_reply(5, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
    }

    #[test]
    fn request_with_bad_magic_loses_framing() {
        let b = request_bytes(0x1234_5678, 0, 0, 1, 0, 512);
        assert_eq!(
            parse_request(&b),
            Err(FramingError::BadRequestMagic(0x1234_5678))
        );
    }

    #[test]
    fn request_decodes_fields() {
        let b = request_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, 1, 0xdead, 4096, 512);
        let r = parse_request(&b).unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!((r.cookie, r.offset, r.len), (0xdead, 4096, 512));
        assert!(r.fua());
        assert_eq!(r.payload_len(), 512);
    }

    #[test]
    fn in_range_requests_pass() {
        assert_eq!(check(0, 0, 0, 1 << 20, &LIMITS), Ok(()));
        assert_eq!(check(1, CMD_FLAG_FUA, 1000, 24, &LIMITS), Ok(()));
        assert_eq!(check(6, CMD_FLAG_NO_HOLE, 0, 512, &LIMITS), Ok(()));
        assert_eq!(check(7, CMD_FLAG_REQ_ONE, 0, 512, &LIMITS), Ok(()));
        assert_eq!(check(3, 0, 0, 0, &LIMITS), Ok(()));
        assert_eq!(check(0, CMD_FLAG_DF, 0, 1, &LIMITS), Ok(()));
    }

    #[test]
    fn out_of_range_requests_get_einval_or_enospc() {
        let size = LIMITS.export_size;
        assert_eq!(check(0, 0, size, 1, &LIMITS), Err(EINVAL));
        assert_eq!(check(1, 0, size - 1, 2, &LIMITS), Err(ENOSPC));
        assert_eq!(check(6, 0, size, 512, &LIMITS), Err(ENOSPC));
        assert_eq!(check(4, 0, u64::MAX, 2, &LIMITS), Err(EINVAL));
        assert_eq!(check(5, 0, size + 1, 0, &LIMITS), Err(EINVAL));
    }

    #[test]
    fn oversize_payloads_get_eoverflow() {
        let limits = SessionLimits {
            export_size: 1 << 40,
            ..LIMITS
        };
        assert_eq!(check(0, 0, 0, MAX_PAYLOAD + 1, &limits), Err(EOVERFLOW));
        assert_eq!(check(1, 0, 0, u32::MAX, &limits), Err(EOVERFLOW));
        // Commands without payload may cover more.
        assert_eq!(check(4, 0, 0, u32::MAX, &limits), Ok(()));
    }

    #[test]
    fn unknown_commands_and_flags_get_einval() {
        assert_eq!(check(42, 0, 0, 0, &LIMITS), Err(EINVAL));
        assert_eq!(check(0, CMD_FLAG_NO_HOLE, 0, 1, &LIMITS), Err(EINVAL));
        assert_eq!(check(0, 1 << 9, 0, 1, &LIMITS), Err(EINVAL));
        let simple = SessionLimits {
            structured: false,
            ..LIMITS
        };
        assert_eq!(check(0, CMD_FLAG_DF, 0, 1, &simple), Err(EINVAL));
        let no_meta = SessionLimits {
            base_allocation: false,
            ..LIMITS
        };
        assert_eq!(check(7, 0, 0, 512, &no_meta), Err(EINVAL));
        assert_eq!(check(7, 0, 0, 0, &LIMITS), Err(EINVAL));
        assert_eq!(check(3, 0, 1, 0, &LIMITS), Err(EINVAL));
    }

    #[test]
    fn read_only_session_refuses_writes_with_eperm() {
        let ro = SessionLimits {
            read_only: true,
            ..LIMITS
        };
        for cmd in [1, 4, 6] {
            assert_eq!(check(cmd, 0, 0, 512, &ro), Err(EPERM), "command {cmd}");
        }
        assert_eq!(check(0, 0, 0, 512, &ro), Ok(()));
    }

    #[test]
    fn reply_layouts() {
        let s = encode_simple_reply(0x0102, EIO);
        assert_eq!(&s[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[4..8], &EIO.to_be_bytes());
        assert_eq!(&s[8..16], &0x0102u64.to_be_bytes());

        let d = encode_data_chunk_header(5, 4096, 100, true);
        assert_eq!(&d[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&d[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&d[16..20], &108u32.to_be_bytes());
        assert_eq!(&d[20..28], &4096u64.to_be_bytes());

        let h = encode_hole_chunk(5, 0, 512, false);
        assert_eq!(&h[4..6], &[0, 0]);
        assert_eq!(h.len(), 32);

        let b = encode_block_status_chunk(
            5,
            BASE_ALLOCATION_ID,
            &[Extent {
                len: 512,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(&b[16..20], &12u32.to_be_bytes());
        assert_eq!(&b[24..28], &512u32.to_be_bytes());
        assert_eq!(&b[28..32], &3u32.to_be_bytes());

        let e = encode_error_chunk(5, EIO, &"é".repeat(3000));
        let msg_len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(msg_len <= MAX_STRING);
        assert_eq!(e.len(), 26 + msg_len);
        assert!(std::str::from_utf8(&e[26..]).is_ok());
    }

    #[test]
    fn store_errnos_map_to_protocol_errors() {
        assert_eq!(errno_to_nbd(libc::EROFS), EPERM);
        assert_eq!(errno_to_nbd(libc::ETIMEDOUT), EIO);
        assert_eq!(errno_to_nbd(libc::EINVAL), EINVAL);
    }
}
