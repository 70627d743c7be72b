//! The link's two tasks. They only move bytes: the writer encodes what the owner loop queues (and
//! waits for the engine reads a resync queued, in order), the reader decodes what the peer sends
//! and hands every frame to the loop. Neither holds replication state; each reports its end to the
//! loop, tagged with the link's generation so that a late report of an old link is ignored.

use bytes::{Bytes, BytesMut};
use syncblock_engine::Pending;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::link::write_encoded;
use crate::wire::Frame;

use super::compare::block_frames;
use crate::{ReplError, Result};

use super::owner::Event;

/// What the owner loop queues on the link.
pub(super) enum Out {
    Frame(Frame),
    /// Resync data (or a verify repair): the engine read was queued in the loop's order; its
    /// bytes are shipped as a `Write` with `tag` once ready.
    Read {
        tag: u64,
        offset: u64,
        read: Pending<Bytes>,
    },
    /// Resync data read in log order: the engine read of the blocks `lbas` names was queued in the
    /// loop's order; they are shipped, once read, as a `WriteBlocks` frame and trims (see
    /// [`crate::primary::compare::block_frames`]) with `tag`.
    Blocks {
        tag: u64,
        lbas: Vec<u64>,
        read: Pending<Vec<Option<Bytes>>>,
    },
}

/// Coalescing bound of the link writer: frames queued together are written together up to this
/// many bytes (a syscall per 256 KiB is cheap; beyond that, latency of the first frame matters).
const COALESCE_BYTES: usize = 256 << 10;

/// Writes what the loop queues until the queue closes (the loop dropped the link) or a write
/// fails; tells the loop why it ended. While it waits for a resync read, it sends `keepalive`
/// every `every` (see [`keepalive`]).
pub(super) async fn writer(
    generation: u64,
    mut wr: crate::net::WritePart,
    mut rx: mpsc::Receiver<Out>,
    events: mpsc::Sender<Event>,
    keepalive: Frame,
    every: std::time::Duration,
) {
    let keepalive = Keepalive { frame: keepalive.encode(), every };
    let r = write_all(&mut wr, &mut rx, &keepalive).await;
    let _ = events.send(Event::LinkDown(generation, r.err().unwrap_or_else(closed))).await;
}

fn closed() -> ReplError {
    ReplError::Stopped("link closed".into())
}

/// A frame that confirms nothing, so that it may go out at any point of the stream: a `Ping`
/// with nonce 0 (its `Pong` raises no nonce the primary waits for, and its floor of 0 raises no
/// floor). Sent while the writer waits for a resync read, which on a busy volume fragmented by
/// random writes is one device read per 4 KiB block (up to 0.6 s per MiB measured at
/// re-protection, on a disk shared by four nodes): the heartbeats queued behind the read cannot
/// pass it, and the peer must not take the link for dead meanwhile.
pub(super) fn keepalive(epoch: syncblock_engine::Epoch) -> Frame {
    Frame::Ping { epoch, nonce: 0, floor: 0 }
}

struct Keepalive {
    frame: bytes::Bytes,
    every: std::time::Duration,
}

async fn write_all(wr: &mut crate::net::WritePart, rx: &mut mpsc::Receiver<Out>, keepalive: &Keepalive) -> Result<()> {
    let mut buf = BytesMut::new();
    loop {
        let Some(out) = rx.recv().await else { return Ok(()) };
        let mut next = Some(out);
        // Everything queued meanwhile goes out in the same write, up to a read still pending.
        while let Some(out) = next.take() {
            let frames = match out {
                Out::Frame(f) => vec![f],
                Out::Read { tag, offset, read } => {
                    let data = wait_read(wr, &mut buf, read, keepalive).await?;
                    vec![Frame::Write { tag, offset, fua: false, data }]
                }
                Out::Blocks { tag, lbas, read } => {
                    let blocks = wait_read(wr, &mut buf, read, keepalive).await?;
                    block_frames(tag, &lbas, blocks)
                }
            };
            for frame in &frames {
                add_frame(wr, &mut buf, frame).await?;
            }
            if buf.len() < COALESCE_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            write_encoded(wr, &buf).await?;
            buf.clear();
        }
    }
}

/// Waits for a resync read: what is buffered goes first, while it completes, and a keepalive goes
/// out every `keepalive.every` until it has.
async fn wait_read<T>(
    wr: &mut crate::net::WritePart,
    buf: &mut BytesMut,
    mut read: Pending<T>,
    keepalive: &Keepalive,
) -> Result<T> {
    if !buf.is_empty() {
        write_encoded(wr, buf).await?;
        buf.clear();
    }
    loop {
        tokio::select! {
            r = &mut read => return Ok(r?),
            _ = tokio::time::sleep(keepalive.every) => write_encoded(wr, &keepalive.frame).await?
        }
    }
}

/// Appends `frame` to `buf`; a large write goes out at once instead, after what is buffered, as its
/// head and then its payload as it is, uncopied (see [`Frame::encode_split`]).
async fn add_frame(wr: &mut crate::net::WritePart, buf: &mut BytesMut, frame: &Frame) -> Result<()> {
    match frame.encode_split() {
        Some((head, payload)) => {
            buf.extend_from_slice(&head);
            wr.write_all(buf).await?;
            buf.clear();
            wr.write_all(&payload).await?;
        }
        None => frame.encode_into(buf),
    }
    Ok(())
}

/// Reads frames until the link fails or the peer goes silent for `timeout`; hands each to the
/// loop (waiting when the loop is behind: TCP then pushes back on the peer).
pub(super) async fn reader(
    generation: u64,
    mut rd: crate::net::ReadPart,
    timeout: std::time::Duration,
    events: mpsc::Sender<Event>,
) {
    let err = loop {
        match rd.read_frame(timeout).await {
            Ok(f) => {
                if events.send(Event::Frame(generation, f)).await.is_err() {
                    return;
                }
            }
            Err(e) => break e,
        }
    };
    let _ = events.send(Event::LinkDown(generation, err)).await;
}

/// A task aborted when its handle is dropped (the loop dropping a link closes its socket).
pub(super) struct AbortOnDrop<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
