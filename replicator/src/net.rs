//! The replicator's network seam: every connection and listener goes through a [`Net`], TCP in
//! production ([`TcpNet`]) and an in-memory network with seeded faults in the simulation tests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use crate::link::FrameReader;
use crate::tls::{Tls, TlsError};

/// Implements `AsyncWrite` for a wrapper whose writes all go straight to its `inner` stream (a
/// wrapper that changes only how its stream is read).
macro_rules! forward_writes {
    ($wrapper:ty) => {
        impl tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use forward_writes;

/// A byte stream to a peer.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

pub type BoxStream = Box<dyn Stream>;
/// The reading half, read through a [`FrameReader`]: frames are small (an ack is 32 bytes, a write
/// 4 KiB and a few dozen), and reading each header and body with its own system call was a large
/// part of a replicated write's cost.
pub type ReadPart = FrameReader<ReadHalf<BoxStream>>;
pub type WritePart = WriteHalf<BoxStream>;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connection accepted but not yet established: its security handshake (TLS, when the listener
/// has it) runs in [`Incoming::establish`], on the connection's own task, so that a peer that
/// stalls mid-handshake holds up only itself, never the accept loop.
pub struct Incoming {
    pub from: SocketAddr,
    stream: BoxStream,
    tls: Option<Arc<Tls>>,
    /// Already established, by whoever handed it on (a node's replication router).
    proven: Option<Who>,
}

/// An established connection, and who is at its other end.
pub struct Peer {
    pub stream: BoxStream,
    pub who: Who,
}

/// Where a peer connects from and the identity it proved (`None` on a link without
/// authentication: plain TCP on loopback, or TLS without a CA or PSK keys).
#[derive(Debug, Clone)]
pub struct Who {
    pub from: SocketAddr,
    pub identity: Option<String>,
}

impl Incoming {
    pub fn plain(stream: BoxStream, from: SocketAddr) -> Incoming {
        Incoming { from, stream, tls: None, proven: None }
    }

    /// A connection established elsewhere (its handshake done, its peer's identity known).
    pub fn established(peer: Peer) -> Incoming {
        Incoming { from: peer.who.from, stream: peer.stream, tls: None, proven: Some(peer.who) }
    }

    /// Completes the handshake (bounded by [`crate::tls::HANDSHAKE_TIMEOUT`]).
    pub async fn establish(self) -> Result<Peer, TlsError> {
        let Incoming { from, stream, tls, proven } = self;
        if let Some(who) = proven {
            return Ok(Peer { stream, who });
        }
        match tls {
            None => Ok(Peer { stream, who: Who { from, identity: None } }),
            Some(tls) => {
                let (s, identity) = tls.accept(stream).await?;
                if tls.authenticates() && identity.is_none() {
                    // Signed by the CA but naming no one (no CN): it cannot be held to a name.
                    return Err(TlsError::Handshake("the peer's certificate has no common name (CN)".into()));
                }
                Ok(Peer { stream: Box::new(s), who: Who { from, identity } })
            }
        }
    }
}

impl Who {
    /// Refuses a peer that names itself `claimed` (in its hello) but proved another identity, or is
    /// not the node this one replicates with (`peer_node`, when configured): the one check of a
    /// secondary's port and of a primary's port for successors.
    pub fn check_peer(&self, claimed: &str, peer_node: Option<&str>) -> Result<(), String> {
        self.check_claim(claimed)?;
        match peer_node {
            Some(peer) if peer != claimed => Err(format!("this node replicates with {peer:?}, not with {claimed:?}")),
            _ => Ok(()),
        }
    }

    /// Refuses a peer that names itself (in a hello or a witness request) other than the identity
    /// it proved. Without authentication there is nothing to check against.
    pub fn check_claim(&self, claimed: &str) -> Result<(), String> {
        match &self.identity {
            Some(id) if id != claimed => Err(format!(
                "{} proved it is {id:?} but calls itself {claimed:?}; refused (a node's certificate CN \
                 or PSK identity must be its node name)",
                self.from
            )),
            _ => Ok(()),
        }
    }
}

/// A bound listener.
pub trait Listener: Send + 'static {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

pub type BoxListener = Box<dyn Listener>;

/// Opens connections and listeners.
pub trait Net: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>>;
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>>;
    /// Whether the connections of this network ride node links that carry a heartbeat of their
    /// own and close every stream once the peer node goes silent (`cluster::mux`). A volume on
    /// such a link need not prove the peer alive by itself: it pings and reports only at
    /// [`crate::QUIET_EVERY`] while it has nothing to send ([`crate::ReplConfig::silence_limit`]).
    fn links_beat(&self) -> bool {
        false
    }
    /// Whether the node at `addr` answers its link's heartbeat, so that it takes a quiet volume's
    /// stream for alive (a node of a version before link heartbeats waits for a volume's pings
    /// every 125 ms, and would take a quiet one's stream for dead after 1 s). A volume goes quiet
    /// only then.
    fn peer_beats(&self, _addr: SocketAddr) -> bool {
        false
    }
    /// When a quiet volume's next ping, or quiet report, falls due, its last one going at `now`:
    /// at most [`crate::QUIET_EVERY`] later. A node's links put all its quiet volumes on one grid
    /// of that period, so that their timers fire together: one wake-up of the node a second
    /// instead of one per volume, and their pings and reports go out in one burst on each link
    /// and in one batch to etcd.
    fn quiet_due(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        now + crate::QUIET_EVERY
    }
}

/// Splits a stream into halves that can be used by two tasks.
pub fn split(s: BoxStream) -> (ReadPart, WritePart) {
    let (rd, wr) = tokio::io::split(s);
    (FrameReader::new(rd), wr)
}

/// Real TCP, with Nagle off (frames are small and latency is the product).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpNet;

struct TcpListenerBox(tokio::net::TcpListener);

impl Listener for TcpListenerBox {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>> {
        Box::pin(async move {
            let (s, from) = self.0.accept().await?;
            s.set_nodelay(true)?;
            Ok(Incoming::plain(Box::new(s), from))
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Net for TcpNet {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxStream)
        })
    }
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>> {
        Box::pin(async move { Ok(Box::new(TcpListenerBox(tokio::net::TcpListener::bind(addr).await?)) as BoxListener) })
    }
}

/// Wraps an already bound tokio listener (for callers that bind themselves).
pub fn tcp_listener(l: tokio::net::TcpListener) -> BoxListener {
    Box::new(TcpListenerBox(l))
}

/// The default network.
pub fn tcp() -> Arc<dyn Net> {
    Arc::new(TcpNet)
}

/// TLS over another network: every connection it opens runs a client handshake with this
/// process's credentials, and every connection its listeners accept a server handshake (in
/// [`Incoming::establish`]). Wraps the simulation's network as readily as TCP.
pub struct TlsNet {
    inner: Arc<dyn Net>,
    tls: Arc<Tls>,
    /// The name the server at an address must prove (its certificate's CN), where known.
    expect: std::collections::HashMap<SocketAddr, String>,
}

impl TlsNet {
    pub fn over(inner: Arc<dyn Net>, tls: Arc<Tls>) -> Arc<dyn Net> {
        TlsNet::expecting(inner, tls, [])
    }

    /// A `TlsNet` whose connections to each address check that the server is the named node (with
    /// certificates; a PSK server proves only that it knows the connecting node's key).
    pub fn expecting(
        inner: Arc<dyn Net>,
        tls: Arc<Tls>,
        expect: impl IntoIterator<Item = (SocketAddr, String)>,
    ) -> Arc<dyn Net> {
        Arc::new(TlsNet { inner, tls, expect: expect.into_iter().collect() })
    }
}

struct TlsListener {
    inner: BoxListener,
    tls: Arc<Tls>,
}

impl Listener for TlsListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>> {
        Box::pin(async move {
            let mut incoming = self.inner.accept().await?;
            incoming.tls = Some(self.tls.clone());
            Ok(incoming)
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Wraps a listener so that its connections run a TLS server handshake.
pub fn tls_listener(inner: BoxListener, tls: Arc<Tls>) -> BoxListener {
    Box::new(TlsListener { inner, tls })
}

impl Net for TlsNet {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let s = self.inner.connect(addr).await?;
            let s = self
                .tls
                .connect(s, self.expect.get(&addr).map(String::as_str))
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS with {addr}: {e}")))?;
            Ok(Box::new(s) as BoxStream)
        })
    }
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>> {
        Box::pin(async move { Ok(tls_listener(self.inner.bind(addr).await?, self.tls.clone())) })
    }
}
