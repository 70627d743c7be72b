//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use syncblock_engine::sim::{Rng, SimDevice, SimDisk};
use syncblock_engine::{Config, Store, VolumeInfo};

/// A simulated disk of `device_bytes` with a store formatted on it in segments of `segment_bytes`; the
/// formatted image is the base that crash images start from.
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

/// A store with the default config on a fresh `sim_disk` of `device_bytes` in 1 MiB segments, and
/// its one volume, "v", of `volume_bytes`: where most scenarios start.
pub fn sim_volume(
    rt: &tokio::runtime::Runtime,
    device_bytes: usize,
    volume_bytes: u64,
) -> (Arc<Mutex<SimDisk>>, Store, VolumeInfo) {
    let disk = sim_disk(device_bytes, 1 << 20);
    let store = open_sim(&disk, Config::default()).unwrap();
    let vol = rt.block_on(store.create_volume("v", volume_bytes)).unwrap();
    (disk, store, vol)
}

/// Stops a store without its shutdown checkpoint (every later device write fails), leaving the log
/// as the only record of recent writes, as after a crash once everything was flushed; the image.
pub fn crash(store: Store, disk: &Arc<Mutex<SimDisk>>) -> Vec<u8> {
    let image = disk.lock().unwrap().written.clone();
    disk.lock().unwrap().fail_writes_from = Some(0);
    drop(store);
    image
}

/// Opens a store image (recovery runs) on a simulated disk of its own.
pub fn open_image(image: Vec<u8>) -> (Arc<Mutex<SimDisk>>, syncblock_engine::Result<Store>) {
    let disk = SimDisk::new(image);
    let store = Store::open_device(Box::new(SimDevice::new(disk.clone())), Config::default(), "img");
    (disk, store)
}

/// This test binary re-executed to run only its test `test` (sled's crash tests re-run their own
/// binary this way): stdin closed, stdout and stderr into `out`, no backtraces. The caller adds
/// the environment that tells the test it is the child.
pub fn child_test_command(test: &str, out: File) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
    cmd
}

pub fn rt() -> tokio::runtime::Runtime {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Deterministic content identifying `tag`: `len` bytes drawn from the simulator's seeded `Rng`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(tag);
    let mut v: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    v.truncate(len);
    v
}
