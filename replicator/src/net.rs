//! The replicator's network seam: every connection and listener goes through a [`Net`], TCP in
//! production ([`TcpNet`]) and an in-memory network with seeded faults in the simulation tests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use crate::link::FrameReader;

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

/// A bound listener.
pub trait Listener: Send + 'static {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, SocketAddr)>>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

pub type BoxListener = Box<dyn Listener>;

/// Opens connections and listeners.
pub trait Net: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>>;
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>>;
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
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, SocketAddr)>> {
        Box::pin(async move {
            let (s, from) = self.0.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s) as BoxStream, from))
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
