//! The production [`Device`]: io_uring on an `O_DIRECT` regular file or block device.
//!
//! One task owns a [`UringDevice`] and drives it through the [`Device`] trait: `submit` only queues;
//! `poll` (never blocking) and `wait` (blocking until something completes) move queued ops into the
//! ring, enter the kernel and turn completion queue entries (CQEs) into [`Completion`]s. An event
//! loop sleeps on the ring's descriptor ([`Device::completion_fd`]) between `poll`s.
//!
//! Invariants, established here and relied on throughout:
//! - Every SQE we push owns a *slot*. A data op's slot owns its [`AlignedBuf`] until the op's final CQE
//!   is reaped, so the memory the kernel reads from or writes to stays alive (the struct may move, the
//!   heap block it points to does not).
//! - `user_data` is our slot index, never the caller's token, so resubmitted remainders of short
//!   transfers belong to their slot and a caller may reuse tokens freely.
//! - Outstanding SQEs never exceed the SQ size: there is one slot per SQ entry.
//!   Because the kernel sizes the CQ at twice the SQ, the CQ cannot overflow either.
//! - Dropping the device waits for every data op the kernel holds before freeing buffers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::buf::AlignedBuf;
use crate::device::{Completion, Device, IoKind, IoOp};
use crate::error::{Error, Result};
use crate::lock::lock_store;
pub use crate::lock::LOCK_EXIT_WAIT_MAX;
use crate::types::BLOCK_BYTES;

/// Size of the submission queue (the kernel makes the completion queue twice as large).
///
/// 256 keeps any NVMe device busy (device queue depths are typically 32–128 per queue) while the
/// whole ring stays around 25 KiB — under the 64 KiB `RLIMIT_MEMLOCK` default that kernels before
/// 5.12 charge rings against. The engine bounds what it submits; ops beyond this simply wait in the
/// device's queue.
pub const RING_ENTRIES: u32 = 256;

/// Largest byte count put into a single read or write SQE; bigger buffers go in several pieces.
///
/// An SQE's length is a `u32`, and Linux caps one read or write at `MAX_RW_COUNT` (2 GiB − 4 KiB)
/// anyway. 1 GiB is a multiple of every plausible logical block size, so each piece stays aligned
/// for `O_DIRECT`.
const SQE_BYTES_MAX: usize = 1 << 30;
// A power of two at least BLOCK_BYTES (itself a power of two) is a multiple of it.
const _: () = assert!(SQE_BYTES_MAX.is_power_of_two() && SQE_BYTES_MAX >= BLOCK_BYTES);
const _: () = assert!(SQE_BYTES_MAX <= u32::MAX as usize);

/// How often one read or write is resubmitted after `EINTR`/`EAGAIN` before the error is reported.
///
/// These are transient (an io-wq worker interrupted, a request queue momentarily full) and retrying a
/// read or write is harmless; a handful of retries covers them, while a device that keeps failing is
/// reported instead of spun on. Syncs are never retried: after a failed fsync the kernel may have
/// dropped the dirty pages, and a retry that "succeeds" would lie.
const TRANSIENT_RETRIES_MAX: u32 = 8;

/// How many times `wait` re-enters the kernel after `EBUSY`/`EAGAIN` (CQ overflow pressure or no
/// request memory) before reporting the error. Each retry first reaps the CQ to relieve the pressure;
/// since our accounting keeps the CQ from overflowing, needing more than a few means a kernel problem.
const ENTER_BUSY_RETRIES_MAX: u32 = 16;

/// An io_uring-driven `O_DIRECT` file or block device.
pub struct UringDevice {
    // `Drop::drop` waits for (or leaks) everything the kernel holds before any field is dropped, so
    // field order carries no safety weight.
    /// Ops submitted by the caller and not yet given a slot.
    queue: VecDeque<IoOp>,
    /// Finished ops, ready for `pop_completion`.
    completions: VecDeque<Completion>,
    /// Indexed by slot id (= `user_data`); `Some` while the kernel may hold the op.
    slots: Vec<Option<Slot>>,
    /// Free slot ids.
    free_slots: Vec<u32>,
    /// Slots whose (remaining) transfer needs an SQE pushed: short transfers and transient retries.
    resubmit: VecDeque<u32>,
    /// Set by `Drop`: finish ops rather than resubmit their remainders.
    draining: bool,
    /// Scratch space for CQEs (`user_data`, `result`), kept to avoid an allocation per reap.
    cqes: Vec<(u64, i32)>,
    ring: IoUring,
    file: File,
    len_bytes: u64,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("len_bytes", &self.len_bytes)
            .field("n_queued", &self.queue.len())
            .field("n_in_flight", &self.n_slots_used())
            .field("n_completions", &self.completions.len())
            .finish_non_exhaustive()
    }
}

/// A data op the kernel may be working on.
struct Slot {
    token: u64,
    kind: SlotKind,
    /// `EINTR`/`EAGAIN` retries so far (see [`TRANSIENT_RETRIES_MAX`]).
    n_retries: u32,
}

enum SlotKind {
    Read { offset: u64, buf: AlignedBuf, done: usize },
    Write { offset: u64, buf: AlignedBuf, done: usize, durable: bool },
    Sync,
}

impl UringDevice {
    /// Opens `path` (a regular file or a block device) for `O_DIRECT` I/O through io_uring.
    ///
    /// With `create_bytes`, a missing file is created and a smaller one grown (sparsely) to that
    /// size; a block device smaller than that is an error, since it cannot grow. The reported length
    /// is rounded down to a multiple of [`BLOCK_BYTES`].
    ///
    /// A store whose lock another running process holds is refused at once. One whose holder is
    /// exiting (a killed `syncblock serve` whose io_uring the kernel is still tearing down) is
    /// waited for, up to [`LOCK_EXIT_WAIT_MAX`], so that a restart right after a crash succeeds.
    pub fn open(path: &Path, create_bytes: Option<u64>) -> Result<UringDevice> {
        let shown = path.display();
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(create_bytes.is_some()).custom_flags(libc::O_DIRECT | libc::O_CLOEXEC);
        let file = options.open(path).map_err(|e| open_error(path, create_bytes.is_some(), e))?;
        // One engine per store: two would interleave their logs and destroy each other's data.
        lock_store(&file, path, LOCK_EXIT_WAIT_MAX)?;

        let metadata = file.metadata().map_err(|e| Error::io(format!("{shown}: fstat"), e))?;
        let file_type = metadata.file_type();
        let size_bytes = if file_type.is_block_device() {
            let size_bytes =
                block_device_bytes(&file).map_err(|e| Error::io(format!("{shown}: ioctl(BLKGETSIZE64)"), e))?;
            let sector_bytes =
                block_device_sector_bytes(&file).map_err(|e| Error::io(format!("{shown}: ioctl(BLKSSZGET)"), e))?;
            // BLOCK_BYTES is a power of two, so its divisors are exactly the powers of two up to it.
            if sector_bytes > BLOCK_BYTES || !sector_bytes.is_power_of_two() {
                return Err(Error::InvalidArgument(format!(
                    "{shown}: logical sector size is {sector_bytes} bytes, but O_DIRECT I/O here is in \
                     {BLOCK_BYTES}-byte blocks; use a device with 512- or 4096-byte sectors"
                )));
            }
            if let Some(want) = create_bytes {
                if size_bytes < want {
                    return Err(Error::InvalidArgument(format!(
                        "{shown}: block device holds {size_bytes} bytes, fewer than the {want} \
                         requested; a block device cannot grow: use a larger device or a smaller size"
                    )));
                }
            }
            size_bytes
        } else if file_type.is_file() {
            match create_bytes {
                Some(want) if metadata.len() < want => {
                    // set_len is ftruncate: it only records the size, so the file stays sparse.
                    file.set_len(want)
                        .map_err(|e| Error::io(format!("{shown}: growing to {want} bytes (ftruncate)"), e))?;
                    want
                }
                _ => metadata.len(),
            }
        } else {
            return Err(Error::InvalidArgument(format!(
                "{shown}: not a regular file or block device; point the store at one of those"
            )));
        };
        let len_bytes = size_bytes - size_bytes % BLOCK_BYTES as u64;

        let ring = new_ring()?;
        let sq_entries = ring.params().sq_entries() as usize;
        let n_slots = sq_entries;
        Ok(UringDevice {
            queue: VecDeque::new(),
            completions: VecDeque::new(),
            slots: (0..n_slots).map(|_| None).collect(),
            // Reversed so that slot 0 is handed out first; purely cosmetic.
            free_slots: (0..n_slots as u32).rev().collect(),
            resubmit: VecDeque::new(),
            draining: false,
            cqes: Vec::with_capacity(sq_entries * 2),
            ring,
            file,
            len_bytes,
        })
    }

    /// Whether the store is on a block device (not a regular file).
    pub fn is_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file.metadata().is_ok_and(|m| m.file_type().is_block_device())
    }

    /// Number of data ops the kernel may hold at once (queued beyond this, ops wait in the device).
    pub fn in_flight_max(&self) -> usize {
        self.slots.len()
    }

    fn n_slots_used(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Rejects ops the kernel would reject less clearly, or that would silently grow a regular file.
    fn check_op(&self, kind: &IoKind) -> io::Result<()> {
        let (what, offset, buf) = match kind {
            IoKind::Read { offset, buf } => ("read", *offset, buf),
            IoKind::Write { offset, buf, .. } => ("write", *offset, buf),
            IoKind::Sync => return Ok(()),
        };
        if offset % BLOCK_BYTES as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} at offset {offset}, which is not a multiple of {BLOCK_BYTES} bytes"),
            ));
        }
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len_bytes) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} of {} bytes at offset {offset} extends beyond the device end at {} bytes",
                    buf.len(),
                    self.len_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Gives queued ops free slots and pushes SQEs for them and for pending resubmissions.
    fn fill_sq(&mut self) {
        while let Some(slot_idx) = self.resubmit.pop_front() {
            self.push_slot_sqe(slot_idx);
        }
        while !self.free_slots.is_empty() {
            let Some(op) = self.queue.pop_front() else { break };
            let kind = match op.kind {
                IoKind::Read { offset, buf } if !buf.is_empty() => SlotKind::Read { offset, buf, done: 0 },
                IoKind::Write { offset, buf, durable } if !buf.is_empty() => {
                    SlotKind::Write { offset, buf, done: 0, durable }
                }
                IoKind::Sync => SlotKind::Sync,
                // Nothing to transfer; the kernel would answer 0, which reads as end of file.
                IoKind::Read { buf, .. } | IoKind::Write { buf, .. } => {
                    self.completions.push_back(Completion { token: op.token, result: Ok(()), buf: Some(buf) });
                    continue;
                }
            };
            let slot_idx = self.free_slots.pop().expect("checked non-empty");
            let slot = &mut self.slots[slot_idx as usize];
            debug_assert!(slot.is_none(), "free slot {slot_idx} is occupied");
            *slot = Some(Slot { token: op.token, kind, n_retries: 0 });
            self.push_slot_sqe(slot_idx);
        }
    }

    /// Pushes the SQE for the (remaining) transfer of slot `slot_idx`.
    fn push_slot_sqe(&mut self, slot_idx: u32) {
        let fd = types::Fd(self.file.as_raw_fd());
        let slot = self.slots[slot_idx as usize].as_mut().expect("pushing an SQE for a free slot");
        let entry = match &mut slot.kind {
            SlotKind::Read { offset, buf, done } => {
                let n_bytes = (buf.len() - *done).min(SQE_BYTES_MAX);
                opcode::Read::new(fd, buf[*done..].as_mut_ptr(), n_bytes as u32).offset(*offset + *done as u64).build()
            }
            SlotKind::Write { offset, buf, done, durable } => {
                let n_bytes = (buf.len() - *done).min(SQE_BYTES_MAX);
                let flags = if *durable { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, buf[*done..].as_ptr(), n_bytes as u32)
                    .offset(*offset + *done as u64)
                    .rw_flags(flags)
                    .build()
            }
            SlotKind::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        };
        self.push_sqe(entry.user_data(u64::from(slot_idx)));
    }

    fn push_sqe(&mut self, entry: squeue::Entry) {
        // SAFETY: every pointer in `entry` refers to memory owned by `self` that stays alive and in
        // place until the entry's CQE is reaped: a slot's AlignedBuf heap block (freed only after its
        // final CQE, or leaked by Drop). The push cannot find the SQ full: SQEs outstanding are
        // bounded by the number of slots, sq_entries.
        unsafe { self.ring.submission().push(&entry) }.expect("io_uring SQ full despite slot accounting");
    }

    /// Moves every available CQE into device state and completions. Never blocks.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        for &(user_data, res) in &cqes {
            self.on_slot_cqe(user_data, res);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn on_slot_cqe(&mut self, user_data: u64, res: i32) {
        let slot_idx = u32::try_from(user_data).expect("CQE user_data is a slot id");
        let draining = self.draining;
        let slot = self.slots[slot_idx as usize].as_mut().expect("CQE for a free slot");
        let transient = res == -libc::EINTR || res == -libc::EAGAIN;
        let is_read = matches!(slot.kind, SlotKind::Read { .. });
        let result = match &mut slot.kind {
            SlotKind::Sync => {
                if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                }
            }
            SlotKind::Read { .. } | SlotKind::Write { .. }
                if transient && slot.n_retries < TRANSIENT_RETRIES_MAX && !draining =>
            {
                slot.n_retries += 1;
                self.resubmit.push_back(slot_idx);
                return;
            }
            SlotKind::Read { offset, buf, done } | SlotKind::Write { offset, buf, done, .. } if res >= 0 => {
                let n_bytes = res as usize;
                assert!(*done + n_bytes <= buf.len(), "kernel transferred more than asked");
                *done += n_bytes;
                if *done == buf.len() {
                    Ok(())
                } else if n_bytes == 0 || draining {
                    let (kind, what) = if is_read {
                        (io::ErrorKind::UnexpectedEof, "read hit end of file")
                    } else {
                        (io::ErrorKind::WriteZero, "write made no progress")
                    };
                    Err(io::Error::new(
                        kind,
                        format!("{what} at offset {} after {done} of {} bytes", *offset + *done as u64, buf.len()),
                    ))
                } else {
                    // Short transfer: go again for the remainder, from the same slot.
                    self.resubmit.push_back(slot_idx);
                    return;
                }
            }
            SlotKind::Read { .. } | SlotKind::Write { .. } => Err(io::Error::from_raw_os_error(-res)),
        };
        let slot = self.slots[slot_idx as usize].take().expect("slot checked above");
        self.free_slots.push(slot_idx);
        let buf = match slot.kind {
            SlotKind::Read { buf, .. } | SlotKind::Write { buf, .. } => Some(buf),
            SlotKind::Sync => None,
        };
        self.completions.push_back(Completion { token: slot.token, result, buf });
    }

    /// Submits pushed SQEs without waiting.
    fn submit_nowait(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // The SQEs stay in the SQ and go in with the next enter.
            Err(e) if is_retryable_enter_error(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Device for UringDevice {
    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn submit(&mut self, op: IoOp) {
        match self.check_op(&op.kind) {
            Ok(()) => self.queue.push_back(op),
            Err(e) => {
                let buf = match op.kind {
                    IoKind::Read { buf, .. } | IoKind::Write { buf, .. } => Some(buf),
                    IoKind::Sync => None,
                };
                self.completions.push_back(Completion { token: op.token, result: Err(e), buf });
            }
        }
    }

    /// Returns once a completion is available, nothing is outstanding (no data op in flight or
    /// queued), or the wait was interrupted by a signal (`EINTR`: the caller's loop is the retry).
    fn wait(&mut self) -> io::Result<()> {
        let mut n_busy = 0;
        loop {
            self.fill_sq();
            if !self.completions.is_empty() {
                // Start what was just queued, but do not block: the caller has work to do.
                self.submit_nowait()?;
                self.reap();
                return Ok(());
            }
            if self.n_slots_used() == 0 {
                debug_assert!(self.queue.is_empty() && self.resubmit.is_empty());
                // Nothing could ever complete; blocking would hang.
                return self.submit_nowait();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    self.reap();
                    return Ok(());
                }
                Err(e) if is_retryable_enter_error(&e) && n_busy < ENTER_BUSY_RETRIES_MAX => n_busy += 1,
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("io_uring_enter failed: {e}")));
                }
            }
            self.reap();
        }
    }

    fn pop_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    fn poll(&mut self) -> io::Result<()> {
        // Completions are read from the shared CQ ring without a system call; the kernel is
        // entered only when there is something to submit.
        self.fill_sq();
        if !self.ring.submission().is_empty() {
            self.submit_nowait()?;
        }
        self.reap();
        // A reaped short transfer queued its remainder, or a freed slot lets a queued op in:
        // start it now rather than at the next call.
        self.fill_sq();
        if !self.ring.submission().is_empty() {
            self.submit_nowait()?;
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        // The ring's descriptor polls readable while its completion queue holds entries.
        Some(self.ring.as_raw_fd())
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // Ops still in `queue` never reached the kernel; they drop normally. Ops in slots may be in
        // the kernel's hands: wait for each before its buffer is freed, or the kernel would read from
        // or write into freed memory.
        // While draining, CQEs never queue resubmissions, so after this `resubmit` stays empty.
        self.draining = true;
        // A slot waiting for resubmission has no SQE outstanding: free it now.
        while let Some(slot_idx) = self.resubmit.pop_front() {
            self.slots[slot_idx as usize] = None;
            self.free_slots.push(slot_idx);
        }
        let mut n_busy = 0;
        let mut failure = None;
        while self.n_slots_used() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if is_retryable_enter_error(&e) && n_busy < ENTER_BUSY_RETRIES_MAX => n_busy += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            self.reap();
            debug_assert!(self.resubmit.is_empty(), "resubmission while draining");
        }
        if let Some(e) = failure {
            // We cannot know when the kernel is done with these buffers: leaking is the only safe
            // choice. This needs io_uring_enter itself to fail, which does not happen in practice.
            let n_leaked = self.n_slots_used();
            tracing::error!(n_leaked, "io_uring_enter failed while draining on drop ({e}); leaking buffers");
            for slot in self.slots.drain(..).flatten() {
                std::mem::forget(slot);
            }
        }
    }
}

fn is_retryable_enter_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN))
}

/// Builds the ring and checks the kernel supports every opcode we use.
fn new_ring() -> Result<IoUring> {
    let ring = IoUring::new(RING_ENTRIES).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM | libc::ENOSYS | libc::EACCES | libc::EINVAL) => Error::UringUnavailable {
            cause: format!(
                "io_uring_setup failed: {e}; likely causes: `sysctl kernel.io_uring_disabled` is 1 or 2 \
                 (set it to 0, or add this user to the group in kernel.io_uring_group), a container \
                 seccomp profile blocks io_uring_setup (Docker's default does: run with a profile \
                 that allows io_uring_setup, io_uring_enter and io_uring_register), or the kernel is \
                 older than 5.6"
            ),
        },
        Some(libc::ENOMEM) => Error::UringUnavailable {
            cause: format!(
                "io_uring_setup failed: {e}; likely cause: RLIMIT_MEMLOCK is too low (kernels before \
                 5.12 charge ring memory to it); raise it with `ulimit -l` or LimitMEMLOCK="
            ),
        },
        _ => Error::io("io_uring_setup", e),
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| Error::UringUnavailable {
        cause: format!(
            "IORING_REGISTER_PROBE failed: {e}; likely cause: the kernel is older than 5.6, or a \
             seccomp profile blocks io_uring_register"
        ),
    })?;
    let needed = [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(Error::UringUnavailable {
                cause: format!("the kernel does not support {name}; likely cause: a kernel older than 5.6"),
            });
        }
    }
    Ok(ring)
}

/// Names the likely cause of a failed open.
fn open_error(path: &Path, create: bool, e: io::Error) -> Error {
    let shown = path.display();
    let why = match e.raw_os_error() {
        Some(libc::EINVAL) => {
            "the filesystem does not support O_DIRECT (tmpfs? overlayfs?); put the store \
                               on ext4/xfs or a block device"
        }
        Some(libc::ENOENT) if create => "the parent directory does not exist; create it first",
        Some(libc::ENOENT) => "the path does not exist; check it, or create the store first",
        Some(libc::EACCES | libc::EPERM) => {
            "permission denied; check the file's owner and mode (block \
                                              devices usually need root or the `disk` group)"
        }
        Some(libc::EROFS) => "the filesystem is read-only",
        Some(libc::EISDIR) => "the path is a directory; give a file or block device path",
        Some(libc::ENOTDIR) => "a component of the path is not a directory",
        Some(libc::EBUSY) => "the device is in use (mounted, or opened exclusively by another program)",
        _ => "opening with O_RDWR | O_DIRECT failed",
    };
    Error::io(format!("{shown} ({why})"), e)
}

fn block_device_bytes(file: &File) -> io::Result<u64> {
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live u64. (The
    // kernel defines the request as _IOR(0x12, 114, size_t) but always writes 64 bits; we build the
    // same number so it matches on 32-bit targets too.)
    let rc =
        unsafe { libc::ioctl(file.as_raw_fd(), libc::_IOR::<libc::size_t>(0x12, 114), &mut size_bytes as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size_bytes)
}

fn block_device_sector_bytes(file: &File) -> io::Result<usize> {
    let mut sector_bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the valid pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector_bytes as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(sector_bytes).map_err(|_| io::Error::other(format!("BLKSSZGET returned {sector_bytes}")))
}

// ---------------------------------------------------------------------------------------------
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::device::{read_blocking, sync_blocking, write_blocking};

    /// How long a test waits for something that should happen at once before failing rather than
    /// hanging; generous because CI machines stall.
    const TEST_DEADLINE: Duration = Duration::from_secs(30);

    /// A store file in a fresh temporary directory, plus the directory guard.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        /// `None` (after printing why) if io_uring or O_DIRECT is unavailable here.
        fn new() -> Option<Fixture> {
            if let Err(e) = IoUring::new(8) {
                println!("SKIP: io_uring unavailable: {e}");
                return None;
            }
            let dir = tempfile::tempdir().expect("create tempdir");
            Some(Fixture { dir })
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("store.img")
        }

        /// Creates (or reopens) the store file with `n_blocks` blocks. `None` after printing why
        /// if this environment cannot run the test.
        fn open(&self, n_blocks: u64) -> Option<UringDevice> {
            match UringDevice::open(&self.path(), Some(n_blocks * BLOCK_BYTES as u64)) {
                Ok(device) => Some(device),
                Err(Error::UringUnavailable { cause }) => {
                    println!("SKIP: io_uring unavailable: {cause}");
                    None
                }
                Err(Error::Io { what, source }) if source.raw_os_error() == Some(libc::EINVAL) => {
                    println!(
                        "SKIP: O_DIRECT unsupported in {}: {what}; set TMPDIR to ext4/xfs",
                        self.dir.path().display()
                    );
                    None
                }
                Err(e) => panic!("open failed: {e}"),
            }
        }
    }

    /// A block whose bytes identify `(block_idx, generation)`.
    fn pattern(block_idx: u64, generation: u64) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK_BYTES];
        for (i, chunk) in block.chunks_mut(8).enumerate() {
            let word = block_idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(17) ^ i as u64;
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        block
    }

    /// Waits until `n` completions have arrived; returns them by token.
    fn collect(device: &mut UringDevice, n: usize) -> BTreeMap<u64, Completion> {
        let deadline = Instant::now() + TEST_DEADLINE;
        let mut done = BTreeMap::new();
        while done.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} completions arrived", done.len());
            device.wait().expect("wait");
            while let Some(c) = device.pop_completion() {
                let token = c.token;
                assert!(done.insert(token, c).is_none(), "token {token} completed twice");
            }
        }
        assert!(device.pop_completion().is_none());
        done
    }

    /// Writes `(offset_block, n_blocks)` extents, all in flight at once, then reads them back the
    /// same way and checks the bytes.
    fn check_roundtrip(device: &mut UringDevice, extents: &[(u64, usize)], generation: u64) {
        for (token, &(first_block, n_blocks)) in extents.iter().enumerate() {
            let data: Vec<u8> = (0..n_blocks as u64).flat_map(|i| pattern(first_block + i, generation)).collect();
            let buf = AlignedBuf::from_slice(&data);
            device.submit(IoOp {
                token: token as u64,
                kind: IoKind::Write { offset: first_block * BLOCK_BYTES as u64, buf, durable: generation % 2 == 1 },
            });
        }
        for (token, c) in collect(device, extents.len()) {
            c.result.unwrap_or_else(|e| panic!("write {token} failed: {e}"));
            assert_eq!(c.buf.expect("write returns its buffer").n_blocks(), extents[token as usize].1);
        }
        for (token, &(first_block, n_blocks)) in extents.iter().enumerate() {
            let buf = AlignedBuf::zeroed(n_blocks);
            device.submit(IoOp {
                token: token as u64,
                kind: IoKind::Read { offset: first_block * BLOCK_BYTES as u64, buf },
            });
        }
        for (token, c) in collect(device, extents.len()) {
            c.result.unwrap_or_else(|e| panic!("read {token} failed: {e}"));
            let buf = c.buf.expect("read returns its buffer");
            let (first_block, n_blocks) = extents[token as usize];
            for i in 0..n_blocks {
                assert!(
                    buf.block(i) == pattern(first_block + i as u64, generation).as_slice(),
                    "block {} differs",
                    first_block + i as u64
                );
            }
        }
    }

    #[test]
    fn writes_and_reads_with_64_in_flight_roundtrip() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(1024) else { return };
        assert_eq!(device.len_bytes(), 1024 * BLOCK_BYTES as u64);
        // 64 disjoint extents of 1..=4 blocks, scattered over the device, including its last block.
        let extents: Vec<(u64, usize)> = (0..64u64).map(|i| ((i * 389) % 252 * 4, 1 + (i % 4) as usize)).collect();
        let mut extents = extents;
        extents.push((1023, 1));
        check_roundtrip(&mut device, &extents, 1);
        // Overwrite in place and check again: the second generation must win everywhere.
        check_roundtrip(&mut device, &extents, 2);
    }

    #[test]
    fn more_ops_than_the_ring_holds_all_complete() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(1024) else { return };
        let n_ops = device.in_flight_max() * 3 + 7;
        assert!(n_ops <= 1024);
        let extents: Vec<(u64, usize)> = (0..n_ops as u64).map(|i| (i, 1)).collect();
        check_roundtrip(&mut device, &extents, 3);
    }

    #[test]
    fn large_multi_block_buffer_roundtrips() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(2048) else { return };
        check_roundtrip(&mut device, &[(0, 1024), (1024, 1024)], 4);
    }

    #[test]
    fn sync_completes_and_data_survives_reopen() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(16) else { return };
        write_blocking(&mut device, 5 * BLOCK_BYTES as u64, AlignedBuf::from_slice(&pattern(5, 9))).expect("write");
        device.submit(IoOp { token: 77, kind: IoKind::Sync });
        let c = collect(&mut device, 1).remove(&77).expect("sync completion");
        c.result.expect("sync");
        assert!(c.buf.is_none());
        drop(device);

        let Some(mut device) = fixture.open(16) else { return };
        let buf = read_blocking(&mut device, 5 * BLOCK_BYTES as u64, 1).expect("read");
        assert!(buf.block(0) == pattern(5, 9).as_slice());
        sync_blocking(&mut device).expect("sync with nothing written");
    }

    #[test]
    fn wait_with_nothing_to_do_returns_immediately() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(4) else { return };
        let started = Instant::now();
        device.wait().expect("wait");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(device.pop_completion().is_none());
    }

    #[test]
    fn create_in_missing_directory_names_the_cause() {
        let Some(fixture) = Fixture::new() else { return };
        let path = fixture.dir.path().join("no-such-dir").join("store.img");
        let err = UringDevice::open(&path, Some(BLOCK_BYTES as u64)).expect_err("open must fail");
        let message = err.to_string();
        assert!(message.contains("parent directory does not exist"), "{message}");
        assert!(message.contains("no-such-dir"), "{message}");
        assert!(matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT)), "{err}");
    }

    #[test]
    fn open_missing_store_without_create_names_the_cause() {
        let Some(fixture) = Fixture::new() else { return };
        let err = UringDevice::open(&fixture.path(), None).expect_err("open must fail");
        let message = err.to_string();
        assert!(message.contains("path does not exist"), "{message}");
    }

    #[test]
    fn open_directory_names_the_cause() {
        let Some(fixture) = Fixture::new() else { return };
        let err = UringDevice::open(fixture.dir.path(), None).expect_err("open must fail");
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn size_zero_store_opens_and_rejects_every_transfer() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(0) else { return };
        assert_eq!(device.len_bytes(), 0);
        let err = read_blocking(&mut device, 0, 1).expect_err("read of an empty device");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        sync_blocking(&mut device).expect("sync of an empty device");
    }

    #[test]
    fn existing_file_grows_to_create_size_and_length_rounds_down() {
        let Some(fixture) = Fixture::new() else { return };
        std::fs::write(fixture.path(), vec![7u8; 2 * BLOCK_BYTES + 100]).expect("write seed file");
        // Without create_bytes the size is kept, rounded down to whole blocks.
        match UringDevice::open(&fixture.path(), None) {
            Ok(device) => assert_eq!(device.len_bytes(), 2 * BLOCK_BYTES as u64),
            Err(e) => {
                println!("SKIP: {e}");
                return;
            }
        }
        // A smaller create size never shrinks the file.
        let Some(device) = fixture.open(1) else { return };
        assert_eq!(device.len_bytes(), 2 * BLOCK_BYTES as u64);
        drop(device);
        let Some(mut device) = fixture.open(8) else { return };
        assert_eq!(device.len_bytes(), 8 * BLOCK_BYTES as u64);
        assert_eq!(std::fs::metadata(fixture.path()).expect("stat").len(), 8 * BLOCK_BYTES as u64);
        // The old contents are intact and the grown part reads as zeros.
        let buf = read_blocking(&mut device, 0, 8).expect("read");
        assert!(buf[..2 * BLOCK_BYTES + 100].iter().all(|b| *b == 7));
        assert!(buf[2 * BLOCK_BYTES + 100..].iter().all(|b| *b == 0));
    }

    /// Documented behaviour: a transfer reaching past `len_bytes` fails with `InvalidInput` before
    /// reaching the kernel (it would otherwise silently grow a regular file), and hands the buffer back.
    #[test]
    fn transfer_beyond_end_fails_with_invalid_input() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(4) else { return };
        let end = 4 * BLOCK_BYTES as u64;
        device.submit(IoOp { token: 1, kind: IoKind::Read { offset: end, buf: AlignedBuf::zeroed(1) } });
        device.submit(IoOp {
            token: 2,
            kind: IoKind::Read { offset: end - BLOCK_BYTES as u64, buf: AlignedBuf::zeroed(2) },
        });
        device
            .submit(IoOp { token: 3, kind: IoKind::Write { offset: end, buf: AlignedBuf::zeroed(1), durable: false } });
        device.submit(IoOp { token: 4, kind: IoKind::Read { offset: u64::MAX - 4095, buf: AlignedBuf::zeroed(1) } });
        device.submit(IoOp { token: 5, kind: IoKind::Read { offset: 512, buf: AlignedBuf::zeroed(1) } });
        for (token, c) in collect(&mut device, 5) {
            let err = c.result.expect_err("out-of-range transfer");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "token {token}: {err}");
            assert!(c.buf.is_some(), "token {token}: buffer not handed back");
        }
        assert_eq!(std::fs::metadata(fixture.path()).expect("stat").len(), end, "file grew");
    }

    /// A file shrunk behind the device's back: the kernel returns a short read, the device asks
    /// for the remainder, gets 0 bytes, and reports `UnexpectedEof`.
    #[test]
    fn read_past_end_of_truncated_file_is_unexpected_eof() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(8) else { return };
        std::fs::OpenOptions::new()
            .write(true)
            .open(fixture.path())
            .and_then(|f| f.set_len(4 * BLOCK_BYTES as u64))
            .expect("truncate");
        let err = read_blocking(&mut device, 2 * BLOCK_BYTES as u64, 4).expect_err("read across the new end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(err.to_string().contains("after 8192 of 16384 bytes"), "{err}");
        read_blocking(&mut device, 0, 4).expect("read inside the file");
    }

    #[test]
    fn zero_length_transfers_complete_without_io() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(4) else { return };
        device.submit(IoOp { token: 1, kind: IoKind::Write { offset: 0, buf: AlignedBuf::zeroed(0), durable: false } });
        device.submit(IoOp {
            token: 2,
            kind: IoKind::Read { offset: 4 * BLOCK_BYTES as u64, buf: AlignedBuf::zeroed(0) },
        });
        for (token, c) in collect(&mut device, 2) {
            c.result.unwrap_or_else(|e| panic!("token {token}: {e}"));
        }
    }

    #[test]
    fn drop_with_ops_in_flight_waits_for_them() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(256) else { return };
        let n_ops = 128u64;
        for block_idx in 0..n_ops {
            let buf = AlignedBuf::from_slice(&pattern(block_idx, 5));
            device.submit(IoOp {
                token: block_idx,
                kind: IoKind::Write { offset: block_idx * BLOCK_BYTES as u64, buf, durable: false },
            });
        }
        // One wait pushes all 128 into the kernel and returns after the first completes.
        device.wait().expect("wait");
        drop(device);
        // Every write the kernel accepted has finished and none wrote through a freed buffer.
        let Some(mut device) = fixture.open(256) else { return };
        let buf = read_blocking(&mut device, 0, n_ops as usize).expect("read");
        for block_idx in 0..n_ops {
            assert!(buf.block(block_idx as usize) == pattern(block_idx, 5).as_slice(), "block {block_idx}");
        }
    }

    #[test]
    fn poll_never_blocks_and_the_ring_fd_reports_completions() {
        let Some(fixture) = Fixture::new() else { return };
        let Some(mut device) = fixture.open(64) else { return };
        let fd = device.completion_fd().expect("a ring descriptor");
        let readable = |timeout_ms: i32| {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            assert!(n >= 0, "poll: {}", io::Error::last_os_error());
            n == 1 && pfd.revents & libc::POLLIN != 0
        };
        for round in 0..3u64 {
            assert!(!readable(0), "round {round}: readable with nothing in flight");
            device.poll().expect("poll with nothing to do");
            assert!(device.pop_completion().is_none());
            for block_idx in 0..32u64 {
                let buf = AlignedBuf::from_slice(&pattern(block_idx, round));
                let kind = IoKind::Write { offset: block_idx * BLOCK_BYTES as u64, buf, durable: round == 1 };
                device.submit(IoOp { token: block_idx, kind });
            }
            let deadline = Instant::now() + TEST_DEADLINE;
            let mut done = BTreeMap::new();
            loop {
                // Start what is queued, take what completed; then, as an event loop would, sleep
                // on the descriptor until more completes.
                device.poll().expect("poll");
                while let Some(c) = device.pop_completion() {
                    c.result.as_ref().expect("write");
                    assert!(done.insert(c.token, c).is_none(), "a token completed twice");
                }
                if done.len() == 32 {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(readable(left.as_millis() as i32), "round {round}: {} of 32 completed", done.len());
            }
        }
        let buf = read_blocking(&mut device, 0, 32).expect("read back");
        for block_idx in 0..32u64 {
            assert!(buf.block(block_idx as usize) == pattern(block_idx, 2).as_slice(), "block {block_idx}");
        }
    }
}
