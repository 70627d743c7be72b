//! NBD wire format: constants, decoders for what clients send and encoders for what the server sends.
//!
//! Pure byte code, no I/O, so every message has a golden-bytes test below and a fuzz target can
//! feed the decoders arbitrary input. All integers are big-endian (network order), as the NBD
//! specification (`doc/proto.md` in NetworkBlockDevice/nbd) requires. Decoders never panic: a
//! malformed message is a [`ProtoError`].

use bytes::{BufMut, BytesMut};

// ---- Handshake ----------------------------------------------------------------------------

/// "NBDMAGIC", the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also prefixes every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefixes every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// What we send: fixed newstyle, and we can skip the 124 zero bytes after EXPORT_NAME.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

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
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Longest string (export name, context name, description) we accept or send: the spec's limit.
pub const STRING_BYTES_MAX: usize = 4096;
/// Largest option payload we buffer. The largest legitimate one is SET_META_CONTEXT with a few
/// 4 KiB queries; anything bigger is drained and refused with `NBD_REP_ERR_TOO_BIG`.
pub const OPTION_BYTES_MAX: u32 = 64 << 10;
/// Most meta-context queries we look at in one option; more is refused as invalid. The spec has
/// exactly one context we serve, so a client never needs more than a handful.
pub const META_QUERIES_MAX: u32 = 128;

/// The one metadata context we serve.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` (any value is allowed; non-zero catches clients that assume 0).
pub const CONTEXT_ID_BASE_ALLOCATION: u32 = 1;

// ---- Transmission -------------------------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD error numbers: the protocol's own values, fixed on the wire whatever the host's errno.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad magic {got:#x} (expected {expected:#x}); likely cause: the peer is not an NBD client or lost sync")]
    BadMagic { expected: u64, got: u64 },
    #[error("message truncated: needed {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("string of {0} bytes exceeds the limit of {STRING_BYTES_MAX}")]
    StringTooLong(usize),
    #[error("string contains a NUL byte or is not UTF-8")]
    BadString,
    #[error("{0} trailing bytes after the option payload")]
    TrailingBytes(usize),
    #[error("{0} meta-context queries exceed the limit of {META_QUERIES_MAX}")]
    TooManyQueries(u32),
}

/// Reads big-endian fields from a byte slice without ever panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated { needed: n, have: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes: bounded, UTF-8, no NUL.
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > STRING_BYTES_MAX {
            return Err(ProtoError::StringTooLong(len));
        }
        let b = self.take(len)?;
        if b.contains(&0) {
            return Err(ProtoError::BadString);
        }
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString)
    }

    /// A string prefixed by its 32-bit length.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(&self) -> Result<(), ProtoError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(ProtoError::TrailingBytes(n)),
        }
    }
}

/// The server's greeting: magic, IHAVEOPT and the handshake flags (18 bytes).
pub fn encode_greeting(out: &mut BytesMut) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(HANDSHAKE_FLAGS);
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the client's 32-bit flags. An unknown flag means the client expects something we do
/// not do: the spec says to close the connection.
pub fn decode_client_flags(b: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(b);
    if flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags { fixed_newstyle: flags & CLIENT_FIXED_NEWSTYLE != 0, no_zeroes: flags & CLIENT_NO_ZEROES != 0 })
}

/// The 16-byte header of an option: IHAVEOPT, option number, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub const OPTION_HEADER_BYTES: usize = 16;

pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(b);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic { expected: IHAVEOPT, got: magic });
    }
    Ok(OptionHeader { option: r.u32()?, len: r.u32()? })
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = r.u16()?;
    let mut infos = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, infos })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn decode_meta_request(data: &[u8]) -> Result<MetaRequest, ProtoError> {
    let mut r = Reader::new(data);
    let export = r.string32()?;
    let n = r.u32()?;
    if n > META_QUERIES_MAX {
        return Err(ProtoError::TooManyQueries(n));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(r.string32()?);
    }
    r.finish()?;
    Ok(MetaRequest { export, queries })
}

/// An option reply: magic, option, reply type, payload length, payload.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply: u32, payload: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// An error reply carrying a human-readable message (truncated to the string limit).
pub fn encode_option_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    let msg = truncate_str(message, STRING_BYTES_MAX);
    encode_option_reply(out, option, reply, msg.as_bytes());
}

/// NBD_REP_SERVER for LIST: the export name, then its description.
pub fn encode_rep_server(out: &mut BytesMut, option: u32, name: &str, description: &str) {
    let mut p = BytesMut::new();
    p.put_u32(name.len() as u32);
    p.put_slice(name.as_bytes());
    p.put_slice(truncate_str(description, STRING_BYTES_MAX).as_bytes());
    encode_option_reply(out, option, REP_SERVER, &p);
}

/// NBD_REP_META_CONTEXT: context id and name.
pub fn encode_rep_meta_context(out: &mut BytesMut, option: u32, id: u32, name: &str) {
    let mut p = BytesMut::new();
    p.put_u32(id);
    p.put_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &p);
}

/// Block size constraints, as advertised in NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// One NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info<'a> {
    Export { size: u64, flags: u16 },
    Name(&'a str),
    Description(&'a str),
    BlockSize(BlockSize),
}

pub fn encode_rep_info(out: &mut BytesMut, option: u32, info: &Info<'_>) {
    let mut p = BytesMut::new();
    match info {
        Info::Export { size, flags } => {
            p.put_u16(INFO_EXPORT);
            p.put_u64(*size);
            p.put_u16(*flags);
        }
        Info::Name(name) => {
            p.put_u16(INFO_NAME);
            p.put_slice(truncate_str(name, STRING_BYTES_MAX).as_bytes());
        }
        Info::Description(d) => {
            p.put_u16(INFO_DESCRIPTION);
            p.put_slice(truncate_str(d, STRING_BYTES_MAX).as_bytes());
        }
        Info::BlockSize(bs) => {
            p.put_u16(INFO_BLOCK_SIZE);
            p.put_u32(bs.min);
            p.put_u32(bs.preferred);
            p.put_u32(bs.max);
        }
    }
    encode_option_reply(out, option, REP_INFO, &p);
}

/// The reply that ends an NBD_OPT_EXPORT_NAME negotiation: size, transmission flags and, unless the
/// client asked for NO_ZEROES, 124 bytes of zero padding.
pub fn encode_export_name_reply(out: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- Requests and replies -----------------------------------------------------------------

/// A transmission request header (28 bytes). The payload of a WRITE follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn decode_request_header(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, ProtoError> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic { expected: u64::from(REQUEST_MAGIC), got: u64::from(magic) });
    }
    Ok(RequestHeader { flags: r.u16()?, command: r.u16()?, cookie: r.u64()?, offset: r.u64()?, len: r.u32()? })
}

pub fn encode_request_header(out: &mut BytesMut, h: &RequestHeader) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(h.flags);
    out.put_u16(h.command);
    out.put_u64(h.cookie);
    out.put_u64(h.offset);
    out.put_u32(h.len);
}

/// A simple reply header; a successful READ's data follows it.
pub fn encode_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk header; `len` payload bytes follow it.
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len);
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// NBD_REPLY_TYPE_NONE with the DONE flag: the end of a reply with no more payload.
pub fn encode_chunk_none(out: &mut BytesMut, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// The header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk; the caller sends `data_len`
/// bytes of data after it (kept separate so read data is never copied).
pub fn encode_chunk_offset_data(out: &mut BytesMut, cookie: u64, offset: u64, data_len: u32, done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len);
    out.put_u64(offset);
}

/// NBD_REPLY_TYPE_OFFSET_HOLE: `len` bytes at `offset` read as zeros.
pub fn encode_chunk_offset_hole(out: &mut BytesMut, cookie: u64, offset: u64, len: u32, done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// NBD_REPLY_TYPE_ERROR: an errno and a message (truncated to fit the 16-bit length).
pub fn encode_chunk_error(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = truncate_str(message, STRING_BYTES_MAX);
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u32,
    pub flags: u32,
}

/// NBD_REPLY_TYPE_BLOCK_STATUS for one context.
pub fn encode_chunk_block_status(out: &mut BytesMut, cookie: u64, context: u32, extents: &[StatusExtent], done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * extents.len() as u32);
    out.put_u32(context);
    for e in extents {
        out.put_u32(e.len);
        out.put_u32(e.flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut b = BytesMut::new();
        f(&mut b);
        b.to_vec()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn greeting_is_magic_ihaveopt_and_flags() {
        assert_eq!(bytes(encode_greeting), hex("4e42444d41474943 49484156454f5054 0003"));
        assert_eq!(&bytes(encode_greeting)[..8], b"NBDMAGIC");
        assert_eq!(&bytes(encode_greeting)[8..16], b"IHAVEOPT");
    }

    #[test]
    fn client_flags_decode_and_unknown_flags_are_refused() {
        assert_eq!(decode_client_flags([0, 0, 0, 3]), Ok(ClientFlags { fixed_newstyle: true, no_zeroes: true }));
        assert_eq!(decode_client_flags([0, 0, 0, 1]), Ok(ClientFlags { fixed_newstyle: true, no_zeroes: false }));
        assert_eq!(decode_client_flags([0, 0, 0, 0]), Ok(ClientFlags { fixed_newstyle: false, no_zeroes: false }));
        assert_eq!(decode_client_flags([0, 0, 0, 4]), Err(ProtoError::UnknownClientFlags(4)));
        assert_eq!(decode_client_flags([0x80, 0, 0, 1]), Err(ProtoError::UnknownClientFlags(0x8000_0001)));
    }

    #[test]
    fn option_header_decodes_and_rejects_bad_magic() {
        let b: [u8; 16] = hex("49484156454f5054 00000007 0000000a").try_into().unwrap();
        assert_eq!(decode_option_header(&b), Ok(OptionHeader { option: OPT_GO, len: 10 }));
        let b: [u8; 16] = hex("49484156454f5055 00000007 0000000a").try_into().unwrap();
        assert!(matches!(decode_option_header(&b), Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn info_request_decodes_name_and_info_list() {
        let d = hex("00000003 766f6c 0002 0003 0001");
        assert_eq!(
            decode_info_request(&d),
            Ok(InfoRequest { name: "vol".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        let d = hex("00000000 0000");
        assert_eq!(decode_info_request(&d), Ok(InfoRequest { name: String::new(), infos: vec![] }));
    }

    #[test]
    fn info_request_rejects_malformed_payloads() {
        // Name length beyond the payload.
        assert!(matches!(decode_info_request(&hex("00000010 6162")), Err(ProtoError::Truncated { .. })));
        // Name length beyond the string limit: refused before looking for the bytes.
        assert_eq!(decode_info_request(&hex("ffffffff")), Err(ProtoError::StringTooLong(0xffff_ffff)));
        // Info count larger than the payload.
        assert!(matches!(decode_info_request(&hex("00000000 0005 0001")), Err(ProtoError::Truncated { .. })));
        // Trailing bytes.
        assert_eq!(decode_info_request(&hex("00000000 0000 ff")), Err(ProtoError::TrailingBytes(1)));
        // NUL in the name.
        assert_eq!(decode_info_request(&hex("00000002 6100 0000")), Err(ProtoError::BadString));
        // Empty payload.
        assert!(decode_info_request(&[]).is_err());
    }

    #[test]
    fn meta_request_decodes_queries_and_bounds_their_number() {
        let d = hex("00000001 61 00000002 0000000f 626173653a616c6c6f636174696f6e 00000005 626173653a");
        assert_eq!(
            decode_meta_request(&d),
            Ok(MetaRequest { export: "a".into(), queries: vec!["base:allocation".into(), "base:".into()] })
        );
        assert_eq!(decode_meta_request(&hex("00000000 ffffffff")), Err(ProtoError::TooManyQueries(u32::MAX)));
        assert!(matches!(decode_meta_request(&hex("00000000 00000001")), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn option_replies_have_magic_option_type_and_length() {
        assert_eq!(
            bytes(|b| encode_option_reply(b, OPT_ABORT, REP_ACK, &[])),
            hex("0003e889045565a9 00000002 00000001 00000000")
        );
        assert_eq!(
            bytes(|b| encode_option_error(b, 42, REP_ERR_UNSUP, "no")),
            hex("0003e889045565a9 0000002a 80000001 00000002 6e6f")
        );
        assert_eq!(
            bytes(|b| encode_rep_server(b, OPT_LIST, "vol", "d")),
            hex("0003e889045565a9 00000003 00000002 00000008 00000003 766f6c 64")
        );
        assert_eq!(
            bytes(|b| encode_rep_meta_context(b, OPT_SET_META_CONTEXT, 1, "base:allocation")),
            hex("0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e")
        );
    }

    #[test]
    fn info_replies_encode_each_info_type() {
        assert_eq!(
            bytes(|b| encode_rep_info(b, OPT_GO, &Info::Export { size: 1 << 30, flags: 0x0d6d })),
            hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0d6d")
        );
        assert_eq!(
            bytes(|b| encode_rep_info(b, OPT_INFO, &Info::Name("v"))),
            hex("0003e889045565a9 00000006 00000003 00000003 0001 76")
        );
        assert_eq!(
            bytes(|b| encode_rep_info(b, OPT_INFO, &Info::Description("dd"))),
            hex("0003e889045565a9 00000006 00000003 00000004 0002 6464")
        );
        let bs = BlockSize { min: 1, preferred: 4096, max: 32 << 20 };
        assert_eq!(
            bytes(|b| encode_rep_info(b, OPT_GO, &Info::BlockSize(bs))),
            hex("0003e889045565a9 00000007 00000003 0000000e 0003 00000001 00001000 02000000")
        );
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        assert_eq!(bytes(|b| encode_export_name_reply(b, 512, 0x0001, true)), hex("0000000000000200 0001"));
        let padded = bytes(|b| encode_export_name_reply(b, 512, 0x0001, false));
        assert_eq!(padded.len(), 10 + 124);
        assert!(padded[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn request_header_round_trips_and_rejects_bad_magic() {
        let b = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
        let arr: [u8; 28] = b.clone().try_into().unwrap();
        let h = decode_request_header(&arr).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(bytes(|o| encode_request_header(o, &h)), b);
        let mut bad = arr;
        bad[0] = 0x26;
        assert!(matches!(decode_request_header(&bad), Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn simple_reply_is_magic_error_cookie() {
        assert_eq!(bytes(|b| encode_simple_reply(b, EINVAL, 7)), hex("67446698 00000016 0000000000000007"));
    }

    #[test]
    fn structured_chunks_encode_each_type() {
        assert_eq!(bytes(|b| encode_chunk_none(b, 9)), hex("668e33ef 0001 0000 0000000000000009 00000000"));
        assert_eq!(
            bytes(|b| encode_chunk_offset_data(b, 9, 4096, 4, false)),
            hex("668e33ef 0000 0001 0000000000000009 0000000c 0000000000001000")
        );
        assert_eq!(
            bytes(|b| encode_chunk_offset_hole(b, 9, 8192, 4096, true)),
            hex("668e33ef 0001 0002 0000000000000009 0000000c 0000000000002000 00001000")
        );
        assert_eq!(
            bytes(|b| encode_chunk_error(b, 9, EIO, "x")),
            hex("668e33ef 0001 8001 0000000000000009 00000007 00000005 0001 78")
        );
        let ext = [StatusExtent { len: 4096, flags: 0 }, StatusExtent { len: 8192, flags: STATE_HOLE | STATE_ZERO }];
        assert_eq!(
            bytes(|b| encode_chunk_block_status(b, 9, 1, &ext, true)),
            hex("668e33ef 0001 0005 0000000000000009 00000014 00000001 00001000 00000000 00002000 00000003")
        );
    }

    #[test]
    fn long_strings_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(3000); // 6000 bytes
        let t = truncate_str(&s, STRING_BYTES_MAX);
        assert!(t.len() <= STRING_BYTES_MAX && t.is_char_boundary(t.len()));
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        for n in 0..40 {
            let data = vec![0xffu8; n];
            let _ = decode_info_request(&data);
            let _ = decode_meta_request(&data);
        }
    }
}
