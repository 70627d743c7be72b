//! One replication listener per node, shared by all its volumes: a volume's cost on a node is not
//! a port and an accept loop of its own. The router accepts, runs the TLS handshake, reads the
//! first frame (a primary's `Hello`, which names the volume) and hands the connection, that frame
//! replayed in front of it, to the listener of that volume: the secondary's accept loop (or a
//! primary's successor port) then reads and checks the hello as it would on a port of its own.
//! [`RoutedNet`] is the per-volume `Net` whose `bind` returns that listener.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::mpsc;

use crate::link::{write_frame, FrameReader};
use crate::net::{BoxFuture, BoxListener, BoxStream, Incoming, Listener, Net, Peer};
use crate::wire::{Frame, Refusal, MAGIC};

use super::mux;

/// Connections being routed at once (handshake and first frame): one node's port serves all its
/// volumes, so this is eight times a single secondary's `HANDSHAKES_MAX`; a flood of silent
/// connections beyond it is dropped, and each is bounded by [`FIRST_FRAME_TIMEOUT`].
pub const ROUTING_MAX: usize = 64;

/// How long a connection has to complete its handshake and send its first frame: 5 s, as a
/// secondary's hello timeout on a loaded machine.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections handed to one volume and not yet accepted by it: a primary connects once per
/// session, so a few suffice; more are refused rather than queued without bound.
const QUEUE_PER_VOLUME: usize = 8;

/// Node links one router serves at once: one from each node that replicates to this one, so a
/// cluster's size (1,000 nodes in the simulation) with room to spare; beyond it a link is refused
/// and its volumes retry.
pub const LINKS_MAX: usize = 1024;

/// A node's replication listener and the volumes it routes to.
pub struct Router {
    addr: SocketAddr,
    node: String,
    routes: Mutex<HashMap<String, mpsc::Sender<Incoming>>>,
}

impl Router {
    /// Starts routing the connections `listener` accepts; runs until the process ends or the
    /// returned router is dropped with every route.
    pub fn start(mut listener: BoxListener, node: String) -> io::Result<Arc<Router>> {
        let router = Arc::new(Router { addr: listener.local_addr()?, node, routes: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(ROUTING_MAX));
            let links = Arc::new(tokio::sync::Semaphore::new(LINKS_MAX));
            loop {
                let incoming = match listener.accept().await {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!("replication accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(router) = weak.upgrade() else { return };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(from = %incoming.from, "replication port: {ROUTING_MAX} connections being routed; dropping one more");
                    continue;
                };
                let (permits, links) = (permits.clone(), links.clone());
                tokio::spawn(async move {
                    let from = incoming.from;
                    // One bound for the handshake, the first bytes and the hello together.
                    let deadline = tokio::time::Instant::now() + FIRST_FRAME_TIMEOUT;
                    match tokio::time::timeout_at(deadline, sniff(incoming)).await {
                        Ok(Ok((peer, Kind::Single))) => {
                            router
                                .route(peer, deadline.saturating_duration_since(tokio::time::Instant::now()), false)
                                .await
                        }
                        Ok(Ok((peer, Kind::Link))) => {
                            drop(permit);
                            let Ok(_link) = links.try_acquire_owned() else {
                                tracing::warn!(%from, "replication port: {LINKS_MAX} node links open; refusing one more");
                                return;
                            };
                            router.serve_link(peer, permits).await;
                        }
                        Ok(Err(why)) => tracing::warn!(%from, "replication port: {why}; connection dropped"),
                        Err(_) => tracing::warn!(
                            %from,
                            "replication port: no hello within {FIRST_FRAME_TIMEOUT:?}; connection dropped"
                        ),
                    }
                });
            }
        });
        Ok(router)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Routes each stream a node link carries, as a connection of its own (with the identity the
    /// link proved); returns when the link closes.
    async fn serve_link(self: &Arc<Router>, peer: Peer, permits: Arc<tokio::sync::Semaphore>) {
        let Peer { stream, who } = peer;
        tracing::debug!(from = %who.from, "node link accepted");
        let (tx, mut streams) = mpsc::channel(mux::STREAMS_QUEUED);
        let _session = mux::run(stream, yamux::Mode::Server, Some(tx));
        while let Some(stream) = streams.recv().await {
            // Streams from an established link wait their turn (a restarted node's volumes all
            // reconnect at once); a connection of its own would have been dropped.
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (router, who) = (self.clone(), who.clone());
            tokio::spawn(async move {
                router.route(Peer { stream, who }, FIRST_FRAME_TIMEOUT, true).await;
                drop(permit);
            });
        }
        tracing::debug!(from = %who.from, "node link closed");
    }

    /// Reads a connection's first frame (a hello naming the volume, due `within`) and hands the
    /// connection to that volume's listener; or, for a stream of a node link (`on_link`) that
    /// starts with a ping, answers the link's heartbeat on a task of its own.
    async fn route(&self, peer: Peer, within: Duration, on_link: bool) {
        let from = peer.who.from;
        let first = async {
            let Peer { mut stream, who } = peer;
            let mut rd = FrameReader::new(&mut stream);
            let hello = rd.read_frame(within).await.map_err(|e| format!("not a syncblock peer ({e})"))?;
            let (_, rest) = rd.into_parts();
            Ok::<_, String>((stream, who, hello, rest))
        };
        let (mut stream, who, hello, rest) = match first.await {
            Ok(x) => x,
            Err(why) => {
                tracing::warn!(%from, "replication port: {why}; connection dropped");
                return;
            }
        };
        if let (Frame::Ping { nonce, .. }, true) = (&hello, on_link) {
            let replayed = Replayed { head: rest.freeze(), inner: stream };
            tokio::spawn(mux::answer_beats(Box::new(replayed), *nonce));
            return;
        }
        let Frame::Hello { volume, .. } = &hello else {
            tracing::warn!(%from, "replication port: first frame {hello:?} is not a hello; connection dropped");
            return;
        };
        let route = self.routes.lock().expect("routes").get(volume).cloned();
        let refused = match route {
            None => Some(format!("node {} holds no replica of {volume}", self.node)),
            Some(tx) => {
                let mut head = Vec::new();
                let _ = write_frame(&mut head, &hello).await;
                head.extend_from_slice(&rest);
                let replayed = Replayed { head: Bytes::from(head), inner: stream };
                match tx.try_send(Incoming::established(Peer { stream: Box::new(replayed), who })) {
                    Ok(()) => return,
                    Err(_) => {
                        // Closed: the volume is between roles (or being deleted); the primary
                        // retries. Full: a burst of connections no accept loop is taking.
                        tracing::warn!(%from, %volume, "replication port: the volume is not accepting connections now; dropped");
                        return;
                    }
                }
            }
        };
        if let Some(reason) = refused {
            tracing::warn!(%from, "replication port: {reason}; refused");
            let _ = write_frame(&mut stream, &Frame::Refuse { why: Refusal::NotRegistered, reason }).await;
        }
    }

    /// The listener for `volume`'s connections, replacing any earlier one (a role change binds
    /// again before the old role's listener is dropped).
    fn listen(self: &Arc<Router>, volume: &str) -> BoxListener {
        let (tx, rx) = mpsc::channel(QUEUE_PER_VOLUME);
        self.routes.lock().expect("routes").insert(volume.to_string(), tx);
        Box::new(Routed { rx, addr: self.addr })
    }

    /// Stops routing to `volume` (deleted, or no longer on this node).
    pub fn forget(&self, volume: &str) {
        self.routes.lock().expect("routes").remove(volume);
    }
}

/// What a replication connection carries.
enum Kind {
    /// One volume's frames (a node that does not multiplex, or a test's client).
    Single,
    /// A node link: many volumes' streams.
    Link,
}

/// Completes a connection's handshake and reads its first bytes: a frame's magic (one volume's
/// connection, replayed in front of the stream) or a link's preamble (consumed).
async fn sniff(incoming: Incoming) -> Result<(Peer, Kind), String> {
    let Peer { mut stream, who } = incoming.establish().await.map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut head = [0u8; 8];
    stream.read_exact(&mut head[..4]).await.map_err(|e| format!("not a syncblock peer ({e})"))?;
    if u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) == MAGIC {
        let replayed = Replayed { head: Bytes::copy_from_slice(&head[..4]), inner: stream };
        return Ok((Peer { stream: Box::new(replayed), who }, Kind::Single));
    }
    stream.read_exact(&mut head[4..]).await.map_err(|e| format!("not a syncblock peer ({e})"))?;
    if head != mux::LINK_PREAMBLE {
        return Err(format!("not a syncblock peer (first bytes {head:02x?})"));
    }
    Ok((Peer { stream, who }, Kind::Link))
}

struct Routed {
    rx: mpsc::Receiver<Incoming>,
    addr: SocketAddr,
}

impl Listener for Routed {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>> {
        Box::pin(async move {
            match self.rx.recv().await {
                Some(i) => Ok(i),
                // Replaced by a newer listener of the same volume: this one never accepts again.
                None => std::future::pending().await,
            }
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// One volume's network on a node: connections go out through `inner`; listening means taking
/// this volume's connections from the node's router (the address asked for is the router's).
pub struct RoutedNet {
    pub inner: Arc<dyn Net>,
    pub router: Arc<Router>,
    pub volume: String,
}

impl Net for RoutedNet {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        self.inner.connect(addr)
    }
    fn bind(&self, _addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>> {
        Box::pin(async move { Ok(self.router.listen(&self.volume)) })
    }
    fn links_beat(&self) -> bool {
        self.inner.links_beat()
    }
    fn peer_beats(&self, addr: SocketAddr) -> bool {
        self.inner.peer_beats(addr)
    }
    fn quiet_due(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        self.inner.quiet_due(now)
    }
}

/// A stream whose first bytes (the frame the router read, and whatever came after it) are served
/// from memory before the socket is read again.
struct Replayed {
    head: Bytes,
    inner: BoxStream,
}

impl AsyncRead for Replayed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.head.has_remaining() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::net::forward_writes!(Replayed);
