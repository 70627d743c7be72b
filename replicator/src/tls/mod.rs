//! TLS for every link (NBD, replication, witness, admin): one set of credentials per process,
//! loaded once, and the identity a peer proved in its handshake.
//!
//! Two kinds of credentials, either or both:
//! - **X.509**: this process's certificate and key, and a CA. With a CA, a peer must present a
//!   certificate signed by it; its identity is the certificate's subject common name (CN).
//! - **PSK**: a file of `identity:hexkey` lines, as `psktool`, qemu and nbdkit use. A client
//!   proves the identity it names by knowing that identity's key.
//!
//! Two TLS stacks (ARCHITECTURE.md, "TLS"). OpenSSL does both kinds of credentials: rustls has no
//! external PSK, and NBD clients (qemu, libnbd, nbdkit — all GnuTLS) use PSK as often as
//! certificates. Links authenticated by certificates run on rustls ([`x509`]), which costs less
//! than half the CPU per record: every link of a process with certificates only, and the clients
//! that offer no PSK of a server that also has a PSK file ([`hello`]). TLS 1.2 is the oldest
//! version accepted (the NBD spec's floor); TLS 1.3 is preferred.

mod hello;
mod x509;

use hello::Peeked;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openssl::nid::Nid;
use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslContext, SslMethod, SslRef, SslVerifyMode, SslVersion};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio_openssl::SslStream;

/// Longest PSK identity and key accepted. GnuTLS caps identities at 128 bytes; keys are 32 bytes
/// from `psktool` and at most 64 in OpenSSL (`PSK_MAX_PSK_LEN` is 512 bytes; 64 covers SHA-384).
pub const PSK_IDENTITY_BYTES_MAX: usize = 128;
pub const PSK_KEY_BYTES_MAX: usize = 64;

/// How long a TLS handshake may take. Real handshakes take one or two round trips (a few ms); the
/// bound stops a peer that connects and stalls mid-handshake from holding a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS 1.2 cipher suites: ECDHE with AES-GCM or ChaCha20 for certificates, and the PSK suites
/// GnuTLS clients offer (ECDHE-PSK, DHE-PSK and plain PSK, AEAD only). TLS 1.3 uses OpenSSL's
/// default suites, which all are AEAD.
const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305:ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES128-GCM-SHA256:\
DHE-PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305";

/// TLS 1.3 suites, SHA-256 ones first (see `CIPHER_SERVER_PREFERENCE` in [`Tls::load`]).
const TLS13_CIPHERS: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384";

/// Where a process's credentials are (the `--tls-*` flags or the config file's `[tls]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This process's certificate (PEM; may be followed by its chain).
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that sign peers' certificates. Given, peers must present one.
    pub ca: Option<PathBuf>,
    /// PSK file: `identity:hexkey` lines.
    pub psk: Option<PathBuf>,
}

impl TlsFiles {
    /// No credential named.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none() && self.psk.is_none()
    }

    /// Peers must prove an identity: a CA (client certificates) or a PSK file. A certificate alone
    /// only encrypts.
    pub fn authenticates(&self) -> bool {
        self.ca.is_some() || self.psk.is_some()
    }

    /// Resolves relative paths against `dir` (a config file's directory).
    pub fn relative_to(mut self, dir: &Path) -> TlsFiles {
        for p in [&mut self.cert, &mut self.key, &mut self.ca, &mut self.psk].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        self
    }

    /// Fills what `self` lacks from `other` (flags over a file).
    pub fn or(self, other: TlsFiles) -> TlsFiles {
        TlsFiles {
            cert: self.cert.or(other.cert),
            key: self.key.or(other.key),
            ca: self.ca.or(other.ca),
            psk: self.psk.or(other.psk),
        }
    }
}

/// Why credentials could not be loaded, or a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    File { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Handshake(String),
}

/// PSK keys by identity, from a `identity:hexkey` file.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PskKeys(HashMap<String, Vec<u8>>);

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl PskKeys {
    /// Parses `identity:hexkey` lines (blank lines and `#` comments allowed). A repeated identity,
    /// a key that is not even-length hex, or an overlong identity or key is refused with its line.
    pub fn parse(text: &str) -> Result<PskKeys, String> {
        let mut keys = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let (id, hex) = line.rsplit_once(':').ok_or_else(|| bad("expected identity:hexkey"))?;
            if id.is_empty() || id.len() > PSK_IDENTITY_BYTES_MAX {
                return Err(bad(&format!("identity must be 1 to {PSK_IDENTITY_BYTES_MAX} bytes")));
            }
            let key = decode_hex(hex).ok_or_else(|| bad("key is not hexadecimal"))?;
            if key.is_empty() || key.len() > PSK_KEY_BYTES_MAX {
                return Err(bad(&format!("key must be 1 to {PSK_KEY_BYTES_MAX} bytes")));
            }
            if keys.insert(id.to_string(), key).is_some() {
                return Err(bad(&format!("identity {id:?} is listed twice")));
            }
        }
        if keys.is_empty() {
            return Err("no identity:hexkey line".into());
        }
        Ok(PskKeys(keys))
    }

    /// Reads and parses the PSK file at `path`.
    pub fn load(path: &Path) -> Result<PskKeys, TlsError> {
        let text = std::fs::read(path).map_err(|source| TlsError::File {
            what: "PSK file",
            path: path.to_path_buf(),
            source,
        })?;
        PskKeys::parse(&String::from_utf8_lossy(&text))
            .map_err(|e| TlsError::Config(format!("PSK file {}: {e}", path.display())))
    }

    pub fn get(&self, identity: &str) -> Option<&[u8]> {
        self.0.get(identity).map(|k| k.as_slice())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// What a PSK handshake saw, kept on the connection for the error message.
#[derive(Debug, Clone)]
struct PskSeen {
    identity: String,
    known: bool,
}

fn psk_index() -> openssl::ex_data::Index<Ssl, PskSeen> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, PskSeen>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

/// A process's loaded credentials: a server context (for links it accepts) and a client context
/// (for links it opens), and the name it proves itself as when it connects with PSK.
#[derive(Clone)]
pub struct Tls {
    server: SslContext,
    client: SslContext,
    /// The certificates for rustls, when there are some and rustls accepts them. With a PSK file
    /// too, only accepted links use them, for clients that offer no PSK; without one, every
    /// asynchronous link (the blocking admin client stays on OpenSSL).
    rustls: Option<Arc<x509::Configs>>,
    /// A PSK file is configured.
    psk: bool,
    /// Peers must prove an identity (a CA or a PSK file is configured).
    authenticates: bool,
    summary: String,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

impl Tls {
    /// Loads `files`. `name` is the identity this process connects as: its PSK identity, and the
    /// CN its certificate must carry (a certificate for another name is refused here, at start,
    /// rather than by every peer later). `None`: a process that only accepts (NBD).
    pub fn load(files: &TlsFiles, name: Option<&str>) -> Result<Arc<Tls>, TlsError> {
        Tls::build(files, name, name)
    }

    /// Loads a client's credentials (an admin command): it connects as `psk_identity` (by
    /// default the PSK file's only identity); its certificate may carry any name.
    pub fn load_client(files: &TlsFiles, psk_identity: Option<&str>) -> Result<Arc<Tls>, TlsError> {
        let only;
        let identity = match (psk_identity, &files.psk) {
            (Some(id), _) => Some(id),
            (None, Some(path)) => {
                let keys = PskKeys::load(path)?;
                if keys.0.len() != 1 {
                    return Err(TlsError::Config(format!(
                        "PSK file {} has {} identities: name the one to use with --tls-user",
                        path.display(),
                        keys.0.len()
                    )));
                }
                only = keys.0.into_keys().next().expect("one");
                Some(only.as_str())
            }
            (None, None) => None,
        };
        Tls::build(files, identity, None)
    }

    fn build(files: &TlsFiles, psk_identity: Option<&str>, cn: Option<&str>) -> Result<Arc<Tls>, TlsError> {
        let cfg = |s: String| TlsError::Config(s);
        let read = |what: &'static str, p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::File { what, path: p.to_path_buf(), source })
        };
        if files.cert.is_some() != files.key.is_some() {
            return Err(cfg("--tls-cert and --tls-key go together: give both, or neither".into()));
        }
        if files.cert.is_none() && files.psk.is_none() {
            return Err(cfg("TLS needs a certificate (--tls-cert and --tls-key) or a PSK file (--tls-psk)".into()));
        }
        let ossl = |what: &'static str| move |e: openssl::error::ErrorStack| TlsError::Config(format!("{what}: {e}"));
        let mut server = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(ossl("OpenSSL"))?;
        let mut client = SslConnector::builder(SslMethod::tls_client()).map_err(ossl("OpenSSL"))?;
        // The server's order decides: a TLS 1.3 PSK from a file is a SHA-256 key (OpenSSL and GnuTLS
        // agree on that), so a suite with SHA-256 must win for PSK clients to be served.
        server.set_options(openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
        for b in [&mut *server, &mut *client] {
            b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(ossl("OpenSSL"))?;
            b.set_cipher_list(TLS12_CIPHERS).map_err(ossl("cipher list"))?;
            b.set_ciphersuites(TLS13_CIPHERS).map_err(ossl("TLS 1.3 cipher suites"))?;
            // Read whole socket buffers at a time, not one record header and body per system call.
            // And keep the record buffers: the `openssl` crate's contexts free them whenever they
            // are empty (RELEASE_BUFFERS), which on a busy link is a free and an allocation per
            // record.
            b.set_read_ahead(true);
            const SSL_CTRL_CLEAR_MODE: std::ffi::c_int = 78;
            // SAFETY: the pointer is the builder's live SSL_CTX; SSL_CTRL_CLEAR_MODE only clears
            // mode bits and takes no pointer argument.
            unsafe {
                openssl_sys::SSL_CTX_ctrl(
                    b.as_ptr(),
                    SSL_CTRL_CLEAR_MODE,
                    openssl_sys::SSL_MODE_RELEASE_BUFFERS,
                    std::ptr::null_mut(),
                )
            };
        }
        // A TLS 1.2 peer that asks to renegotiate (TLS 1.3 has none) is cut off: a renegotiation
        // buys an attacker a costly handshake on an established connection and us nothing.
        // `NO_RENEGOTIATION` (or OpenSSL 3's default) would only answer each attempt with a
        // warning alert and keep the connection, so renegotiation is allowed in OpenSSL, and every
        // ClientHello after the first handshake fails here, before any key exchange, with a fatal
        // alert: the connection's next read fails and its task closes it. A peer's Finished is
        // recorded only once a handshake completes, so the first handshake (and a TLS 1.3 retried
        // hello) passes.
        server.set_client_hello_callback(|ssl, alert| {
            if ssl.peer_finished(&mut [0u8; 64]) == 0 {
                return Ok(openssl::ssl::ClientHelloResponse::SUCCESS);
            }
            tracing::warn!("a TLS peer asked to renegotiate; refused, and its connection is closed");
            // `no_renegotiation` is a warning-level alert by the RFC; a fatal one says handshake_failure.
            *alert = openssl::ssl::SslAlert::HANDSHAKE_FAILURE;
            Err(openssl::error::ErrorStack::get())
        });
        // OpenSSL 3 ignores a client's renegotiation with a warning unless told to allow it, and
        // then the callback above would never run. SSL_OP_ALLOW_CLIENT_RENEGOTIATION is bit 8
        // (ssl.h); the `openssl` crate does not name it.
        if openssl::version::number() >= 0x3000_0000 {
            server.set_options(openssl::ssl::SslOptions::from_bits_retain(1 << 8));
        }
        // Our own outgoing links ignore a server's request to renegotiate.
        client.set_options(openssl::ssl::SslOptions::NO_RENEGOTIATION);
        // Needed by OpenSSL whenever peers are verified and a PSK session is looked up.
        server.set_session_id_context(b"syncblock").map_err(ossl("OpenSSL"))?;
        let mut parts = Vec::new();
        let mut own_cn = None;
        let mut x509_parts = None;
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            let pem = read("certificate", cert)?;
            let chain = X509::stack_from_pem(&pem)
                .map_err(|e| cfg(format!("certificate {}: not a PEM certificate ({e})", cert.display())))?;
            let leaf = chain.first().ok_or_else(|| cfg(format!("certificate {}: empty", cert.display())))?;
            own_cn = common_name(leaf);
            let key_pem = read("key", key)?;
            let pkey = openssl::pkey::PKey::private_key_from_pem(&key_pem)
                .map_err(|e| cfg(format!("key {}: not a PEM private key ({e})", key.display())))?;
            for b in [&mut *server, &mut *client] {
                b.set_certificate(leaf).map_err(ossl("certificate"))?;
                for extra in chain.iter().skip(1) {
                    b.add_extra_chain_cert(extra.clone()).map_err(ossl("certificate chain"))?;
                }
                b.set_private_key(&pkey).map_err(ossl("key"))?;
                b.check_private_key().map_err(|_| {
                    cfg(format!("key {} does not belong to certificate {}", key.display(), cert.display()))
                })?;
            }
            x509_parts = Some((chain, pkey));
            parts.push(format!("certificate CN={}", own_cn.as_deref().unwrap_or("?")));
        }
        if let (Some(name), Some(cn)) = (cn, &own_cn) {
            if name != cn {
                return Err(cfg(format!(
                    "the certificate is for {cn:?} but this node is named {name:?}; peers check that the \
                     name a node gives is the one its certificate proves: use a certificate with CN={name}"
                )));
            }
        }
        let mut cas = None;
        if let Some(ca) = &files.ca {
            let pem = read("CA file", ca)?;
            cas = Some(X509::stack_from_pem(&pem).map_err(|e| cfg(format!("CA file {}: {e}", ca.display())))?);
            for b in [&mut *server, &mut *client] {
                b.set_ca_file(ca).map_err(|e| cfg(format!("CA file {}: {e}", ca.display())))?;
            }
            server.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            client.set_verify(SslVerifyMode::PEER);
            parts.push("peers verified against the CA".into());
        } else {
            // Without a CA a client cannot check the server's certificate: encryption only, against
            // passive listeners. PSK still authenticates both sides.
            client.set_verify(SslVerifyMode::NONE);
        }
        if let Some(psk) = &files.psk {
            let keys = PskKeys::load(psk)?;
            let n = keys.0.len();
            let server_keys = keys.clone();
            server.set_psk_server_callback(move |ssl, identity, out| {
                let identity = String::from_utf8_lossy(identity.unwrap_or_default()).into_owned();
                let key = server_keys.get(&identity);
                ssl.set_ex_data(psk_index(), PskSeen { identity, known: key.is_some() });
                match key {
                    Some(k) if k.len() <= out.len() => {
                        out[..k.len()].copy_from_slice(k);
                        Ok(k.len())
                    }
                    _ => Ok(0),
                }
            });
            if let Some(name) = psk_identity {
                let key = keys
                    .get(name)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| cfg(format!("PSK file {} has no key for identity {name:?}", psk.display())))?;
                let id = name.as_bytes().to_vec();
                client.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
                    if id.len() >= id_out.len() || key.len() > key_out.len() {
                        return Ok(0);
                    }
                    id_out[..id.len()].copy_from_slice(&id);
                    id_out[id.len()] = 0;
                    key_out[..key.len()].copy_from_slice(&key);
                    Ok(key.len())
                });
            }
            parts.push(format!("PSK file with {n} identities"));
        }
        // Certificates: rustls for the links they authenticate, unless it refuses them.
        let rustls = match &x509_parts {
            Some((chain, pkey)) => match x509::configs(chain, pkey, cas.as_deref()) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::info!("TLS links run on OpenSSL: rustls cannot use these certificates ({e})");
                    None
                }
            },
            None => None,
        };
        Ok(Arc::new(Tls {
            server: server.build().into_context(),
            client: client.build().into_context(),
            rustls,
            psk: files.psk.is_some(),
            authenticates: files.authenticates(),
            summary: parts.join(", "),
        }))
    }

    /// Peers must prove who they are (a CA or PSK keys are configured); otherwise TLS only
    /// encrypts.
    pub fn authenticates(&self) -> bool {
        self.authenticates
    }

    /// Runs the server side of a handshake on `stream`, within [`HANDSHAKE_TIMEOUT`]. Returns the
    /// encrypted stream and the identity the client proved (`None` without a CA or PSK).
    pub async fn accept<S>(&self, stream: S) -> Result<(TlsStream<S>, Option<String>), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.server_handshake(stream)).await {
            Err(_) => Err(too_slow()),
            Ok(r) => r,
        }
    }

    async fn server_handshake<S>(&self, mut stream: S) -> Result<(TlsStream<S>, Option<String>), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // With certificates and a PSK file, the client's first record decides the stack.
        let mut head = Vec::new();
        let rustls = match &self.rustls {
            Some(r) if self.psk => {
                head = hello::first_record(&mut stream)
                    .await
                    .map_err(|e| TlsError::Handshake(format!("reading the ClientHello: {e}")))?;
                (hello::offers_psk(&head) == Some(false)).then_some(r)
            }
            r => r.as_ref(),
        };
        let stream = Peeked::new(head, stream);
        if let Some(r) = rustls {
            let s = tokio_rustls::TlsAcceptor::from(r.server.clone())
                .accept(BufReader::with_capacity(READ_BUFFER_BYTES, stream))
                .await
                .map_err(|e| TlsError::Handshake(x509::explain(&e)))?;
            // With a CA every certificate presented was verified; without one none is asked for.
            let id = s.get_ref().1.peer_certificates().and_then(x509::peer_cn);
            return Ok((TlsStream(Inner::Rustls(Box::new(s.into()))), id));
        }
        let ssl = Ssl::new(&self.server).map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut s = SslStream::new(ssl, stream).map_err(|e| TlsError::Handshake(e.to_string()))?;
        match Pin::new(&mut s).accept().await {
            Err(e) => Err(TlsError::Handshake(explain(&e, s.ssl()))),
            Ok(()) => {
                let id = peer_identity(s.ssl());
                Ok((TlsStream(Inner::Openssl { inner: s, scratch: Vec::new() }), id))
            }
        }
    }

    /// Runs the client side of a handshake on `stream`. With a CA, the server's certificate must
    /// be signed by it, and if `expect` is given, be for that name.
    pub async fn connect<S>(&self, stream: S, expect: Option<&str>) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.client_handshake(stream, expect)).await {
            Err(_) => Err(too_slow()),
            Ok(r) => r,
        }
    }

    async fn client_handshake<S>(&self, stream: S, expect: Option<&str>) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = Peeked::new(Vec::new(), stream);
        // A client with a PSK file stays on OpenSSL, which offers both kinds of credentials.
        if let Some(r) = self.rustls.as_ref().filter(|_| !self.psk) {
            let s = tokio_rustls::TlsConnector::from(r.client.clone())
                .connect(x509::server_name(), BufReader::with_capacity(READ_BUFFER_BYTES, stream))
                .await
                .map_err(|e| TlsError::Handshake(x509::explain(&e)))?;
            if let (Some(expect), Some(certs)) = (expect, s.get_ref().1.peer_certificates()) {
                check_cn(x509::peer_cn(certs), expect)?;
            }
            return Ok(TlsStream(Inner::Rustls(Box::new(s.into()))));
        }
        let mut ssl = Ssl::new(&self.client).map_err(|e| TlsError::Handshake(e.to_string()))?;
        ssl.set_connect_state();
        let mut s = SslStream::new(ssl, stream).map_err(|e| TlsError::Handshake(e.to_string()))?;
        Pin::new(&mut s).connect().await.map_err(|e| TlsError::Handshake(explain(&e, s.ssl())))?;
        check_server_name(s.ssl(), expect)?;
        Ok(TlsStream(Inner::Openssl { inner: s, scratch: Vec::new() }))
    }

    /// The client side of a handshake on a blocking socket (the admin commands); `expect` as in
    /// [`Tls::connect`].
    pub fn connect_blocking(
        &self,
        stream: std::net::TcpStream,
        expect: Option<&str>,
    ) -> Result<openssl::ssl::SslStream<std::net::TcpStream>, TlsError> {
        let ssl = Ssl::new(&self.client).map_err(|e| TlsError::Handshake(e.to_string()))?;
        let s = ssl.connect(stream).map_err(|e| match e {
            openssl::ssl::HandshakeError::Failure(m) => TlsError::Handshake(explain(m.error(), m.ssl())),
            other => TlsError::Handshake(other.to_string()),
        })?;
        check_server_name(s.ssl(), expect)?;
        Ok(s)
    }
}

/// Bytes gathered from a vectored write into one TLS record: the largest record TLS has.
const RECORD_BYTES: usize = 16 << 10;

/// Bytes read from the socket at a time under rustls, which asks for 4 KiB at a time: without
/// this buffer a 4 KiB NBD write (one record of 4,146 bytes) took two system calls, and a
/// replicated pair made five times the `recv` calls of plaintext, each of them CPU on the cores
/// the client shares. Four of the largest records; per connection.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// A TLS stream on either stack. Its vectored writes become one record, not one record (and
/// one system call) per buffer. The NBD server writes every reply that is ready in one vectored
/// write; `tokio-openssl` alone would send each as its own record: 32 small records and system
/// calls for a queue depth of 32, which cost a third of the throughput of 4 KiB writes (rustls
/// gathers them itself). Reads use OpenSSL's read-ahead, or rustls's own buffering.
pub struct TlsStream<S>(Inner<S>);

impl<S> TlsStream<S> {
    /// The TLS stack that runs this connection: "rustls" or "OpenSSL".
    pub fn stack(&self) -> &'static str {
        match self.0 {
            Inner::Openssl { .. } => "OpenSSL",
            Inner::Rustls(_) => "rustls",
        }
    }
}

enum Inner<S> {
    Openssl { inner: SslStream<Peeked<S>>, scratch: Vec<u8> },
    Rustls(Box<tokio_rustls::TlsStream<BufReader<Peeked<S>>>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Openssl { inner, .. } => Pin::new(inner).poll_read(cx, buf),
            Inner::Rustls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Inner::Openssl { inner, .. } => Pin::new(inner).poll_write(cx, buf),
            Inner::Rustls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let (inner, scratch) = match &mut self.get_mut().0 {
            Inner::Openssl { inner, scratch } => (inner, scratch),
            Inner::Rustls(s) => return Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(0, |b| b.len());
        if first >= RECORD_BYTES {
            return Pin::new(inner).poll_write(cx, &bufs.iter().find(|b| !b.is_empty()).expect("non-empty")[..]);
        }
        // The same prefix of the caller's bytes on every retry: OpenSSL may see a moved buffer
        // (ACCEPT_MOVING_WRITE_BUFFER) but never other bytes.
        scratch.clear();
        for b in bufs {
            let room = RECORD_BYTES - scratch.len();
            scratch.extend_from_slice(&b[..b.len().min(room)]);
            if scratch.len() == RECORD_BYTES {
                break;
            }
        }
        Pin::new(inner).poll_write(cx, scratch)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Openssl { inner, .. } => Pin::new(inner).poll_flush(cx),
            Inner::Rustls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Openssl { inner, .. } => Pin::new(inner).poll_shutdown(cx),
            Inner::Rustls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn too_slow() -> TlsError {
    TlsError::Handshake(format!("handshake not finished within {HANDSHAKE_TIMEOUT:?}"))
}

/// With certificates and a name to `expect`, refuses a server whose certificate (verified against
/// the CA) carries another CN. A PSK server has no certificate: it proved only that it knows the
/// client's key.
fn check_server_name(ssl: &SslRef, expect: Option<&str>) -> Result<(), TlsError> {
    match (expect, ssl.peer_certificate()) {
        (Some(expect), Some(cert)) => check_cn(common_name(&cert), expect),
        _ => Ok(()),
    }
}

/// Refuses a server certificate's CN `got` unless it is `expect`.
fn check_cn(got: Option<String>, expect: &str) -> Result<(), TlsError> {
    if got.as_deref() != Some(expect) {
        return Err(TlsError::Handshake(format!(
            "the server's certificate is for {:?}, not {expect:?}",
            got.unwrap_or_default()
        )));
    }
    Ok(())
}

/// The identity a peer proved: its PSK identity, or its verified certificate's CN.
pub fn peer_identity(ssl: &SslRef) -> Option<String> {
    if let Some(seen) = ssl.ex_data(psk_index()) {
        if seen.known {
            return Some(seen.identity.clone());
        }
    }
    if ssl.verify_result() != openssl::x509::X509VerifyResult::OK {
        return None;
    }
    ssl.peer_certificate().and_then(|c| common_name(&c))
}

#[allow(deprecated)] // as_utf8: an interior NUL is caught by the length check
fn common_name(cert: &openssl::x509::X509Ref) -> Option<String> {
    let cn = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
    cn.data().as_utf8().ok().map(|s| s.to_string()).filter(|s| s.len() == cn.data().len())
}

/// The likely causes both stacks' refusals name alike (`explain`, `x509::explain`).
const NO_CLIENT_CERTIFICATE: &str =
    "; likely cause: the client has no certificate, and this server requires one signed by its CA";
const PEER_CLOSED: &str = "; the peer closed the connection (it may have refused this server's certificate)";

/// A handshake failure in words that name the likely cause.
fn explain(e: &openssl::ssl::Error, ssl: &SslRef) -> String {
    if let Some(seen) = ssl.ex_data(psk_index()) {
        return if seen.known {
            format!("PSK identity {:?}: handshake failed ({e}); likely cause: a wrong key", seen.identity)
        } else {
            format!("unknown PSK identity {:?}: it is not in the PSK file", seen.identity)
        };
    }
    let verify = ssl.verify_result();
    if verify != openssl::x509::X509VerifyResult::OK {
        return format!("the peer's certificate was refused: {}", verify.error_string());
    }
    let text = e.to_string();
    let cause = if text.contains("peer did not return a certificate") {
        NO_CLIENT_CERTIFICATE
    } else if text.contains("wrong version number") || text.contains("packet length too long") {
        "; likely cause: the peer does not speak TLS here (plaintext, or another protocol)"
    } else if text.contains("http request") {
        "; likely cause: plain HTTP sent to a TLS endpoint (use https://, or `syncblock status` with --tls-… credentials)"
    } else if text.contains("no suitable signature algorithm") {
        "; likely cause: the client offers only certificate authentication and this server has no certificate \
         (PSK only), or a PSK identity it does not know"
    } else if text.contains("no shared cipher") {
        "; likely cause: the client offers neither a certificate cipher this server can use nor PSK"
    } else if text.contains("unexpected eof") || e.code() == openssl::ssl::ErrorCode::SYSCALL {
        PEER_CLOSED
    } else {
        ""
    };
    format!("{text}{cause}")
}

/// The address of a non-loopback listener bound without TLS, for the `--insecure` refusal.
pub fn exposed(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_like_psktool_writes_them() {
        let k = PskKeys::parse("# keys\nalice:0011aaff\n\nbob:DEADBEEF\n").unwrap();
        assert_eq!(k.get("alice"), Some(&[0x00, 0x11, 0xaa, 0xff][..]));
        assert_eq!(k.get("bob"), Some(&[0xde, 0xad, 0xbe, 0xef][..]));
        assert_eq!(k.get("carol"), None);
        assert!(format!("{k:?}").contains("alice") && !format!("{k:?}").contains("0011"));
        for (bad, why) in [
            ("alice", "expected identity:hexkey"),
            ("alice:abc", "not hexadecimal"),
            ("alice:zz", "not hexadecimal"),
            (":00", "identity must be"),
            ("a:00\na:11", "listed twice"),
            ("", "no identity"),
        ] {
            let e = PskKeys::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = format!("a:{}", "00".repeat(PSK_KEY_BYTES_MAX + 1));
        assert!(PskKeys::parse(&long).unwrap_err().contains("key must be"));
    }
}
