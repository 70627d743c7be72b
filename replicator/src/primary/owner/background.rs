//! The resync and the verify pass, a step per turn of the owner's loop: each step is a point of
//! the sequencer's order, between two client operations (`docs/replication.md`, "Resync", "Full
//! sync", "Online verify").

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;
use crate::primary::compare::{blocks_in, fix, fix_runs, log_order, runs_of, take_blocks, windows, Fix};

/// A full sync's state, taken out of [`Resync::Compare`] for a step.
pub(super) struct Compare {
    windows: Vec<ByteRange>,
    next_ask: usize,
    asked: VecDeque<(u64, usize)>,
    todo: VecDeque<ByteRange>,
    order: LogOrder,
}

impl Owner {
    /// One step of the resync or the verify pass, when the link has room: each is a point of the
    /// sequencer's order, between two client operations.
    pub(super) async fn step_background(&mut self) -> Result<()> {
        let LinkState::Up(l) = &self.link else { return Ok(()) };
        // Nothing is queued while the link's backlog holds anything: the loop takes no client
        // operation then either, and waits for the writer to catch up.
        if !l.backlog.is_empty() {
            return Ok(());
        }
        let queued = LINK_QUEUE - l.tx.capacity();
        // Steps of at most `RESYNC_STEP_BYTES_MAX`, each confirmed by its own pong, until the
        // budget is used: the window refills as the peer applies each, so reads, the link and
        // the peer's writes overlap instead of taking turns.
        for _ in 0..RESYNC_UNCONFIRMED_MAX / RESYNC_STEP_BYTES_MAX {
            let steps = self.resync_marks.len();
            self.step_resync().await?;
            if self.resync_marks.len() == steps || !matches!(&self.link, LinkState::Up(l) if l.backlog.is_empty()) {
                break;
            }
        }
        // A verify pass steps while at most `VERIFY_AHEAD_MAX` items wait on the link.
        if queued <= VERIFY_AHEAD_MAX {
            if let Some(v) = self.verify.take() {
                self.step_verify(v).await?;
            }
        }
        Ok(())
    }

    /// One step of the resync, within its budget: what it may have unconfirmed (less while
    /// clients are active), what the node's other copies leave, and `RESYNC_STEP_BYTES_MAX`
    /// (`RESYNC_STEP_BUSY_BYTES_MAX` while clients are active).
    async fn step_resync(&mut self) -> Result<()> {
        if self.resync.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let busy = !self.ops.is_empty() || self.last_client.is_some_and(|t| now < t + CLIENT_QUIET);
        let max = if busy { RESYNC_UNCONFIRMED_BUSY_MAX } else { RESYNC_UNCONFIRMED_MAX };
        let unconfirmed: u64 = self.resync_marks.iter().map(|(_, held)| held.num_permits() as u64).sum();
        let step_max = if busy { RESYNC_STEP_BUSY_BYTES_MAX } else { RESYNC_STEP_BYTES_MAX };
        let budget = max.saturating_sub(unconfirmed).min(step_max);
        // And within what the node's other copies leave (`RESYNC_NODE_BYTES_MAX`). With none
        // left, the step waits for the next turn of the loop (a heartbeat's pong comes every
        // 125 ms at the latest).
        let shared = &self.cfg.resync_bytes;
        let take = budget.min(shared.available_permits() as u64) / BLOCK_BYTES_U64 * BLOCK_BYTES_U64;
        self.step_permit = u32::try_from(take).ok().and_then(|n| shared.clone().try_acquire_many_owned(n).ok());
        let budget = self.step_permit.as_ref().map_or(0, |p| p.num_permits() as u64);
        if budget > 0 {
            match self.resync.take() {
                Some(Resync::Ship { todo, order }) => self.step_ship(todo, order, budget).await?,
                Some(Resync::Compare { windows, next_ask, asked, todo, order }) => {
                    self.step_compare(Compare { windows, next_ask, asked, todo, order }, budget, busy).await?
                }
                other => self.resync = other,
            }
        }
        // What the step did not use goes back at once.
        self.step_permit = None;
        Ok(())
    }

    /// Ships up to `budget` bytes of data of the changed ranges, from where the last step ended.
    pub(super) async fn step_ship(
        &mut self,
        mut todo: VecDeque<ByteRange>,
        mut order: LogOrder,
        budget: u64,
    ) -> Result<()> {
        if order.is_done() {
            if todo.is_empty() {
                self.commit();
                return Ok(());
            }
            order = self.plan_order(&mut todo).await?;
        }
        let data = self.ship_ordered(&mut order, budget).await?;
        self.confirm_step(data);
        self.resync = Some(Resync::Ship { todo, order });
        Ok(())
    }

    /// Plans the next pass of shipping, at this point of the order: takes up to
    /// `ORDER_BLOCKS_MAX` blocks from the front of `todo`, ships a trim now for each stretch of
    /// them this node does not map, and returns the mapped ones in the order they lie in its log,
    /// to be read and shipped a budget at a time ([`Owner::ship_ordered`]).
    ///
    /// Correct at any point of the order, however long after the ranges were found to differ:
    /// the peer gets what this node holds now, and every operation after this point reaches
    /// both nodes. (A trim decided earlier and sent later could undo a client write between the
    /// two points, which is why mapped or not is asked here, not remembered; and a block planned
    /// here is read again, with whatever it holds then, when its turn comes.)
    async fn plan_order(&mut self, todo: &mut VecDeque<ByteRange>) -> Result<LogOrder> {
        let runs = take_blocks(todo, ORDER_BLOCKS_MAX);
        let places = self.store.block_places(self.volume, runs.clone()).await?;
        let (holes, lbas) = if places.len() > SORT_INLINE_MAX {
            tokio::task::spawn_blocking(move || log_order(&runs, places))
                .await
                .map_err(|e| ReplError::Stopped(format!("sorting a resync pass: {e}")))?
        } else {
            log_order(&runs, places)
        };
        let tag = self.next_tag - 1;
        let mut trimmed = 0;
        for h in holes {
            self.ship(Out::Frame(Frame::Trim { tag, offset: h.offset, len: h.len }));
            trimmed += h.len;
        }
        self.peer.send_modify(|v| v.resync.bytes_done += trimmed);
        Ok(LogOrder { lbas, next: 0 })
    }

    /// Queues reads of the next blocks of `order`, up to `budget` bytes, as of this point of the
    /// order (a block trimmed since the pass was planned is shipped as a trim); returns the data
    /// bytes queued.
    async fn ship_ordered(&mut self, order: &mut LogOrder, budget: u64) -> Result<u64> {
        let tag = self.next_tag - 1;
        let n = ((budget / BLOCK_BYTES_U64) as usize).min(order.lbas.len() - order.next);
        let step = &order.lbas[order.next..order.next + n];
        for piece in step.chunks((RESYNC_READ_BYTES / BLOCK_BYTES_U64) as usize) {
            let read = self.store.enqueue_read_blocks(self.volume, piece.to_vec()).await?;
            self.ship(Out::Blocks { tag, lbas: piece.to_vec(), read });
        }
        order.next += n;
        let bytes = n as u64 * BLOCK_BYTES_U64;
        self.peer.send_modify(|v| {
            v.resync.bytes_done += bytes;
            v.resync_bytes_shipped += bytes;
        });
        Ok(bytes)
    }

    /// Ends a resync step that queued `data` bytes with a ping: its pong, answered after the
    /// peer applied everything before it, confirms them (see `RESYNC_UNCONFIRMED_MAX`), and
    /// wakes the loop for the next step.
    fn confirm_step(&mut self, data: u64) {
        let nonce = self.ship_ping();
        // A step runs only with its budget taken (`step_background`) and ships at most that.
        let held = self.step_permit.as_mut().and_then(|p| p.split(data as usize));
        self.resync_marks.push_back((nonce, held.expect("a step ships at most the bytes it took")));
    }

    /// A full sync, window by window (see `docs/replication.md`, "Full sync"): the peer's
    /// checksums are asked at a point P1 of the order; when the answer is in, this node's are
    /// taken at a later point P2, and the blocks that differ are shipped (or trimmed) in log
    /// order, as they are when their turn comes, a budget at a time.
    pub(super) async fn step_compare(&mut self, c: Compare, budget: u64, busy: bool) -> Result<()> {
        let Compare { windows, mut next_ask, mut asked, mut todo, mut order } = c;
        if order.is_done() {
            while let Some(theirs) = asked.front().and_then(|(id, _)| self.crc_answers.remove(id)) {
                let (_, k) = asked.pop_front().expect("checked");
                let window = windows[k];
                let mine = self.store.block_crcs(self.volume, window.offset, window.len).await?;
                let runs = fix_runs(window.offset, &mine, &theirs);
                let skipped: u64 = runs.iter().filter(|(_, f)| *f == Fix::Same).map(|(r, _)| r.len).sum();
                todo.extend(runs.iter().filter(|(_, f)| *f != Fix::Same).map(|(r, _)| *r));
                self.peer.send_modify(|v| {
                    v.resync.bytes_done += skipped;
                    v.resync_bytes_skipped += skipped;
                });
            }
            let compared = asked.is_empty() && next_ask == windows.len();
            if !todo.is_empty() && (compared || blocks_in(&todo) >= ORDER_BLOCKS_MAX) {
                order = self.plan_order(&mut todo).await?;
            }
        }
        if !order.is_done() {
            let data = self.ship_ordered(&mut order, budget).await?;
            self.confirm_step(data);
        }
        // While clients are active, asked only with nothing being shipped: an answer goes stale
        // (blocks written since read as different) while it waits, and shipping takes long under
        // a busy volume's budget. Otherwise ahead, so that shipping never waits for an answer. And
        // only while what is left to ship is less than a pass, which bounds `todo`.
        let room = blocks_in(&todo) < ORDER_BLOCKS_MAX;
        while (order.is_done() || !busy) && room && asked.len() < CRC_LOOKAHEAD && next_ask < windows.len() {
            asked.push_back((self.ask_crcs(windows[next_ask]), next_ask));
            next_ask += 1;
        }
        if asked.is_empty() && todo.is_empty() && order.is_done() && next_ask == windows.len() {
            self.commit();
        } else {
            self.resync = Some(Resync::Compare { windows, next_ask, asked, todo, order });
        }
        Ok(())
    }

    /// Queues the resync's commit and a ping: the peer answers pings in stream order, after
    /// applying everything before them, so the pong proves the commit applied (`applied >= tag`
    /// alone cannot: when nothing was written since the common point, the peer reported that tag
    /// before the resync began).
    pub(super) fn commit(&mut self) {
        let tag = self.next_tag - 1;
        let history: Vec<EpochStart> = self.state.history.clone();
        self.ship(Out::Frame(Frame::ResyncCommit { tag, epoch: self.state.epoch, history }));
        let nonce = self.ship_ping();
        self.resync = Some(Resync::Committing { tag, nonce });
    }

    pub(super) fn check_commit(&mut self) {
        let Some(Resync::Committing { tag, nonce }) = self.resync else { return };
        let confirmed = {
            let v = self.peer.borrow();
            v.applied >= tag && v.pong >= nonce
        };
        if !confirmed {
            return;
        }
        self.resync = None;
        let (total, shipped, skipped, full, secs) = {
            let v = self.peer.borrow();
            (
                v.resync.bytes_total,
                v.resync_bytes_shipped,
                v.resync_bytes_skipped,
                v.resync_full,
                v.resync.elapsed_at(Instant::now()).as_secs_f64(),
            )
        };
        tracing::info!(volume = %self.name, bytes = total, shipped, skipped, full, secs, "resync committed at tag {tag}; peer in sync");
        self.peer.send_modify(|v| {
            v.in_sync = true;
            // The peer has everything: every write is confirmed by it again (the witness hears
            // that the pair is in sync at the report sent now, which clears its solo mark).
            v.solo = false;
            v.resync.bytes_done = total;
            v.resync.end();
        });
        self.ops_dirty = true;
        // Tell the witness at once: a pair becomes allowed to continue alone (degrade) only once
        // the witness has heard it was in sync.
        self.timers.report = Instant::now();
    }

    pub(super) async fn start_verify(&mut self, repair: bool, reply: oneshot::Sender<Result<VerifyReport>>) {
        if self.verify.is_some() {
            let _ = reply.send(Err(ReplError::Invalid("a verify pass is already running".into())));
            return;
        }
        let in_sync = {
            let v = self.peer.borrow();
            v.connected && v.in_sync
        };
        let generation = match &self.link {
            LinkState::Up(l) if in_sync => l.generation,
            _ => {
                let msg =
                    "verify needs a connected peer in sync; wait for the resync to finish (see `syncblock status`)";
                let _ = reply.send(Err(ReplError::Invalid(msg.into())));
                return;
            }
        };
        let size = self.size_bytes;
        self.peer.send_modify(|v| v.verify = Progress::begin(size));
        self.verify = Some(Verify {
            generation,
            repair,
            windows: windows(
                &[BlockRun { lba: Lba(0), n_blocks: self.size_bytes / BLOCK_BYTES_U64 }],
                CRC_WINDOW_BYTES,
            ),
            next_ask: 0,
            asked: VecDeque::new(),
            report: VerifyReport::default(),
            started: Instant::now(),
            reply,
        });
    }

    /// Each window is compared at one point of the order: this node's checksums are queued in
    /// its engine and the peer's asked on the link back to back, so both answers describe the
    /// same history prefix (see [`super::Primary::verify`]).
    pub(super) async fn step_verify(&mut self, mut v: Verify) -> Result<()> {
        while v.asked.len() < CRC_LOOKAHEAD && v.next_ask < v.windows.len() {
            let window = v.windows[v.next_ask];
            let mine = self.store.enqueue_block_crcs(self.volume, window.offset, window.len).await?;
            v.asked.push_back((self.ask_crcs(window), v.next_ask, mine));
            v.next_ask += 1;
        }
        let answered = v.asked.front().is_some_and(|(id, _, _)| self.crc_answers.contains_key(id));
        if answered {
            let (id, k, mine) = v.asked.pop_front().expect("checked");
            let theirs = self.crc_answers.remove(&id).expect("checked");
            let mine = mine.await?;
            let window = v.windows[k];
            let differing: Vec<bool> = mine.iter().zip(&theirs).map(|(m, t)| fix(*m, *t) != Fix::Same).collect();
            if v.repair && differing.iter().any(|d| *d) {
                // A later point R than the comparison's: ship this node's state at R (data, or a
                // trim where it has none now), so that a write between the two points is not
                // undone. Blocks equal at the comparison stay equal: both apply the same ops.
                let tag = self.next_tag - 1;
                let now = self.store.block_crcs(self.volume, window.offset, window.len).await?;
                let fixes = runs_of(
                    window.offset,
                    now.iter().zip(&differing).map(|(c, d)| match (d, c) {
                        (false, _) => Fix::Same,
                        (true, Some(_)) => Fix::Ship,
                        (true, None) => Fix::Trim,
                    }),
                );
                let (shipped, trimmed) = self.queue_fixes(tag, &fixes).await?;
                v.report.blocks_repaired += (shipped + trimmed) / BLOCK_BYTES_U64;
            }
            for (k, d) in differing.iter().enumerate() {
                if !*d {
                    continue;
                }
                v.report.blocks_differing += 1;
                let offset = window.offset + k as u64 * BLOCK_BYTES_U64;
                let n_ranges = v.report.ranges.len();
                match v.report.ranges.last_mut() {
                    Some(last) if last.end() == offset => last.len += BLOCK_BYTES_U64,
                    _ if n_ranges < VERIFY_RANGES_MAX => {
                        v.report.ranges.push(ByteRange { offset, len: BLOCK_BYTES_U64 })
                    }
                    _ => v.report.ranges_truncated = true,
                }
            }
            v.report.bytes_compared += window.len;
            self.peer.send_modify(|p| p.verify.bytes_done += window.len);
        }
        if v.asked.is_empty() && v.next_ask == v.windows.len() {
            v.report.elapsed = v.started.elapsed();
            let report = v.report.clone();
            tracing::info!(
                volume = %self.name,
                differing_blocks = report.blocks_differing,
                repaired = report.blocks_repaired,
                secs = report.elapsed.as_secs_f64(),
                "verify pass done"
            );
            self.peer.send_modify(|p| {
                p.verify.end();
                p.last_verify = Some(report.clone());
            });
            let _ = v.reply.send(Ok(report));
        } else {
            self.verify = Some(v);
        }
        Ok(())
    }

    /// Queues a `CrcRequest` at this point of the order: the answer is the peer's image after
    /// every frame queued before it. Registered before the frame can reach the peer.
    pub(super) fn ask_crcs(&mut self, window: ByteRange) -> u64 {
        let id = self.next_crc_id;
        self.next_crc_id += 1;
        self.crc_asked.insert(id, window);
        self.ship(Out::Frame(Frame::CrcRequest { id, offset: window.offset, len: window.len }));
        id
    }

    /// Queues engine reads of `range` (in pieces of at most `RESYNC_READ_BYTES`) and their frames
    /// on the link, at this point of the order.
    pub(super) async fn queue_reads(&mut self, tag: u64, range: ByteRange, resync: bool) -> Result<()> {
        let mut o = range.offset;
        while o < range.end() {
            let n = (range.end() - o).min(RESYNC_READ_BYTES);
            let read = self.store.enqueue_read(self.volume, o, n).await?;
            self.ship(Out::Read { tag, offset: o, read });
            if resync {
                self.peer.send_modify(|v| {
                    v.resync.bytes_done += n;
                    v.resync_bytes_shipped += n;
                });
            }
            o += n;
        }
        Ok(())
    }

    /// Queues the repairs `runs` call for, now (a verify's repair); returns bytes shipped as
    /// reads and bytes trimmed.
    pub(super) async fn queue_fixes(&mut self, tag: u64, runs: &[(ByteRange, Fix)]) -> Result<(u64, u64)> {
        let (mut shipped, mut trimmed) = (0, 0);
        for &(range, f) in runs {
            match f {
                Fix::Same => {}
                Fix::Ship => {
                    self.queue_reads(tag, range, false).await?;
                    shipped += range.len;
                }
                Fix::Trim => {
                    self.ship(Out::Frame(Frame::Trim { tag, offset: range.offset, len: range.len }));
                    trimmed += range.len;
                }
            }
        }
        Ok((shipped, trimmed))
    }
}
