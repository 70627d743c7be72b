//! Helpers shared by the replicator's loopback tests: stores on files, replication settings, test
//! data, volume images, waiting for a peer to be in sync.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use syncblock_engine::{Config, CreateOptions, Store, BLOCK_BYTES};
use syncblock_replicator::{Primary, ReplConfig, Secondary};

/// A store file of `store_bytes` in `dir` holding one volume "v" of `vol_bytes`. Blocking: call it
/// from `spawn_blocking` inside a runtime.
pub fn store(dir: &Path, name: &str, store_bytes: u64, vol_bytes: u64) -> Store {
    let s = Store::create(
        &dir.join(name),
        &CreateOptions { size_bytes: store_bytes, ..CreateOptions::default() },
        Config::default(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(s.create_volume("v", vol_bytes)).unwrap();
    s
}

/// Two such stores, "a.img" and "b.img".
pub async fn two_stores(dir: &Path, store_bytes: u64, vol_bytes: u64) -> (Store, Store) {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        (store(&d, "a.img", store_bytes, vol_bytes), store(&d, "b.img", store_bytes, vol_bytes))
    })
    .await
    .unwrap()
}

/// Replication settings with short timings, for node `node`.
pub fn cfg(node: &str, timeout: Duration) -> ReplConfig {
    ReplConfig {
        node: node.into(),
        heartbeat: Duration::from_millis(100),
        timeout,
        reconnect: Duration::from_millis(50),
        ..ReplConfig::default()
    }
}

/// A secondary "b" for volume "v" of `b`, accepting its primary on `bind` (port 0: any).
pub async fn start_secondary(b: &Store, bind: SocketAddr, timeout: Duration) -> Secondary {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    Secondary::start(b.clone(), "v", syncblock_replicator::net::tcp_listener(listener), cfg("b", timeout))
        .await
        .unwrap()
}

/// A pair on loopback: `a` primary ("a"), `b` secondary ("b"), volume "v", no witness.
pub async fn start_pair(a: &Store, b: &Store, timeout: Duration) -> (Primary, Secondary) {
    let sec = start_secondary(b, "127.0.0.1:0".parse().unwrap(), timeout).await;
    let prim = Primary::start(a.clone(), "v", sec.local_addr(), cfg("a", timeout), None).await.unwrap();
    (prim, sec)
}

/// `len` bytes of data identified by `seed`.
pub fn data(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

/// One block of data identified by `seed`.
pub fn block(seed: u64) -> Bytes {
    data(seed, BLOCK_BYTES)
}

/// The whole of volume "v".
pub async fn image(s: &Store) -> Vec<u8> {
    let v = s.volume("v").await.unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < v.size_bytes {
        out.extend_from_slice(&s.read(v.id, at, (4 << 20).min(v.size_bytes - at)).await.unwrap());
        at += 4 << 20;
    }
    out
}

pub async fn wait_in_sync(p: &Primary) {
    let mut w = p.peer_view();
    tokio::time::timeout(Duration::from_secs(20), w.wait_for(|v| v.in_sync)).await.expect("peer in sync").unwrap();
}

/// An address nothing listens on yet.
pub async fn free_addr() -> SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
