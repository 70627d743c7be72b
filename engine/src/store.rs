//! [`Store`]: the engine's public handle, and the thread that drives the core.
//!
//! One engine task owns the [`Core`] and the [`Device`]. Callers (any thread, any async runtime)
//! push requests into a shared queue and wake the task. Everything queued while the task was busy
//! is taken in one go and becomes one batch: that is the group commit.
//!
//! The task is an event loop that sleeps on the io_uring ring's descriptor (readable when
//! completions are waiting) and on the queue's wakeup, both through Tokio's reactor. It runs either
//! on a thread of its own ([`Driver::Thread`], the default) or on the caller's Tokio runtime
//! ([`Driver::Runtime`]). On the caller's runtime, a request, its log write's completion and its
//! reply can all be handled on the thread that received the request: no hand-off to another
//! thread and back for each batch, which on a small machine costs more than the engine's work.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::core::{ChangedRun, Config, Core, Driver, Extent, Reply, Request, Since, Stats, Written};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::StagedOp;
use crate::recovery::{self, RecoveryReport};
use crate::state::VolumeInfo;
use crate::types::{BlockRun, Lsn, Tag, VolumeId, BLOCK_BYTES_U64};
use crate::uring::UringDevice;

/// Admission budget, in units of one request plus one unit per 64 KiB of payload: about 8192
/// small requests or 512 MiB of payload queued or in flight in the engine at once. Beyond that,
/// callers wait (backpressure) instead of growing memory without bound.
const QUEUE_PERMITS: usize = 8192;

fn permits_for(bytes: u64) -> u32 {
    (1 + (bytes >> 16)).min(QUEUE_PERMITS as u64 / 2) as u32
}

/// Options for creating a store.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Size of the backing file to create (ignored for block devices, which have their own size).
    pub size_bytes: u64,
    pub segment_bytes: u64,
    /// Write zeros over the whole file before formatting it (like `qemu-img create -o
    /// preallocation=full`). A new store file is sparse, and until the log has wrapped once each
    /// log write lands in never-written space: on ext4 a durable 8 KiB write there costs block
    /// allocation and a journal commit, ~175 µs instead of ~90 (an `fallocate`d file is no
    /// better, ~210 µs: its extents must still be converted). Costs a pass over the file at
    /// creation (about 5 s per 10 GiB here). Block devices are never sparse and are left alone.
    pub zero_fill: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions { size_bytes: 1 << 30, segment_bytes: recovery::DEFAULT_SEGMENT_BYTES, zero_fill: false }
    }
}

/// A request queued in the engine (see [`Store::enqueue_write`]); [`Pending::wait`] for its result.
/// Dropping it does not cancel the request.
#[must_use = "a queued request's result should be awaited"]
pub struct Pending<T> {
    rx: oneshot::Receiver<Result<T>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T> Pending<T> {
    pub async fn wait(self) -> Result<T> {
        self.await
    }
}

/// Polling a `Pending` by reference (e.g. the oldest of a queue of them, in a `select!`) leaves it
/// in place until it is ready.
impl<T> std::future::Future for Pending<T> {
    type Output = Result<T>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<T>> {
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|r| r.map_err(|_| Error::ShutDown)?)
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

/// What callers share with the engine task, under one lock.
#[derive(Default)]
struct Intake {
    reqs: VecDeque<Request>,
    /// Requests in `reqs` that may change stored data (anything but reads, flushes and queries).
    n_mutations: usize,
    /// Set by the engine task when it has nothing in progress and every write it was ever given
    /// is durable; cleared when it takes requests. With no mutation queued either, a flush has
    /// nothing to do, and [`Store::flush`] answers it without a trip to the engine task.
    all_durable: bool,
    /// Flushes answered that way since the engine task last took requests: its prediction of
    /// which writes a flush will follow needs to hear of them (see `Core::note_flush`). They all
    /// came before every mutation in `reqs`.
    noop_flushes: u64,
}

impl Intake {
    /// Answers a flush on the spot if it has nothing to do.
    fn try_noop_flush(&mut self) -> bool {
        let noop = self.all_durable && self.n_mutations == 0;
        self.noop_flushes += noop as u64;
        noop
    }
}

/// What the handles and the engine task share. The task holds it too, so it must not own the
/// task: see [`EngineThread`].
struct Inner {
    queue: Mutex<Intake>,
    sleeping: AtomicBool,
    wake: Notify,
    permits: Arc<Semaphore>,
    closed: AtomicBool,
}

/// The engine task, owned by the [`Store`] handles alone: when the last one is dropped, the task
/// is stopped (and with it go the core and the device). It cannot live in [`Inner`], which the
/// task itself holds: that would be a cycle, and a store dropped without `close()` would keep its
/// task, its index and its device forever.
struct EngineThread {
    inner: Arc<Inner>,
    /// The engine's own thread, with [`Driver::Thread`].
    handle: Mutex<Option<JoinHandle<()>>>,
    /// Disconnected when the engine task has stopped and dropped its device.
    stopped: Mutex<Option<mpsc::Receiver<()>>>,
}

/// A handle on an open store. Cheap to clone; all clones talk to the same engine task.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    thread: Arc<EngineThread>,
    report: Arc<RecoveryReport>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Creates a new store in a file (created sparse) or on a block device, then opens it.
    ///
    /// `create`, `open` and `close` block the calling thread until the engine has recovered or
    /// stopped: call them outside async code (or through `tokio::task::spawn_blocking`).
    pub fn create(path: &Path, opts: &CreateOptions, cfg: Config) -> Result<Store> {
        let mut dev = UringDevice::open(path, Some(opts.size_bytes))?;
        if opts.zero_fill && !dev.is_block_device() {
            crate::device::zero_fill(&mut dev)
                .map_err(|e| Error::io(format!("{}: writing zeros over the new store", path.display()), e))?;
        }
        recovery::format(&mut dev, opts.segment_bytes)?;
        Store::open_device(Box::new(dev), cfg, &path.display().to_string())
    }

    /// Opens an existing store, recovering it after a crash if need be.
    pub fn open(path: &Path, cfg: Config) -> Result<Store> {
        let dev = UringDevice::open(path, None)?;
        Store::open_device(Box::new(dev), cfg, &path.display().to_string())
    }

    /// Formats any device (e.g. the simulated one).
    pub fn format_device(device: &mut dyn Device, segment_bytes: u64) -> Result<()> {
        recovery::format(device, segment_bytes).map(|_| ())
    }

    /// Recovers and opens the store on any device. Returns only after the recovery checkpoint is
    /// durable, so nothing written afterwards can depend on the pre-crash log.
    pub fn open_device(device: Box<dyn Device>, cfg: Config, name: &str) -> Result<Store> {
        let store = Store::start(device, cfg, name)?;
        store.call_blocking(|reply| Request::Checkpoint { reply })?;
        Ok(store)
    }

    /// [`Store::open_device`] from async code, with [`Driver::Runtime`] on the caller's runtime:
    /// recovery runs on the calling thread (fine for an in-memory device; a real disk's recovery
    /// would hold up the runtime), then the engine starts on the runtime and this awaits its first
    /// checkpoint instead of blocking. It lets a simulation run every node's engine on one
    /// single-threaded runtime, in a reproducible order.
    pub async fn open_device_async(device: Box<dyn Device>, cfg: Config, name: &str) -> Result<Store> {
        let store = Store::start(device, cfg, name)?;
        store.call(0, |reply| Request::Checkpoint { reply }).await?;
        Ok(store)
    }

    /// Recovers the device and starts the engine; the caller waits for the recovery checkpoint.
    fn start(mut device: Box<dyn Device>, cfg: Config, name: &str) -> Result<Store> {
        let driver = cfg.driver.clone();
        let (core, report) = recovery::recover(device.as_mut(), cfg, name)?;
        let inner = Arc::new(Inner {
            queue: Mutex::new(Intake::default()),
            sleeping: AtomicBool::new(false),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(QUEUE_PERMITS)),
            closed: AtomicBool::new(false),
        });
        let (stopped_tx, stopped_rx) = mpsc::channel::<()>();
        let task_inner = inner.clone();
        let task = async move {
            drive(core, device, task_inner).await;
            drop(stopped_tx);
        };
        let handle = match driver {
            Driver::Runtime(rt) => {
                rt.spawn(task);
                None
            }
            Driver::Thread => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|e| Error::io("starting the engine thread's event loop", e))?;
                let handle = std::thread::Builder::new()
                    .name("syncblock-engine".into())
                    .spawn(move || rt.block_on(task))
                    .map_err(|e| Error::io("spawning the engine thread", e))?;
                Some(handle)
            }
        };
        let thread = Arc::new(EngineThread {
            inner: inner.clone(),
            handle: Mutex::new(handle),
            stopped: Mutex::new(Some(stopped_rx)),
        });
        Ok(Store { inner, thread, report: Arc::new(report) })
    }

    /// What recovery found when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    fn send(&self, req: Request) -> Result<()> {
        {
            // Checked under the queue lock: the engine task sets `closed` and drains the queue
            // under the same lock when it stops, so no request is left behind unanswered.
            let mut queue = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::ShutDown);
            }
            queue.n_mutations += req.is_mutation() as usize;
            queue.reqs.push_back(req);
        }
        if self.inner.sleeping.swap(false, Ordering::AcqRel) {
            self.inner.wake.notify_one();
        }
        Ok(())
    }

    async fn call<T>(&self, bytes: u64, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let _permit = self.inner.permits.acquire_many(permits_for(bytes)).await.map_err(|_| Error::ShutDown)?;
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::ShutDown)?
    }

    /// Queues a request and returns once it is in the engine's intake, without waiting for its
    /// result. Requests queued one after another from one task enter the log in that order, which is
    /// what a replicator needs to give its tags the engine's order.
    async fn enqueue<T>(&self, bytes: u64, make: impl FnOnce(Reply<T>) -> Request) -> Result<Pending<T>> {
        let permit =
            self.inner.permits.clone().acquire_many_owned(permits_for(bytes)).await.map_err(|_| Error::ShutDown)?;
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        Ok(Pending { rx, _permit: Some(permit) })
    }

    /// Queues a write (see [`Store::enqueue`] for the ordering promise).
    pub async fn enqueue_write(
        &self,
        volume: VolumeId,
        offset: u64,
        data: Bytes,
        fua: bool,
        tag: Tag,
    ) -> Result<Pending<Written>> {
        self.enqueue(data.len() as u64, |reply| Request::Write {
            volume,
            offset,
            data,
            fua,
            tag,
            write_back: false,
            reply,
        })
        .await
    }

    /// Queues a write of whole blocks at scattered LBAs (see [`Store::enqueue`] for the ordering
    /// promise), at most [`crate::core::SCATTERED_BLOCKS_MAX`]: one request, one answer, the
    /// blocks applied in the order given.
    pub async fn enqueue_write_blocks(
        &self,
        volume: VolumeId,
        blocks: Vec<(u64, Bytes)>,
        tag: Tag,
    ) -> Result<Pending<Written>> {
        let bytes = blocks.len() as u64 * BLOCK_BYTES_U64;
        self.enqueue(bytes, |reply| Request::WriteBlocks { volume, blocks, tag, reply }).await
    }

    pub async fn enqueue_trim(&self, volume: VolumeId, offset: u64, len: u64, tag: Tag) -> Result<Pending<Written>> {
        self.enqueue(0, |reply| Request::Trim { volume, offset, len, tag, reply }).await
    }

    pub async fn enqueue_write_zeroes(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
        tag: Tag,
    ) -> Result<Pending<Written>> {
        let bytes = if may_trim { 0 } else { len.min(crate::core::IO_BYTES_MAX) };
        self.enqueue(bytes, |reply| Request::WriteZeroes { volume, offset, len, may_trim, fua, tag, reply }).await
    }

    /// Queues a read: it sees every write queued before it, and none queued after.
    pub async fn enqueue_read(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Pending<Bytes>> {
        self.enqueue(len, |reply| Request::Read { volume, offset, len, reply }).await
    }

    /// Queues a flush: it covers every write queued before it.
    pub async fn enqueue_flush(&self) -> Result<Pending<()>> {
        if self.flush_is_noop() {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            return Ok(Pending { rx, _permit: None });
        }
        self.enqueue(0, |reply| Request::Flush { reply }).await
    }

    /// True when a flush queued now would find every write queued before it already durable (see
    /// [`Intake::all_durable`]).
    fn flush_is_noop(&self) -> bool {
        let mut intake = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        !self.inner.closed.load(Ordering::Acquire) && intake.try_noop_flush()
    }

    /// Blocking form of a call, for threads outside any async runtime.
    pub fn call_blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.blocking_recv().map_err(|_| Error::ShutDown)?
    }

    pub async fn read(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Bytes> {
        self.call(len, |reply| Request::Read { volume, offset, len, reply }).await
    }

    /// Writes `data` at `offset`. With `fua`, returns only once the data is durable.
    pub async fn write(&self, volume: VolumeId, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.call_write(volume, offset, data, fua, false).await
    }

    /// A write that may be answered once it is queued in the log, before it reaches the disk
    /// (write-back, as a disk's volatile cache does): reads see it at once, and any flush (or FUA
    /// write) queued after it makes it durable or fails. A crash of the process before then may
    /// lose it, which NBD allows for a write without FUA that no flush has covered. The engine
    /// answers writes this way only while [`crate::core::WRITE_BACK_BLOCKS_MAX`] allows.
    pub async fn write_back(&self, volume: VolumeId, offset: u64, data: Bytes) -> Result<()> {
        self.call_write(volume, offset, data, false, true).await
    }

    async fn call_write(&self, volume: VolumeId, offset: u64, data: Bytes, fua: bool, write_back: bool) -> Result<()> {
        let tag = Tag::NONE;
        self.call(data.len() as u64, |reply| Request::Write { volume, offset, data, fua, tag, write_back, reply })
            .await
            .map(drop)
    }

    /// Makes every write that completed before this call durable.
    pub async fn flush(&self) -> Result<()> {
        if self.flush_is_noop() {
            return Ok(());
        }
        self.call(0, |reply| Request::Flush { reply }).await
    }

    pub async fn trim(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        let tag = Tag::NONE;
        self.call(0, |reply| Request::Trim { volume, offset, len, tag, reply }).await.map(drop)
    }

    pub async fn write_zeroes(&self, volume: VolumeId, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        let bytes = if may_trim { 0 } else { len.min(crate::core::IO_BYTES_MAX) };
        let tag = Tag::NONE;
        self.call(bytes, |reply| Request::WriteZeroes { volume, offset, len, may_trim, fua, tag, reply })
            .await
            .map(drop)
    }

    pub async fn block_status(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.call(0, |reply| Request::BlockStatus { volume, offset, len, reply }).await
    }

    /// The CRC32 of each block of a block-aligned range (at most [`crate::core::CRC_BLOCKS_MAX`]
    /// blocks), `None` for unmapped ones: answered from the index without reading data, as of
    /// every request queued before it (unapplied writes included).
    pub async fn block_crcs(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Option<u32>>> {
        self.call(0, |reply| Request::BlockCrcs { volume, offset, len, reply }).await
    }

    /// Queues [`Store::block_crcs`] (see [`Store::enqueue`] for the ordering promise): the answer
    /// is the state after every request queued before it and none queued after.
    pub async fn enqueue_block_crcs(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Pending<Vec<Option<u32>>>> {
        self.enqueue(0, |reply| Request::BlockCrcs { volume, offset, len, reply }).await
    }

    /// Where the mapped blocks of `runs` (sorted, disjoint, at most
    /// [`crate::core::PLACES_BLOCKS_MAX`] blocks) lie, in LBA order, unmapped ones left out: as of
    /// every request queued before it, answered from memory. Sorting the answer by place gives the
    /// order in which [`Store::enqueue_read_blocks`] reads them fastest.
    pub async fn block_places(&self, volume: VolumeId, runs: Vec<BlockRun>) -> Result<Vec<crate::core::BlockPlace>> {
        self.call(0, |reply| Request::BlockPlaces { volume, runs, reply }).await
    }

    /// Queues a read of the blocks `lbas` names, in any order (at most
    /// [`crate::core::SCATTERED_BLOCKS_MAX`]): it sees every write queued before it, and none queued
    /// after (see [`Store::enqueue`]). Blocks close together in the log are read together. Each is
    /// answered in the order asked, `None` for an unmapped one.
    pub async fn enqueue_read_blocks(&self, volume: VolumeId, lbas: Vec<u64>) -> Result<Pending<Vec<Option<Bytes>>>> {
        let bytes = lbas.len() as u64 * BLOCK_BYTES_U64;
        self.enqueue(bytes, |reply| Request::ReadBlocks { volume, lbas, reply }).await
    }

    pub async fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        let name = name.to_string();
        self.call(0, |reply| Request::CreateVolume { name, size_bytes, reply }).await
    }

    pub async fn resize_volume(&self, volume: VolumeId, size_bytes: u64) -> Result<()> {
        self.call(0, |reply| Request::ResizeVolume { volume, size_bytes, reply }).await
    }

    pub async fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        self.call(0, |reply| Request::DeleteVolume { volume, reply }).await
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.call(0, |reply| Request::ListVolumes { reply }).await
    }

    /// The volume named `name`.
    pub async fn volume(&self, name: &str) -> Result<VolumeInfo> {
        self.list_volumes()
            .await?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::NoSuchVolumeName(name.to_string()))
    }

    /// Blocks of `volume` changed after `since`, as sorted, disjoint runs of LBAs (for resync).
    pub async fn changed_since(&self, volume: VolumeId, since: Since) -> Result<Vec<ChangedRun>> {
        self.call(0, |reply| Request::ChangedSince { volume, since, reply }).await
    }

    /// Sets a volume's replication state: last tag ([`crate::state::KEEP_LAST_TAG`] leaves it),
    /// trim floor and the replicator's blob. Durable when this returns, and so is every write queued
    /// before it (the log is durable as a prefix).
    pub async fn set_repl(&self, volume: VolumeId, last_tag: u64, trim_floor: u64, attr: Vec<u8>) -> Result<()> {
        self.set_repl_staged(volume, last_tag, trim_floor, attr, StagedOp::Keep).await
    }

    /// [`Store::set_repl`] that also commits or discards the volume's staged resync (resync writes,
    /// tagged [`Tag::resync`], are kept aside from the volume's committed image until then).
    pub async fn set_repl_staged(
        &self,
        volume: VolumeId,
        last_tag: u64,
        trim_floor: u64,
        attr: Vec<u8>,
        staged: StagedOp,
    ) -> Result<()> {
        self.call(0, |reply| Request::SetRepl { volume, last_tag, trim_floor, attr, staged, reply }).await
    }

    /// Queues [`Store::set_repl_staged`] (see [`Store::enqueue_write`] for the ordering promise): a
    /// resync's commit must take effect exactly between the writes queued before and after it.
    pub async fn enqueue_set_repl_staged(
        &self,
        volume: VolumeId,
        last_tag: u64,
        trim_floor: u64,
        attr: Vec<u8>,
        staged: StagedOp,
    ) -> Result<Pending<()>> {
        self.enqueue(0, |reply| Request::SetRepl { volume, last_tag, trim_floor, attr, staged, reply }).await
    }

    /// A volume's description by id.
    pub async fn volume_info(&self, volume: VolumeId) -> Result<VolumeInfo> {
        self.list_volumes().await?.into_iter().find(|v| v.id == volume).ok_or(Error::NoSuchVolume(volume))
    }

    pub async fn checkpoint(&self) -> Result<()> {
        self.call(0, |reply| Request::Checkpoint { reply }).await
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.call(0, |reply| Request::Stats { reply }).await
    }

    /// The highest LSN known durable.
    pub async fn durable_lsn(&self) -> Result<Lsn> {
        Ok(self.stats().await?.durable_lsn)
    }

    /// Finishes queued work, writes a checkpoint and stops the engine. Returns once the engine has
    /// let go of the device. Later calls on any clone fail with [`Error::ShutDown`].
    ///
    /// With [`Driver::Runtime`], the runtime must keep running until this returns: call it from
    /// outside the runtime's worker threads (e.g. through `tokio::task::spawn_blocking`), before
    /// the runtime is dropped.
    pub fn close(&self) -> Result<()> {
        let r = self.call_blocking(|reply| Request::Shutdown { reply });
        self.inner.closed.store(true, Ordering::Release);
        if let Some(stopped) = self.thread.stopped.lock().expect("stopped slot").take() {
            let _ = stopped.recv();
        }
        if let Some(t) = self.thread.handle.lock().expect("thread slot").take() {
            let _ = t.join();
        }
        match r {
            Err(Error::ShutDown) => Ok(()),
            other => other,
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        // Last handle gone without close(): stop the engine, checkpointing on the way out, after
        // everything already queued. A task on the caller's runtime is not waited for: this may
        // run on one of that runtime's threads.
        if self.stopped.get_mut().expect("stopped slot").is_none() {
            return; // closed
        }
        let (tx, _rx) = oneshot::channel();
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner()).reqs.push_back(Request::Shutdown { reply: tx });
        self.inner.wake.notify_one();
        let Some(t) = self.handle.get_mut().expect("thread slot").take() else { return };
        // No handle lives on the engine's thread; should one ever be dropped there, joining would
        // deadlock, and the thread stops anyway once it has served the shutdown.
        if t.thread().id() != std::thread::current().id() {
            let _ = t.join();
        }
    }
}

/// Marks the store closed and answers everything queued (by dropping the reply senders, which
/// callers see as [`Error::ShutDown`]) when the engine task stops, also if it panics.
struct StopGuard(Arc<Inner>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.0.closed.store(true, Ordering::Release);
        queue.reqs.clear();
        queue.n_mutations = 0;
        queue.all_durable = false;
        if std::thread::panicking() {
            tracing::error!("the engine task panicked; the store is stopped and every call now fails");
        }
    }
}

/// The ring descriptor as Tokio's reactor sees it: borrowed, never closed by it (the device owns
/// it and outlives the registration).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Whether the engine, woken by a request, lets other tasks run before it takes the queue.
///
/// On a shared runtime the scheduler runs a freshly woken task first. When many client tasks each
/// have a request ready (a burst: say 32 writers just answered), the first one's request wakes the
/// engine, which would take it alone, and the next as a batch of its own, and so on: no group
/// commit (measured in-process, 4 KiB random writes with 32 in flight: 5x the batches and 22 %
/// fewer writes/s). Yielding once lets the burst queue up first. But a yield costs a trip through
/// the scheduler, which on a multi-threaded runtime wakes another worker thread; with one request
/// at a time (a database's commit loop) it gains nothing. So the engine yields while yielding
/// gains requests, and after a yield that gained none, only every [`BurstWait::PROBE_EVERY`]th
/// wake, to notice when bursts come back.
#[derive(Default)]
struct BurstWait {
    /// Wakes left before the next yield.
    skip: u32,
}

impl BurstWait {
    const PROBE_EVERY: u32 = 16;

    async fn after_wake(&mut self, inner: &Inner) {
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        let queued = || inner.queue.lock().unwrap_or_else(|p| p.into_inner()).reqs.len();
        let before = queued();
        tokio::task::yield_now().await;
        self.skip = if queued() > before { 0 } else { Self::PROBE_EVERY };
    }
}

/// The engine's event loop.
async fn drive(mut core: Core, mut device: Box<dyn Device>, inner: Arc<Inner>) {
    let _guard = StopGuard(inner.clone());
    // Declared after `device`, so dropped (deregistered) before it.
    // SAFETY: the device owns the descriptor and keeps it open until it is dropped, after `ring`.
    let registered =
        device.completion_fd().map(|fd| unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) });
    let mut ring = match registered {
        Some(Ok(ring)) => Some(ring),
        Some(Err(e)) => {
            let e = e.into_parts().1;
            // Without the reactor, wait in the device instead: correct, only slower to notice
            // new requests while I/O is in flight.
            tracing::warn!("cannot watch the io_uring ring through the event loop ({e}); waiting in the device");
            None
        }
        None => None,
    };
    let mut burst = BurstWait::default();
    loop {
        let batch: Vec<Request> = {
            let mut intake = inner.queue.lock().expect("queue");
            intake.n_mutations = 0;
            intake.all_durable = false;
            if intake.noop_flushes > 0 {
                core.note_flushes(std::mem::take(&mut intake.noop_flushes));
            }
            intake.reqs.drain(..).collect()
        };
        for req in batch {
            core.push_request(req);
        }
        core.run();
        for op in core.take_ops() {
            device.submit(op);
        }
        if core.finished() {
            break;
        }
        // Start what was just submitted and take whatever has completed, without sleeping.
        if let Err(e) = device.poll() {
            core.device_failed(format!("starting or reaping I/O failed: {e}"));
        }
        let mut progressed = false;
        while let Some(c) = device.pop_completion() {
            core.on_completion(c);
            progressed = true;
        }
        if progressed {
            continue;
        }
        inner.sleeping.store(true, Ordering::Release);
        let queued = {
            let mut intake = inner.queue.lock().expect("queue");
            // Only what this task took before is covered; requests queued since are counted.
            intake.all_durable = core.all_durable();
            !intake.reqs.is_empty()
        };
        if queued {
            inner.sleeping.store(false, Ordering::Release);
            continue;
        }
        let woken_by_request = if !core.io_in_flight() {
            inner.wake.notified().await;
            true
        } else if let Some(watched) = &ring {
            tokio::select! {
                biased;
                () = inner.wake.notified() => true,
                ready = watched.readable() => {
                    match ready {
                        // Cleared before the next reap: a completion posted after this point
                        // raises readiness again (Tokio clears only what it had reported).
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            // The reactor is going away (its runtime is shutting down).
                            tracing::warn!("watching the io_uring ring failed ({e}); waiting in the device");
                            ring = None;
                        }
                    }
                    false
                }
            }
        } else if let Some(at) = device.ready_at() {
            // A simulated device with latency: its I/O takes time on this runtime's clock.
            tokio::select! {
                biased;
                () = inner.wake.notified() => true,
                () = tokio::time::sleep_until(at) => false,
            }
        } else {
            if let Err(e) = device.wait() {
                core.device_failed(format!("waiting for I/O failed: {e}"));
            }
            false
        };
        if woken_by_request {
            burst.after_wake(&inner).await;
        }
        inner.sleeping.store(false, Ordering::Release);
    }
}
