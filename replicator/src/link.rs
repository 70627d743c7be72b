//! Reading and writing frames on a TCP stream, with a deadline on every read.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Frame, Header, HEADER_BYTES};
use crate::ReplError;

/// Reads one frame, failing if nothing complete arrives within `timeout`.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin), timeout: Duration) -> Result<Frame, ReplError> {
    let fut = async {
        let mut h = [0u8; HEADER_BYTES];
        r.read_exact(&mut h).await?;
        let header = Header::decode(&h)?;
        let mut body = BytesMut::zeroed(header.body_len);
        r.read_exact(&mut body).await?;
        Ok::<_, ReplError>(header.decode_body(body.freeze())?)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ReplError::Stopped(format!("peer silent for {} ms", timeout.as_millis()))),
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
