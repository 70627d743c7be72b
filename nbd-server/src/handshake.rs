//! Option negotiation as a pure state machine: one option in, reply bytes and the next step out.
//!
//! The connection code reads an option from the socket, hands its payload to
//! [`Negotiation::on_option`] together with a snapshot of the exports, writes the bytes this
//! appends to `out`, and acts on the returned [`Step`]. Nothing here touches a socket or the engine,
//! so tests drive it directly.

use bytes::BytesMut;
use syncblock_engine::{VolumeId, IO_BYTES_MAX};

use crate::proto::{self, BlockSize, ClientFlags};

/// Most options one client may send before entering transmission; more means a confused or
/// hostile client, and we close the connection. Real clients send fewer than ten.
pub const OPTIONS_MAX: u32 = 1024;

/// What we advertise in NBD_INFO_BLOCK_SIZE. The engine is byte-granular (it read-modify-writes
/// partial blocks), so the honest minimum is 1; 4 KiB is its block and avoids that
/// read-modify-write; the maximum is the engine's largest single I/O.
pub const BLOCK_SIZE: BlockSize = BlockSize { min: 1, preferred: 4096, max: IO_BYTES_MAX as u32 };
const _: () = assert!(IO_BYTES_MAX <= u32::MAX as u64 && IO_BYTES_MAX >= 1 << 20);

/// One export as the handshake sees it: an engine volume, and whether this client may open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub volume: VolumeId,
    pub size: u64,
    pub read_only: bool,
    pub admission: Admission,
}

/// Whether the client on this connection may open an export (decided by the server from the
/// export's access list and the identity the client proved in TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The export has an access list and the client has not started TLS yet (`--tls=on`): INFO
    /// and GO answer `NBD_REP_ERR_TLS_REQD`, as the spec's SELECTIVETLS mode does.
    NeedsTls,
    /// The client's identity is not on the export's access list: `NBD_REP_ERR_POLICY`.
    Denied,
}

/// The server's TLS mode (`--tls`, named as nbdkit names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// TLS offered; a client may go on without it, to exports without an access list.
    On,
    /// Every option but STARTTLS and ABORT is refused until TLS is on (`NBD_REP_ERR_TLS_REQD`),
    /// so nothing about the exports is revealed to a client that has not started it.
    Require,
}

/// The exports on offer, taken fresh from the engine before each option.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    pub list: Vec<ExportInfo>,
    /// The volume that the empty export name selects, if any.
    pub default_name: Option<String>,
    /// In cluster mode, why an export not on offer here is served elsewhere (naming the node that
    /// serves it), so that a client's error says where to reconnect.
    pub elsewhere: Option<Elsewhere>,
}

/// Given an export name, the message for a client that asked the wrong node for it.
#[derive(Clone)]
pub struct Elsewhere(pub std::sync::Arc<ElsewhereFn>);

pub type ElsewhereFn = dyn Fn(&str) -> Option<String> + Send + Sync;

impl std::fmt::Debug for Elsewhere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Elsewhere")
    }
}

impl Exports {
    /// The error message for an export name not on offer.
    pub fn not_here(&self, name: &str) -> String {
        self.elsewhere.as_ref().and_then(|e| (e.0)(name)).unwrap_or_else(|| format!("no export named {name:?}"))
    }

    /// The export `name` selects; the empty name selects the default export.
    pub fn find(&self, name: &str) -> Option<&ExportInfo> {
        let name = if name.is_empty() { self.default_name.as_deref()? } else { name };
        self.list.iter().find(|e| e.name == name)
    }
}

/// The transmission flags for an export, given what was negotiated.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    use proto::*;
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    // Every FLUSH and FUA goes through the one shared engine, so their effect is visible on every
    // connection when we reply: multi-conn is honest.
    f |= TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// What was agreed when a client enters transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub export: ExportInfo,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    pub flags: u16,
}

/// What the connection does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the replies and read the next option.
    Continue,
    /// Write the replies (if any), then close the connection.
    Close,
    /// Write the replies, then start transmission.
    Transmit(Session),
    /// Write the replies (the STARTTLS ack), then run the TLS handshake, call
    /// [`Negotiation::tls_started`] and read the next option over TLS.
    StartTls,
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub struct Negotiation {
    client: ClientFlags,
    tls: TlsMode,
    tls_active: bool,
    /// Why the last option was refused by an export's access list, for the server's log.
    denied: Option<String>,
    structured: bool,
    /// The export (canonical name) `base:allocation` was selected for by SET_META_CONTEXT.
    meta_export: Option<String>,
    n_options: u32,
}

impl Negotiation {
    pub fn new(client: ClientFlags) -> Negotiation {
        Negotiation::with_tls(client, TlsMode::Off)
    }

    pub fn with_tls(client: ClientFlags, tls: TlsMode) -> Negotiation {
        Negotiation { client, tls, tls_active: false, denied: None, structured: false, meta_export: None, n_options: 0 }
    }

    /// TLS is now on: everything negotiated before it is forgotten (the spec: a client must not
    /// rely on it, and a man in the middle may have sent it).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta_export = None;
    }

    /// The export the last option was refused by its access list, if it was.
    pub fn take_denied(&mut self) -> Option<String> {
        self.denied.take()
    }

    /// Handles an option whose payload was too large to buffer (already drained by the caller).
    pub fn on_oversized_option(&mut self, option: u32, out: &mut BytesMut) -> Step {
        if !self.client.fixed_newstyle || option == proto::OPT_EXPORT_NAME {
            return Step::Close;
        }
        proto::encode_option_error(out, option, proto::REP_ERR_TOO_BIG, "option payload too large");
        self.count()
    }

    fn count(&mut self) -> Step {
        self.n_options += 1;
        if self.n_options >= OPTIONS_MAX {
            Step::Close
        } else {
            Step::Continue
        }
    }

    /// Handles one option, appending its replies to `out`.
    pub fn on_option(&mut self, option: u32, data: &[u8], exports: &Exports, out: &mut BytesMut) -> Step {
        use proto::*;
        if !self.client.fixed_newstyle && option != OPT_EXPORT_NAME {
            // Without fixed newstyle the client cannot parse option replies.
            return Step::Close;
        }
        if self.tls == TlsMode::Require && !self.tls_active {
            match option {
                OPT_STARTTLS | OPT_ABORT => {}
                // No reply is possible to EXPORT_NAME but the export itself: a hard close.
                OPT_EXPORT_NAME => return Step::Close,
                _ => {
                    encode_option_error(out, option, REP_ERR_TLS_REQD, "this server requires TLS: send STARTTLS first");
                    return self.count();
                }
            }
        }
        match option {
            OPT_STARTTLS => {
                if !data.is_empty() {
                    encode_option_error(out, option, REP_ERR_INVALID, "STARTTLS takes no payload");
                } else if self.tls_active {
                    encode_option_error(out, option, REP_ERR_INVALID, "TLS is already on");
                } else if self.tls == TlsMode::Off {
                    encode_option_error(out, option, REP_ERR_POLICY, "TLS is not configured on this server");
                } else {
                    encode_option_reply(out, option, REP_ACK, &[]);
                    self.n_options += 1;
                    return Step::StartTls;
                }
                self.count()
            }
            OPT_EXPORT_NAME => {
                let Ok(name) = Reader::new(data).string(data.len()) else { return Step::Close };
                let Some(export) = exports.find(&name) else { return Step::Close };
                if export.admission != Admission::Allowed {
                    if export.admission == Admission::Denied {
                        self.denied = Some(export.name.clone());
                    }
                    return Step::Close;
                }
                let session = self.session(export);
                encode_export_name_reply(out, export.size, session.flags, self.client.no_zeroes);
                Step::Transmit(session)
            }
            OPT_ABORT => {
                encode_option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    encode_option_error(out, option, REP_ERR_INVALID, "LIST takes no payload");
                } else {
                    for e in exports.list.iter().filter(|e| e.admission == Admission::Allowed) {
                        encode_rep_server(out, option, &e.name, &description(e));
                    }
                    encode_option_reply(out, option, REP_ACK, &[]);
                }
                self.count()
            }
            OPT_INFO | OPT_GO => {
                let req = match decode_info_request(data) {
                    Ok(r) => r,
                    Err(e) => {
                        encode_option_error(out, option, REP_ERR_INVALID, &e.to_string());
                        return self.count();
                    }
                };
                let Some(export) = exports.find(&req.name) else {
                    encode_option_error(out, option, REP_ERR_UNKNOWN, &exports.not_here(&req.name));
                    return self.count();
                };
                if let Some((err, msg)) = refusal(export) {
                    encode_option_error(out, option, err, &msg);
                    if export.admission == Admission::Denied {
                        self.denied = Some(export.name.clone());
                    }
                    return self.count();
                }
                let session = self.session(export);
                encode_rep_info(out, option, &Info::Export { size: export.size, flags: session.flags });
                if req.infos.contains(&INFO_NAME) {
                    encode_rep_info(out, option, &Info::Name(&export.name));
                }
                if req.infos.contains(&INFO_DESCRIPTION) {
                    encode_rep_info(out, option, &Info::Description(&description(export)));
                }
                // Sent whether asked or not (as qemu-nbd does): it only informs clients that did
                // not ask, and every request size they may send is still served.
                encode_rep_info(out, option, &Info::BlockSize(crate::handshake::BLOCK_SIZE));
                encode_option_reply(out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    Step::Transmit(session)
                } else {
                    self.count()
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    encode_option_error(out, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no payload");
                } else {
                    self.structured = true;
                    encode_option_reply(out, option, REP_ACK, &[]);
                }
                self.count()
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.on_meta_context(option, data, exports, out);
                self.count()
            }
            _ => {
                encode_option_error(out, option, REP_ERR_UNSUP, &format!("option {option} is not supported"));
                self.count()
            }
        }
    }

    fn on_meta_context(&mut self, option: u32, data: &[u8], exports: &Exports, out: &mut BytesMut) {
        use proto::*;
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            encode_option_error(out, option, REP_ERR_INVALID, "SET_META_CONTEXT needs STRUCTURED_REPLY first");
            return;
        }
        let req = match decode_meta_request(data) {
            Ok(r) => r,
            Err(e) => {
                encode_option_error(out, option, REP_ERR_INVALID, &e.to_string());
                return;
            }
        };
        let Some(export) = exports.find(&req.export) else {
            encode_option_error(out, option, REP_ERR_UNKNOWN, &exports.not_here(&req.export));
            return;
        };
        if let Some((err, msg)) = refusal(export) {
            encode_option_error(out, option, err, &msg);
            return;
        }
        let selected = if set {
            // `base:` is a wildcard only for LIST; SET ignores it. Unknown names are ignored.
            req.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
        } else {
            req.queries.is_empty() || req.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION || q == "base:")
        };
        if selected {
            encode_rep_meta_context(out, option, CONTEXT_ID_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION);
        }
        if set {
            // A SET replaces whatever an earlier SET selected.
            self.meta_export = selected.then(|| export.name.clone());
        }
        encode_option_reply(out, option, REP_ACK, &[]);
    }

    fn session(&self, export: &ExportInfo) -> Session {
        Session {
            export: export.clone(),
            structured: self.structured,
            base_allocation: self.structured && self.meta_export.as_deref() == Some(export.name.as_str()),
            flags: transmission_flags(export.read_only, self.structured),
        }
    }
}

/// The option error for an export this client may not open.
fn refusal(e: &ExportInfo) -> Option<(u32, String)> {
    match e.admission {
        Admission::Allowed => None,
        Admission::NeedsTls => {
            Some((proto::REP_ERR_TLS_REQD, format!("export {:?} requires TLS: send STARTTLS first", e.name)))
        }
        Admission::Denied => Some((
            proto::REP_ERR_POLICY,
            format!("export {:?}: this client's identity is not allowed to open it", e.name),
        )),
    }
}

fn description(e: &ExportInfo) -> String {
    format!("syncblock volume {}{}", e.name, if e.read_only { " (read-only)" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use bytes::BufMut;

    fn exports() -> Exports {
        Exports {
            list: vec![
                ExportInfo {
                    name: "a".into(),
                    volume: VolumeId(1),
                    size: 1 << 20,
                    read_only: false,
                    admission: Admission::Allowed,
                },
                ExportInfo {
                    name: "ro".into(),
                    volume: VolumeId(2),
                    size: 4096,
                    read_only: true,
                    admission: Admission::Allowed,
                },
            ],
            default_name: Some("a".into()),
            elsewhere: None,
        }
    }

    fn fixed() -> Negotiation {
        Negotiation::new(ClientFlags { fixed_newstyle: true, no_zeroes: true })
    }

    fn run(n: &mut Negotiation, option: u32, data: &[u8]) -> (Step, Vec<u8>) {
        let mut out = BytesMut::new();
        let step = n.on_option(option, data, &exports(), &mut out);
        (step, out.to_vec())
    }

    /// Splits option replies into (option, type, payload).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let mut r = Reader::new(b);
            assert_eq!(r.u64().unwrap(), OPT_REPLY_MAGIC);
            let (opt, typ, len) = (r.u32().unwrap(), r.u32().unwrap(), r.u32().unwrap() as usize);
            v.push((opt, typ, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_u16(infos.len() as u16);
        for i in infos {
            b.put_u16(*i);
        }
        b.to_vec()
    }

    fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(export.len() as u32);
        b.put_slice(export.as_bytes());
        b.put_u32(queries.len() as u32);
        for q in queries {
            b.put_u32(q.len() as u32);
            b.put_slice(q.as_bytes());
        }
        b.to_vec()
    }

    #[test]
    fn unknown_option_gets_err_unsup_and_negotiation_continues() {
        let mut n = fixed();
        let (step, out) = run(&mut n, 99, b"junk");
        assert_eq!(step, Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        let (step, _) = run(&mut n, OPT_GO, &info_payload("a", &[]));
        assert!(matches!(step, Step::Transmit(_)));
    }

    #[test]
    fn go_replies_export_block_size_then_ack() {
        let mut n = fixed();
        let (step, out) = run(&mut n, OPT_GO, &info_payload("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]));
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(types, vec![REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        let flags = transmission_flags(false, false);
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        assert_eq!(r[0].2, export);
        assert_eq!(r[1].2, b"\0\x01a");
        assert_eq!(r[3].2, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        let Step::Transmit(s) = step else { panic!("expected transmission") };
        assert_eq!(s.export.name, "a");
        assert!(!s.structured && !s.base_allocation);
        assert_eq!(s.flags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn go_for_unknown_export_is_err_unknown_and_info_does_not_transmit() {
        let mut n = fixed();
        let (step, out) = run(&mut n, OPT_GO, &info_payload("nope", &[]));
        assert_eq!(step, Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        let (step, out) = run(&mut n, OPT_INFO, &info_payload("ro", &[]));
        assert_eq!(step, Step::Continue);
        assert_eq!(replies(&out).last().unwrap().1, REP_ACK);
        let (step, out) = run(&mut n, OPT_GO, &[0, 0]);
        assert_eq!(step, Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn read_only_export_advertises_read_only_and_no_trim() {
        let f = transmission_flags(true, true);
        assert_ne!(f & TFLAG_READ_ONLY, 0);
        assert_eq!(f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO), 0);
        assert_eq!(transmission_flags(false, true), 0x0ded);
        assert_eq!(transmission_flags(false, false), 0x0d6d);
    }

    #[test]
    fn export_name_enters_transmission_or_closes() {
        let mut n = Negotiation::new(ClientFlags { fixed_newstyle: false, no_zeroes: false });
        let (step, out) = run(&mut n, OPT_EXPORT_NAME, b"a");
        assert!(matches!(step, Step::Transmit(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut n = Negotiation::new(ClientFlags { fixed_newstyle: false, no_zeroes: false });
        assert_eq!(
            run(&mut n, OPT_GO, &info_payload("a", &[])).0,
            Step::Close,
            "only EXPORT_NAME without fixed newstyle"
        );
        let mut n = fixed();
        assert_eq!(run(&mut n, OPT_EXPORT_NAME, b"nope"), (Step::Close, vec![]));
        assert_eq!(run(&mut n, OPT_EXPORT_NAME, b"a\0").0, Step::Close);
    }

    #[test]
    fn list_sends_one_server_reply_per_export_and_refuses_payload() {
        let mut n = fixed();
        let (_, out) = run(&mut n, OPT_LIST, &[]);
        let r = replies(&out);
        assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_SERVER, REP_SERVER, REP_ACK]);
        assert_eq!(&r[0].2[..5], b"\0\0\0\x01a");
        let (_, out) = run(&mut n, OPT_LIST, b"x");
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn abort_acks_and_closes() {
        let mut n = fixed();
        let (step, out) = run(&mut n, OPT_ABORT, &[]);
        assert_eq!(step, Step::Close);
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_binds_to_the_export() {
        let mut n = fixed();
        let (_, out) = run(&mut n, OPT_SET_META_CONTEXT, &meta_payload("a", &["base:allocation"]));
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        run(&mut n, OPT_STRUCTURED_REPLY, &[]);
        let (_, out) = run(&mut n, OPT_SET_META_CONTEXT, &meta_payload("a", &["base:allocation", "qemu:x"]));
        let r = replies(&out);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(r[0].2, b"\0\0\0\x01base:allocation");
        assert_eq!(r[1].1, REP_ACK);
        // GO on another export: no context there.
        let (step, _) = run(&mut n, OPT_GO, &info_payload("ro", &[]));
        let Step::Transmit(s) = step else { panic!() };
        assert!(s.structured && !s.base_allocation);
        // The default name resolves to the same export as "a".
        let (step, _) = run(&mut n, OPT_GO, &info_payload("", &[]));
        let Step::Transmit(s) = step else { panic!() };
        assert!(s.base_allocation);
        assert_ne!(s.flags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn list_meta_context_expands_the_base_wildcard_and_set_ignores_it() {
        let mut n = fixed();
        let (_, out) = run(&mut n, OPT_LIST_META_CONTEXT, &meta_payload("a", &["base:"]));
        assert_eq!(replies(&out)[0].1, REP_META_CONTEXT);
        let (_, out) = run(&mut n, OPT_LIST_META_CONTEXT, &meta_payload("a", &[]));
        assert_eq!(replies(&out)[0].1, REP_META_CONTEXT);
        let (_, out) = run(&mut n, OPT_LIST_META_CONTEXT, &meta_payload("nope", &[]));
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        run(&mut n, OPT_STRUCTURED_REPLY, &[]);
        let (_, out) = run(&mut n, OPT_SET_META_CONTEXT, &meta_payload("a", &["base:"]));
        assert_eq!(replies(&out).iter().map(|x| x.1).collect::<Vec<_>>(), vec![REP_ACK]);
    }

    #[test]
    fn too_many_options_close_the_connection() {
        let mut n = fixed();
        let mut last = Step::Continue;
        for _ in 0..OPTIONS_MAX {
            last = run(&mut n, 99, &[]).0;
        }
        assert_eq!(last, Step::Close);
    }

    #[test]
    fn oversized_option_gets_too_big() {
        let mut n = fixed();
        let mut out = BytesMut::new();
        assert_eq!(n.on_oversized_option(OPT_GO, &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
        assert_eq!(n.on_oversized_option(OPT_EXPORT_NAME, &mut out), Step::Close);
    }

    fn tls(mode: TlsMode) -> Negotiation {
        Negotiation::with_tls(ClientFlags { fixed_newstyle: true, no_zeroes: true }, mode)
    }

    #[test]
    fn starttls_is_refused_when_off_acked_when_on_and_invalid_twice_or_with_payload() {
        let mut n = fixed();
        let (step, out) = run(&mut n, OPT_STARTTLS, &[]);
        assert_eq!((step, replies(&out)[0].1), (Step::Continue, REP_ERR_POLICY));
        let mut n = tls(TlsMode::On);
        assert_eq!(replies(&run(&mut n, OPT_STARTTLS, b"x").1)[0].1, REP_ERR_INVALID);
        let (step, out) = run(&mut n, OPT_STARTTLS, &[]);
        assert_eq!((step, replies(&out)[0].1), (Step::StartTls, REP_ACK));
        n.tls_started();
        assert_eq!(replies(&run(&mut n, OPT_STARTTLS, &[]).1)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn require_mode_answers_tls_reqd_to_all_but_starttls_and_abort_and_closes_on_export_name() {
        let mut n = tls(TlsMode::Require);
        for opt in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, 99] {
            let (step, out) = run(&mut n, opt, &info_payload("a", &[]));
            let r = replies(&out);
            assert_eq!((step, r.len(), r[0].1), (Step::Continue, 1, REP_ERR_TLS_REQD), "option {opt}");
            assert!(!String::from_utf8_lossy(&r[0].2).contains("a\""), "an export name before TLS");
        }
        assert_eq!(run(&mut n, OPT_EXPORT_NAME, b"a"), (Step::Close, vec![]));
        let mut n = tls(TlsMode::Require);
        assert_eq!(run(&mut n, OPT_ABORT, &[]).0, Step::Close);
        let mut n = tls(TlsMode::Require);
        assert_eq!(run(&mut n, OPT_STARTTLS, &[]).0, Step::StartTls);
        n.tls_started();
        assert!(matches!(run(&mut n, OPT_GO, &info_payload("a", &[])).0, Step::Transmit(_)));
    }

    #[test]
    fn starttls_forgets_what_was_negotiated_before_it() {
        let mut n = tls(TlsMode::On);
        run(&mut n, OPT_STRUCTURED_REPLY, &[]);
        run(&mut n, OPT_SET_META_CONTEXT, &meta_payload("a", &["base:allocation"]));
        assert_eq!(run(&mut n, OPT_STARTTLS, &[]).0, Step::StartTls);
        n.tls_started();
        let Step::Transmit(s) = run(&mut n, OPT_GO, &info_payload("a", &[])).0 else { panic!() };
        assert!(!s.structured && !s.base_allocation, "state from before TLS survived it");
    }

    #[test]
    fn admission_hides_and_refuses_exports() {
        let mut ex = exports();
        ex.list[0].admission = Admission::Denied;
        ex.list[1].admission = Admission::NeedsTls;
        let mut n = fixed();
        let mut out = BytesMut::new();
        n.on_option(OPT_LIST, &[], &ex, &mut out);
        assert_eq!(replies(&out).iter().map(|r| r.1).collect::<Vec<_>>(), vec![REP_ACK], "nothing openable listed");
        out.clear();
        assert_eq!(n.on_option(OPT_GO, &info_payload("a", &[]), &ex, &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
        assert_eq!(n.take_denied().as_deref(), Some("a"));
        out.clear();
        n.on_option(OPT_INFO, &info_payload("ro", &[]), &ex, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_TLS_REQD);
        assert_eq!(n.take_denied(), None);
        out.clear();
        n.on_option(OPT_LIST_META_CONTEXT, &meta_payload("a", &[]), &ex, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
        assert_eq!(n.on_option(OPT_EXPORT_NAME, b"a", &ex, &mut out), Step::Close);
    }
}
