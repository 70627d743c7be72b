//! A simulated device for tests: it keeps what was *written* (what reads see, the page cache)
//! apart from what is *durable* (what survives a power cut), logs every write and sync, can build
//! the disk image a power cut would leave after any prefix of that log (with unsynced writes
//! dropped, kept or torn at 512-byte sectors, chosen by a seed), and can fail chosen writes or syncs.
//! A `durable` write (FUA) survives a power cut once it completed, and makes nothing else durable:
//! writes completed before it stay as uncertain as ever.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use crate::buf::AlignedBuf;
use crate::device::{Completion, Device, IoKind, IoOp};

/// One logged device operation.
#[derive(Debug, Clone)]
pub enum LoggedOp {
    Write { offset: u64, data: Vec<u8>, durable: bool },
    Sync,
}

/// Shared state of a simulated disk; tests keep an `Arc` to inspect it while the engine runs.
#[derive(Debug)]
pub struct SimDisk {
    /// What reads return.
    pub written: Vec<u8>,
    /// The image the log started from.
    pub base: Vec<u8>,
    /// Every write and sync since `base`, in execution order.
    pub log: Vec<LoggedOp>,
    /// Fail the write with this index (counting writes from 0) with EIO, and every later one.
    pub fail_writes_from: Option<u64>,
    /// Fail the sync with this index (counting syncs from 0), and every later one.
    pub fail_syncs_from: Option<u64>,
    /// Fail reads of this device byte range with EIO.
    pub fail_reads_in: Option<(u64, u64)>,
    pub n_writes: u64,
    pub n_syncs: u64,
}

impl SimDisk {
    pub fn new(image: Vec<u8>) -> Arc<Mutex<SimDisk>> {
        Arc::new(Mutex::new(SimDisk {
            written: image.clone(),
            base: image,
            log: Vec::new(),
            fail_writes_from: None,
            fail_syncs_from: None,
            fail_reads_in: None,
            n_writes: 0,
            n_syncs: 0,
        }))
    }

    /// A zeroed disk of `device_bytes` with a new store formatted on it (segments of
    /// `segment_bytes`), ready for [`crate::Store::open_device`]: the start of most tests. The
    /// format's writes are in the log.
    pub fn formatted(device_bytes: usize, segment_bytes: u64) -> crate::Result<Arc<Mutex<SimDisk>>> {
        let disk = SimDisk::new(vec![0u8; device_bytes]);
        crate::Store::format_device(&mut SimDevice::new(disk.clone()), segment_bytes)?;
        Ok(disk)
    }

    /// Number of logged operations: the I/O boundaries at which a crash can be simulated.
    pub fn n_ops(&self) -> usize {
        self.log.len()
    }

    /// The image a power cut leaves after the first `n_ops` logged operations. Writes followed by a
    /// sync, and durable writes, are durable; every other write is, per seed, lost, kept, or torn
    /// sector by sector.
    pub fn crash_image(&self, n_ops: usize, seed: u64) -> Vec<u8> {
        let mut image = self.base.clone();
        let mut unsynced: Vec<Unsynced<'_>> = Vec::new();
        for op in &self.log[..n_ops] {
            match op {
                LoggedOp::Write { offset, data, durable } => {
                    unsynced.push(Unsynced { offset: *offset, data, durable: *durable })
                }
                LoggedOp::Sync => {
                    for w in unsynced.drain(..) {
                        image[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(w.data);
                    }
                }
            }
        }
        apply_unsynced(&mut image, &unsynced, &mut Rng::new(seed));
        image
    }

    /// The image after every logged write, all durable (a clean power-off after a final sync).
    pub fn durable_image(&self) -> Vec<u8> {
        self.written.clone()
    }
}

/// A write issued after the last sync, as a power cut finds it.
#[derive(Debug, Clone, Copy)]
pub struct Unsynced<'a> {
    pub offset: u64,
    pub data: &'a [u8],
    /// Written durably (FUA): always kept.
    pub durable: bool,
}

/// Applies, in order, writes issued since the last sync to a power-cut image: a durable one is
/// kept; each other one is, by `rng`, lost, kept whole, or torn (each 512-byte sector kept or lost
/// independently).
pub fn apply_unsynced(image: &mut [u8], writes: &[Unsynced<'_>], rng: &mut Rng) {
    for w in writes {
        let (offset, data) = (w.offset as usize, w.data);
        if w.durable {
            image[offset..offset + data.len()].copy_from_slice(data);
            continue;
        }
        match rng.below(3) {
            0 => {}
            1 => image[offset..offset + data.len()].copy_from_slice(data),
            _ => {
                for (i, sector) in data.chunks(512).enumerate() {
                    if rng.below(2) == 0 {
                        let at = offset + i * 512;
                        image[at..at + sector.len()].copy_from_slice(sector);
                    }
                }
            }
        }
    }
}

/// A tiny deterministic PRNG (splitmix64) so that a seed replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The [`Device`] over a [`SimDisk`]. Ops execute at `wait`, optionally in a seeded random order.
pub struct SimDevice {
    disk: Arc<Mutex<SimDisk>>,
    queued: Vec<IoOp>,
    done: VecDeque<Completion>,
    reorder: Option<Rng>,
    len: u64,
    /// With latency: the longest an op takes, the draw of each wait's delay, and when the ops
    /// queued now may complete.
    latency: Option<(std::time::Duration, Rng)>,
    ready_at: Option<tokio::time::Instant>,
}

impl SimDevice {
    pub fn new(disk: Arc<Mutex<SimDisk>>) -> SimDevice {
        let len = disk.lock().expect("sim disk").written.len() as u64;
        SimDevice { disk, queued: Vec::new(), done: VecDeque::new(), reorder: None, len, latency: None, ready_at: None }
    }

    /// Ops take up to `max` (drawn from `seed`) on the event loop's clock, so that other tasks run
    /// while they are in flight, and a crash taken meanwhile finds them not yet written. Needs the
    /// store's engine on a Tokio runtime with time enabled.
    pub fn with_latency(mut self, max: std::time::Duration, seed: u64) -> SimDevice {
        self.latency = Some((max, Rng::new(seed)));
        self
    }

    /// Whether queued ops may execute now; sets their ready time when they are first waited for.
    fn due(&mut self) -> bool {
        let Some((max, rng)) = &mut self.latency else { return true };
        if self.queued.is_empty() {
            self.ready_at = None;
            return true;
        }
        let now = tokio::time::Instant::now();
        let at = *self.ready_at.get_or_insert_with(|| {
            let us = max.as_micros() as u64;
            now + std::time::Duration::from_micros(us / 4 + rng.below(us - us / 4 + 1))
        });
        if now < at {
            return false;
        }
        self.ready_at = None;
        true
    }

    /// Executes the queued ops (a random part of them, in random order, with reordering).
    fn execute_queued(&mut self) -> io::Result<()> {
        if !self.done.is_empty() || self.queued.is_empty() {
            return Ok(());
        }
        let mut ops = std::mem::take(&mut self.queued);
        if let Some(rng) = &mut self.reorder {
            // Complete a random non-empty subset, in random order; the rest stay in flight.
            for i in (1..ops.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                ops.swap(i, j);
            }
            let keep = rng.below(ops.len() as u64) as usize;
            self.queued = ops.split_off(ops.len() - keep);
        }
        for op in ops {
            let c = self.execute(op);
            self.done.push_back(c);
        }
        Ok(())
    }

    /// Executes the ops queued at each `wait` in an order chosen by `seed`.
    pub fn with_reordering(mut self, seed: u64) -> SimDevice {
        self.reorder = Some(Rng::new(seed));
        self
    }

    fn execute(&mut self, op: IoOp) -> Completion {
        let mut disk = self.disk.lock().expect("sim disk");
        let check = |offset: u64, len: usize, dev_len: u64| -> io::Result<()> {
            if offset % 4096 != 0 || offset + len as u64 > dev_len {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "transfer outside the device"));
            }
            Ok(())
        };
        match op.kind {
            IoKind::Read { offset, mut buf } => {
                let r = check(offset, buf.len(), self.len).and_then(|()| {
                    if let Some((s, e)) = disk.fail_reads_in {
                        if offset < e && offset + buf.len() as u64 > s {
                            return Err(io::Error::from_raw_os_error(libc::EIO));
                        }
                    }
                    let o = offset as usize;
                    let n = buf.len();
                    buf.copy_from_slice(&disk.written[o..o + n]);
                    Ok(())
                });
                Completion { token: op.token, result: r, buf: Some(buf) }
            }
            IoKind::Write { offset, buf, durable } => {
                let idx = disk.n_writes;
                disk.n_writes += 1;
                let r = check(offset, buf.len(), self.len).and_then(|()| {
                    if disk.fail_writes_from.is_some_and(|f| idx >= f) {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                    let o = offset as usize;
                    disk.written[o..o + buf.len()].copy_from_slice(&buf);
                    disk.log.push(LoggedOp::Write { offset, data: buf.to_vec(), durable });
                    Ok(())
                });
                Completion { token: op.token, result: r, buf: Some(buf) }
            }
            IoKind::Sync => {
                let idx = disk.n_syncs;
                disk.n_syncs += 1;
                let r = if disk.fail_syncs_from.is_some_and(|f| idx >= f) {
                    Err(io::Error::from_raw_os_error(libc::EIO))
                } else {
                    disk.log.push(LoggedOp::Sync);
                    Ok(())
                };
                Completion { token: op.token, result: r, buf: None::<AlignedBuf> }
            }
        }
    }
}

impl Device for SimDevice {
    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn submit(&mut self, op: IoOp) {
        self.queued.push(op);
    }

    fn wait(&mut self) -> io::Result<()> {
        // Blocking callers (recovery at open time) cannot let virtual time pass: for them the
        // latency is zero. The event loop reaches ops through `poll`, which honours it.
        self.ready_at = None;
        self.execute_queued()
    }

    fn pop_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    fn poll(&mut self) -> io::Result<()> {
        if !self.due() {
            return Ok(());
        }
        self.execute_queued()
    }

    fn ready_at(&self) -> Option<tokio::time::Instant> {
        if self.queued.is_empty() || !self.done.is_empty() {
            return None;
        }
        self.ready_at
    }
}
