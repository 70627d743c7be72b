//! `nbd_null`: the cheapest NBD server there can be, as a yardstick. It stores nothing: every
//! write, flush, trim and zeroing succeeds at once and a read returns zeros. One thread per
//! connection reads whatever the socket holds, answers every complete request in it with one
//! write, and reads again: two system calls per batch of requests, no task hand-offs, no disk.
//!
//! What it measures is the floor that the NBD protocol, TCP on loopback and the client (fio's nbd
//! engine, libnbd) put under any NBD server on this machine. `benches/nbd-floor.sh` runs it beside
//! raw io_uring, qemu-nbd and the QEMU mirror: a ratio target that even this server misses cannot
//! be met by one that also writes to a disk.
//!
//! Usage: `nbd_null [ADDR]` (default 127.0.0.1:0); prints `nbd://ADDR` once listening. Not a
//! server for data: it answers the handshake that fio, qemu and libnbd need (fixed newstyle,
//! EXPORT_NAME, INFO and GO) and refuses every other option.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

use syncblock_nbd::proto::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_REPLY_MAGIC, REP_ACK, REP_ERR_UNSUP, REP_INFO, REQUEST_HEADER_BYTES, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

/// The export's size: larger than any region the benchmarks touch.
const EXPORT_BYTES: u64 = 64 << 30;
/// CAN_MULTI_CONN: trivially true for a server that stores nothing.
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const TFLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;
/// Largest request payload accepted (what NBD clients send at most).
const PAYLOAD_MAX: u32 = 32 << 20;
/// Largest option payload read during the handshake.
const OPTION_MAX: u32 = 64 << 10;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const EINVAL: u32 = 22;

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr)?;
    println!("nbd://{}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("nbd_null: connection ended: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    if !handshake(&mut s)? {
        return Ok(());
    }
    transmission(&mut s)
}

fn option_reply(s: &mut TcpStream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Fixed newstyle negotiation; true once in transmission.
fn handshake(s: &mut TcpStream) -> io::Result<bool> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let no_zeroes = u32::from_be_bytes(flags) & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        if magic != IHAVEOPT || len > OPTION_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad option header"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let mut b = Vec::new();
                b.extend_from_slice(&EXPORT_BYTES.to_be_bytes());
                b.extend_from_slice(&TFLAGS.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(true);
            }
            OPT_INFO | OPT_GO => {
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&EXPORT_BYTES.to_be_bytes());
                info.extend_from_slice(&TFLAGS.to_be_bytes());
                option_reply(s, option, REP_INFO, &info)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                option_reply(s, option, REP_ACK, &[])?;
                return Ok(false);
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// Answers every complete request in the buffer, then reads more.
fn transmission(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out = Vec::with_capacity(1 << 20);
    loop {
        // Parse what is whole.
        loop {
            let avail = end - start;
            if avail < REQUEST_HEADER_BYTES {
                break;
            }
            let h = &buf[start..start + REQUEST_HEADER_BYTES];
            let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
            let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
            let handle: [u8; 8] = h[8..16].try_into().expect("8");
            let len = u32::from_be_bytes(h[24..28].try_into().expect("4"));
            if magic != REQUEST_MAGIC {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
            }
            if kind == CMD_DISC {
                s.write_all(&out)?;
                return Ok(());
            }
            let payload = if kind == CMD_WRITE { len as usize } else { 0 };
            if len > PAYLOAD_MAX {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "request too large"));
            }
            if avail < REQUEST_HEADER_BYTES + payload {
                break;
            }
            start += REQUEST_HEADER_BYTES + payload;
            out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            let error = if kind > 6 { EINVAL } else { 0 };
            out.extend_from_slice(&error.to_be_bytes());
            out.extend_from_slice(&handle);
            if kind == CMD_READ && error == 0 {
                out.resize(out.len() + len as usize, 0);
            }
        }
        if !out.is_empty() {
            s.write_all(&out)?;
            out.clear();
        }
        // Keep a partial request, and room for a whole one.
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if buf.len() - end < REQUEST_HEADER_BYTES + PAYLOAD_MAX as usize && buf.len() < (PAYLOAD_MAX as usize) * 2 {
            buf.resize((PAYLOAD_MAX as usize) * 2, 0);
        }
        let n = s.read(&mut buf[end..])?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}
