//! Reading and writing frames on a connection: one reader decodes every frame read, with a
//! deadline on every wait.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Frame, Header, WireError, HEADER_BYTES, MAGIC};
use crate::ReplError;

/// Frames decoded from a connection's bytes, read ahead in chunks: every frame read from a
/// connection goes through one, which owns the connection's reading half so that no byte read
/// ahead can be lost between one frame and the next. [`FrameReader::read_frame`] waits for the
/// next frame; a task that waits for frames and for other things at once (in a `select!`) calls
/// [`FrameReader::try_frame`] and [`FrameReader::fill`] instead: abandoning a `fill` loses
/// nothing, since every byte read stays in the buffer until its frame is whole.
///
/// Memory: bytes are read in chunks of at most [`READ_CHUNK_BYTES`]; a decoded write's payload
/// shares its chunk, which lives until every payload cut from it is dropped. The caller bounds how
/// many decoded frames it keeps (the secondary: `APPLY_QUEUE`), and so the chunks held; a frame
/// larger than a chunk gets a buffer of its own size, at most the frame size limit.
///
/// The chunk follows the traffic: it doubles while reads fill it and halves while they take a
/// quarter of it or less, down to [`READ_CHUNK_MIN`]; once every byte read has been taken, a
/// buffer much larger than the chunk is let go. An idle link (a ping and a pong every 125 ms)
/// so holds a few KiB, not 256 KiB whose pages its heartbeats would touch one by one over minutes:
/// a node with thousands of idle volumes pays for that per volume.
#[derive(Debug)]
pub struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    chunk: usize,
}

/// Bytes asked for per read at most: a few dozen 4 KiB write frames.
pub const READ_CHUNK_BYTES: usize = 256 << 10;
/// Bytes asked for per read at least: a page, a hundred heartbeats.
pub const READ_CHUNK_MIN: usize = 4 << 10;
const _: () = assert!(READ_CHUNK_MIN / 4 >= HEADER_BYTES);

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> FrameReader<R> {
        FrameReader { rd, buf: BytesMut::new(), chunk: READ_CHUNK_MIN }
    }

    /// The reader and the bytes read past the frames taken so far.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.rd, self.buf)
    }

    /// The next frame, if all of its bytes have been read. Never waits.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ReplError> {
        // The magic first: another protocol's client (an admin command sent to the wrong port,
        // an HTTP probe) is turned away as soon as it has sent four bytes, not after a timeout.
        if let Some(magic) = self.buf.get(..4) {
            let magic = u32::from_le_bytes(magic.try_into().expect("4 bytes"));
            if magic != MAGIC {
                return Err(WireError::BadMagic(magic).into());
            }
        }
        if self.buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header = Header::decode(self.buf[..HEADER_BYTES].try_into().expect("16 bytes"))?;
        let whole = HEADER_BYTES + header.body_len;
        if self.buf.len() < whole {
            self.buf.reserve(whole - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_BYTES);
        let body = self.buf.split_to(header.body_len).freeze();
        Ok(Some(header.decode_body(body)?))
    }

    /// The next frame, reading until it is whole; fails if it is not within `timeout` (the whole
    /// frame: a peer that trickles bytes is as dead as a silent one).
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<Frame, ReplError> {
        let whole = async {
            loop {
                if let Some(frame) = self.try_frame()? {
                    return Ok(frame);
                }
                self.read_more().await?;
            }
        };
        match tokio::time::timeout(timeout, whole).await {
            Ok(r) => r,
            Err(_) => Err(ReplError::Stopped(format!("peer silent for {} ms", timeout.as_millis()))),
        }
    }

    /// Reads the bytes that arrive next (at least one), failing if none do within `timeout`.
    /// Cancel-safe.
    pub async fn fill(&mut self, timeout: Duration) -> Result<(), ReplError> {
        match tokio::time::timeout(timeout, self.read_more()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("peer silent for {} ms", timeout.as_millis()),
            )
            .into()),
        }
    }

    /// Reads what arrives next, at least one byte. Cancel-safe: a read either completes, its bytes
    /// appended, or never started.
    async fn read_more(&mut self) -> Result<(), ReplError> {
        if self.buf.is_empty() && self.buf.capacity() > 2 * self.chunk {
            self.buf = BytesMut::new();
        }
        // (A chunk, at least `READ_CHUNK_MIN`, always holds a frame header.)
        if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
            self.buf.reserve(self.chunk);
        }
        // At most a chunk per read: a reader that must initialize what it is lent (a multiplexed
        // stream) touches no more than that.
        let room = (self.buf.capacity() - self.buf.len()).min(self.chunk);
        let read = self.rd.read_buf(&mut (&mut self.buf).limit(room)).await;
        if let Ok(n) = read {
            if n == room {
                self.chunk = (self.chunk * 2).min(READ_CHUNK_BYTES);
            } else if n <= self.chunk / 4 {
                self.chunk = (self.chunk / 2).max(READ_CHUNK_MIN);
            }
        }
        match read {
            // Between frames: the peer stopped (or its host closed the socket for it). Only the
            // link's end, not an error in itself; failure detection decides what it means.
            Ok(0) if self.buf.is_empty() => Err(ReplError::Stopped("the peer closed the connection".into())),
            Ok(0) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection in the middle of a frame",
            )
            .into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

pub async fn write_frame(w: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> Result<(), ReplError> {
    let b: Bytes = frame.encode();
    write_encoded(w, &b).await
}

/// Writes frames already encoded back to back (see [`Frame::encode_into`]).
pub async fn write_encoded(w: &mut (impl AsyncWrite + Unpin), frames: &[u8]) -> Result<(), ReplError> {
    w.write_all(frames).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn frames() -> Vec<Frame> {
        let data = Bytes::from((0..3 * 4096u32).map(|x| (x * 7 % 251) as u8).collect::<Vec<u8>>());
        (0..40u64)
            .map(|n| match n % 4 {
                0 => Frame::Write {
                    tag: n,
                    offset: n * 4096,
                    fua: n % 8 == 0,
                    data: data.slice(..4096 * (1 + n as usize % 3)),
                },
                1 => Frame::Ack { applied: n, durable: n - 1 },
                2 => Frame::Ping { epoch: syncblock_engine::Epoch(3), nonce: n, floor: n / 2 },
                _ => Frame::Flush { upto: n },
            })
            .collect()
    }

    /// Frames arriving in pieces of every size, with waits abandoned at random points (as a
    /// `select!` does), decode to exactly what was sent.
    #[tokio::test]
    async fn frame_reader_loses_nothing_when_a_fill_is_abandoned() {
        let sent = frames();
        let mut wire = BytesMut::new();
        for f in &sent {
            f.encode_into(&mut wire);
        }
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            let mut at = 0;
            let mut piece = 1;
            while at < wire.len() {
                let end = (at + piece).min(wire.len());
                tx.write_all(&wire[at..end]).await.unwrap();
                at = end;
                piece = piece * 5 % 9973 + 1;
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
            tx
        });
        let mut reader = FrameReader::new(rx);
        let mut got = Vec::new();
        let mut n_abandoned = 0;
        while got.len() < sent.len() {
            while let Some(f) = reader.try_frame().unwrap() {
                got.push(f);
            }
            if got.len() == sent.len() {
                break;
            }
            // Often gives up before bytes arrive: the abandoned read must not have eaten any.
            match tokio::time::timeout(Duration::from_micros(30), reader.fill(Duration::from_secs(10))).await {
                Ok(r) => r.unwrap(),
                Err(_) => n_abandoned += 1,
            }
        }
        assert_eq!(got, sent);
        assert!(n_abandoned > 0, "no fill was abandoned: the test proved nothing");
        drop(writer.await.unwrap());
        // The peer closed: the next fill says so.
        let e = reader.fill(Duration::from_secs(10)).await.unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }

    /// Waiting for one frame, another protocol is turned away at its first four bytes, and a peer
    /// gets one deadline for the whole frame, not one per read.
    #[tokio::test]
    async fn read_frame_refuses_garbage_at_once_and_bounds_the_whole_frame() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(rx);
        tx.write_all(b"GET ").await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), reader.read_frame(Duration::from_secs(60))).await;
        let e = r.expect("waited for a whole header of garbage").unwrap_err();
        assert!(matches!(e, ReplError::Wire(WireError::BadMagic(_))), "{e}");

        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(rx);
        let wire = Frame::Flush { upto: 9 }.encode();
        let trickle = tokio::spawn(async move {
            for b in wire.iter() {
                tx.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tx
        });
        let e = reader.read_frame(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(e, ReplError::Stopped(_)), "{e}");
        drop(trickle.await.unwrap());
    }

    #[tokio::test]
    async fn frame_reader_refuses_garbage_and_corruption() {
        let mut reader = FrameReader::new(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        reader.fill(Duration::from_secs(1)).await.unwrap();
        assert!(reader.try_frame().is_err(), "an HTTP request decoded as a frame");

        let mut wire = BytesMut::new();
        Frame::Flush { upto: 9 }.encode_into(&mut wire);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut reader = FrameReader::new(&wire[..]);
        reader.fill(Duration::from_secs(1)).await.unwrap();
        assert!(reader.try_frame().is_err(), "a frame with a flipped bit decoded");
    }
}
