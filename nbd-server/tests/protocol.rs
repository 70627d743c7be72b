//! The server driven by a hand-written client over TCP: handshake variants, every command, error
//! replies, pipelining, bad input and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use syncblock_nbd::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;
const FUA: u16 = 1;
const NO_HOLE: u16 = 2;
const REQ_ONE: u16 = 8;
const FAST_ZERO: u16 = 16;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Runs `f` on a server over a fresh sim store (`TestServer::start`'s volumes) with `config`.
fn run_with(config: ServerConfig, f: impl AsyncFnOnce(TestServer)) {
    let rt = rt();
    // Store::open_device blocks: call it outside the runtime.
    let store = sim_store();
    rt.block_on(async {
        let server = TestServer::start_with(store, None, TEST_VOLUMES, config).await;
        f(server).await;
    });
}

fn run(f: impl AsyncFnOnce(TestServer)) {
    run_with(test_config(), f)
}

#[test]
fn structured_read_sends_holes_for_unwritten_ranges() {
    run(async |server| {
        let mut c = connect(server.addr, "vol", true, true).await;
        assert_eq!(c.size, VOL_BYTES);
        assert_eq!(c.flags, 0x0ded);
        let data = pattern(1, 8192);
        assert_eq!(c.cmd(0, WRITE, 4096, 8192, &data).await, 0);
        // Small reads skip hole detection: one data chunk, zeros included.
        let (got, kinds) = c.read(0, 16384).await.unwrap();
        assert_eq!(kinds, vec![1], "one data chunk");
        assert_eq!(&got[..4096], &[0u8; 4096][..]);
        assert_eq!(&got[4096..12288], &data[..]);
        assert_eq!(&got[12288..], &[0u8; 4096][..]);
        // Large reads send unwritten ranges as holes.
        let big = pattern(2, 65536);
        assert_eq!(c.cmd(0, WRITE, 1 << 20, 65536, &big).await, 0);
        let (got, kinds) = c.read((1 << 20) - 65536, 3 * 65536).await.unwrap();
        assert_eq!(kinds, vec![2, 1, 2], "hole, data, hole");
        assert_eq!(&got[..65536], &[0u8; 65536][..]);
        assert_eq!(&got[65536..131072], &big[..]);
        assert_eq!(&got[131072..], &[0u8; 65536][..]);
        // Block status: allocated 4096..12288, hole+zero elsewhere.
        c.send(0, BLOCK_STATUS, 3, 0, 16384, &[]).await;
        let ch = c.recv(0).await;
        assert_eq!((ch.kind, ch.flags), (5, 1));
        let words: Vec<u32> = ch.payload.chunks(4).map(|w| u32::from_be_bytes(w.try_into().unwrap())).collect();
        assert_eq!(words, vec![1, 4096, 3, 8192, 0, 4096, 3]);
        c.send(REQ_ONE, BLOCK_STATUS, 3, 4096, 16384, &[]).await;
        let ch = c.recv(0).await;
        assert_eq!(ch.payload.len(), 12, "exactly one extent with REQ_ONE");
        // DF: one data chunk.
        c.send(4, READ, 5, 0, 16384, &[]).await;
        let ch = c.recv(0).await;
        assert_eq!((ch.kind, ch.flags, ch.payload.len()), (1, 1, 8 + 16384));
        server.stop().await.unwrap();
    });
}

#[test]
fn simple_replies_cover_every_command() {
    run(async |server| {
        let mut c = connect(server.addr, "", false, false).await;
        assert_eq!(c.flags & 0x80, 0, "no DF without structured replies");
        let data = pattern(2, 65536);
        assert_eq!(c.cmd(FUA, WRITE, 1 << 20, 65536, &data).await, 0);
        assert_eq!(c.read(1 << 20, 65536).await.unwrap().0, data);
        assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).await, 0);
        assert_eq!(c.cmd(0, CACHE, 0, 4096, &[]).await, 0);
        assert_eq!(c.cmd(0, WRITE_ZEROES, (1 << 20) + 100, 1000, &[]).await, 0);
        let mut expect = data.clone();
        expect[100..1100].fill(0);
        assert_eq!(c.read(1 << 20, 65536).await.unwrap().0, expect);
        assert_eq!(c.cmd(NO_HOLE | FUA, WRITE_ZEROES, 1 << 20, 4096, &[]).await, 0);
        assert_eq!(c.cmd(FAST_ZERO, WRITE_ZEROES, (1 << 20) + 8192, 8192, &[]).await, 0);
        expect[..4096].fill(0);
        expect[8192..16384].fill(0);
        assert_eq!(c.read(1 << 20, 65536).await.unwrap().0, expect);
        assert_eq!(c.cmd(0, TRIM, 1 << 20, 65536, &[]).await, 0);
        // Unaligned byte-granular I/O works (min block size 1).
        assert_eq!(c.cmd(0, WRITE, 3, 5, b"hello").await, 0);
        assert_eq!(c.read(0, 10).await.unwrap().0, b"\0\0\0hello\0\0");
        server.stop().await.unwrap();
    });
}

#[test]
fn errors_are_the_ones_the_spec_names_and_the_connection_survives() {
    run(async |server| {
        let mut c = connect(server.addr, "vol", true, false).await;
        assert_eq!(c.read(VOL_BYTES - 512, 4096).await, Err(EINVAL));
        assert_eq!(c.cmd(0, WRITE, VOL_BYTES - 512, 4096, &[0u8; 4096]).await, ENOSPC);
        assert_eq!(c.cmd(0, WRITE_ZEROES, VOL_BYTES, 1, &[]).await, ENOSPC);
        assert_eq!(c.cmd(0, TRIM, u64::MAX, 4096, &[]).await, EINVAL);
        assert_eq!(c.cmd(0, 42, 0, 0, &[]).await, EINVAL, "unknown command");
        assert_eq!(c.cmd(0x20, READ, 0, 4096, &[]).await, EINVAL, "unknown flag");
        assert_eq!(c.cmd(NO_HOLE, READ, 0, 4096, &[]).await, EINVAL, "flag for another command");
        assert_eq!(c.cmd(0, BLOCK_STATUS, 0, 4096, &[]).await, EINVAL, "no context negotiated");
        assert_eq!(c.cmd(0, READ, 0, (32 << 20) + 1, &[]).await, EINVAL, "over the maximum block size");
        assert_eq!(c.cmd(FAST_ZERO | NO_HOLE, WRITE_ZEROES, 0, 4096, &[]).await, ENOTSUP);
        // Still serving.
        assert_eq!(c.cmd(0, WRITE, 0, 4, b"abcd").await, 0);
        assert_eq!(c.read(0, 4).await.unwrap().0, b"abcd");
        let mut ro = connect(server.addr, "ro", false, false).await;
        assert_ne!(ro.flags & 2, 0, "READ_ONLY flag");
        assert_eq!(ro.cmd(0, WRITE, 0, 4, b"abcd").await, EPERM);
        assert_eq!(ro.cmd(0, TRIM, 0, 4096, &[]).await, EPERM);
        assert_eq!(ro.read(0, 4).await.unwrap().0, [0u8; 4]);
        server.stop().await.unwrap();
    });
}

#[test]
fn handshake_variants_list_info_unknown_option_abort_and_export_name() {
    run(async |server| {
        let mut s = greet(server.addr).await;
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        send_option(&mut s, 99, b"xyz").await;
        assert_eq!(read_option_reply(&mut s).await.1, 0x8000_0001, "ERR_UNSUP");
        send_option(&mut s, 3, &[]).await;
        let mut names = Vec::new();
        loop {
            let (_, typ, d) = read_option_reply(&mut s).await;
            if typ == 1 {
                break;
            }
            assert_eq!(typ, 2);
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
        }
        names.sort();
        assert_eq!(names, vec!["ro", "vol"]);
        send_option(&mut s, 6, &info_payload("nope", &[])).await;
        assert_eq!(read_option_reply(&mut s).await.1, 0x8000_0006, "ERR_UNKNOWN");
        send_option(&mut s, 9, &meta_payload("vol", &["base:"])).await;
        let (_, typ, d) = read_option_reply(&mut s).await;
        assert_eq!((typ, &d[4..]), (4, &b"base:allocation"[..]));
        assert_eq!(read_option_reply(&mut s).await.1, 1);
        send_option(&mut s, 2, &[]).await;
        assert_eq!(read_option_reply(&mut s).await.1, 1, "ABORT is acked");
        assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0, "then closed");

        // Old client: no flags, EXPORT_NAME, 124 zero bytes of padding.
        let mut s = greet(server.addr).await;
        s.write_all(&0u32.to_be_bytes()).await.unwrap();
        send_option(&mut s, 1, b"vol").await;
        let mut r = [0u8; 134];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), VOL_BYTES);
        assert!(r[10..].iter().all(|&b| b == 0));
        let mut c = Client { s, structured: false, size: VOL_BYTES, flags: 0 };
        assert_eq!(c.read(0, 512).await.unwrap().0.len(), 512);

        // Unknown client flag: closed at once.
        let mut s = greet(server.addr).await;
        s.write_all(&8u32.to_be_bytes()).await.unwrap();
        assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0);

        // EXPORT_NAME of an unknown export: closed.
        let mut s = greet(server.addr).await;
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        send_option(&mut s, 1, b"nope").await;
        assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0);
        server.stop().await.unwrap();
    });
}

#[test]
fn pipelined_requests_all_get_replies_and_bad_magic_closes_only_that_connection() {
    run(async |server| {
        let mut c = connect(server.addr, "vol", false, false).await;
        let mut other = connect(server.addr, "vol", true, false).await;
        // 200 requests without waiting (more than IN_FLIGHT_MAX: exercises backpressure).
        let n = 200u64;
        for i in 0..n {
            c.send(0, WRITE, i, i * 4096, 4096, &pattern(i as u8, 4096)).await;
        }
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let r = c.recv(0).await;
            assert_eq!(r.error, 0);
            assert!(!std::mem::replace(&mut seen[r.cookie as usize], true), "duplicate reply");
        }
        assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).await, 0);
        for i in [0u64, 57, 199] {
            assert_eq!(other.read(i * 4096, 4096).await.unwrap().0, pattern(i as u8, 4096));
        }
        // Garbage magic: that connection closes...
        c.s.write_all(&[0xde; 28]).await.unwrap();
        assert_eq!(c.s.read(&mut [0u8; 1]).await.unwrap_or(0), 0);
        // ...the other carries on, and a write then DISC is answered before the close.
        other.send(0, WRITE, 77, 0, 4, b"wxyz").await;
        other.send(0, DISC, 78, 0, 0, &[]).await;
        let r = other.recv(0).await;
        assert_eq!((r.cookie, r.error), (77, 0));
        assert_eq!(other.s.read(&mut [0u8; 1]).await.unwrap(), 0);
        let mut third = connect(server.addr, "vol", false, false).await;
        assert_eq!(third.read(0, 4).await.unwrap().0, b"wxyz");
        server.stop().await.unwrap();
    });
}

#[test]
fn shutdown_finishes_with_idle_clients_connected_and_flushes() {
    run(async |server| {
        let mut c = connect(server.addr, "vol", false, false).await;
        assert_eq!(c.cmd(0, WRITE, 0, 4, b"keep").await, 0);
        let _idle = greet(server.addr).await;
        let store = server.store.clone();
        server.stop().await.unwrap();
        assert_eq!(c.s.read(&mut [0u8; 1]).await.unwrap_or(0), 0, "connection closed on shutdown");
        let vol = store.volume("vol").await.unwrap();
        assert_eq!(&store.read(vol.id, 0, 4).await.unwrap()[..], b"keep");
    });
}

#[test]
fn silent_or_stalled_handshakes_are_dropped_after_the_timeout_but_idle_sessions_stay() {
    let timeout = Duration::from_millis(300);
    run_with(ServerConfig { handshake_timeout: timeout, ..test_config() }, async |server| {
        let started = Instant::now();
        // Reads the greeting, then sends nothing.
        let mut silent = greet(server.addr).await;
        // Sends its flags and half an option header, then stalls.
        let mut stalled = greet(server.addr).await;
        stalled.write_all(&3u32.to_be_bytes()).await.unwrap();
        stalled.write_all(b"IHAVEOPT\0\0").await.unwrap();
        // Negotiates at once, then stays idle in transmission for longer than the timeout.
        let mut idle = connect(server.addr, "vol", false, false).await;
        for s in [&mut silent, &mut stalled] {
            let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 1])).await;
            assert_eq!(read.expect("the server must close a stalled handshake").unwrap_or(0), 0, "closed, no reply");
        }
        let waited = started.elapsed();
        assert!(waited >= timeout, "closed after {waited:?}, before the {timeout:?} timeout");
        tokio::time::sleep(timeout * 2).await;
        assert_eq!(idle.cmd(0, WRITE, 0, 4, b"idle").await, 0, "a negotiated session has no such timeout");
        let mut late = connect(server.addr, "vol", true, false).await;
        assert_eq!(late.read(0, 4).await.unwrap().0, b"idle");
        server.stop().await.unwrap();
    });
}

/// A client that pipelines far more READ data than the payload budget and reads no reply until
/// it has sent everything is stopped by backpressure (its unwritten replies count against the
/// budget), other clients meanwhile get answers, and every reply arrives, correct, once it reads.
#[test]
fn a_client_that_does_not_read_its_replies_is_held_back_not_buffered_and_others_go_on() {
    run(async |server| {
        let mut writer = connect(server.addr, "vol", false, false).await;
        let block = 1u32 << 20;
        assert_eq!(writer.cmd(0, WRITE, 0, block, &pattern(9, block as usize)).await, 0);
        let mut greedy = connect(server.addr, "vol", false, false).await;
        // 300 MiB of reads, more than twice the 128 MiB budget, none of them answered yet.
        let n = 300u64;
        for i in 0..n {
            greedy.send(0, READ, i, 0, block, &[]).await;
        }
        // Another client is served meanwhile, within seconds.
        let other = async {
            assert_eq!(writer.cmd(0, WRITE, 8 << 20, 4096, &pattern(3, 4096)).await, 0);
            assert_eq!(writer.cmd(0, FLUSH, 0, 0, &[]).await, 0);
            writer.read(8 << 20, 4096).await.unwrap().0
        };
        let got = tokio::time::timeout(Duration::from_secs(20), other).await.expect("the other client was starved");
        assert_eq!(got, pattern(3, 4096));
        // Now the greedy client reads: every reply is there and right.
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let r = tokio::time::timeout(Duration::from_secs(20), greedy.recv(block as usize))
                .await
                .expect("a reply never came: the budget was not released");
            assert_eq!(r.error, 0);
            assert!(r.payload == pattern(9, block as usize), "reply {} has the wrong data", r.cookie);
            assert!(!std::mem::replace(&mut seen[r.cookie as usize], true), "duplicate reply");
        }
        server.stop().await.unwrap();
    });
}

#[test]
fn writes_without_fua_are_answered_write_back_unless_the_server_is_write_through() {
    for write_back in [true, false] {
        run_with(ServerConfig { write_back, ..test_config() }, async |server| {
            let store = server.store.clone();
            let mut a = connect(server.addr, "vol", true, false).await;
            let mut b = connect(server.addr, "vol", true, false).await;
            for i in 0..8u64 {
                assert_eq!(a.cmd(0, WRITE, i * 4096, 4, b"back").await, 0);
            }
            // Another connection sees the answered writes at once, and a FUA write is never
            // answered early.
            assert_eq!(b.read(7 * 4096, 4).await.unwrap().0, b"back");
            assert_eq!(a.cmd(FUA, WRITE, 8 * 4096, 4, b"fua!").await, 0);
            assert_eq!(b.cmd(0, FLUSH, 0, 0, b"").await, 0);
            let acks = store.stats().await.unwrap().write_back_acks;
            if write_back {
                assert_eq!(acks, 8, "every plain write answered once queued");
            } else {
                assert_eq!(acks, 0, "write-through answers no write early");
            }
            server.stop().await.unwrap();
        });
    }
}
