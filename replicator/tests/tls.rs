//! The replication link under TLS (PSK, written here; the X.509 case runs through the binary in
//! nbd-server/tests/tls_pair.rs): a pair mirrors writes over it; a peer with the wrong key, or one
//! that proves one name and calls itself another, never becomes the secondary's primary.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use syncblock_engine::Store;
use syncblock_replicator::net::{tcp, tcp_listener, tls_listener, TlsNet};
use syncblock_replicator::tls::{Tls, TlsFiles};
use syncblock_replicator::{Primary, ReplConfig, Secondary};

const TIMEOUT: Duration = Duration::from_millis(1000);

fn psk_file(dir: &Path, name: &str, a_key: &str) -> TlsFiles {
    let path = dir.join(name);
    std::fs::write(&path, format!("a:{a_key}\nb:{}\n", "b2".repeat(32))).unwrap();
    TlsFiles { psk: Some(path), ..TlsFiles::default() }
}

async fn secondary(b: &syncblock_engine::Store, tls: Arc<Tls>) -> Secondary {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Secondary::start(b.clone(), "v", tls_listener(tcp_listener(l), tls), cfg("b", TIMEOUT)).await.unwrap()
}

/// A primary of `a`'s volume named `node` in its hello, connecting to `sec` over TLS as PSK
/// identity `identity` with the keys of `files`.
async fn tls_primary(a: &Store, sec: &Secondary, node: &str, files: &TlsFiles, identity: &str) -> Primary {
    let cfg = ReplConfig { net: TlsNet::over(tcp(), Tls::load(files, Some(identity)).unwrap()), ..cfg(node, TIMEOUT) };
    Primary::start(a.clone(), "v", sec.local_addr(), cfg, None).await.unwrap()
}

async fn in_sync_within(p: &Primary, max: Duration) -> bool {
    let mut w = p.peer_view();
    let synced = tokio::time::timeout(max, w.wait_for(|v| v.in_sync)).await.is_ok();
    synced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_mirrors_writes_over_psk_tls() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, 64 << 20).await;
    let files = psk_file(dir.path(), "keys.psk", &"a1".repeat(32));
    let sec = secondary(&b, Tls::load(&files, Some("b")).unwrap()).await;
    let prim = tls_primary(&a, &sec, "a", &files, "a").await;
    wait_in_sync(&prim).await;
    for k in 0..200u64 {
        prim.write(k * 8192, block(k), k % 7 == 0).await.unwrap();
    }
    prim.flush().await.unwrap();
    assert_eq!(image(&a).await, image(&b).await, "the secondary differs after writes over TLS");
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_a_false_name_never_reaches_the_secondary() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, 64 << 20).await;
    let files = psk_file(dir.path(), "keys.psk", &"a1".repeat(32));
    let sec = secondary(&b, Tls::load(&files, Some("b")).unwrap()).await;

    // Knows a key for "a", but not the right one.
    let wrong = psk_file(dir.path(), "wrong.psk", &"ff".repeat(32));
    let prim = tls_primary(&a, &sec, "a", &wrong, "a").await;
    assert!(!in_sync_within(&prim, Duration::from_secs(3)).await, "a primary with a wrong key got in sync");
    prim.stop();

    // Proves it is "a" (the right key) but says "b" in its hello.
    let liar = tls_primary(&a, &sec, "b", &files, "a").await;
    assert!(!in_sync_within(&liar, Duration::from_secs(3)).await, "a peer calling itself another name got in sync");
    liar.stop();

    // The real "a" is served as ever.
    let prim = tls_primary(&a, &sec, "a", &files, "a").await;
    assert!(in_sync_within(&prim, Duration::from_secs(20)).await, "the real primary was refused");
    prim.stop();
    sec.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_names_its_peer_refuses_every_other_node() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_stores(dir.path(), 256 << 20, 64 << 20).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sec_cfg = ReplConfig { peer_node: Some("a".into()), ..cfg("b", TIMEOUT) };
    let sec = Secondary::start(b.clone(), "v", tcp_listener(l), sec_cfg).await.unwrap();
    let other = Primary::start(a.clone(), "v", sec.local_addr(), cfg("c", TIMEOUT), None).await.unwrap();
    assert!(!in_sync_within(&other, Duration::from_secs(3)).await, "a node other than the named peer got in sync");
    other.stop();
    let prim = Primary::start(a.clone(), "v", sec.local_addr(), cfg("a", TIMEOUT), None).await.unwrap();
    assert!(in_sync_within(&prim, Duration::from_secs(20)).await, "the named peer was refused");
    prim.stop();
    sec.stop().await;
}

/// A witness with a list of nodes (`--allow a,b --allow c,d`) refuses every other identity its
/// credentials prove, serves the listed ones, and keeps each pair's nodes out of the other pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_with_a_node_list_refuses_every_other_identity_and_other_pairs_nodes() {
    use syncblock_engine::Epoch;
    use syncblock_replicator::wire::{Frame, Refusal};
    use syncblock_replicator::witness::{ask, run, Allow, Link};
    use syncblock_replicator::ReplError;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.psk");
    let keys: String = ["a", "b", "c", "d", "e"].iter().map(|n| format!("{n}:{}\n", "a1".repeat(32))).collect();
    std::fs::write(&path, keys).unwrap();
    let files = TlsFiles { psk: Some(path), ..TlsFiles::default() };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let listener = tls_listener(tcp_listener(l), Tls::load(&files, None).unwrap());
    let allow = Allow::parse(&["a,b", "c,d"]).unwrap();
    let witness = tokio::spawn(run(listener, dir.path().join("w.state"), Duration::from_secs(1), allow));
    let report = |pair: u64, node: &str| Frame::WitnessReport {
        pair,
        volume: "v".into(),
        node: node.into(),
        epoch: Epoch(1),
        in_sync: true,
    };
    let as_node = |node: &str| TlsNet::over(tcp(), Tls::load(&files, Some(node)).unwrap());
    let refused = |r: Result<_, ReplError>, what: &str| match r {
        Err(ReplError::Refused { why: Refusal::Protocol, reason }) => {
            assert!(reason.contains(what), "{reason}")
        }
        other => panic!("answered instead of refused ({what}): {other:?}"),
    };

    // e proves its name, but is not on the list: refused before any decision.
    let e = as_node("e");
    refused(
        ask(&*e, &Link::default(), addr, &report(7, "e"), TIMEOUT * 5).await,
        "not on this witness's list of nodes",
    );
    // a is on it: its report registers pair 7; c registers pair 8.
    let a = as_node("a");
    let grant = ask(&*a, &Link::default(), addr, &report(7, "a"), TIMEOUT * 5).await.expect("a listed node is served");
    assert_eq!(grant.primary, "a");
    let c = as_node("c");
    let grant = ask(&*c, &Link::default(), addr, &report(8, "c"), TIMEOUT * 5).await.expect("c's own pair");
    assert_eq!(grant.primary, "c");
    // c cannot take pair 7 over, even forced: it is the other pair's node.
    let promote = |node: &str, force: bool| Frame::WitnessPromote {
        pair: 7,
        volume: "v".into(),
        node: node.into(),
        epoch: Epoch(1),
        consistent: true,
        force,
        reclaim: false,
    };
    refused(ask(&*c, &Link::default(), addr, &promote("c", true), TIMEOUT * 5).await, "may act only in its own pair");
    // b, a's partner, is heard: while a reports, the witness's rules (not the list) refuse it.
    let b = as_node("b");
    match ask(&*b, &Link::default(), addr, &promote("b", false), TIMEOUT * 5).await {
        Err(ReplError::Refused { why, .. }) => assert_ne!(why, Refusal::Protocol, "b was refused by the list"),
        other => panic!("b took over a live primary: {other:?}"),
    }
    witness.abort();
}
