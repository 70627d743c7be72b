//! Durability: the writers waiting for their batches, the fdatasyncs that make batches durable,
//! and the answer to every writer once what it waits for is applied (and durable, if it asked).
//!
//! Owns the durable LSN: the highest LSN such that it and everything before it is on stable
//! storage. It advances by a completed sync (over the batches completed when it was issued) or by
//! a batch written durably right after a durable one. Also owns the stop after a failed write or
//! sync ([`Core::fail_everything`]): every writer waiting is failed, nothing is retried.

use super::*;

/// The waiters and the syncs.
pub(super) struct Durability {
    /// Highest LSN such that it and everything before it is on stable storage.
    pub(super) durable_lsn: Lsn,
    /// Ordered, so that failing them all (`fail_everything`) answers in a reproducible order.
    pub(super) waiters: BTreeMap<u64, Waiter>,
    pub(super) next_waiter: u64,
    /// Writers whose batches are applied and who wait for them to be durable: (last LSN, waiter).
    pub(super) sync_waiters: Vec<(Lsn, u64)>,
    pub(super) sync_in_flight: bool,
}

impl Durability {
    pub(super) fn new(durable_lsn: Lsn) -> Durability {
        Durability {
            durable_lsn,
            waiters: BTreeMap::new(),
            next_waiter: 0,
            sync_waiters: Vec::new(),
            sync_in_flight: false,
        }
    }
}

/// What happens when a writer's last batch is applied.
pub(super) enum Done {
    /// Already answered (a write-back write); nobody waits any more.
    Answered,
    Unit(Reply<()>),
    Write(Reply<Written>),
    Volume(Reply<VolumeInfo>, VolumeInfo),
}

impl Done {
    /// Answers a failure, or a success without a durability claim.
    pub(super) fn send(self, result: Result<()>) {
        match result {
            Ok(()) => self.succeed(false),
            Err(e) => match self {
                Done::Answered => {}
                Done::Unit(r) => drop(r.send(Err(e))),
                Done::Write(r) => drop(r.send(Err(e))),
                Done::Volume(r, _) => drop(r.send(Err(e))),
            },
        }
    }

    /// Answers a success; `durable`: the change (and everything queued before it) is durable.
    pub(super) fn succeed(self, durable: bool) {
        match self {
            Done::Answered => {}
            Done::Unit(r) => drop(r.send(Ok(()))),
            Done::Write(r) => drop(r.send(Ok(Written { durable }))),
            Done::Volume(r, info) => drop(r.send(Ok(info))),
        }
    }
}

/// A writer (or flush, or volume change) waiting for its batches.
pub(super) struct Waiter {
    /// Its batches not yet applied.
    pub(super) remaining: u32,
    /// Answered only once durable (FUA, flush, volume change).
    pub(super) durable: bool,
    /// The LSN of its last batch.
    pub(super) max_lsn: Lsn,
    pub(super) done: Done,
}

impl Core {
    pub(super) fn add_waiter(&mut self, remaining: u32, durable: bool, done: Done) -> u64 {
        let id = self.durability.next_waiter;
        self.durability.next_waiter += 1;
        self.durability.waiters.insert(id, Waiter { remaining, durable, max_lsn: Lsn(0), done });
        id
    }

    pub(super) fn close_open_batch_for_flush(&mut self, waiter: u64) {
        self.log.commit_loop.note_flush();
        self.seal_open_batch();
        let through = Lsn(self.log.next_lsn.0 - 1);
        if self.log.unsubmitted.back().is_some_and(|u| u.0 == through) {
            if let Some(b) = self.log.batches.get_mut(&through) {
                b.want_durable = true;
            }
        }
        let w = self.durability.waiters.get_mut(&waiter).expect("waiter");
        w.max_lsn = through;
        self.durability.sync_waiters.push((through, waiter));
    }

    /// Answers the waiters whose batches are all durable now.
    pub(super) fn reply_synced(&mut self) -> bool {
        let durable = self.durability.durable_lsn;
        let mut replied = false;
        let mut i = 0;
        while i < self.durability.sync_waiters.len() {
            let (through, id) = self.durability.sync_waiters[i];
            if through <= durable {
                self.durability.sync_waiters.swap_remove(i);
                if let Some(w) = self.durability.waiters.remove(&id) {
                    w.done.succeed(true);
                }
                replied = true;
            } else {
                i += 1;
            }
        }
        replied
    }

    /// After a failed write or sync: fail every waiting writer and drop unapplied batches. Reads of
    /// applied data keep working; the index never saw the failed batches.
    pub(super) fn fail_everything(&mut self) {
        let cause = self.poisoned.clone().unwrap_or_default();
        for (_, w) in std::mem::take(&mut self.durability.waiters) {
            w.done.send(Err(Error::Poisoned { cause: cause.clone() }));
        }
        self.durability.sync_waiters.clear();
        self.log.batches.clear();
        self.log.unsubmitted.clear();
        self.log.open = None;
        self.log.unwritten_blocks = 0;
        self.log.pending.clear();
        self.log.pending_unmaps.clear();
        for r in self.ckpt.waiters.drain(..) {
            let _ = r.send(Err(Error::Poisoned { cause: cause.clone() }));
        }
        self.ckpt.phase = CkptPhase::Idle;
        self.ckpt.wanted = false;
        match self.intake.stall.take() {
            Some(Stall::Space { op, .. }) => op.done.send(Err(Error::Poisoned { cause: cause.clone() })),
            // Its reads are still in flight: it fails when the last one returns.
            Some(Stall::Rmw { op, bases, outstanding, error }) => {
                let error = Some(error.unwrap_or(Error::Poisoned { cause: cause.clone() }));
                self.intake.stall = Some(Stall::Rmw { op, bases, outstanding, error });
            }
            None => {}
        }
        self.gc.phase = Gc::Idle;
    }

    /// Issues an fdatasync when a waiter, a segment on its way to reuse or the checkpoint needs
    /// one and every batch it covers has completed.
    pub(super) fn step_syncs(&mut self) -> bool {
        if self.durability.sync_in_flight {
            return false;
        }
        let completed = self.completed_through();
        let mut want = false;
        if self.durability.sync_waiters.iter().any(|(t, _)| *t > self.durability.durable_lsn && *t <= completed) {
            want = true;
        }
        // Segments waiting to be freed need a sync of what superseded their data, but only once
        // free space matters: until then the syncs that flushes and checkpoints issue anyway free
        // them, and a writer that never flushes (a sequential copy) is not slowed by a device
        // cache flush per segment it overwrites (one per 8 MiB: 160 a second at 1.3 GB/s, which
        // cost a third of the throughput of 1 MiB writes on a virtio disk). The margin is twice
        // the cleaner's threshold, so these frees come before the cleaner would start copying.
        if self.segments.n_pending_free > 0
            && (self.free_segments() < 2 * self.gc_low_segments() || self.low_on_space())
            && self.segments.table.iter().any(|s| {
                s.status == SegStatus::PendingFree
                    && s.free_after_lsn > self.durability.durable_lsn
                    && s.free_after_lsn <= completed
            })
        {
            want = true;
        }
        if let CkptPhase::SyncBefore { through, .. } = &self.ckpt.phase {
            if *through > self.durability.durable_lsn {
                want = true;
            }
        }
        let ckpt_after = matches!(self.ckpt.phase, CkptPhase::SyncAfter { .. }) && self.ckpt.sync_after_token.is_none();
        if want || ckpt_after {
            let token = self.io.next_token;
            self.submit(Token::Sync { through: completed }, IoKind::Sync);
            self.durability.sync_in_flight = true;
            if ckpt_after {
                self.ckpt.sync_after_token = Some(token);
            }
            return true;
        }
        false
    }

    /// An fdatasync completed: everything it covered is durable.
    pub(super) fn synced(&mut self, token: u64, through: Lsn, result: std::io::Result<()>) {
        self.durability.sync_in_flight = false;
        if let Err(e) = result {
            self.poison(format!("fdatasync failed: {e}"));
            self.fail_everything();
            return;
        }
        self.stats.syncs += 1;
        self.durability.durable_lsn = self.durability.durable_lsn.max(through);
        if let CkptPhase::SyncAfter { header } = &self.ckpt.phase {
            if self.ckpt.sync_after_token == Some(token) {
                let header = *header;
                self.checkpoint_done(header);
            }
        }
        self.reply_synced();
    }

    /// Nothing is durable that has not completed, one sync at most is in flight, and every writer
    /// waiting for a sync is still waiting.
    pub(super) fn check_durability(&self) {
        let d = &self.durability;
        assert!(d.durable_lsn <= self.completed_through(), "durable LSN {} beyond the completed log", d.durable_lsn);
        let syncs = self.io.tokens.values().filter(|t| matches!(t, Token::Sync { .. })).count();
        assert_eq!(syncs, d.sync_in_flight as usize, "syncs in flight");
        for (through, id) in &d.sync_waiters {
            let w = d.waiters.get(id).expect("a sync waiter without its writer");
            assert!(w.durable && w.remaining == 0 && w.max_lsn == *through, "sync waiter {id}");
        }
    }
}
