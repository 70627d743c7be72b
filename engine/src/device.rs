//! The storage seam: the one trait through which the engine touches a disk.
//!
//! The engine core never blocks on I/O. It hands [`IoOp`]s to a [`Device`] and later receives one
//! [`Completion`] per op, in any order. Production uses [`crate::uring::UringDevice`] (io_uring on an
//! `O_DIRECT` file or block device); tests use [`crate::sim::SimDevice`], which keeps written and
//! durable bytes apart so that a power cut can be simulated at every I/O boundary.
//!
//! Buffers are moved into the op and handed back in the completion, so a buffer is never touched by
//! the engine while the kernel may be using it.

use std::io;
use std::os::fd::RawFd;

use crate::buf::AlignedBuf;

/// What to do. Offsets and lengths are multiples of [`crate::types::BLOCK_BYTES`].
#[derive(Debug)]
pub enum IoKind {
    /// Fill `buf` from the device starting at `offset`.
    Read { offset: u64, buf: AlignedBuf },
    /// Write all of `buf` at `offset`. Unless `durable`, not durable until a later [`IoKind::Sync`]
    /// completes. With `durable` (`RWF_DSYNC`: a FUA write, or a write and a cache flush where the
    /// device has no FUA), these bytes are durable when the op completes; nothing is promised about
    /// other writes, completed before or not.
    Write { offset: u64, buf: AlignedBuf, durable: bool },
    /// Make every write that completed before this op was submitted durable (fdatasync).
    Sync,
}

#[derive(Debug)]
pub struct IoOp {
    /// Chosen by the submitter, returned in the completion.
    pub token: u64,
    pub kind: IoKind,
}

#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    /// `Ok` only if the whole buffer was transferred (devices retry short transfers themselves).
    pub result: io::Result<()>,
    /// The op's buffer, handed back (None for Sync).
    pub buf: Option<AlignedBuf>,
}

/// A block device as the engine sees it.
pub trait Device: Send + 'static {
    /// Size in bytes; the store never addresses beyond it.
    fn len_bytes(&self) -> u64;
    /// Queues an op. It starts no later than the next [`Device::wait`].
    fn submit(&mut self, op: IoOp);
    /// Starts queued ops and blocks until at least one completion is available (at once if none
    /// is in flight). May return early; callers loop.
    fn wait(&mut self) -> io::Result<()>;
    /// Takes one available completion.
    fn pop_completion(&mut self) -> Option<Completion>;
    /// Starts queued ops and takes the completions already available, never blocking. For a
    /// device with a [`Device::completion_fd`], this is how an event loop drives it instead of
    /// [`Device::wait`].
    fn poll(&mut self) -> io::Result<()>;
    /// A descriptor that becomes readable when a completion may be available, so that an event
    /// loop (Tokio's reactor) can sleep on it together with everything else. `None`: the device
    /// finishes ops within [`Device::wait`] without sleeping (the simulated one), and callers use
    /// that instead.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// A simulated device with latency: when the ops it holds may complete, on the event loop's
    /// clock (Tokio's, virtual in a simulation). Until then `poll` completes nothing, and the event
    /// loop sleeps until that instant (or a new request); `wait`, a blocking call, ignores the
    /// latency. `None`: no such wait.
    fn ready_at(&self) -> Option<tokio::time::Instant> {
        None
    }
}

/// Runs one op to completion, blocking. Used at open time, when nothing else is in flight.
pub fn run_blocking(device: &mut dyn Device, kind: IoKind) -> io::Result<Option<AlignedBuf>> {
    const TOKEN: u64 = u64::MAX;
    device.submit(IoOp { token: TOKEN, kind });
    loop {
        device.wait()?;
        if let Some(c) = device.pop_completion() {
            assert_eq!(c.token, TOKEN, "run_blocking used with other ops in flight");
            c.result?;
            return Ok(c.buf);
        }
    }
}

/// Reads `n_blocks` at `offset`, blocking.
pub fn read_blocking(device: &mut dyn Device, offset: u64, n_blocks: usize) -> io::Result<AlignedBuf> {
    let buf = AlignedBuf::zeroed(n_blocks);
    run_blocking(device, IoKind::Read { offset, buf }).map(|b| b.expect("read returns its buffer"))
}

/// Writes `buf` at `offset`, blocking.
pub fn write_blocking(device: &mut dyn Device, offset: u64, buf: AlignedBuf) -> io::Result<()> {
    run_blocking(device, IoKind::Write { offset, buf, durable: false }).map(|_| ())
}

/// Syncs, blocking.
pub fn sync_blocking(device: &mut dyn Device) -> io::Result<()> {
    run_blocking(device, IoKind::Sync).map(|_| ())
}

/// Writes zeros over the whole device, a few large writes in flight at a time, then syncs.
pub fn zero_fill(dev: &mut dyn Device) -> std::io::Result<()> {
    /// 8 MiB per write, four in flight: enough for a virtio disk's sequential bandwidth.
    const CHUNK_BLOCKS: u64 = 2048;
    const IN_FLIGHT: u64 = 4;
    let total_blocks = dev.len_bytes() / crate::types::BLOCK_BYTES as u64;
    let started = std::time::Instant::now();
    let (mut next, mut in_flight) = (0u64, 0u64);
    let mut spare: Vec<AlignedBuf> = Vec::new();
    while next < total_blocks || in_flight > 0 {
        while next < total_blocks && in_flight < IN_FLIGHT {
            let n = CHUNK_BLOCKS.min(total_blocks - next);
            let buf = match spare.pop() {
                Some(b) if b.n_blocks() as u64 == n => b,
                _ => AlignedBuf::zeroed(n as usize),
            };
            dev.submit(IoOp {
                token: next,
                kind: IoKind::Write { offset: next * crate::types::BLOCK_BYTES as u64, buf, durable: false },
            });
            next += n;
            in_flight += 1;
        }
        dev.wait()?;
        while let Some(c) = dev.pop_completion() {
            c.result?;
            in_flight -= 1;
            spare.extend(c.buf);
        }
    }
    sync_blocking(dev)?;
    tracing::info!(
        "wrote zeros over {} MiB of the new store in {:.1} s (zero_fill)",
        (total_blocks * crate::types::BLOCK_BYTES as u64) >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
