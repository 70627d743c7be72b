//! The NBD server: listeners, per-connection handshake, and transmission.
//!
//! Per connection, one task reads requests, runs them concurrently (each a future in a set that
//! the task polls) and writes each whole reply as it completes, so replies go out in completion
//! order, never interleaved. Requests, their engine replies and the socket are all handled by that
//! one task: a request costs no hand-off between tasks (which on a small machine cost more than
//! the work). Bounds on the requests and payload bytes in flight stop the reading of the socket
//! when exhausted, which is the backpressure the client sees.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use syncblock_engine::{ByteRange, Error, ErrorClass, Extent, Store, VolumeId, IO_BYTES_MAX};
use syncblock_replicator::Node;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};

use std::task::{Context, Poll};

use syncblock_replicator::tls::{Tls, TlsStream};
use tokio::io::ReadBuf;

use crate::handshake::{Admission, ExportInfo, Exports, Negotiation, Session, Step, TlsMode};
use crate::metrics::Op;
use crate::proto::{self, *};
use crate::target::{Failure, Target};

/// Structured READs shorter than this are sent as one data chunk without asking the engine which
/// parts are holes: for the 4 KiB reads of databases and fio that halves the engine round trips,
/// while large reads (qemu-img convert, nbdcopy: 64 KiB to 32 MiB) still get holes.
pub const HOLE_SCAN_BYTES_MIN: u64 = 64 << 10;

/// Requests in flight per connection. 64 covers every mainstream client's queue depth per
/// connection (qemu uses 16, fio jobs are usually ≤ 32, the kernel 128 but it blocks fine) while
/// bounding the tasks one client can make us hold.
pub const IN_FLIGHT_MAX: usize = 64;

/// Payload bytes (WRITE data received, READ data requested) in flight per connection: 128 MiB, so
/// four maximal 32 MiB requests still run together while memory per client stays bounded.
pub const IN_FLIGHT_PAYLOAD_BYTES_MAX: u64 = 128 << 20;
/// Unit of the payload budget.
const PAYLOAD_UNIT_BYTES: u64 = 64 << 10;
const PAYLOAD_UNITS: u32 = (IN_FLIGHT_PAYLOAD_BYTES_MAX / PAYLOAD_UNIT_BYTES) as u32;

/// Read-ahead buffer per connection in transmission: a client with 32 small writes in flight sends
/// them back to back, and reading each header and payload with its own system call showed in
/// profiles. Payloads larger than the buffer are read straight into their own memory.
const READ_BUFFER_BYTES: usize = 256 << 10;
const _: () = assert!(IO_BYTES_MAX <= IN_FLIGHT_PAYLOAD_BYTES_MAX);

/// Most extents in one block status reply. The spec caps this at 2^20; 64 Ki keeps a reply under
/// 512 KiB, and a client asks again for the rest.
pub const STATUS_EXTENTS_MAX: usize = 1 << 16;

/// How long a client may take from connecting to entering transmission (or ending negotiation).
/// Real clients negotiate in a few round trips, milliseconds even across a WAN; 30 s leaves room for
/// a stalled machine or a slow link. Without a bound, a client that connects and sends nothing, or
/// stops mid-handshake, would hold a task and a file descriptor forever, and enough of them (a
/// port scanner, a buggy client retrying) would exhaust the descriptors the real clients need.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections one listener serves at once. Each costs a descriptor, a task and up to
/// [`IN_FLIGHT_PAYLOAD_BYTES_MAX`] of buffers under load; real deployments open a few per client
/// (qemu one per disk, multi-conn clients up to 16), so 512 serves a host of VMs while a flood
/// cannot take all of a default 1,024-descriptor limit. More are accepted and closed at once.
pub const CONNECTIONS_MAX: usize = 512;

/// Connections still negotiating (TLS handshake included) per listener. Real clients negotiate in
/// milliseconds; a flood of stalled handshakes is bounded here, and by [`HANDSHAKE_TIMEOUT`] in
/// time, so it cannot take the slots of clients that have entered transmission.
pub const HANDSHAKES_MAX: usize = 64;

/// Which clients may open an export, when it has an access list: one entry per client identity
/// (the CN of its certificate, or its PSK identity).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    pub identity: String,
    /// This client gets the export read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Server configuration (what the exports are comes from the engine's volume list).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The volume the empty export name selects.
    pub default_export: Option<String>,
    /// Volumes exported read-only.
    pub read_only: Vec<String>,
    /// Replicated volumes: while this node is their primary, writes, trims and flushes go through
    /// the replicator (reads stay local); while it is secondary, they are exported read-only.
    pub replicated: HashMap<VolumeId, Node>,
    /// The bound on negotiation; [`HANDSHAKE_TIMEOUT`] unless a test wants a short one.
    pub handshake_timeout: Duration,
    /// Answer writes without FUA once the engine has queued them, before they are on disk
    /// (write-back, as a disk with a volatile cache does; see `docs/durability.md`). FUA writes
    /// and flushes are durable when answered either way. Not used for replicated volumes, whose
    /// writes are answered when both copies have them.
    pub write_back: bool,
    /// Counts requests, bytes, errors and latency per volume and operation (`GET /metrics`).
    pub metrics: Option<crate::metrics::IoMetrics>,
    /// TLS credentials (required unless `tls_mode` is off).
    pub tls: Option<Arc<Tls>>,
    pub tls_mode: TlsMode,
    /// Exports with an access list, by name: only the identities listed may open them.
    pub access: HashMap<String, Vec<AccessRule>>,
    /// Cluster mode: which volumes this node serves, decided by the cluster.
    pub directory: Option<Arc<dyn crate::target::Directory>>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            default_export: None,
            read_only: Vec::new(),
            replicated: HashMap::new(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            write_back: true,
            metrics: None,
            tls: None,
            tls_mode: TlsMode::Off,
            access: HashMap::new(),
            directory: None,
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("engine: {0}")]
    Engine(#[from] Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// Why one connection ended early. Only logged: it never affects other connections.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("engine: {0}")]
    Engine(#[from] Error),
    #[error("WRITE payload of {0} bytes exceeds the {IO_BYTES_MAX}-byte limit")]
    PayloadTooLarge(u32),
    #[error("TLS: {0}")]
    Tls(String),
}

struct Shared {
    store: Store,
    config: ServerConfig,
}

impl Shared {
    /// Whether `identity` may open export `name`, and whether read-only, given whether TLS is on.
    fn admission(&self, name: &str, identity: Option<&str>, tls_active: bool) -> (Admission, bool) {
        let Some(rules) = self.config.access.get(name) else { return (Admission::Allowed, false) };
        match identity {
            Some(id) => match rules.iter().find(|r| r.identity == id) {
                Some(r) => (Admission::Allowed, r.read_only),
                None => (Admission::Denied, false),
            },
            None if !tls_active && self.config.tls_mode != TlsMode::Off => (Admission::NeedsTls, false),
            None => (Admission::Denied, false),
        }
    }

    /// The storage of a volume's export.
    fn target(&self, volume: VolumeId, name: &str) -> Target {
        let store = self.store.clone();
        let node = self.config.replicated.get(&volume).cloned();
        match node.or_else(|| self.config.directory.as_ref().and_then(|d| d.node(name))) {
            Some(node) => Target::Replicated { store, volume, node },
            None => Target::Local { store, volume, write_back: self.config.write_back },
        }
    }
}

/// Serves NBD on `listeners` until `shutdown` completes; then stops accepting, lets every
/// connection finish the requests it has read, flushes the store and returns. The caller closes
/// the store.
pub async fn serve(
    store: Store,
    config: ServerConfig,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared { store, config });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection holds a clone of `alive_tx`; when all are gone, `alive_rx` returns None.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let shared = shared.clone();
        let stop = stop_rx.clone();
        let alive = alive_tx.clone();
        accept_tasks.push(tokio::spawn(accept_loop(listener, shared, stop, alive)));
    }
    drop(alive_tx);
    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    while alive_rx.recv().await.is_some() {}
    shared.store.flush().await?;
    tracing::info!("all connections closed and the store flushed");
    Ok(())
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    let mut refused_logged: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permits =
                    connections.clone().try_acquire_owned().ok().zip(handshakes.clone().try_acquire_owned().ok());
                let Some((connection_permit, handshake_permit)) = permits else {
                    // Closed at once (dropping the stream), logged at most once a second.
                    if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        refused_logged = Some(std::time::Instant::now());
                        tracing::warn!(
                            "{peer}: connection refused: this listener has {} connections ({CONNECTIONS_MAX} at \
                             most), {} of them negotiating ({HANDSHAKES_MAX} at most)",
                            CONNECTIONS_MAX - connections.available_permits(),
                            HANDSHAKES_MAX - handshakes.available_permits(),
                        );
                    }
                    continue;
                };
                let shared = shared.clone();
                let stop = stop.clone();
                let alive = alive.clone();
                tokio::spawn(async move {
                    if let Stream::Tcp(s) = &stream {
                        let _ = s.set_nodelay(true);
                    }
                    connection(stream, &peer, shared, stop, handshake_permit).await;
                    drop(connection_permit);
                    drop(alive);
                });
            }
            Err(e) => {
                // EMFILE and friends: keep serving existing clients, retry shortly.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A connection during negotiation: plain, or TLS after STARTTLS.
enum Conn {
    Plain(Stream),
    Tls(Box<TlsStream<Stream>>),
}

/// Implements tokio's I/O traits for an enum of streams by passing each call to its variant.
macro_rules! delegate_io {
    ($ty:ty, $($variant:path),+) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant(s) => Pin::new(s).poll_read(cx, buf),)+ }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($variant(s) => Pin::new(s).poll_write(cx, buf),)+ }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant(s) => Pin::new(s).poll_flush(cx),)+ }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($variant(s) => Pin::new(s).poll_shutdown(cx),)+ }
            }
        }
    };
}
delegate_io!(Stream, Stream::Tcp, Stream::Unix);
delegate_io!(Conn, Conn::Plain, Conn::Tls);

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(l, p) => l.accept().await.map(|(s, _)| (Stream::Unix(s), p.display().to_string())),
    }
}

async fn connection(
    stream: Stream,
    peer: &str,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        s = tokio::time::timeout(timeout, negotiate(Conn::Plain(stream), peer, &shared)) => s,
    };
    drop(handshake_permit);
    let (conn, session) = match negotiated {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!("{peer}: handshake ended: {e}");
            return;
        }
        Err(_) => {
            tracing::info!("{peer}: handshake not finished within {timeout:?}; closing the connection");
            return;
        }
    };
    tracing::debug!("{peer}: serving export {:?} (structured replies: {})", session.export.name, session.structured);
    // Owned halves for plain sockets: the reader and the writer use the socket without sharing a
    // lock (`tokio::io::split`'s mutex showed up as contention under load). A TLS stream has one
    // state for both directions, so it is split with that lock.
    let ended = match conn {
        Conn::Plain(Stream::Tcp(s)) => {
            let (r, w) = s.into_split();
            transmission(r, w, session, shared, stop).await
        }
        Conn::Plain(Stream::Unix(s)) => {
            let (r, w) = s.into_split();
            transmission(r, w, session, shared, stop).await
        }
        Conn::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            transmission(r, w, session, shared, stop).await
        }
    };
    if let Err(e) = ended {
        tracing::info!("{peer}: connection closed: {e}");
    }
}

/// The exports as this connection's client sees them: who it proved to be decides which it may
/// open.
async fn exports(shared: &Shared, identity: Option<&str>, tls_active: bool) -> Result<Exports, Error> {
    let mut list = shared.store.list_volumes().await?;
    let directory = shared.config.directory.clone();
    if let Some(d) = &directory {
        list.retain(|v| d.elsewhere(&v.name).is_none());
    }
    Ok(Exports {
        elsewhere: directory.map(|d| crate::handshake::Elsewhere(Arc::new(move |name: &str| d.elsewhere(name)))),
        list: list
            .into_iter()
            .map(|v| {
                let (admission, acl_read_only) = shared.admission(&v.name, identity, tls_active);
                ExportInfo {
                    read_only: acl_read_only
                        || shared.config.read_only.contains(&v.name)
                        || !shared.target(v.id, &v.name).writable(),
                    admission,
                    name: v.name,
                    volume: v.id,
                    size: v.size_bytes,
                }
            })
            .collect(),
        default_name: shared.config.default_export.clone(),
    })
}

/// Negotiates on `conn` (upgrading it to TLS on STARTTLS) until the client enters transmission
/// (`Some`) or ends (`None`).
async fn negotiate(mut conn: Conn, peer: &str, shared: &Shared) -> Result<Option<(Conn, Session)>, ConnError> {
    let mut out = BytesMut::new();
    encode_greeting(&mut out);
    conn.write_all(&out).await?;
    conn.flush().await?;
    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags).await?;
    let mut neg = Negotiation::with_tls(decode_client_flags(flags)?, shared.config.tls_mode);
    let mut identity: Option<String> = None;
    loop {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        conn.read_exact(&mut hdr).await?;
        let hdr = decode_option_header(&hdr)?;
        out.clear();
        let step = if hdr.len > OPTION_BYTES_MAX {
            tokio::io::copy(&mut (&mut conn).take(u64::from(hdr.len)), &mut tokio::io::sink()).await?;
            neg.on_oversized_option(hdr.option, &mut out)
        } else {
            let mut data = vec![0u8; hdr.len as usize];
            conn.read_exact(&mut data).await?;
            let tls_active = matches!(conn, Conn::Tls(_));
            let exports = exports(shared, identity.as_deref(), tls_active).await?;
            neg.on_option(hdr.option, &data, &exports, &mut out)
        };
        if let Some(export) = neg.take_denied() {
            let who =
                identity.as_deref().map_or("a client without a TLS identity".into(), |i| format!("identity {i:?}"));
            tracing::warn!("{peer}: refused export {export:?} to {who}: not on its access list");
        }
        conn.write_all(&out).await?;
        conn.flush().await?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(s) => return Ok(Some((conn, s))),
            Step::StartTls => {
                let (Conn::Plain(stream), Some(tls)) = (conn, shared.config.tls.as_ref()) else {
                    return Err(ConnError::Tls("STARTTLS on a connection that cannot start TLS".into()));
                };
                let (s, id) = tls.accept(stream).await.map_err(|e| {
                    tracing::warn!("{peer}: TLS handshake refused: {e}");
                    ConnError::Tls(e.to_string())
                })?;
                let who = id.as_deref().map_or("no client identity".into(), |i| format!("identity {i:?}"));
                tracing::debug!("{peer}: TLS on ({who}, {})", s.stack());
                identity = id;
                conn = Conn::Tls(Box::new(s));
                neg.tls_started();
            }
        }
    }
}

/// A whole reply, as buffers written back to back (header bytes, then read data uncopied).
type Reply = Vec<Bytes>;

/// A request's reply: `Ok` for success, `Err` carrying the error reply.
type Answer = Result<Reply, Reply>;

async fn transmission<R, W>(
    mut r: R,
    w: W,
    session: Session,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let io = shared.config.metrics.as_ref().map(|m| m.volume(&session.export.name));
    let ctx = Arc::new(Ctx { target: shared.target(session.export.volume, &session.export.name), session });
    let mut out = Replies::new(w);
    let mut input = RequestReader::default();
    let mut inflight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut payload_units_used: u32 = 0;
    let result: Result<(), ConnError> = async {
        loop {
            // Start every request already read whole, while the budget allows. Replies not yet
            // written count against the payload budget too: a client that sends requests but
            // does not read replies is stopped, not buffered for without bound.
            let mut blocked = false;
            while inflight.len() < IN_FLIGHT_MAX {
                let units_left = PAYLOAD_UNITS.saturating_sub(payload_units_used + out.units());
                match input.next_request(units_left)? {
                    Next::Request(req, data) => match ctx.validate(&req) {
                        Err((errno, msg)) => {
                            if let Some(io) = &io {
                                io.record(op_of(req.command), 0, Duration::ZERO, false);
                            }
                            out.push(error_reply(ctx.session.structured, req.cookie, errno, msg))
                        }
                        Ok(()) => {
                            let units = payload_units(&req);
                            payload_units_used += units;
                            let ctx = ctx.clone();
                            let io = io.clone();
                            inflight.push(Box::pin(async move {
                                let started = std::time::Instant::now();
                                let (op, len) = (op_of(req.command), u64::from(req.len));
                                let answer = ctx.execute(req, data).await;
                                if let Some(io) = io {
                                    let bytes = if op == Op::flush || op == Op::block_status { 0 } else { len };
                                    io.record(op, bytes, started.elapsed(), answer.is_ok());
                                }
                                (answer.unwrap_or_else(|failed| failed), units)
                            }));
                        }
                    },
                    Next::Disconnect => return Ok(()),
                    Next::NeedBytes => break,
                    Next::OverBudget => {
                        blocked = true;
                        break;
                    }
                }
            }
            let can_read = !blocked && inflight.len() < IN_FLIGHT_MAX;
            // Completions first, then writing replies, then reading requests. All three, and
            // the requests' own progress, go on at once: a client slow to read its replies must
            // not stall requests in flight (a replicated write may hold the volume's sequencer).
            tokio::select! {
                biased;
                Some((reply, units)) = inflight.next(), if !inflight.is_empty() => {
                    payload_units_used -= units;
                    out.push(reply);
                    // Everything else already done goes out in the same write.
                    while let Some(Some((reply, units))) = inflight.next().now_or_never() {
                        payload_units_used -= units;
                        out.push(reply);
                    }
                }
                w = out.write_some(), if !out.is_empty() => w?,
                r = input.fill(&mut r), if can_read => {
                    if !r? {
                        // The client closed between requests: a normal end.
                        return Ok(());
                    }
                }
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
    .await;
    // Requests already started always finish and are answered (if the client is still there):
    // a started write may already be in the log, and a replicated one must reach the peer too.
    while let Some((reply, _)) = inflight.next().await {
        out.push(reply);
    }
    out.finish().await;
    result
}

/// The metrics' name for a command (validation let only these through).
fn op_of(command: u16) -> Op {
    match command {
        CMD_READ => Op::read,
        CMD_WRITE => Op::write,
        CMD_FLUSH => Op::flush,
        CMD_TRIM => Op::trim,
        CMD_WRITE_ZEROES => Op::write_zeroes,
        CMD_BLOCK_STATUS => Op::block_status,
        _ => Op::cache,
    }
}

/// A request started on a connection: its reply and the payload units it holds.
type InFlight = Pin<Box<dyn Future<Output = (Reply, u32)> + Send>>;

/// What [`RequestReader::next_request`] found.
enum Next {
    Request(RequestHeader, Bytes),
    Disconnect,
    /// The next request is not all here yet.
    NeedBytes,
    /// The next request is here, or its header is, but its payload does not fit in the budget
    /// left; wait for requests in flight to complete.
    OverBudget,
}

/// Requests decoded from bytes read ahead. Reading can be abandoned at any point (the connection
/// waits for bytes and for completions at once) without losing any: bytes stay in the buffer until
/// their request is whole.
#[derive(Default)]
struct RequestReader {
    buf: BytesMut,
}

impl RequestReader {
    fn next_request(&mut self, units_left: u32) -> Result<Next, ConnError> {
        if self.buf.len() < REQUEST_HEADER_BYTES {
            return Ok(Next::NeedBytes);
        }
        let req = decode_request_header(self.buf[..REQUEST_HEADER_BYTES].try_into().expect("header bytes"))?;
        if req.command == CMD_DISC {
            return Ok(Next::Disconnect);
        }
        if payload_units(&req) > units_left {
            return Ok(Next::OverBudget);
        }
        let mut whole = REQUEST_HEADER_BYTES;
        if req.command == CMD_WRITE {
            if u64::from(req.len) > IO_BYTES_MAX {
                // Larger than any client may send (the spec allows a hard disconnect); not worth
                // draining.
                return Err(ConnError::PayloadTooLarge(req.len));
            }
            whole += req.len as usize;
        }
        if self.buf.len() < whole {
            // Within the payload budget, checked above: room for the payload, read straight in.
            self.buf.reserve(whole - self.buf.len());
            return Ok(Next::NeedBytes);
        }
        self.buf.advance(REQUEST_HEADER_BYTES);
        let data = self.buf.split_to(whole - REQUEST_HEADER_BYTES).freeze();
        Ok(Next::Request(req, data))
    }

    /// Reads what arrives next; false at end of stream with nothing pending. Cancel-safe.
    async fn fill(&mut self, r: &mut (impl AsyncRead + Unpin)) -> io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < REQUEST_HEADER_BYTES {
            self.buf.reserve(READ_BUFFER_BYTES);
        }
        if r.read_buf(&mut self.buf).await? > 0 {
            return Ok(true);
        }
        if self.buf.is_empty() {
            Ok(false)
        } else {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client vanished in the middle of a request"))
        }
    }
}

fn payload_units(req: &RequestHeader) -> u32 {
    match req.command {
        CMD_READ | CMD_WRITE => {
            let bytes = u64::from(req.len).min(IO_BYTES_MAX);
            (bytes.div_ceil(PAYLOAD_UNIT_BYTES) as u32).max(1)
        }
        _ => 1,
    }
}

/// A connection's replies, in completion order, written together. After a write error (the client
/// went away) replies are dropped: the requests still complete.
struct Replies<W> {
    w: W,
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    failed: bool,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    fn new(w: W) -> Replies<W> {
        Replies { w, pending: VecDeque::new(), pending_bytes: 0, failed: false }
    }

    fn push(&mut self, reply: Reply) {
        if !self.failed {
            for b in reply.into_iter().filter(|b| !b.is_empty()) {
                self.pending_bytes += b.len();
                self.pending.push_back(b);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Payload units the unwritten replies hold (see [`PAYLOAD_UNIT_BYTES`]).
    fn units(&self) -> u32 {
        u32::try_from((self.pending_bytes as u64).div_ceil(PAYLOAD_UNIT_BYTES)).unwrap_or(u32::MAX)
    }

    /// One vectored write of as much as the socket takes. Cancel-safe: the replies advance only
    /// after the write returned.
    async fn write_some(&mut self) -> io::Result<()> {
        /// Slices per system call: Linux's IOV_MAX is 1024.
        const IOVECS_MAX: usize = 1024;
        let res = {
            let slices: Vec<io::IoSlice<'_>> =
                self.pending.iter().take(IOVECS_MAX).map(|b| io::IoSlice::new(b)).collect();
            self.w.write_vectored(&slices).await
        };
        let mut n = match res {
            Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
            other => other,
        }
        .inspect_err(|e| {
            tracing::debug!("writing replies failed: {e}");
            self.failed = true;
            self.pending.clear();
            self.pending_bytes = 0;
        })?;
        self.pending_bytes -= n;
        while n > 0 {
            let front = self.pending.front_mut().expect("the kernel wrote no more than we gave");
            let take = n.min(front.len());
            front.advance(take);
            n -= take;
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
        Ok(())
    }

    /// Writes what is left and closes the writing side.
    async fn finish(&mut self) {
        while !self.is_empty() {
            if self.write_some().await.is_err() {
                return;
            }
        }
        let _ = self.w.flush().await;
        let _ = self.w.shutdown().await;
    }
}

struct Ctx {
    session: Session,
    target: Target,
}

fn simple_ok(cookie: u64) -> Reply {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_HEADER_BYTES);
    encode_simple_reply(&mut b, 0, cookie);
    vec![b.freeze()]
}

fn error_reply(structured: bool, cookie: u64, errno: u32, msg: &str) -> Reply {
    let mut b = BytesMut::new();
    if structured {
        encode_chunk_error(&mut b, cookie, errno, msg);
    } else {
        encode_simple_reply(&mut b, errno, cookie);
    }
    vec![b.freeze()]
}

/// The NBD errno for a failure of `command`: one exhaustive match over the engine's
/// [`ErrorClass`], the classification the admin endpoint maps too.
pub fn nbd_errno(class: ErrorClass, command: u16) -> u32 {
    let writes = matches!(command, CMD_WRITE | CMD_WRITE_ZEROES);
    match class {
        ErrorClass::OutOfRange if writes => proto::ENOSPC,
        ErrorClass::OutOfRange | ErrorClass::Invalid => proto::EINVAL,
        ErrorClass::NoSpace => proto::ENOSPC,
        ErrorClass::ShuttingDown => proto::ESHUTDOWN,
        ErrorClass::Forbidden => proto::EPERM,
        // A volume deleted under a session, a refusal by the peer or the witness, a failed or
        // unusable store: nothing the client can fix by changing the request.
        ErrorClass::NotFound | ErrorClass::Conflict | ErrorClass::Failed | ErrorClass::Unusable => proto::EIO,
    }
}

impl Ctx {
    /// Checks a request before it reaches the engine, in the order the spec's errors rank.
    fn validate(&self, req: &RequestHeader) -> Result<(), (u32, &'static str)> {
        let s = &self.session;
        let allowed = CMD_FLAG_FUA
            | match req.command {
                CMD_READ if s.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !allowed != 0 {
            return Err((EINVAL, "command flag not valid for this command"));
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        match req.command {
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {}
            _ => return Err((EINVAL, "unknown command")),
        }
        if writes && s.export.read_only {
            return Err((EPERM, "export is read-only"));
        }
        if req.command == CMD_READ && u64::from(req.len) > IO_BYTES_MAX {
            return Err((EINVAL, "request exceeds the maximum block size"));
        }
        if req.command != CMD_FLUSH {
            let end = req.offset.checked_add(u64::from(req.len));
            if end.is_none_or(|e| e > s.export.size) {
                let errno = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
                return Err((errno, "request beyond the end of the export"));
            }
        }
        if req.command == CMD_BLOCK_STATUS {
            if !s.base_allocation {
                return Err((EINVAL, "no metadata context was negotiated"));
            }
            if req.len == 0 {
                return Err((EINVAL, "block status of zero length"));
            }
        }
        if req.command == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0 && req.flags & CMD_FLAG_NO_HOLE != 0 {
            // Zeroes that must stay allocated are written block by block: not faster than WRITE.
            return Err((ENOTSUP, "zeroing without holes is not fast"));
        }
        Ok(())
    }

    async fn execute(&self, req: RequestHeader, data: Bytes) -> Answer {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = u64::from(req.len);
        let t = &self.target;
        let res = match req.command {
            CMD_READ => return self.read(req).await,
            CMD_BLOCK_STATUS => return self.block_status(req).await,
            CMD_WRITE => t.write(req.offset, data, fua).await,
            CMD_FLUSH => t.flush().await,
            CMD_TRIM => t.trim(req.offset, len, fua).await,
            CMD_WRITE_ZEROES => t.write_zeroes(req.offset, len, req.flags & CMD_FLAG_NO_HOLE == 0, fua).await,
            // CACHE: the engine has no cache to warm; the range was checked.
            _ => Ok(()),
        };
        match res {
            Ok(()) => Ok(simple_ok(req.cookie)),
            Err(f) => Err(self.failed(&req, &f)),
        }
    }

    /// The error reply for a failed request.
    fn failed(&self, req: &RequestHeader, f: &Failure) -> Reply {
        error_reply(self.session.structured, req.cookie, nbd_errno(f.class, req.command), &f.message)
    }

    async fn read(&self, req: RequestHeader) -> Answer {
        let s = &self.session;
        let t = &self.target;
        let len = u64::from(req.len);
        if !s.structured {
            return match t.read(req.offset, len).await {
                Ok(data) => {
                    let mut reply = simple_ok(req.cookie);
                    reply.push(data);
                    Ok(reply)
                }
                Err(f) => Err(self.failed(&req, &f)),
            };
        }
        if len == 0 {
            let mut b = BytesMut::new();
            encode_chunk_none(&mut b, req.cookie);
            return Ok(vec![b.freeze()]);
        }
        // Small reads skip hole detection: a second engine call (block status) would cost more than
        // sending the few zero bytes it could save. Sending zeros as data is always allowed.
        let df = req.flags & CMD_FLAG_DF != 0 || len < HOLE_SCAN_BYTES_MIN;
        let (data, extents) = if df {
            (t.read(req.offset, len).await, Ok(Vec::new()))
        } else {
            tokio::join!(t.read(req.offset, len), t.block_status(req.offset, len))
        };
        let (data, extents) = match (data, extents) {
            (Ok(d), Ok(e)) => (d, e),
            (Err(f), _) | (_, Err(f)) => return Err(self.failed(&req, &f)),
        };
        // Ranges covering the request and whether each is a hole; data ranges merged.
        let mut runs: Vec<(ByteRange, bool)> = Vec::new();
        if df {
            runs.push((ByteRange { offset: req.offset, len }, false));
        } else {
            for (range, flags) in clip_extents(&extents, req.offset, len, usize::MAX) {
                let hole = flags & STATE_ZERO != 0;
                match runs.last_mut() {
                    Some((last, last_hole)) if *last_hole == hole && last.end() == range.offset => {
                        last.len += range.len
                    }
                    _ => runs.push((range, hole)),
                }
            }
            let covered: u64 = runs.iter().map(|(range, _)| range.len).sum();
            if covered < len {
                // The engine described less than asked: send the rest as data.
                runs.push((ByteRange { offset: req.offset + covered, len: len - covered }, false));
            }
        }
        let mut reply = Vec::with_capacity(runs.len() * 2);
        for (i, &(range, hole)) in runs.iter().enumerate() {
            let done = i + 1 == runs.len();
            let mut b = BytesMut::new();
            if hole {
                encode_chunk_offset_hole(&mut b, req.cookie, range.offset, range.len as u32, done);
                reply.push(b.freeze());
            } else {
                encode_chunk_offset_data(&mut b, req.cookie, range.offset, range.len as u32, done);
                reply.push(b.freeze());
                let from = (range.offset - req.offset) as usize;
                reply.push(data.slice(from..from + range.len as usize));
            }
        }
        Ok(reply)
    }

    async fn block_status(&self, req: RequestHeader) -> Answer {
        let len = u64::from(req.len);
        let extents = match self.target.block_status(req.offset, len).await {
            Ok(e) => e,
            Err(f) => return Err(self.failed(&req, &f)),
        };
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { STATUS_EXTENTS_MAX };
        let mut out: Vec<StatusExtent> = Vec::new();
        for (range, flags) in clip_extents(&extents, req.offset, len, max) {
            match out.last_mut() {
                Some(last) if last.flags == flags && max > 1 => last.len += range.len as u32,
                _ => out.push(StatusExtent { len: range.len as u32, flags }),
            }
        }
        if out.is_empty() {
            // Never send zero extents; "allocated, contents unknown" is always true.
            out.push(StatusExtent { len: req.len, flags: 0 });
        }
        let mut b = BytesMut::new();
        encode_chunk_block_status(&mut b, req.cookie, CONTEXT_ID_BASE_ALLOCATION, &out, true);
        Ok(vec![b.freeze()])
    }
}

/// The engine's extents clipped to `[offset, offset + len)`, contiguous from `offset`, with their
/// base:allocation flags; gaps the engine left are reported as allocated (flags 0, always safe).
/// At most `max` entries; stops at the first gap after it.
fn clip_extents(extents: &[Extent], offset: u64, len: u64, max: usize) -> Vec<(ByteRange, u32)> {
    let end = offset + len;
    let mut cursor = offset;
    let mut out = Vec::new();
    for e in extents {
        if out.len() >= max || cursor >= end {
            break;
        }
        let e_end = e.range.offset.saturating_add(e.range.len);
        if e_end <= cursor || e.range.len == 0 {
            continue;
        }
        if e.range.offset > cursor {
            let gap_end = e.range.offset.min(end);
            out.push((ByteRange { offset: cursor, len: gap_end - cursor }, 0));
            cursor = gap_end;
            if out.len() >= max || cursor >= end {
                break;
            }
        }
        let stop = e_end.min(end);
        let flags = if e.mapped { 0 } else { STATE_HOLE | STATE_ZERO };
        out.push((ByteRange { offset: cursor, len: stop - cursor }, flags));
        cursor = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, mapped: bool) -> Extent {
        Extent { range: ByteRange { offset, len }, mapped }
    }

    #[test]
    fn extents_are_clipped_to_the_request_and_gaps_reported_allocated() {
        let e = [ext(0, 8192, true), ext(8192, 8192, false), ext(20480, 4096, true)];
        let range = |offset, len| ByteRange { offset, len };
        assert_eq!(
            clip_extents(&e, 4096, 20000, usize::MAX),
            vec![(range(4096, 4096), 0), (range(8192, 8192), 3), (range(16384, 4096), 0), (range(20480, 3616), 0)]
        );
        assert_eq!(clip_extents(&e, 4096, 100, 1), vec![(range(4096, 100), 0)]);
        assert_eq!(clip_extents(&[], 0, 100, 5), vec![]);
    }

    #[test]
    fn range_errors_depend_on_the_command() {
        let e = Error::OutOfRange { volume: syncblock_engine::VolumeId(1), offset: 0, len: 1, size: 0 };
        assert_eq!(nbd_errno(e.class(), CMD_WRITE), ENOSPC);
        assert_eq!(nbd_errno(e.class(), CMD_WRITE_ZEROES), ENOSPC);
        assert_eq!(nbd_errno(e.class(), CMD_READ), EINVAL);
        assert_eq!(nbd_errno(e.class(), CMD_TRIM), EINVAL);
        assert_eq!(nbd_errno(Error::NoSpace.class(), CMD_WRITE), ENOSPC);
        assert_eq!(nbd_errno(Error::ShutDown.class(), CMD_FLUSH), ESHUTDOWN);
        assert_eq!(nbd_errno(Error::Poisoned { cause: "x".into() }.class(), CMD_WRITE), EIO);
        assert_eq!(nbd_errno(Error::TooLarge { len: 1 << 40, limit: 1 << 25 }.class(), CMD_READ), EINVAL);
    }
}
