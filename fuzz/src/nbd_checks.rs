//! The properties of the NBD fuzz targets, one public function per target: `nbd_handshake` (option
//! negotiation: client flags, option headers, INFO/GO and META_CONTEXT payloads, the
//! [`Negotiation`] state machine) and `nbd_request` (transmission request headers). Each takes
//! arbitrary bytes and must return normally; a panic is a bug.
//!
//! Shared like `checks.rs`: `fuzz/src/lib.rs` uses it for cargo-fuzz and
//! `nbd-server/tests/fuzz_smoke.rs` includes it for a stable-Rust run. It may use only
//! `syncblock_nbd`, `syncblock_engine` and `bytes`.
//!
//! Input formats.
//! - `nbd_handshake`: a setup byte (bits 0–1: the TLS mode, off/on/require/require; bits 2–3 and
//!   4–5: the admission of export "vol" and of "ro" for this client: allowed, needs TLS, denied,
//!   allowed), 4 bytes of client flags (as the wire has them), then options, each a selector
//!   byte (option number: low nibble picks a known option or, if ≥ 11, is used raw with the next
//!   byte), a 16-bit big-endian payload length, and that many payload bytes (fewer at the end).
//!   The first 16 bytes are also decoded as an option header on their own.
//! - `nbd_request`: consecutive 28-byte request headers.

use bytes::{BufMut, BytesMut};
use syncblock_engine::VolumeId;
use syncblock_nbd::handshake::{Admission, ExportInfo, Exports, Negotiation, Step, TlsMode, OPTIONS_MAX};
use syncblock_nbd::proto::{self, ProtoError, RequestHeader};

/// The exports every handshake input negotiates against: a writable default, a read-only one, both
/// open to the client.
pub fn exports() -> Exports {
    exports_with(Admission::Allowed, Admission::Allowed)
}

fn exports_with(vol: Admission, ro: Admission) -> Exports {
    Exports {
        list: vec![
            ExportInfo { name: "vol".into(), volume: VolumeId(1), size: 64 << 20, read_only: false, admission: vol },
            ExportInfo { name: "ro".into(), volume: VolumeId(2), size: 1 << 20, read_only: true, admission: ro },
        ],
        default_name: Some("vol".into()),
        // Cluster mode's answer for an export another node serves.
        elsewhere: Some(syncblock_nbd::handshake::Elsewhere(std::sync::Arc::new(|name: &str| {
            (name == "moved").then(|| format!("volume {name:?} is served by node n2 at nbd://127.0.0.1:10902/{name}"))
        }))),
    }
}

fn admission(bits: u8) -> Admission {
    [Admission::Allowed, Admission::NeedsTls, Admission::Denied, Admission::Allowed][usize::from(bits & 3)]
}

/// The options a selector's low nibble picks (0 = EXPORT_NAME … 10 = SET_META_CONTEXT).
const KNOWN_OPTIONS: [u32; 11] = [
    proto::OPT_EXPORT_NAME,
    proto::OPT_ABORT,
    proto::OPT_LIST,
    proto::OPT_STARTTLS,
    proto::OPT_INFO,
    proto::OPT_GO,
    proto::OPT_STRUCTURED_REPLY,
    proto::OPT_LIST_META_CONTEXT,
    proto::OPT_SET_META_CONTEXT,
    proto::OPT_INFO,
    proto::OPT_GO,
];

/// Splits `out` into option replies, checking each one's framing; returns (option, type, payload).
fn option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated option reply header: {} bytes", b.len());
        let mut r = proto::Reader::new(b);
        assert_eq!(r.u64().unwrap(), proto::OPT_REPLY_MAGIC, "option reply magic");
        let (opt, typ, len) = (r.u32().unwrap(), r.u32().unwrap(), r.u32().unwrap() as usize);
        assert!(b.len() >= 20 + len, "option reply payload of {len} bytes overruns the output");
        v.push((opt, typ, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

/// `nbd_handshake` target. Properties: no panic; the pure decoders re-encode what they accept to
/// the very bytes they were given; every reply the state machine writes is well framed and names
/// the option it answers; an option error is never followed by transmission in the same step; a
/// transmission session names an export that exists, with flags that match its read-only state;
/// negotiation ends within [`OPTIONS_MAX`] options.
pub fn nbd_handshake(data: &[u8]) {
    if data.len() >= proto::OPTION_HEADER_BYTES {
        let hdr: [u8; proto::OPTION_HEADER_BYTES] = data[..proto::OPTION_HEADER_BYTES].try_into().expect("16 bytes");
        if let Ok(h) = proto::decode_option_header(&hdr) {
            let mut again = BytesMut::new();
            again.put_u64(proto::IHAVEOPT);
            again.put_u32(h.option);
            again.put_u32(h.len);
            assert_eq!(&again[..], &hdr[..], "option header re-encodes");
        }
    }
    check_payload_decoders(data);

    let Some((&setup, data)) = data.split_first() else { return };
    let mode = [TlsMode::Off, TlsMode::On, TlsMode::Require, TlsMode::Require][usize::from(setup & 3)];
    let mut flags = [0u8; 4];
    let n = data.len().min(4);
    flags[..n].copy_from_slice(&data[..n]);
    let Ok(client) = proto::decode_client_flags(flags) else {
        assert_ne!(u32::from_be_bytes(flags) & !3, 0, "only unknown flags are refused");
        return;
    };
    let exports = exports_with(admission(setup >> 2), admission(setup >> 4));
    let mut neg = Negotiation::with_tls(client, mode);
    let mut tls_active = false;
    let mut rest = &data[n..];
    let mut n_options = 0u32;
    while !rest.is_empty() {
        let sel = rest[0];
        let (option, used) = if usize::from(sel & 0x0f) < KNOWN_OPTIONS.len() {
            (KNOWN_OPTIONS[usize::from(sel & 0x0f)], 1)
        } else {
            (u32::from(sel) << 8 | u32::from(*rest.get(1).unwrap_or(&0)), 2)
        };
        rest = &rest[used.min(rest.len())..];
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        rest = &rest[2.min(rest.len())..];
        let payload = &rest[..len.min(rest.len())];
        rest = &rest[payload.len()..];
        check_payload_decoders(payload);

        let mut out = BytesMut::new();
        // A selector with its top bit set stands for an option too large to buffer.
        let step = if sel & 0x80 != 0 && sel & 0x40 != 0 {
            neg.on_oversized_option(option, &mut out)
        } else {
            neg.on_option(option, payload, &exports, &mut out)
        };
        n_options += 1;
        assert!(n_options <= OPTIONS_MAX, "negotiation must end within OPTIONS_MAX options");
        if mode == TlsMode::Require && !tls_active && option != proto::OPT_STARTTLS && option != proto::OPT_ABORT {
            // Nothing is revealed before TLS: one TLS_REQD (or a close), never transmission.
            match &step {
                Step::Close => assert!(out.is_empty() || option != proto::OPT_EXPORT_NAME),
                Step::Continue => {
                    let replies = option_replies(&out);
                    assert_eq!(replies.len(), 1, "one reply before TLS");
                    let typ = replies[0].1;
                    assert!(
                        typ == proto::REP_ERR_TLS_REQD || typ == proto::REP_ERR_TOO_BIG,
                        "option {option} before TLS in require mode got {typ:#x}"
                    );
                }
                other => panic!("option {option} before TLS in require mode: {other:?}"),
            }
        }
        for r in option_replies(if option == proto::OPT_EXPORT_NAME { &[] } else { &out }) {
            if r.1 == proto::REP_SERVER {
                let name_len = u32::from_be_bytes(r.2[..4].try_into().expect("4 bytes")) as usize;
                let name = String::from_utf8_lossy(&r.2[4..4 + name_len]).into_owned();
                let e = exports.find(&name).expect("LIST names a real export");
                assert_eq!(e.admission, Admission::Allowed, "LIST showed {name} to a client that may not open it");
            }
        }
        match step {
            Step::StartTls => {
                assert_ne!(mode, TlsMode::Off, "STARTTLS accepted with TLS off");
                assert!(!tls_active, "STARTTLS accepted twice");
                assert_eq!(option, proto::OPT_STARTTLS);
                assert!(payload.is_empty(), "STARTTLS with a payload accepted");
                assert_eq!(option_replies(&out), vec![(option, proto::REP_ACK, vec![])], "STARTTLS is acked alone");
                neg.tls_started();
                tls_active = true;
            }
            Step::Transmit(session) => {
                assert!(mode != TlsMode::Require || tls_active, "transmission before TLS in require mode");
                let export = exports.find(&session.export.name).expect("session names a real export");
                assert_eq!(export.admission, Admission::Allowed, "transmission to an export the client may not open");
                assert_eq!(export, &session.export);
                assert_eq!(session.flags & proto::TFLAG_READ_ONLY != 0, export.read_only);
                assert!(session.structured || !session.base_allocation, "meta context needs structured replies");
                if option == proto::OPT_EXPORT_NAME {
                    let want = if client.no_zeroes { 10 } else { 10 + 124 };
                    assert_eq!(out.len(), want, "EXPORT_NAME reply length");
                    assert_eq!(&out[..8], &export.size.to_be_bytes());
                } else {
                    assert_eq!(option, proto::OPT_GO, "only GO or EXPORT_NAME start transmission");
                    let replies = option_replies(&out);
                    assert!(
                        replies.iter().all(|r| r.0 == option && r.1 & (1 << 31) == 0),
                        "GO that succeeds has no error"
                    );
                    assert_eq!(replies.last().map(|r| r.1), Some(proto::REP_ACK));
                }
                return;
            }
            Step::Close => {
                if option != proto::OPT_EXPORT_NAME {
                    for r in option_replies(&out) {
                        assert_eq!(r.0, option);
                    }
                }
                return;
            }
            Step::Continue => {
                let replies = option_replies(&out);
                assert!(!replies.is_empty(), "every option that continues gets a reply");
                for r in &replies {
                    assert_eq!(r.0, option, "reply names its option");
                }
                let last = replies.last().expect("non-empty").1;
                assert!(last == proto::REP_ACK || last & (1 << 31) != 0, "a reply ends with ACK or an error");
            }
        }
    }
}

/// INFO/GO and META_CONTEXT payload decoders: what they accept re-encodes to exactly the input.
fn check_payload_decoders(data: &[u8]) {
    if let Ok(req) = proto::decode_info_request(data) {
        let mut b = BytesMut::new();
        b.put_u32(req.name.len() as u32);
        b.put_slice(req.name.as_bytes());
        b.put_u16(req.infos.len() as u16);
        for i in &req.infos {
            b.put_u16(*i);
        }
        assert_eq!(&b[..], data, "info request re-encodes");
    }
    match proto::decode_meta_request(data) {
        Ok(req) => {
            assert!(req.queries.len() as u32 <= proto::META_QUERIES_MAX);
            let mut b = BytesMut::new();
            b.put_u32(req.export.len() as u32);
            b.put_slice(req.export.as_bytes());
            b.put_u32(req.queries.len() as u32);
            for q in &req.queries {
                b.put_u32(q.len() as u32);
                b.put_slice(q.as_bytes());
            }
            assert_eq!(&b[..], data, "meta request re-encodes");
        }
        Err(ProtoError::StringTooLong(n)) => assert!(n > proto::STRING_BYTES_MAX),
        Err(_) => {}
    }
}

/// `nbd_request` target. Properties: no panic; a header decodes exactly when its magic is right,
/// and re-encodes to the same 28 bytes.
pub fn nbd_request(data: &[u8]) {
    for chunk in data.chunks(proto::REQUEST_HEADER_BYTES) {
        let mut hdr = [0u8; proto::REQUEST_HEADER_BYTES];
        hdr[..chunk.len()].copy_from_slice(chunk);
        let magic_ok = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) == proto::REQUEST_MAGIC;
        match proto::decode_request_header(&hdr) {
            Ok(h) => {
                assert!(magic_ok);
                let mut b = BytesMut::new();
                proto::encode_request_header(&mut b, &h);
                assert_eq!(&b[..], &hdr[..], "request header re-encodes");
                let again: RequestHeader = proto::decode_request_header(&hdr).expect("decodes twice");
                assert_eq!(again, h);
            }
            Err(e) => {
                assert!(!magic_ok, "a header with the right magic decodes: {e}");
                assert!(matches!(e, ProtoError::BadMagic { .. }));
            }
        }
    }
}
