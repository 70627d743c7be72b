//! A look at a client's first TLS record before either stack sees it, for a server with both
//! certificates and a PSK file: a client that offers a PSK goes to OpenSSL, every other one to
//! rustls (`super::x509`), which has no external PSK but costs less CPU per record.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The largest first record read ahead: a TLS record's header and the longest body TLS allows
/// (2^14 bytes of plaintext, which a ClientHello is, plus 256 of slack the RFC grants).
const HELLO_BYTES_MAX: usize = 5 + (16 << 10) + 256;

/// The `pre_shared_key` extension (RFC 8446, 4.2.11): a TLS 1.3 client offering a PSK.
const EXT_PRE_SHARED_KEY: u16 = 41;

/// Whether a TLS 1.2 cipher suite authenticates with a PSK (the PSK, DHE_PSK, RSA_PSK and
/// ECDHE_PSK suites of the IANA registry).
fn psk_suite(id: u16) -> bool {
    matches!(id, 0x008C..=0x0095 | 0x00A8..=0x00B9 | 0xC033..=0xC03B | 0xC064..=0xC06B | 0xC08E..=0xC09B
        | 0xC0A4..=0xC0AB | 0xCCAB..=0xCCAE | 0xD001..=0xD005)
}

/// What the first record says about the client: `Some(true)` if it is a ClientHello that offers
/// a PSK (a PSK cipher suite or the `pre_shared_key` extension), `Some(false)` if it is one that
/// does not, `None` if it is not a whole ClientHello (garbage, another protocol, or a hello split
/// over records): OpenSSL then answers it as it always did.
pub(super) fn offers_psk(record: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != 22 {
        return None; // not a handshake record
    }
    r.take(2)?; // record version
    let len = r.u16()? as usize;
    let mut hs = Reader(r.take(len)?);
    if hs.u8()? != 1 {
        return None; // not a ClientHello
    }
    let body_len = hs.u24()? as usize;
    let mut h = Reader(hs.take(body_len)?);
    h.take(2 + 32)?; // client version, random
    let sid = h.u8()? as usize;
    h.take(sid)?;
    let suites_len = h.u16()? as usize;
    let mut suites = Reader(h.take(suites_len)?);
    let mut psk = false;
    while !suites.0.is_empty() {
        psk |= psk_suite(suites.u16()?);
    }
    let comp = h.u8()? as usize;
    h.take(comp)?;
    if h.0.is_empty() {
        return Some(psk); // no extensions
    }
    let ext_len = h.u16()? as usize;
    let mut exts = Reader(h.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()? as usize;
        exts.take(len)?;
        psk |= ty == EXT_PRE_SHARED_KEY;
    }
    Some(psk)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<u32> {
        self.take(3).map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

/// Reads the client's first TLS record from `io` (at most [`HELLO_BYTES_MAX`] bytes): fewer if
/// the peer closes first, or if the header is not that of a TLS record of a possible length.
pub(super) async fn first_record<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; 5];
    let mut got = 0;
    while got < 5 {
        match io.read(&mut head[got..]).await? {
            0 => {
                head.truncate(got);
                return Ok(head);
            }
            n => got += n,
        }
    }
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    if head[0] != 22 || 5 + len > HELLO_BYTES_MAX {
        return Ok(head);
    }
    head.resize(5 + len, 0);
    while got < head.len() {
        match io.read(&mut head[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    head.truncate(got);
    Ok(head)
}

/// A stream whose first bytes, already read from it, are given back before the rest.
pub struct Peeked<S> {
    head: Vec<u8>,
    at: usize,
    io: S,
}

impl<S> Peeked<S> {
    pub(super) fn new(head: Vec<u8>, io: S) -> Peeked<S> {
        Peeked { head, at: 0, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Peeked<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            if this.at == this.head.len() {
                this.head = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Peeked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record with `suites` and extensions of `ext_types` (empty bodies).
    fn hello(suites: &[u16], ext_types: &[u16]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend(s.to_be_bytes());
        }
        body.extend([1, 0]); // null compression
        let mut exts = Vec::new();
        for t in ext_types {
            exts.extend(t.to_be_bytes());
            exts.extend([0, 0]);
        }
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![22, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn a_client_offering_a_psk_is_told_apart() {
        // TLS 1.3 with certificates (AES-128-GCM, ECDHE-ECDSA), key_share and supported_versions.
        assert_eq!(offers_psk(&hello(&[0x1301, 0xC02B], &[51, 43, 45])), Some(false));
        // TLS 1.3 offering a PSK: the pre_shared_key extension, last.
        assert_eq!(offers_psk(&hello(&[0x1301], &[51, 43, 45, 41])), Some(true));
        // TLS 1.2 PSK suites, as GnuTLS offers them: DHE-PSK-AES128-GCM, ECDHE-PSK-CHACHA20.
        assert_eq!(offers_psk(&hello(&[0xC02B, 0x00AA], &[])), Some(true));
        assert_eq!(offers_psk(&hello(&[0xCCAC], &[])), Some(true));
        // Not a whole ClientHello: cut short, another record type, plaintext.
        let h = hello(&[0x1301], &[41]);
        for n in 0..h.len() {
            assert_eq!(offers_psk(&h[..n]), None, "cut at {n}");
        }
        assert_eq!(offers_psk(b"GET / HTTP/1.1\r\n\r\n"), None);
        let mut alert = h.clone();
        alert[0] = 21;
        assert_eq!(offers_psk(&alert), None);
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic. A generated ClientHello: PSK offered exactly when
        /// a PSK suite or the extension is in it, and no answer for any prefix of it.
        #[test]
        fn any_first_record_is_judged_without_panicking(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            suites in proptest::collection::vec(proptest::prelude::any::<u16>(), 1..40),
            exts in proptest::collection::vec(0u16..64, 0..12),
            cut in 0usize..1000,
        ) {
            let _ = offers_psk(&junk);
            let mut as_hello = vec![22, 3, 1];
            as_hello.extend(junk);
            let _ = offers_psk(&as_hello);
            let h = hello(&suites, &exts);
            let psk = suites.iter().any(|s| psk_suite(*s)) || exts.contains(&EXT_PRE_SHARED_KEY);
            proptest::prop_assert_eq!(offers_psk(&h), Some(psk));
            proptest::prop_assert_eq!(offers_psk(&h[..cut % h.len()]), None);
        }
    }

    #[tokio::test]
    async fn the_peeked_bytes_come_back_first() {
        let h = hello(&[0x1301], &[]);
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut sent = h.clone();
        sent.extend(b"after");
        tokio::io::AsyncWriteExt::write_all(&mut a, &sent).await.unwrap();
        drop(a);
        let mut b = b;
        let head = first_record(&mut b).await.unwrap();
        assert_eq!(head, h);
        let mut all = Vec::new();
        Peeked::new(head, b).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, sent);
    }
}
