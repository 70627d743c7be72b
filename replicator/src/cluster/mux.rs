//! Node links: every volume pair two nodes share travels over one connection between them, not a
//! connection (and a TLS session, and a socket's buffers) per volume.
//!
//! A node that needs a stream to a peer's replication address (a primary reaching its secondary)
//! asks its [`MuxNet`]: the first request dials the peer, runs the TLS handshake once and opens a
//! multiplexed session (yamux: per-stream flow control, so a volume whose secondary applies slowly
//! holds up only its own stream); every later request to that address opens one more stream on the
//! same connection. The peer's [`super::router::Router`] recognises the session by
//! [`LINK_PREAMBLE`] and routes each stream it carries by its first frame, exactly as it routes a
//! connection of its own. The pair's code sees a byte stream either way.
//!
//! Each direction has its own link (a node dials for the volumes it is primary of), so two nodes
//! share at most two connections, whatever the number of volumes between them. A link that dies
//! (its peer crashed: the socket closes) fails all its streams at once; each volume then reconnects
//! as it would after losing a connection of its own, and the first to do so dials a new link.
//!
//! A link has a heartbeat of its own, for all its volumes: the dialing node opens a first stream
//! on it that carries a ping every [`LINK_BEAT`], which the peer's router answers with a pong
//! ([`answer_beats`]). Each side ends a link from which nothing has been read for
//! [`LINK_SILENT_MAX`] (a peer's host lost without closing its sockets, or a peer process
//! stopped): all its streams fail at once, as if the socket had closed. So a volume on a link
//! need not prove its peer node alive by itself; while it has nothing to send it pings only every
//! [`crate::QUIET_EVERY`] ([`crate::net::Net::links_beat`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::link::write_frame;
use crate::net::{BoxFuture, BoxListener, BoxStream, Net};
use crate::wire::Frame;

/// The first bytes a node sends on a link, before the multiplexed session: a router tells a link
/// from a single volume's connection (which starts with a frame's magic) and from garbage.
pub const LINK_PREAMBLE: [u8; 8] = *b"SBLINK01";

/// Streams one link carries at once. A store replicates at most 4,096 volumes (the engine's
/// checkpoint budget), each with one stream per direction and, across a reconnection, one more
/// briefly: 8,192 covers every volume two nodes can share. The multiplexer grants each stream a
/// 256 KiB receive window, so a link's buffered bytes are bounded by this number times 256 KiB
/// (plus what the windows may grow by, [`LINK_WINDOW_GROWTH_MAX`]); in practice a stream's reader
/// takes frames as they come (its own bound is the secondary's apply queue), and an idle stream
/// holds no buffer.
pub const LINK_STREAMS_MAX: usize = 8192;

/// A link from which nothing has been read for this long is closed, failing all its streams, and
/// is replaced by the next request for a stream: 1 s, the replication link's default timeout
/// (eight missed beats). Closing a live link wrongly would cost its volumes a reconnection, never
/// data.
pub const LINK_SILENT_MAX: Duration = Duration::from_secs(1);

/// How often the dialing node pings on a link's beat stream (and so how often each side hears
/// from the other on an idle link): 125 ms, the replication heartbeat, so that a link's silence
/// is noticed as soon as one volume's was before links had a heartbeat of their own.
pub const LINK_BEAT: Duration = Duration::from_millis(125);

/// Requests to open a stream waiting for a link's session task.
const OPENS_QUEUED: usize = 64;

/// Streams a peer opened that wait to be routed on the accepting side: 256, as many as the
/// multiplexer lets a peer open before it acknowledges any (yamux's ack backlog), so a restarted
/// node's volumes reconnecting at once queue rather than fail; one more is dropped with a warning
/// and its volume retries.
pub const STREAMS_QUEUED: usize = 256;

/// What a link's streams may grow their receive windows by, beyond the 256 KiB each starts with,
/// all together: 64 MiB, the resync data a node keeps in flight to all its copies at once
/// (`RESYNC_NODE_BYTES_MAX`), so that the streams a node's copies run on can each grow a window
/// of a few MiB. The multiplexer grows a stream's window (doubling it, never shrinking it) when
/// the stream's reader takes a window's worth quickly, so only a stream that moves bulk data
/// grows one, and a reader that stops reading stops its growth.
///
/// Without this room no window can grow, and a copy to a new replica ran lock-step: the primary
/// sent 256 KiB, the window was spent, and it waited for the peer's process to be scheduled, read
/// and grant more; the two nodes then took turns on the CPU instead of working at once. With
/// every store in RAM but the new replica's, a 2 GiB copy went from 475–676 MiB/s to 729–921
/// MiB/s (docs/cluster.md, "Re-protection").
pub const LINK_WINDOW_GROWTH_MAX: usize = 64 << 20;

/// The multiplexer's settings for a node link.
pub fn config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // The window cap first: yamux asserts window >= streams × 256 KiB after each setter.
    let base = LINK_STREAMS_MAX * yamux::DEFAULT_CREDIT as usize;
    cfg.set_max_connection_receive_window(Some(base + LINK_WINDOW_GROWTH_MAX));
    cfg.set_max_num_streams(LINK_STREAMS_MAX);
    // A 4 KiB write frame and its header go out as one data frame; a 1 MiB one as a few.
    cfg.set_split_send_size(256 << 10);
    cfg
}

type OpenReply = oneshot::Sender<io::Result<yamux::Stream>>;

/// One live link to a peer address (a handle to its session task; the session ends once every
/// handle is gone and, on the dialing side, so do its streams).
#[derive(Clone)]
pub(super) struct Link {
    opens: mpsc::Sender<OpenReply>,
    /// The peer answered this link's heartbeat (see [`crate::net::Net::peer_beats`]).
    beating: Arc<AtomicBool>,
}

impl Link {
    /// Its session ended: the connection closed, or the session closed it after
    /// [`LINK_SILENT_MAX`] of silence.
    fn dead(&self) -> bool {
        self.opens.is_closed()
    }

    async fn open(&self) -> io::Result<BoxStream> {
        let (tx, rx) = oneshot::channel();
        self.opens.send(tx).await.map_err(|_| closed())?;
        let stream = rx.await.map_err(|_| closed())??;
        Ok(Box::new(stream.compat()))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the link to the peer node closed")
}

/// The network of a node in a cluster: connections go out as streams on one link per peer
/// address, over `inner` (TCP, or TLS over TCP); listening is the router's business.
pub struct MuxNet {
    inner: Arc<dyn Net>,
    links: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<Link>>>>>,
    /// Where this node's grid of quiet timers starts ([`Net::quiet_due`]).
    grid: tokio::time::Instant,
}

impl MuxNet {
    pub fn over(inner: Arc<dyn Net>) -> Arc<MuxNet> {
        Arc::new(MuxNet { inner, links: Mutex::new(HashMap::new()), grid: tokio::time::Instant::now() })
    }

    /// Live links (for status and tests).
    pub fn links(&self) -> usize {
        let slots: Vec<_> = self.links.lock().expect("links").values().cloned().collect();
        slots.iter().filter(|s| s.try_lock().is_ok_and(|l| l.as_ref().is_some_and(|l| !l.dead()))).count()
    }

    async fn dial(&self, addr: SocketAddr) -> io::Result<Link> {
        let mut stream = self.inner.connect(addr).await?;
        stream.write_all(&LINK_PREAMBLE).await?;
        tracing::debug!(%addr, "link to a peer node opened");
        let link = run(stream, yamux::Mode::Client, None);
        let beats = link.open().await?;
        tokio::spawn(beat(beats, link.beating.clone()));
        Ok(link)
    }
}

/// The dialing side of a link's heartbeat: a ping every [`LINK_BEAT`] on the link's first stream;
/// the pongs are read (reading them is what keeps the link heard, in its session), and the first
/// marks the peer as one that beats. Ends with the link, or when the peer refuses the beat (a node
/// of an earlier version: its router closes the stream).
async fn beat(stream: BoxStream, beating: Arc<AtomicBool>) {
    let (mut rd, mut wr) = crate::net::split(stream);
    let mut tick = tokio::time::interval(LINK_BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                nonce += 1;
                let ping = Frame::Ping { epoch: syncblock_engine::Epoch(0), nonce, floor: 0 };
                if write_frame(&mut wr, &ping).await.is_err() {
                    return;
                }
            }
            r = rd.fill(LINK_SILENT_MAX * 4) => {
                if r.is_err() {
                    return;
                }
                // Pongs only; anything else ends the beat (and the peer's session notices).
                while let Ok(Some(f)) = rd.try_frame() {
                    if !matches!(f, Frame::Pong { .. }) {
                        tracing::warn!("node link: {f:?} on the beat stream; beat stopped");
                        return;
                    }
                    beating.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The accepting side of a link's heartbeat: its router hands it the stream whose first frame was
/// a ping (nonce `first`), that frame consumed. Answers each ping with a pong until the stream ends
/// or carries something else.
pub(super) async fn answer_beats(stream: BoxStream, first: u64) {
    let (mut rd, mut wr) = crate::net::split(stream);
    let mut nonce = first;
    loop {
        if write_frame(&mut wr, &Frame::Pong { nonce }).await.is_err() {
            return;
        }
        match rd.read_frame(LINK_SILENT_MAX * 4).await {
            Ok(Frame::Ping { nonce: n, .. }) => nonce = n,
            Ok(f) => {
                tracing::warn!("node link: {f:?} on the beat stream; beat stopped");
                return;
            }
            Err(_) => return,
        }
    }
}

impl Net for MuxNet {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let slot = self.links.lock().expect("links").entry(addr).or_default().clone();
            // One dial per address at a time: the volumes that lose a link together all wait for
            // the first one's new link rather than each dialing its own.
            let link = {
                let mut held = slot.lock().await;
                match held.as_ref() {
                    Some(link) if !link.dead() => link.clone(),
                    _ => {
                        let link = self.dial(addr).await?;
                        *held = Some(link.clone());
                        link
                    }
                }
            };
            link.open().await
        })
    }
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>> {
        self.inner.bind(addr)
    }
    fn links_beat(&self) -> bool {
        true
    }
    fn peer_beats(&self, addr: SocketAddr) -> bool {
        let slot = self.links.lock().expect("links").get(&addr).cloned();
        slot.is_some_and(|s| {
            s.try_lock().is_ok_and(|l| l.as_ref().is_some_and(|l| !l.dead() && l.beating.load(Ordering::Relaxed)))
        })
    }
    fn quiet_due(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        // The first point of the grid after `now`.
        let every = crate::QUIET_EVERY.as_nanos();
        let since = now.saturating_duration_since(self.grid).as_nanos();
        self.grid + std::time::Duration::from_nanos(((since / every + 1) * every) as u64)
    }
}

/// Runs a link's session on a task of its own: opens the streams asked for and hands each stream
/// the peer opens to `inbound` (a client-side link refuses them: only the dialing side opens).
/// Ends when the connection does, or once every [`Link`] handle to it is gone.
pub(super) fn run(stream: BoxStream, mode: yamux::Mode, inbound: Option<mpsc::Sender<BoxStream>>) -> Link {
    let born = Instant::now();
    let last_read = Arc::new(AtomicU64::new(0));
    let watched = Watched { inner: stream, last_read: last_read.clone(), born };
    let mut conn = yamux::Connection::new(watched.compat(), config(), mode);
    let (opens, mut requests) = mpsc::channel::<OpenReply>(OPENS_QUEUED);
    tokio::spawn(async move {
        let mut waiting: Option<OpenReply> = None;
        let mut handles_gone = false;
        // When to look whether the peer went silent (see `LINK_SILENT_MAX`).
        let mut check = Box::pin(tokio::time::sleep(LINK_SILENT_MAX));
        let end = std::future::poll_fn(|cx| {
            while check.as_mut().poll(cx).is_ready() {
                let silent = born.elapsed().saturating_sub(Duration::from_millis(last_read.load(Ordering::Relaxed)));
                if silent > LINK_SILENT_MAX {
                    let why = format!("nothing heard from the peer node for {} ms", silent.as_millis());
                    return Poll::Ready(Some(yamux::ConnectionError::Io(io::Error::new(io::ErrorKind::TimedOut, why))));
                }
                check
                    .as_mut()
                    .reset(tokio::time::Instant::now() + (LINK_SILENT_MAX - silent) + Duration::from_millis(1));
            }
            // Streams asked for, one at a time (the multiplexer may make an opener wait for the
            // peer to acknowledge earlier streams).
            loop {
                if waiting.is_none() && !handles_gone {
                    match requests.poll_recv(cx) {
                        Poll::Ready(Some(reply)) => waiting = Some(reply),
                        Poll::Ready(None) => handles_gone = true,
                        Poll::Pending => {}
                    }
                }
                let Some(reply) = waiting.take() else { break };
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        let _ = reply.send(Ok(s));
                    }
                    Poll::Ready(Err(e)) => {
                        let _ = reply.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string())));
                        return Poll::Ready(Some(e));
                    }
                    Poll::Pending => {
                        waiting = Some(reply);
                        break;
                    }
                }
            }
            if handles_gone && inbound.is_none() {
                // Nobody can open a stream on this link again; its streams end with it.
                return Poll::Ready(None);
            }
            // Reading and writing the connection happen here, whatever else is asked.
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => match &inbound {
                        Some(tx) => {
                            if tx.try_send(Box::new(s.compat())).is_err() {
                                tracing::warn!("node link: too many streams waiting to be routed; one dropped");
                            }
                        }
                        None => drop(s),
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e)),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        match end {
            Some(e) => tracing::info!("node link closed: {e}"),
            None => tracing::debug!("node link closed"),
        }
    });
    Link { opens, beating: Arc::new(AtomicBool::new(false)) }
}

/// A stream that notes when it last read something.
struct Watched {
    inner: BoxStream,
    last_read: Arc<AtomicU64>,
    born: Instant,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_read.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

crate::net::forward_writes!(Watched);
