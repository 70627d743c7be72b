//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use syncblock_engine::sim::{SimDevice, SimDisk};
use syncblock_engine::{Config, Store};

/// A formatted simulated disk of `n_segments` segments of `segment_blocks` blocks.
pub fn sim_disk(device_bytes: usize, segment_bytes: u64) -> Arc<Mutex<SimDisk>> {
    let disk = SimDisk::formatted(device_bytes, segment_bytes).expect("format");
    {
        let mut d = disk.lock().unwrap();
        d.base = d.written.clone();
        d.log.clear();
    }
    disk
}

pub fn open_sim(disk: &Arc<Mutex<SimDisk>>, cfg: Config) -> syncblock_engine::Result<Store> {
    Store::open_device(Box::new(SimDevice::new(disk.clone())), cfg, "sim")
}

pub fn rt() -> tokio::runtime::Runtime {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Deterministic block content identifying (tag, lba).
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}
