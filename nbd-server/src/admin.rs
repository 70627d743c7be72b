//! The admin endpoint (`--admin`): HTTP/1.1, JSON for status and commands, the Prometheus text
//! format for metrics. `curl` and any monitoring agent can use it; `syncblock status`, `promote`,
//! `demote`, `switchover` and `verify` are its clients.
//!
//! | request | answer |
//! |---|---|
//! | `GET /status[?volume=NAME]` | [`StatusDoc`] |
//! | `GET /metrics` | Prometheus exposition ([`crate::metrics`]) |
//! | `POST /promote?[volume=NAME][&force=true]` | [`Answer`] with `epoch` |
//! | `POST /demote?[volume=NAME]` | [`Answer`] with `role` |
//! | `POST /switchover?[volume=NAME]` | [`Answer`] with `primary` (the peer, now primary) and `epoch` |
//! | `POST /verify?[volume=NAME][&repair=true]` | [`Answer`] with `verify` |
//!
//! A command that is refused answers 409 (or 404 for an unknown volume, 400 for a bad request)
//! with `ok: false` and an `error` that names the cause.
//!
//! **Who may call** ([`Admin::access`], `--admin-allow IDENTITY[:ro]`): without a list, every
//! identity the TLS credentials prove (a plaintext endpoint listens on loopback only). With one,
//! only the identities it names, and one marked `:ro` only reads (`GET /status`, `GET /metrics`):
//! a Prometheus scraper's certificate then cannot promote or demote. Others get 403 and a log line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use syncblock_engine::{ErrorClass, Store, BLOCK_BYTES_U64};
use syncblock_replicator::status::VerifyReportView;
use syncblock_replicator::tls::{Tls, TlsStream};
use syncblock_replicator::{Node, StatusView};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Admin connections open at once. An operator's CLI, a Prometheus scraper and a supervisor's
/// health check need a handful; the bound keeps a flood of connections from taking the
/// descriptors that NBD clients need. Connections beyond it wait to be accepted.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;

/// What `GET /status` answers: this node's store and each of its volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// The node's name (`--node`).
    pub node: String,
    pub version: String,
    pub store: StoreDoc,
    pub volumes: Vec<VolumeDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreDoc {
    pub path: String,
    /// The store file's or device's size.
    pub size_bytes: u64,
    /// The log's capacity (the size less the superblocks and checkpoint slots), and how much of
    /// it is in segments holding data or free.
    pub log_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Current data in the log.
    pub live_bytes: u64,
    /// The volumes' sizes added up: more than `size_bytes` is overcommitted (a volume as large as
    /// the store is not: the store is then full before the volume, by the log's overhead).
    pub provisioned_bytes: u64,
    /// Bytes a sparse store file may still grow by that its file system does not have free.
    pub backing_shortfall_bytes: u64,
    pub write_amplification: f64,
    pub client_written_bytes: u64,
    pub log_written_bytes: u64,
    pub cleaner_copied_bytes: u64,
    pub segments_cleaned: u64,
    pub checkpoints: u64,
    pub syncs: u64,
    pub io_errors: u64,
    /// An I/O error stopped the store; it refuses writes until restarted.
    pub poisoned: bool,
}

impl StoreDoc {
    /// Promised more than it may be able to hold: volumes larger than the store together, or a
    /// sparse store file its file system cannot fill.
    pub fn overcommitted(&self) -> bool {
        self.provisioned_bytes > self.size_bytes || self.backing_shortfall_bytes > 0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeDoc {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes holding written data.
    pub mapped_bytes: u64,
    pub read_only: bool,
    /// Without replication: None.
    pub replication: Option<StatusView>,
}

/// The answer to a command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// After a switchover: the node that is primary now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReportView>,
}

/// What the endpoint serves from.
#[derive(Debug)]
pub struct Admin {
    pub store: Store,
    pub store_path: PathBuf,
    pub node: String,
    /// The replicated volumes' nodes.
    pub nodes: Nodes,
    pub read_only: Vec<String>,
    pub metrics: Arc<Metrics>,
    /// Who may call (see the module's doc): empty, every identity the credentials prove.
    pub access: Vec<crate::server::AccessRule>,
}

/// The replicated volumes' nodes: fixed for `serve`, read at each request in cluster mode (where
/// volumes come and go).
#[derive(Clone)]
pub enum Nodes {
    Fixed(Vec<Node>),
    Live(Arc<dyn Fn() -> Vec<Node> + Send + Sync>),
}

impl Nodes {
    pub fn get(&self) -> Vec<Node> {
        match self {
            Nodes::Fixed(v) => v.clone(),
            Nodes::Live(f) => f(),
        }
    }
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.get().iter()).finish()
    }
}

/// A request refused: the HTTP status and why.
#[derive(Debug)]
pub struct Refusal {
    pub code: StatusCode,
    pub error: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.code, Json(Answer { ok: false, error: Some(self.error), ..Answer::default() })).into_response()
    }
}

fn refuse(code: StatusCode, error: String) -> Refusal {
    Refusal { code, error }
}

/// The HTTP status for a failure class: one exhaustive match, as `server::nbd_errno` is for NBD.
pub fn http_status(class: ErrorClass) -> StatusCode {
    match class {
        ErrorClass::Invalid | ErrorClass::OutOfRange => StatusCode::BAD_REQUEST,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Conflict => StatusCode::CONFLICT,
        ErrorClass::Forbidden => StatusCode::FORBIDDEN,
        ErrorClass::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorClass::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Failed | ErrorClass::Unusable => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<syncblock_replicator::ReplError> for Refusal {
    fn from(e: syncblock_replicator::ReplError) -> Refusal {
        refuse(http_status(e.class()), e.to_string())
    }
}

impl From<syncblock_engine::Error> for Refusal {
    fn from(e: syncblock_engine::Error) -> Refusal {
        refuse(http_status(e.class()), e.to_string())
    }
}

impl Admin {
    /// A snapshot of the store and its volumes (all, or the one named).
    pub async fn status(&self, volume: Option<&str>) -> Result<StatusDoc, Refusal> {
        let stats = self.store.stats().await?;
        let list = self.store.list_volumes().await?;
        if let Some(v) = volume.filter(|v| !list.iter().any(|x| x.name == *v)) {
            let names: Vec<_> = list.iter().map(|x| x.name.as_str()).collect();
            return Err(refuse(StatusCode::NOT_FOUND, format!("no volume {v} here (volumes: {})", names.join(", "))));
        }
        let mut volumes = Vec::new();
        let nodes = self.nodes.get();
        for v in list.iter().filter(|x| volume.is_none_or(|n| x.name == n)) {
            let replication = match nodes.iter().find(|n| n.volume() == v.name) {
                Some(n) => Some(n.status().await.view()),
                None => None,
            };
            volumes.push(VolumeDoc {
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                mapped_bytes: v.mapped_bytes,
                read_only: self.read_only.contains(&v.name),
                replication,
            });
        }
        let seg = stats.segment_bytes;
        let log_bytes = u64::from(stats.n_segments) * seg;
        let store = StoreDoc {
            path: self.store_path.display().to_string(),
            size_bytes: store_size_bytes(&self.store_path, &stats),
            log_bytes,
            used_bytes: u64::from(stats.n_segments - stats.free_segments.min(stats.n_segments)) * seg,
            free_bytes: u64::from(stats.free_segments) * seg,
            live_bytes: stats.live_blocks * BLOCK_BYTES_U64,
            provisioned_bytes: list.iter().map(|v| v.size_bytes).sum(),
            backing_shortfall_bytes: backing_shortfall(&self.store_path),
            // Before any client write the ratio is the format's own blocks over nothing: say 1.
            write_amplification: if stats.user_blocks_written == 0 {
                1.0
            } else {
                (stats.write_amplification() * 1000.0).round() / 1000.0
            },
            client_written_bytes: stats.user_blocks_written * BLOCK_BYTES_U64,
            log_written_bytes: stats.log_blocks_written * BLOCK_BYTES_U64,
            cleaner_copied_bytes: stats.gc_blocks_copied * BLOCK_BYTES_U64,
            segments_cleaned: stats.segments_cleaned,
            checkpoints: stats.checkpoints,
            syncs: stats.syncs,
            io_errors: stats.io_errors,
            poisoned: stats.poisoned,
        };
        Ok(StatusDoc { node: self.node.clone(), version: env!("CARGO_PKG_VERSION").into(), store, volumes })
    }

    /// The replicated volume a command names, or the only one.
    fn node(&self, volume: Option<&str>) -> Result<Node, Refusal> {
        let nodes = self.nodes.get();
        let names = || nodes.iter().map(|n| n.volume()).collect::<Vec<_>>().join(", ");
        if nodes.is_empty() {
            return Err(refuse(StatusCode::CONFLICT, "this node replicates no volume".into()));
        }
        match volume {
            Some(v) => nodes.iter().find(|n| n.volume() == v).cloned().ok_or_else(|| {
                refuse(
                    StatusCode::NOT_FOUND,
                    format!("volume {v} is not replicated by this node (it replicates {})", names()),
                )
            }),
            None if nodes.len() == 1 => Ok(nodes[0].clone()),
            None => Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("this node replicates {}: name one with --volume", names()),
            )),
        }
    }
}

/// What a store holds, against which its volumes' sizes count: the store file's or device's size
/// (never less than its log's capacity).
pub fn store_size_bytes(path: &std::path::Path, stats: &syncblock_engine::Stats) -> u64 {
    let log_bytes = u64::from(stats.n_segments) * stats.segment_bytes;
    device_bytes(path).unwrap_or(log_bytes).max(log_bytes)
}

/// The size of the store file or block device at `path`.
pub fn device_bytes(path: &std::path::Path) -> Option<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(std::io::SeekFrom::End(0)).ok()
}

/// How much a sparse store file may still grow beyond its file system's free space (0 for a
/// block device, a fully allocated file, or when the sizes cannot be read).
pub fn backing_shortfall(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if meta.file_type().is_block_device() {
        return 0;
    }
    let unallocated = meta.len().saturating_sub(meta.blocks() * 512);
    unallocated.saturating_sub(fs_free_bytes(path).unwrap_or(u64::MAX))
}

/// Bytes an unprivileged writer may still allocate on the file system holding `path`.
fn fs_free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the right size.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types vary by platform (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[derive(Debug, Deserialize)]
struct Params {
    volume: Option<String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    repair: bool,
}

impl Admin {
    /// Whether `identity` may make a request that only reads (`read`) or one that commands.
    pub fn allows(&self, identity: Option<&str>, read: bool) -> Result<(), String> {
        if self.access.is_empty() {
            return Ok(());
        }
        let Some(id) = identity else {
            return Err("the caller proved no identity, and the endpoint has an access list (--admin-allow)".into());
        };
        match self.access.iter().find(|r| r.identity == id) {
            None => Err(format!("identity {id:?} is not on the admin access list (--admin-allow)")),
            Some(r) if r.read_only && !read => Err(format!(
                "identity {id:?} may only read (GET /status, /metrics): it is on the admin access list as {id}:ro"
            )),
            Some(_) => Ok(()),
        }
    }
}

/// A connection's address and, over TLS, the identity its handshake proved. The handshake runs on
/// the connection's first read, so the identity is set before any request is parsed.
#[derive(Clone, Debug)]
struct Caller {
    addr: SocketAddr,
    identity: Arc<OnceLock<Option<String>>>,
}

impl Connected<axum::serve::IncomingStream<'_, Limited>> for Caller {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Limited>) -> Caller {
        stream.remote_addr().clone()
    }
}

/// Refuses, with 403 and a log line, a request its caller may not make ([`Admin::allows`]).
async fn authorize(
    State(a): State<Arc<Admin>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    req: Request,
    next: Next,
) -> Response {
    let identity = caller.identity.get().cloned().flatten();
    if let Err(why) = a.allows(identity.as_deref(), req.method() == Method::GET) {
        tracing::warn!("{}: admin endpoint: refused {} {}: {why}", caller.addr, req.method(), req.uri().path());
        return refuse(StatusCode::FORBIDDEN, why).into_response();
    }
    next.run(req).await
}

/// The HTTP routes.
fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/promote", post(post_promote))
        .route("/demote", post(post_demote))
        .route("/switchover", post(post_switchover))
        .route("/verify", post(post_verify))
        .fallback(|| async {
            refuse(
                StatusCode::NOT_FOUND,
                "no such endpoint: GET /status, GET /metrics, POST /promote, /demote, /switchover or /verify".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(admin.clone(), authorize))
        .with_state(admin)
}

async fn get_status(State(a): State<Arc<Admin>>, Query(p): Query<Params>) -> Result<Json<StatusDoc>, Refusal> {
    a.status(p.volume.as_deref()).await.map(Json)
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), the Prometheus text format to
/// anyone else (`curl`, `promtool check metrics`).
async fn get_metrics(State(a): State<Arc<Admin>>, headers: axum::http::HeaderMap) -> Response {
    let doc = match a.status(None).await {
        Ok(doc) => doc,
        Err(r) => return r.into_response(),
    };
    let text = a.metrics.render(doc);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
    } else {
        let text = crate::metrics::openmetrics_to_prometheus(&text);
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
    }
}

async fn post_promote(State(a): State<Arc<Admin>>, Query(p): Query<Params>) -> Result<Json<Answer>, Refusal> {
    let node = a.node(p.volume.as_deref())?;
    match node.promote(p.force).await {
        Ok(epoch) => {
            Ok(Json(Answer { ok: true, volume: Some(node.volume().into()), epoch: Some(epoch.0), ..Answer::default() }))
        }
        Err(e) => Err(e.into()),
    }
}

async fn post_demote(State(a): State<Arc<Admin>>, Query(p): Query<Params>) -> Result<Json<Answer>, Refusal> {
    let node = a.node(p.volume.as_deref())?;
    match node.demote().await {
        Ok(()) => Ok(Json(Answer {
            ok: true,
            volume: Some(node.volume().into()),
            role: Some("secondary".into()),
            ..Answer::default()
        })),
        Err(e) => Err(e.into()),
    }
}

async fn post_switchover(State(a): State<Arc<Admin>>, Query(p): Query<Params>) -> Result<Json<Answer>, Refusal> {
    let node = a.node(p.volume.as_deref())?;
    match node.switchover().await {
        Ok(grant) => Ok(Json(Answer {
            ok: true,
            volume: Some(node.volume().into()),
            epoch: Some(grant.epoch.0),
            role: Some("secondary".into()),
            primary: Some(grant.primary),
            ..Answer::default()
        })),
        Err(e) => Err(e.into()),
    }
}

async fn post_verify(State(a): State<Arc<Admin>>, Query(p): Query<Params>) -> Result<Json<Answer>, Refusal> {
    let node = a.node(p.volume.as_deref())?;
    match node.verify(p.repair).await {
        Ok(report) => Ok(Json(Answer {
            ok: true,
            volume: Some(node.volume().into()),
            verify: Some((&report).into()),
            ..Answer::default()
        })),
        Err(e) => Err(e.into()),
    }
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, tls: Option<Arc<Tls>>) -> std::io::Result<()> {
    let limited = Limited { listener, tls, slots: Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX)) };
    axum::serve(limited, router(admin).into_make_service_with_connect_info::<Caller>()).await
}

/// A TCP listener that holds at most [`ADMIN_CONNECTIONS_MAX`] connections open, and with TLS
/// credentials runs each connection's handshake (on the connection's own task: see [`AdminIo`]).
struct Limited {
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Slotted;
    type Addr = Caller;

    async fn accept(&mut self) -> (Slotted, Caller) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let identity = Arc::new(OnceLock::new());
                    let io = match &self.tls {
                        None => {
                            let _ = identity.set(None);
                            AdminIo::Plain(stream)
                        }
                        Some(tls) => {
                            let (tls, proven) = (tls.clone(), identity.clone());
                            AdminIo::Handshaking(Box::pin(async move {
                                // Every identity the CA or the PSK file proves gets this far;
                                // the access list, if any, decides per request (`authorize`).
                                let (s, id) = tls.accept(stream).await.map_err(|e| {
                                    tracing::warn!("{addr}: admin endpoint: TLS handshake refused: {e}");
                                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                                })?;
                                let _ = proven.set(id);
                                Ok(s)
                            }))
                        }
                    };
                    return (Slotted { io, _slot: slot }, Caller { addr, identity });
                }
                // Out of descriptors, or a connection reset before it was accepted: wait a
                // little rather than spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Caller> {
        Ok(Caller { addr: self.listener.local_addr()?, identity: Arc::new(OnceLock::new()) })
    }
}

type Handshake = Pin<Box<dyn std::future::Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send>>;

/// An admin connection: plain, or TLS whose handshake runs on the first read or write, so that
/// it happens on the connection's task and a client that stalls mid-handshake holds up nobody.
enum AdminIo {
    Plain(TcpStream),
    Handshaking(Handshake),
    Tls(Box<TlsStream<TcpStream>>),
    Failed,
}

impl AdminIo {
    /// Drives the handshake; `Ready(Ok)` once the stream can carry data.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match self {
                AdminIo::Handshaking(h) => match h.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(s)) => *self = AdminIo::Tls(Box::new(s)),
                    Poll::Ready(Err(e)) => {
                        *self = AdminIo::Failed;
                        return Poll::Ready(Err(e));
                    }
                },
                AdminIo::Failed => {
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "TLS refused")))
                }
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// A connection holding its slot until it closes.
struct Slotted {
    io: AdminIo,
    _slot: OwnedSemaphorePermit,
}

macro_rules! with_stream {
    ($self:ident, $cx:ident, $method:ident($($arg:expr),*)) => {{
        let io = &mut $self.get_mut().io;
        if let Poll::Ready(Err(e)) = io.poll_ready($cx) {
            return Poll::Ready(Err(e));
        }
        match io {
            AdminIo::Plain(s) => Pin::new(s).$method($($arg),*),
            AdminIo::Tls(s) => Pin::new(&mut **s).$method($($arg),*),
            _ => Poll::Pending,
        }
    }};
}

impl AsyncRead for Slotted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        with_stream!(self, cx, poll_read(cx, buf))
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        with_stream!(self, cx, poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_stream!(self, cx, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_stream!(self, cx, poll_shutdown(cx))
    }
}
