//! The owner driven by synthetic events: a store on a simulated disk, a link that is an in-memory
//! pipe to a scripted peer, and witness answers made up by the test. Each test is a scenario; the
//! loop's invariants are checked after every step, as in the real loop.

use std::time::Duration;

use syncblock_engine::Epoch;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::*;
use crate::link::FrameReader;
use crate::state::Role;

const VOL: u64 = 4 << 20;
const EPOCH: Epoch = Epoch(3);

struct Harness {
    owner: Owner,
    _parts: Parts,
}

async fn harness(policy: Policy) -> Harness {
    harness_sharing(policy, ReplConfig::default().resync_bytes).await
}

/// A harness whose resyncs share `resync_bytes` (a node's other volumes hold the rest).
async fn harness_sharing(policy: Policy, resync_bytes: Arc<tokio::sync::Semaphore>) -> Harness {
    harness_on(policy, resync_bytes, crate::net::tcp()).await
}

/// TCP whose connections count as riding node links with a heartbeat of their own
/// (`Net::links_beat`), as a cluster node's do.
struct Beating;

impl crate::net::Net for Beating {
    fn connect(&self, addr: SocketAddr) -> crate::net::BoxFuture<'_, std::io::Result<crate::net::BoxStream>> {
        crate::net::TcpNet.connect(addr)
    }
    fn bind(&self, addr: SocketAddr) -> crate::net::BoxFuture<'_, std::io::Result<crate::net::BoxListener>> {
        crate::net::TcpNet.bind(addr)
    }
    fn links_beat(&self) -> bool {
        true
    }
    fn peer_beats(&self, _addr: SocketAddr) -> bool {
        true
    }
}

async fn harness_on(
    policy: Policy,
    resync_bytes: Arc<tokio::sync::Semaphore>,
    net: Arc<dyn crate::net::Net>,
) -> Harness {
    let (store, info) = crate::testutil::sim_store(VOL).await;
    let mut state = ReplState::new(Role::Primary);
    state.begin_epoch(EPOCH, 1, 11);
    state.pair = 0x77;
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = ReplConfig {
        node: "a".into(),
        authority: (policy == Policy::Degrade).then(|| crate::authority::Witness::shared(crate::net::tcp(), unused)),
        policy,
        resync_bytes,
        net,
        ..ReplConfig::default()
    };
    let (owner, parts) = Owner::new(store, info.id, "v".into(), VOL, unused, cfg, state, 0, 0, None);
    Harness { owner, _parts: parts }
}

/// The peer's end of a link. It answers checksum requests (an empty replica: every block
/// unmapped) and, when `pong` is set, pings; acknowledgements are the test's to send.
struct Peer {
    io: WriteHalf<DuplexStream>,
    frames: FrameReader<ReadHalf<DuplexStream>>,
    pong: bool,
    /// Every frame received, in order.
    got: Vec<Frame>,
}

impl Peer {
    async fn send(&mut self, f: Frame) {
        self.io.write_all(&f.encode()).await.unwrap();
    }

    async fn ack(&mut self, applied: u64, durable: u64) {
        self.send(Frame::Ack { applied, durable }).await;
    }

    /// Reads what has arrived, answering as scripted.
    async fn read(&mut self) {
        while tokio::time::timeout(Duration::from_millis(1), self.frames.fill(Duration::from_secs(60)))
            .await
            .is_ok_and(|r| r.is_ok())
        {}
        while let Some(f) = self.frames.try_frame().unwrap() {
            match &f {
                Frame::CrcRequest { id, offset, len } => {
                    let crcs = vec![None; (*len / BLOCK_BYTES_U64) as usize];
                    self.send(Frame::CrcReply { id: *id, offset: *offset, crcs }).await;
                }
                Frame::Ping { nonce, .. } if self.pong => self.send(Frame::Pong { nonce: *nonce }).await,
                _ => {}
            }
            self.got.push(f);
        }
    }

    fn writes(&self) -> Vec<(u64, bool)> {
        self.got
            .iter()
            .filter_map(|f| if let Frame::Write { tag, fua, .. } = f { Some((*tag, *fua)) } else { None })
            .collect()
    }

    fn flushes(&self) -> usize {
        self.got.iter().filter(|f| matches!(f, Frame::Flush { .. })).count()
    }
}

impl Harness {
    fn peer(&self) -> PeerView {
        self.owner.peer.borrow().clone()
    }

    /// Link `generation` comes up: the peer accepted a hello, and last holds `peer_last`.
    async fn link_up(&mut self, peer_last: u64, common: u64) -> (u64, Peer) {
        let (ours, theirs) = tokio::io::duplex(4 << 20);
        let (rd, wr) = crate::net::split(Box::new(ours));
        self.owner.generation += 1;
        let generation = self.owner.generation;
        self.owner.link = LinkState::Connecting { generation };
        let h = Handshake { rd, wr, peer_last, common, runs: vec![] };
        self.owner.on_event(Event::LinkUp(generation, Box::new(h))).await;
        self.after_step();
        let (theirs_rd, theirs_wr) = tokio::io::split(theirs);
        (generation, Peer { io: theirs_wr, frames: FrameReader::new(theirs_rd), pong: true, got: Vec::new() })
    }

    fn after_step(&mut self) {
        self.owner.complete_ops();
        self.owner.check_invariants();
        self.owner.publish();
    }

    /// Runs the loop's steps (no timers, no new client operations) until nothing is left to do,
    /// letting the peer read and answer between steps. Bounded.
    async fn settle(&mut self, peer: Option<&mut Peer>) {
        let mut peer = peer;
        let mut idle = 0;
        for _ in 0..10_000 {
            if let Err(e) = self.owner.step_background().await {
                let generation = self.owner.generation;
                self.owner.link_failed(generation, e);
            }
            if let Some(p) = peer.as_deref_mut() {
                p.read().await;
            }
            let next = tokio::select! {
                biased;
                Some(e) = self.owner.events.recv() => Some(Next::Event(e)),
                Some((op, r)) = self.owner.engine.next(), if !self.owner.engine.is_empty() => Some(Next::Local(op, r)),
                _ = tokio::time::sleep(Duration::from_millis(1)) => None,
            };
            match next {
                Some(Next::Event(e)) => self.owner.on_event(e).await,
                Some(Next::Local(op, r)) => self.owner.on_local(op, r),
                _ => {
                    idle += 1;
                    if idle > 3 {
                        break;
                    }
                }
            }
            self.after_step();
        }
    }

    async fn write(&mut self, lba: u64, fua: bool) -> oneshot::Receiver<Result<u64>> {
        let (reply, rx) = oneshot::channel();
        let data = Bytes::from(vec![lba as u8 + 1; BLOCK_BYTES_U64 as usize]);
        self.owner.on_command(Command::Write { offset: lba * BLOCK_BYTES_U64, data, fua, reply }).await;
        self.after_step();
        rx
    }

    async fn flush(&mut self) -> oneshot::Receiver<Result<u64>> {
        let (reply, rx) = oneshot::channel();
        self.owner.on_command(Command::Flush { reply }).await;
        self.after_step();
        rx
    }

    /// A link up and resynced: the peer (empty, sharing nothing) takes a full sync that finds
    /// nothing to ship, commits, and answers the confirming ping.
    async fn in_sync(&mut self) -> (u64, Peer) {
        let (generation, mut peer) = self.link_up(0, 0).await;
        self.settle(Some(&mut peer)).await;
        let commit =
            peer.got.iter().find_map(|f| if let Frame::ResyncCommit { tag, .. } = f { Some(*tag) } else { None });
        assert_eq!(commit, Some(self.owner.next_tag - 1), "{:?}", peer.got);
        peer.ack(self.owner.next_tag - 1, self.owner.next_tag - 1).await;
        self.settle(Some(&mut peer)).await;
        assert!(self.peer().in_sync, "{:?}", self.peer());
        (generation, peer)
    }
}

fn pending<T>(rx: &mut oneshot::Receiver<T>) -> bool {
    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

#[tokio::test(start_paused = true)]
async fn a_write_is_answered_only_once_both_logs_have_it() {
    let mut h = harness(Policy::Strict).await;
    let (_, mut peer) = h.in_sync().await;
    let mut w = h.write(1, false).await;
    h.settle(Some(&mut peer)).await;
    assert_eq!(peer.writes(), [(1, false)], "streamed at once");
    assert!(pending(&mut w), "answered before the peer had it");
    peer.ack(1, 0).await;
    h.settle(Some(&mut peer)).await;
    assert_eq!(w.try_recv().unwrap().unwrap(), 1);

    // A FUA write needs the peer's durability, not only its log.
    let mut w = h.write(2, true).await;
    peer.ack(2, 1).await;
    h.settle(Some(&mut peer)).await;
    assert!(pending(&mut w), "a FUA write answered before the peer made it durable");
    peer.ack(2, 2).await;
    h.settle(Some(&mut peer)).await;
    assert_eq!(w.try_recv().unwrap().unwrap(), 2);
}

/// A full sync ships a volume scattered by its writes in the order its blocks lie in the log: in
/// passes of `ORDER_BLOCKS_MAX` blocks (256 here, a quarter of the volume), each sorted off the
/// loop (past `SORT_INLINE_MAX`), every block once with its data; then the commit.
#[tokio::test(start_paused = true)]
async fn a_full_sync_ships_blocks_in_log_order_pass_by_pass() {
    let mut h = harness(Policy::Strict).await;
    let n = VOL / BLOCK_BYTES_U64;
    // Every block written once, in a scattered order (389 is prime to 1024): the log holds them so.
    let written: Vec<u64> = (0..n).map(|i| i * 389 % n).collect();
    let fill = |lba: u64| (lba % 251) as u8 + 1;
    for &lba in &written {
        let data = Bytes::from(vec![fill(lba); BLOCK_BYTES_U64 as usize]);
        h.owner.store.write(h.owner.volume, lba * BLOCK_BYTES_U64, data, false).await.unwrap();
    }
    let (_, mut peer) = h.link_up(0, 0).await;
    h.settle(Some(&mut peer)).await;
    let mut shipped = Vec::new();
    for f in &peer.got {
        if let Frame::WriteBlocks { lbas, data, .. } = f {
            assert_eq!(data.len(), lbas.len() * BLOCK_BYTES_U64 as usize);
            for (lba, block) in lbas.iter().zip(data.chunks(BLOCK_BYTES_U64 as usize)) {
                assert!(block.iter().all(|&b| b == fill(*lba)), "block {lba}");
                shipped.push(*lba);
            }
        }
    }
    let pass = ORDER_BLOCKS_MAX;
    let expected: Vec<u64> =
        (0..n / pass).flat_map(|p| written.iter().copied().filter(move |lba| lba / pass == p)).collect();
    assert_eq!(shipped, expected, "each pass in the order the blocks were written");
    assert!(peer.got.iter().any(|f| matches!(f, Frame::ResyncCommit { .. })), "committed");
    assert_eq!(h.peer().resync_bytes_shipped, VOL);
}

#[tokio::test(start_paused = true)]
async fn peer_returns_during_resync() {
    let mut h = harness(Policy::Strict).await;
    let (g1, mut p1) = h.in_sync().await;
    // The link dies with a FUA write in flight: it waits through the outage.
    let mut w = h.write(5, true).await;
    h.settle(Some(&mut p1)).await;
    h.owner.on_event(Event::LinkDown(g1, ReplError::Stopped("the peer closed the connection".into()))).await;
    h.after_step();
    assert!(!h.peer().connected && !h.peer().in_sync);
    assert!(pending(&mut w));
    // A late frame of the dead link changes nothing.
    h.owner.on_event(Event::Frame(g1, Frame::Ack { applied: 99, durable: 99 })).await;
    h.after_step();
    assert!(pending(&mut w) && h.peer().durable < 99);

    // The peer returns; the resync is interrupted by yet another outage before it commits.
    let (g2, mut p2) = h.link_up(0, 0).await;
    p2.pong = false;
    h.settle(Some(&mut p2)).await;
    assert!(p2.got.iter().any(|f| matches!(f, Frame::ResyncCommit { .. })));
    h.owner.on_event(Event::LinkDown(g2, ReplError::Stopped("reset".into()))).await;
    h.after_step();
    assert!(pending(&mut w), "answered without a committed resync");

    // The third link resyncs to the end: the write is answered once the commit is confirmed.
    let (_, mut p3) = h.link_up(0, 0).await;
    h.settle(Some(&mut p3)).await;
    assert!(pending(&mut w), "answered before the peer confirmed the commit");
    p3.ack(1, 1).await;
    h.settle(Some(&mut p3)).await;
    assert_eq!(w.try_recv().unwrap().unwrap(), 1);
    assert_eq!(h.peer().resyncs, 3);
}

#[tokio::test(start_paused = true)]
async fn witness_disk_failure_does_not_depose() {
    let mut h = harness(Policy::Degrade).await;
    let storage = ReplError::refused(Refusal::WitnessStorage, "witness cannot record decisions: disk full");
    h.owner.on_witness(Ask::Report, Err(storage));
    // Neither does a refusal naming this node's own epoch, nor an older one.
    for epoch in [Epoch(EPOCH.0 - 1), EPOCH] {
        h.owner.on_witness(Ask::Report, Err(ReplError::refused(Refusal::Deposed { epoch }, "stale")));
    }
    h.after_step();
    assert_eq!(h.peer().deposed, None);
    // A newer epoch does.
    h.owner.on_witness(Ask::Report, Err(ReplError::refused(Refusal::Deposed { epoch: EPOCH.next() }, "b is primary")));
    assert!(h.peer().deposed.is_some_and(|why| why.contains("b is primary")));
}

#[tokio::test(start_paused = true)]
async fn only_a_peer_that_saw_a_newer_epoch_deposes_the_primary() {
    let mut h = harness(Policy::Strict).await;
    let (g, _p) = h.link_up(0, 0).await;
    h.owner.link_failed(g, ReplError::refused(Refusal::Deposed { epoch: EPOCH }, "peer refused: stale epoch"));
    assert_eq!(h.peer().deposed, None);
    assert!(!h.peer().connected);
    let (g, _p) = h.link_up(0, 0).await;
    h.owner.link_failed(
        g,
        ReplError::refused(Refusal::Deposed { epoch: Epoch(EPOCH.0 + 2) }, "peer refused: stale epoch"),
    );
    assert!(h.peer().deposed.is_some());
}

/// A primary whose peer's link fails asks to continue alone one link timeout later, whatever its
/// report timer says: every volume whose link failed with the same node asks at once (a cluster
/// node then sends their requests to etcd together), and none waits for its next report past the
/// timeout. Refused or unanswered, it asks again a witness period later, not in a loop.
#[tokio::test(start_paused = true)]
async fn a_peer_away_for_the_link_timeout_is_met_by_one_request_to_go_on_alone() {
    let mut h = harness(Policy::Degrade).await;
    let (g, _p) = h.link_up(0, 0).await;
    h.owner.timers.report = Instant::now() + Duration::from_secs(3600);
    h.owner.link_failed(g, ReplError::Stopped("the peer closed the connection".into()));
    h.owner.timers.report = Instant::now() + Duration::from_secs(3600);
    let timeout = h.owner.cfg.timeout;
    assert_eq!(h.owner.solo_due(), Some(Instant::now() + timeout), "the loop does not wake for it");
    tokio::time::advance(timeout - Duration::from_millis(1)).await;
    h.owner.on_timers();
    assert!(!h.owner.witness_asking, "asked to go on alone before the link timeout");
    tokio::time::advance(Duration::from_millis(1)).await;
    h.owner.on_timers();
    assert!(h.owner.witness_asking, "no request to go on alone at the link timeout");
    // Unanswered: not asked again before a witness period has passed.
    h.owner.witness_asking = false;
    h.owner.on_timers();
    assert!(!h.owner.witness_asking, "asked again at once");
    tokio::time::advance(h.owner.witness_period).await;
    h.owner.on_timers();
    assert!(h.owner.witness_asking, "not asked again after a witness period");
}

#[tokio::test(start_paused = true)]
async fn solo_ends_when_its_lease_runs_out() {
    let mut h = harness(Policy::Degrade).await;
    let lease = Duration::from_millis(500);
    let grant = Grant { epoch: EPOCH, primary: "a".into(), solo: true, lease, valid_until: Instant::now() + lease };
    h.owner.on_witness(Ask::Solo, Ok(grant));
    h.after_step();
    assert!(h.peer().solo);
    // No peer at all: a write is answered alone, with the witness's consent.
    let mut w = h.write(1, true).await;
    h.settle(None).await;
    assert_eq!(w.try_recv().unwrap().unwrap(), 1);
    // The lease runs out with no answer from the witness: writes wait again.
    tokio::time::advance(lease).await;
    h.owner.on_timers();
    h.owner.witness_asking = false;
    h.after_step();
    assert!(!h.peer().solo);
    let mut w = h.write(2, false).await;
    h.settle(None).await;
    assert!(pending(&mut w), "answered alone after the lease ran out");
}

#[tokio::test(start_paused = true)]
async fn a_checksum_reply_that_does_not_match_its_request_ends_the_link() {
    let mut h = harness(Policy::Strict).await;
    let (g, mut peer) = h.link_up(0, 0).await;
    peer.pong = false;
    // Let the plan arrive and the first requests go out, without answering them.
    for _ in 0..20 {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), h.owner.events.recv()).await {
            h.owner.on_event(e).await;
        }
        let _ = h.owner.step_background().await;
        h.after_step();
    }
    let (&id, &ByteRange { offset, .. }) = h.owner.crc_asked.iter().next().expect("a checksum request");
    h.owner.on_event(Event::Frame(g, Frame::CrcReply { id, offset, crcs: vec![None; 3] })).await;
    h.after_step();
    let v = h.peer();
    assert!(!v.connected, "{v:?}");
    assert!(v.last_error.is_some_and(|e| e.contains("asked")));
    assert!(h.owner.resync.is_none() && h.owner.crc_asked.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_commit_loop_flush_needs_no_frame_once_the_peer_made_the_write_durable() {
    let mut h = harness(Policy::Strict).await;
    let (_, mut peer) = h.in_sync().await;
    // A database committing: write, flush, write, flush... After two such rounds the writes go
    // to the peer as FUA, and its acknowledgement already covers the flush that follows.
    for k in 1..=4u64 {
        let mut w = h.write(k, false).await;
        h.settle(Some(&mut peer)).await;
        let fua = peer.writes().last().unwrap().1;
        peer.ack(k, if fua { k } else { k - 1 }).await;
        h.settle(Some(&mut peer)).await;
        assert_eq!(w.try_recv().unwrap().unwrap(), k);
        let flushes = peer.flushes();
        let mut f = h.flush().await;
        h.settle(Some(&mut peer)).await;
        if peer.flushes() > flushes {
            peer.ack(k, k).await;
            h.settle(Some(&mut peer)).await;
        } else {
            assert!(fua, "a flush without a frame before the peer had the write durably");
        }
        assert_eq!(f.try_recv().unwrap().unwrap(), k);
    }
    let fua: Vec<bool> = peer.writes().iter().map(|w| w.1).collect();
    assert_eq!(fua, [false, false, true, true], "the commit loop was not recognised");
    assert_eq!(peer.flushes(), 2, "flushes after FUA writes sent a frame");
}

/// Bytes of data in the `Write` and `WriteBlocks` frames of `frames`.
fn write_bytes(frames: &[Frame]) -> u64 {
    frames
        .iter()
        .map(|f| match f {
            Frame::Write { data, .. } | Frame::WriteBlocks { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

/// The primary holds 3 MiB the (empty) peer lacks.
async fn three_mib_to_resync(h: &Harness) {
    let (store, volume) = (h.owner.store.clone(), h.owner.volume);
    for k in 0..3u64 {
        store.write(volume, k << 20, Bytes::from(vec![k as u8 + 1; 1 << 20]), false).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_resync_yields_to_a_busy_volume_and_goes_on_as_the_peer_confirms() {
    let mut h = harness(Policy::Strict).await;
    three_mib_to_resync(&h).await;
    // A client write waits (the peer never acknowledges it): the volume is busy throughout.
    let mut w = h.write(1000, false).await;
    let (_, mut peer) = h.link_up(0, 0).await;
    peer.pong = false;
    let mut confirmed = 0;
    for round in 0..10 {
        h.settle(Some(&mut peer)).await;
        let unconfirmed = write_bytes(&peer.got[confirmed..]);
        assert!(unconfirmed <= RESYNC_UNCONFIRMED_BUSY_MAX, "round {round}: {unconfirmed} bytes unconfirmed");
        if peer.got.iter().any(|f| matches!(f, Frame::ResyncCommit { .. })) {
            assert!(round >= 3, "3 MiB shipped in {round} round trips");
            assert_eq!(write_bytes(&peer.got), (3 << 20) + BLOCK_BYTES_U64, "everything, once");
            assert!(pending(&mut w));
            return;
        }
        // The peer confirms everything it has so far.
        let (k, nonce) = peer
            .got
            .iter()
            .enumerate()
            .rev()
            .find_map(|(k, f)| if let Frame::Ping { nonce, .. } = f { Some((k, *nonce)) } else { None })
            .expect("each resync step ends with a ping");
        peer.send(Frame::Pong { nonce }).await;
        confirmed = k + 1;
    }
    panic!("the resync never committed: {} bytes shipped", write_bytes(&peer.got));
}

#[tokio::test(start_paused = true)]
async fn a_resync_of_an_idle_volume_does_not_wait_for_confirmations() {
    let mut h = harness(Policy::Strict).await;
    three_mib_to_resync(&h).await;
    let (_, mut peer) = h.link_up(0, 0).await;
    peer.pong = false;
    h.settle(Some(&mut peer)).await;
    assert_eq!(write_bytes(&peer.got), 3 << 20);
    assert!(peer.got.iter().any(|f| matches!(f, Frame::ResyncCommit { .. })), "not committed");
    const { assert!(3 << 20 <= RESYNC_UNCONFIRMED_MAX) };
}

#[tokio::test(start_paused = true)]
async fn a_resync_takes_only_what_the_nodes_other_copies_leave() {
    // The node's other volumes hold all but 1 MiB of the shared resync bytes.
    let shared = Arc::new(tokio::sync::Semaphore::new(crate::RESYNC_NODE_BYTES_MAX as usize));
    let others = shared.clone().try_acquire_many_owned((crate::RESYNC_NODE_BYTES_MAX - (1 << 20)) as u32).unwrap();
    let mut h = harness_sharing(Policy::Strict, shared.clone()).await;
    three_mib_to_resync(&h).await;
    let (_, mut peer) = h.link_up(0, 0).await;
    peer.pong = false;
    h.settle(Some(&mut peer)).await;
    assert_eq!(write_bytes(&peer.got), 1 << 20, "an idle volume's copy beyond the node's bound");
    assert_eq!(shared.available_permits(), 0);
    // The others finish: the copy goes on, and once the peer confirmed it all, holds nothing.
    drop(others);
    h.settle(Some(&mut peer)).await;
    assert_eq!(write_bytes(&peer.got), 3 << 20);
    let nonce = peer.got.iter().rev().find_map(|f| if let Frame::Ping { nonce, .. } = f { Some(*nonce) } else { None });
    peer.send(Frame::Pong { nonce: nonce.unwrap() }).await;
    h.settle(Some(&mut peer)).await;
    assert_eq!(shared.available_permits() as u64, crate::RESYNC_NODE_BYTES_MAX);
}

/// An idle volume's loop wakes for its timers (heartbeats every 125 ms, the floor, the warning
/// check), not every `PUBLISH_EVERY`: a quiet timer turn that publishes a deferred status sets no
/// new deadline. Before, each such turn deferred the next publish, and an idle volume woke every
/// 2 ms for ever (5,000 turns in 10 s).
#[tokio::test(start_paused = true)]
async fn an_idle_primary_wakes_for_its_timers_only() {
    let mut h = harness(Policy::Strict).await;
    let (_, mut peer) = h.in_sync().await;
    let Harness { owner, _parts: parts } = h;
    let turns = owner.turns.clone();
    let task = tokio::spawn(owner.run());
    // A write and its answer first: busy turns, a publish deferred.
    let (reply, rx) = oneshot::channel();
    let data = Bytes::from(vec![7u8; BLOCK_BYTES_U64 as usize]);
    parts.commands.send((Instant::now(), Command::Write { offset: 0, data, fua: false, reply })).await.unwrap();
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        peer.read().await;
        if let Some(tag) = peer.writes().last().map(|w| w.0) {
            peer.ack(tag, tag).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rx.await.expect("answered").expect("the write succeeded");
    let before = turns.load(std::sync::atomic::Ordering::Relaxed);
    // Then 10 s idle, the peer answering heartbeats.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        peer.read().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = turns.load(std::sync::atomic::Ordering::Relaxed) - before;
    // 80 heartbeats and their pongs, ~100 floor and warning checks: a few hundred.
    assert!(idle < 1_000, "{idle} turns of the loop in 10 s idle");
    assert!(idle >= 80, "{idle} turns: the heartbeats did not run");
    let _ = parts.stop.send(true);
    task.await.unwrap();
}

/// Lets `d` pass, the peer reading and answering pings.
async fn idle_for(peer: &mut Peer, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        peer.read().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On a node link that beats on its own, a primary with nothing to send pings once a second
/// (`QUIET_EVERY`), not every heartbeat; its first write brings the heartbeat back at once.
#[tokio::test(start_paused = true)]
async fn a_quiet_primary_on_a_beating_link_pings_once_a_second_until_it_writes() {
    let mut h = harness_on(Policy::Strict, ReplConfig::default().resync_bytes, Arc::new(Beating)).await;
    let heartbeat = h.owner.cfg.heartbeat;
    let (_, mut peer) = h.in_sync().await;
    let Harness { owner, _parts: parts } = h;
    let task = tokio::spawn(owner.run());
    let pings = |p: &Peer| p.got.iter().filter(|f| matches!(f, Frame::Ping { nonce, .. } if *nonce > 0)).count();
    // The first seconds settle (the floor the sync left is told once); then 10 s quiet.
    idle_for(&mut peer, Duration::from_secs(3)).await;
    let before = pings(&peer);
    idle_for(&mut peer, Duration::from_secs(10)).await;
    let quiet = pings(&peer) - before;
    assert!((9..=11).contains(&quiet), "{quiet} pings in 10 s quiet (one a second expected; 80 at the heartbeat)");
    // Right after a quiet ping, a write: the next ping follows within a heartbeat, not a second
    // later; then the volume is quiet again.
    let n = pings(&peer);
    while pings(&peer) == n {
        peer.read().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (reply, rx) = oneshot::channel();
    let data = Bytes::from(vec![7u8; BLOCK_BYTES_U64 as usize]);
    parts.commands.send((Instant::now(), Command::Write { offset: 0, data, fua: true, reply })).await.unwrap();
    let sent = Instant::now();
    let n = pings(&peer);
    let mut first = None;
    while first.is_none() && Instant::now() < sent + Duration::from_secs(2) {
        peer.read().await;
        if let Some(t) = peer.writes().last().map(|w| w.0) {
            peer.ack(t, t).await;
        }
        if pings(&peer) > n {
            first = Some(sent.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rx.await.expect("answered").expect("the write succeeded");
    let first = first.expect("a ping after the write");
    assert!(first <= heartbeat + Duration::from_millis(20), "the first ping came {first:?} after the write");
    idle_for(&mut peer, Duration::from_secs(1)).await;
    let before = pings(&peer);
    idle_for(&mut peer, Duration::from_secs(5)).await;
    let quiet = pings(&peer) - before;
    assert!((4..=6).contains(&quiet), "{quiet} pings in 5 s quiet again after the write");
    let _ = parts.stop.send(true);
    task.await.unwrap();
}
