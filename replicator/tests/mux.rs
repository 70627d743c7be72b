//! Node links (`cluster::mux`) over real TCP on loopback, through a node's router: many volumes'
//! streams share one connection, a stream whose reader stalls holds up no other, a link's own
//! heartbeat keeps it up while its streams are idle, a silent link fails its streams on both sides
//! and is replaced by the next stream asked for, and garbage on the port is turned away.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use syncblock_engine::Epoch;
use syncblock_replicator::cluster::mux::{self, MuxNet, LINK_PREAMBLE, LINK_SILENT_MAX};
use syncblock_replicator::cluster::router::{RoutedNet, Router};
use syncblock_replicator::link::{write_frame, FrameReader};
use syncblock_replicator::net::{self, BoxFuture, BoxListener, BoxStream, Incoming, Listener, Net};
use syncblock_replicator::wire::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A TCP listener that counts the connections it accepts.
struct Counting {
    inner: BoxListener,
    accepted: Arc<AtomicUsize>,
}

impl Listener for Counting {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>> {
        Box::pin(async move {
            let i = self.inner.accept().await?;
            self.accepted.fetch_add(1, Ordering::SeqCst);
            Ok(i)
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

async fn router() -> (Arc<Router>, SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let inner = net::tcp().bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let r = Router::start(Box::new(Counting { inner, accepted: accepted.clone() }), "n2".into()).unwrap();
    let addr = r.local_addr();
    (r, addr, accepted)
}

fn hello(volume: &str) -> Frame {
    Frame::Hello {
        pair: 7,
        epoch: Epoch(1),
        last_tag: 0,
        size_bytes: 1 << 20,
        volume: volume.into(),
        node: "n1".into(),
        history: vec![],
    }
}

fn ping(nonce: u64) -> Frame {
    Frame::Ping { epoch: Epoch(1), nonce, floor: 0 }
}

/// A volume's listener on the router, as its secondary would bind it.
async fn listen(router: &Arc<Router>, volume: &str) -> BoxListener {
    let routed = RoutedNet { inner: net::tcp(), router: router.clone(), volume: volume.into() };
    routed.bind("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

/// Connects `volume` through `links`, sends its hello and takes the connection on the secondary's
/// side: (primary's stream, secondary's reader and stream).
async fn pair_up(links: &MuxNet, addr: SocketAddr, listener: &mut BoxListener, volume: &str) -> (BoxStream, BoxStream) {
    let mut out = links.connect(addr).await.unwrap();
    write_frame(&mut out, &hello(volume)).await.unwrap();
    let incoming = tokio::time::timeout(WAIT, listener.accept()).await.expect("routed in time").unwrap();
    let mut peer = incoming.establish().await.unwrap().stream;
    let mut rd = FrameReader::new(&mut peer);
    match rd.read_frame(WAIT).await.unwrap() {
        Frame::Hello { volume: v, .. } => assert_eq!(v, volume),
        other => panic!("first frame {other:?}"),
    }
    (out, peer)
}

async fn read_frame(s: &mut BoxStream) -> Frame {
    FrameReader::new(s).read_frame(WAIT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_volumes_share_one_connection_each_way() {
    let (router, addr, accepted) = router().await;
    let links = MuxNet::over(net::tcp());
    let mut pairs = Vec::new();
    for i in 0..40 {
        let name = format!("v{i}");
        let mut l = listen(&router, &name).await;
        pairs.push((name.clone(), pair_up(&links, addr, &mut l, &name).await, l));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "40 volumes took more than one connection");
    assert_eq!(links.links(), 1);
    // Both ways, on every stream, interleaved.
    for (i, (_, (out, back), _)) in pairs.iter_mut().enumerate() {
        write_frame(out, &ping(i as u64)).await.unwrap();
        write_frame(back, &ping(1000 + i as u64)).await.unwrap();
    }
    for (i, (_, (out, back), _)) in pairs.iter_mut().enumerate() {
        assert!(matches!(read_frame(back).await, Frame::Ping { nonce, .. } if nonce == i as u64));
        assert!(matches!(read_frame(out).await, Frame::Ping { nonce, .. } if nonce == 1000 + i as u64));
    }
    // A 1 MiB write goes through whole.
    let data = Bytes::from((0..1 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let (out, back) = &mut pairs[3].1;
    // (Written while read: it is four times a stream's window.)
    let frame = Frame::Write { tag: 9, offset: 4096, fua: false, data: data.clone() };
    let write = write_frame(out, &frame);
    let (w, got) = tokio::join!(write, read_frame(back));
    w.unwrap();
    match got {
        Frame::Write { tag: 9, offset: 4096, data: got, .. } => assert!(got == data),
        other => panic!("{other:?}"),
    }
    // Closing one volume's stream ends it on the other side and leaves the others alone.
    let (_, (mut out, mut back), _) = pairs.remove(0);
    out.shutdown().await.unwrap();
    drop(out);
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, back.read(&mut buf)).await.expect("EOF in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let (_, (out, back), _) = &mut pairs[0];
    write_frame(out, &ping(77)).await.unwrap();
    assert!(matches!(read_frame(back).await, Frame::Ping { nonce: 77, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_reader_stalls_holds_up_no_other() {
    let (router, addr, _) = router().await;
    let links = MuxNet::over(net::tcp());
    let mut la = listen(&router, "slow").await;
    let mut lb = listen(&router, "fast").await;
    let (mut slow_out, _slow_back) = pair_up(&links, addr, &mut la, "slow").await;
    let (mut fast_out, mut fast_back) = pair_up(&links, addr, &mut lb, "fast").await;
    // Nobody reads "slow": its writer fills its window and then waits…
    let block = Bytes::from(vec![0xab; 64 << 10]);
    let stalled = tokio::spawn(async move {
        for tag in 0..64u64 {
            let f = Frame::Write { tag, offset: 0, fua: false, data: block.clone() };
            write_frame(&mut slow_out, &f).await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stalled.is_finished(), "4 MiB went into a stream nobody reads: no flow control");
    // …while "fast" goes on.
    for n in 0..100 {
        write_frame(&mut fast_out, &ping(n)).await.unwrap();
        assert!(matches!(read_frame(&mut fast_back).await, Frame::Ping { nonce, .. } if nonce == n));
    }
    stalled.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_closed_link_is_replaced_by_the_next_stream() {
    // A "peer" that accepts links and reads their preamble; then it says nothing (a host gone
    // without closing its sockets), except that it closes the links it is told to (a process
    // that died).
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (close_tx, mut close) = tokio::sync::mpsc::channel::<()>(1);
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        loop {
            tokio::select! {
                a = tcp.accept() => {
                    let (mut s, _) = a.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let mut pre = [0u8; 8];
                    s.read_exact(&mut pre).await.unwrap();
                    assert_eq!(pre, LINK_PREAMBLE);
                    keep.push(s);
                }
                Some(()) = close.recv() => keep.clear(),
            }
        }
    });
    let links = MuxNet::over(net::tcp());
    let mut s1 = links.connect(addr).await.unwrap();
    let _s2 = links.connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "two streams, one link");
    // A peer that never answers the beat (as a node of an earlier version) gets no quiet volumes.
    assert!(!links.peer_beats(addr));
    // Past the silence limit the link closes, failing its streams, and the next stream comes on
    // a new link.
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(LINK_SILENT_MAX * 3, s1.read(&mut b)).await.expect("the silent link's stream ended");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let mut s3 = links.connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a silent link was reused");
    // The peer closes its links: their streams end, and the next stream dials again at once.
    close_tx.send(()).await.unwrap();
    let r = tokio::time::timeout(WAIT, s3.read(&mut b)).await.expect("the stream ended in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _s4 = links.connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a closed link was reused");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_stays_up_on_its_own_heartbeat() {
    let (router, addr, accepted) = router().await;
    let links = MuxNet::over(net::tcp());
    let mut l = listen(&router, "v").await;
    let (mut out, mut back) = pair_up(&links, addr, &mut l, "v").await;
    // Nothing on the volume's stream for three times the silence limit: the link's beat carries it.
    tokio::time::sleep(LINK_SILENT_MAX * 3).await;
    write_frame(&mut out, &ping(5)).await.unwrap();
    assert!(matches!(read_frame(&mut back).await, Frame::Ping { nonce: 5, .. }));
    write_frame(&mut back, &ping(6)).await.unwrap();
    assert!(matches!(read_frame(&mut out).await, Frame::Ping { nonce: 6, .. }));
    let _again = links.connect(addr).await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the idle link was replaced");
    assert_eq!(links.links(), 1);
    // The router answered the beat: this peer takes a quiet volume's stream for alive.
    assert!(links.peer_beats(addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialing_node_gone_silent_fails_the_streams_its_link_carries() {
    use futures_util::future::poll_fn;
    use std::future::Future;
    use std::task::Poll;
    use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
    let (router, addr, _) = router().await;
    let mut l = listen(&router, "v").await;
    // A node that opens a link and one volume's stream on it, sends its hello, and then stops
    // (a host gone without closing its socket): no beat, nothing at all.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&LINK_PREAMBLE).await.unwrap();
    let mut conn = yamux::Connection::new(tcp.compat(), mux::config(), yamux::Mode::Client);
    let stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    let driver = tokio::spawn(async move {
        // Drives the connection (sending what its stream writes) until told to go silent.
        poll_fn(|cx| {
            if std::pin::Pin::new(&mut stop).poll(cx).is_ready() {
                return Poll::Ready(());
            }
            while let Poll::Ready(Some(_)) = conn.poll_next_inbound(cx) {}
            Poll::Pending
        })
        .await;
        conn
    });
    let mut out = stream.compat();
    write_frame(&mut out, &hello("v")).await.unwrap();
    let incoming = tokio::time::timeout(WAIT, l.accept()).await.expect("routed in time").unwrap();
    let mut back = incoming.establish().await.unwrap().stream;
    assert!(matches!(read_frame(&mut back).await, Frame::Hello { .. }));
    stop_tx.send(()).unwrap();
    let _silent = driver.await.unwrap();
    let t = std::time::Instant::now();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(WAIT, back.read(&mut b)).await.expect("the stream ended in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = t.elapsed();
    assert!(took < LINK_SILENT_MAX * 3, "the silent link's stream ended after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_is_dropped_and_routing_goes_on() {
    let (router, addr, _) = router().await;
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"SBLINK02xxxxxxxx", b"\0\0\0\0\0\0\0\0\0\0"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(WAIT, s.read(&mut b)).await.expect("closed in time");
        assert!(matches!(r, Ok(0) | Err(_)), "{junk:?} got {r:?}");
    }
    // A link whose stream sends garbage loses that stream, not the link.
    let links = MuxNet::over(net::tcp());
    let mut bad = links.connect(addr).await.unwrap();
    bad.write_all(b"not a frame at all").await.unwrap();
    let mut l = listen(&router, "ok").await;
    let (mut out, mut back) = pair_up(&links, addr, &mut l, "ok").await;
    write_frame(&mut out, &ping(3)).await.unwrap();
    assert!(matches!(read_frame(&mut back).await, Frame::Ping { nonce: 3, .. }));
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(WAIT, bad.read(&mut b)).await.expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // And a volume nobody holds is refused by name.
    let mut nobody = links.connect(addr).await.unwrap();
    write_frame(&mut nobody, &hello("nobody")).await.unwrap();
    match read_frame(&mut nobody).await {
        Frame::Refuse { reason, .. } => assert!(reason.contains("holds no replica of nobody"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// A primary's link is split between a writing task and a reading task, and the secondary answers
/// every frame: several streams at once, all on one thread, with answers large enough that the
/// readers send window updates often. yamux 0.13 gave the two halves of a stream one waker slot
/// in its command channel, so a reader's window update could overwrite a waiting writer's waker;
/// at re-protection under client load (benches/cluster-reprotect.sh, four nodes on two cores) the
/// writer then slept until the link timed out, every few seconds. This test did not catch that
/// on an idle machine, but a lost wake-up here is a hang, which it does catch.
#[tokio::test(flavor = "current_thread")]
async fn streams_split_between_a_writer_and_a_reader_task_never_stall() {
    const STREAMS: usize = 8;
    const FRAMES: u64 = 256;
    let (router, addr, _) = router().await;
    let links = MuxNet::over(net::tcp());
    let mut tasks = tokio::task::JoinSet::new();
    for v in 0..STREAMS {
        let name = format!("v{v}");
        let mut l = listen(&router, &name).await;
        let (out, back) = pair_up(&links, addr, &mut l, &name).await;
        // The secondary: one task that reads each write and answers it at once.
        tasks.spawn(async move {
            let (r, mut w) = tokio::io::split(back);
            let mut rd = FrameReader::new(r);
            let answer = Bytes::from(vec![0xa5; 64 << 10]);
            for _ in 0..FRAMES {
                match rd.read_frame(WAIT).await.unwrap() {
                    Frame::Write { tag, .. } => {
                        let f = Frame::Write { tag, offset: 0, fua: false, data: answer.clone() };
                        write_frame(&mut w, &f).await.unwrap()
                    }
                    other => panic!("{other:?}"),
                }
            }
            drop(l);
        });
        let (mut rd, mut wr) = net::split(out);
        tasks.spawn(async move {
            let data = Bytes::from(vec![0x5a; 256 << 10]);
            for tag in 0..FRAMES {
                write_frame(&mut wr, &Frame::Write { tag, offset: 0, fua: false, data: data.clone() }).await.unwrap();
            }
            // Kept open until the answers are in.
            tokio::time::sleep(WAIT).await;
        });
        tasks.spawn(async move {
            for n in 0..FRAMES {
                match rd.read_frame(WAIT).await {
                    Ok(Frame::Write { tag, .. }) => assert_eq!(tag, n),
                    other => panic!("answer {n}: {other:?}"),
                }
            }
        });
    }
    // Every secondary and every reader done (the writers wait): 8 × 64 MiB one way, 8 × 16 back.
    let done = async {
        for _ in 0..2 * STREAMS {
            tasks.join_next().await.unwrap().unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), done).await.expect("a split stream stalled");
}

/// A node's quiet volumes share one grid of timers: whenever each last pinged, its next quiet
/// ping (and report) falls due at the same instant as every other's, at most `QUIET_EVERY` later,
/// so that a node with many idle volumes wakes once a second for all of them.
#[tokio::test(start_paused = true)]
async fn quiet_volumes_of_a_node_fall_due_together() {
    use syncblock_replicator::QUIET_EVERY;
    use tokio::time::Instant;
    let links = MuxNet::over(net::tcp());
    let start = Instant::now();
    let mut dues = Vec::new();
    for ms in [0u64, 1, 250, 999] {
        let now = start + Duration::from_millis(ms);
        let due = links.quiet_due(now);
        assert!(due > now && due <= now + QUIET_EVERY, "{ms} ms: due {:?} after", due - now);
        dues.push(due);
    }
    assert!(dues.iter().all(|d| *d == dues[0]), "{dues:?}");
    // The next round falls due together again, a period later.
    assert_eq!(links.quiet_due(dues[0]), dues[0] + QUIET_EVERY);
    // A net without node links keeps each volume's own period.
    let plain = net::tcp();
    assert_eq!(plain.quiet_due(start + Duration::from_millis(250)), start + Duration::from_millis(250) + QUIET_EVERY);
}
