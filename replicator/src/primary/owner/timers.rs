//! The owner's timers: heartbeats, reconnection, reports to the witness and its answers (solo
//! operation and its lease, deposition), the trim floor, and warnings about operations waiting
//! for the peer.

use tokio::time::Instant;

use crate::QUIET_EVERY;

use super::*;

impl Owner {
    pub(super) fn on_timers(&mut self) {
        let now = Instant::now();
        if self.publish_due && now >= self.published_at + PUBLISH_EVERY {
            self.publish_now();
        }
        if self.link_up() && now >= self.timers.ping {
            // Quiet: nothing shipped since the last ping and no new floor to tell, on a node link
            // whose own heartbeat proves the peer node alive.
            let quiet =
                !self.shipped && self.floor_tag() == self.pinged_floor && self.cfg.net.peer_beats(self.peer_addr);
            self.ship_ping();
            self.shipped = false;
            self.quiet_ping = quiet;
            self.timers.ping = if quiet { self.cfg.net.quiet_due(now) } else { now + self.cfg.heartbeat };
        }
        if let LinkState::Down { retry_at } = self.link {
            if now >= retry_at {
                self.connect();
            }
        }
        self.ask_solo_if_due(now);
        if self.cfg.authority.is_some() && !self.witness_asking && now >= self.timers.report {
            self.report_to_witness();
            self.timers.report = self.next_report(now);
        }
        let lease_over = self.solo_until.is_none_or(|t| now >= t);
        if self.peer.borrow().solo && lease_over {
            tracing::error!(volume = %self.name, "solo lease expired (witness unreachable): writes wait for the peer or the witness");
            self.peer.send_modify(|v| v.solo = false);
        }
        if now >= self.timers.floor {
            self.timers.floor = now + FLOOR_PERIOD;
            if let Some(floor) = self.floor.due(self.floor_tag(), now) {
                let (store, volume, attr, events) =
                    (self.store.clone(), self.volume, self.state.encode(), self.events_tx.clone());
                tokio::spawn(async move {
                    let r = FloorRecord::record(&store, volume, floor, attr).await.map_err(ReplError::from);
                    let _ = events.send(Event::FloorWritten(floor, r)).await;
                });
            }
        }
        if now >= self.timers.warn {
            self.timers.warn = now + Duration::from_secs(1);
            self.warn_if_waiting(now);
        }
    }

    /// Queues a ping with the next nonce and the current floor; returns the nonce. The peer
    /// answers it in stream order, once everything queued before it applied.
    pub(super) fn ship_ping(&mut self) -> u64 {
        self.next_nonce += 1;
        let (epoch, nonce, floor) = (self.state.epoch, self.next_nonce, self.floor_tag());
        self.pinged_floor = floor;
        self.ship(Out::Frame(Frame::Ping { epoch, nonce, floor }));
        nonce
    }

    /// When the next report falls due, one going at `now`: a witness period later, or, for a
    /// volume in sync, connected, not solo and not handing over, if the authority allows it
    /// ([`crate::authority::Authority::quiet_reports`]), with the quiet pings on the node's grid of
    /// quiet timers ([`crate::net::Net::quiet_due`], at most [`QUIET_EVERY`] later). Such a report
    /// only confirms the record: no write can be acknowledged without the peer meanwhile.
    pub(super) fn next_report(&self, now: Instant) -> Instant {
        let quiet = self.cfg.authority.as_ref().is_some_and(|a| a.quiet_reports()) && self.handover.is_none() && {
            let v = self.peer.borrow();
            v.connected && v.in_sync && !v.solo
        };
        if quiet && self.witness_period <= QUIET_EVERY {
            self.cfg.net.quiet_due(now)
        } else {
            now + self.witness_period
        }
    }

    /// The tag known durable on both nodes: trims above it are still needed by a future resync.
    pub(super) fn floor_tag(&self) -> u64 {
        self.local_durable.min(self.peer.borrow().durable)
    }

    pub(super) fn report_to_witness(&mut self) {
        let (in_sync, solo) = {
            let v = self.peer.borrow();
            (v.in_sync, v.solo)
        };
        if in_sync && solo {
            // The peer has everything again: back to confirming every write with it, before the
            // witness hears that the pair is in sync.
            self.peer.send_modify(|v| v.solo = false);
        }
        let report = Frame::WitnessReport {
            pair: self.state.pair,
            volume: self.name.clone(),
            node: self.cfg.node.clone(),
            epoch: self.state.epoch,
            in_sync,
        };
        self.ask_witness(Ask::Report, report);
    }

    pub(super) fn ask_witness(&mut self, ask: Ask, req: Frame) {
        let Some(authority) = self.cfg.authority.clone() else { return };
        self.witness_asking = true;
        let (timeout, events) = (self.cfg.timeout, self.events_tx.clone());
        tokio::spawn(async move {
            let r = authority.ask(&req, timeout).await;
            let _ = events.send(Event::Witness(ask, r)).await;
        });
    }

    /// Whether a refusal (from the witness or the peer) proves this primary was deposed: only a
    /// newer epoch held by another node does. Anything else (the witness failing to record its
    /// state, a protocol error, a witness that lost its records) is treated like a witness or a
    /// link that cannot be reached: it grants nothing, so a solo lease runs out, but it deposes
    /// nobody.
    pub(super) fn deposed_by(&self, e: &ReplError) -> bool {
        matches!(e.refusal(), Some(Refusal::Deposed { epoch }) if epoch > self.state.epoch)
    }

    pub(super) fn on_witness(&mut self, ask: Ask, r: Result<Grant>) {
        self.witness_asking = false;
        if ask == Ask::Handover {
            return self.on_handover_answer(r);
        }
        let now = Instant::now();
        match (ask, r) {
            (Ask::Report, Ok(grant)) => {
                // A refusal to go on alone stands until it is granted or the peer is back: reports
                // and requests to go on alone alternate, and the status must not hide it.
                if self.witness_error_from != Ask::Solo {
                    self.last_witness_error.clear();
                }
                // Reports renew the lease: at least four per lease, whatever the heartbeat.
                self.witness_period = self.cfg.heartbeat.min(grant.lease / 4).max(Duration::from_millis(5));
                // Solo operation is a lease: valid for the witness's lease from the last request
                // it answered (counted from when it was sent, so it ends before the witness,
                // counting from when it received it, would let anyone take over).
                self.solo_until = Some(grant.valid_until);
            }
            (Ask::Solo, Ok(grant)) if now < grant.valid_until => {
                self.last_witness_error.clear();
                self.solo_until = Some(grant.valid_until);
                tracing::warn!(volume = %self.name, "peer away: continuing alone with the witness's consent (RPO > 0 until it resyncs)");
                self.peer.send_modify(|v| v.solo = true);
                self.ops_dirty = true;
            }
            // Answered above.
            (Ask::Handover, Ok(_)) => {}
            (Ask::Solo, Ok(_)) => {
                tracing::warn!(volume = %self.name, "the witness's solo grant arrived after its lease ran out")
            }
            (_, Err(e)) if self.deposed_by(&e) => {
                tracing::error!(volume = %self.name, "the witness says this primary was deposed: {e}");
                if let Some(Refusal::Deposed { epoch }) = e.refusal() {
                    self.on_deposed_in(epoch);
                }
                self.depose(e.to_string());
                return;
            }
            (_, Err(e)) => {
                let msg = match e.refusal() {
                    Some(_) => format!("the witness refuses ({e}); treated as unreachable"),
                    None => format!("witness unreachable: {e}"),
                };
                if msg != self.last_witness_error {
                    tracing::warn!(volume = %self.name, "{msg}");
                    self.last_witness_error = msg;
                }
                self.witness_error_from = ask;
            }
        }
        if ask != Ask::Report {
            return;
        }
        // A request held back while this report was in flight may be due.
        self.ask_solo_if_due(now);
    }

    /// When to ask to continue alone (see [`Owner::ask_solo_if_due`]), if the peer is away.
    pub(super) fn solo_due(&self) -> Option<Instant> {
        if self.cfg.policy != Policy::Degrade || self.cfg.authority.is_none() {
            return None;
        }
        let v = self.peer.borrow();
        let since = self.away_since.filter(|_| !v.connected && !v.solo)?;
        Some((since + self.cfg.timeout).max(self.timers.solo))
    }

    /// Under the degrade policy, a peer away for the link timeout: asks the authority to continue
    /// alone, then again every witness period until it grants it or the peer is back. The peer is
    /// away from the moment its link failed (or, never connected, from this primary's start), so the
    /// volumes whose links failed together, with a peer node, all ask at once, and a cluster node
    /// sends their requests to etcd together (`cluster/batch.rs`). Before, each asked on its first
    /// report past the timeout, up to two report periods late and spread over one.
    pub(super) fn ask_solo_if_due(&mut self, now: Instant) {
        if self.witness_asking || self.solo_due().is_none_or(|t| now < t) {
            return;
        }
        self.timers.solo = now + self.witness_period;
        let req = Frame::WitnessSolo {
            pair: self.state.pair,
            volume: self.name.clone(),
            node: self.cfg.node.clone(),
            epoch: self.state.epoch,
        };
        self.ask_witness(Ask::Solo, req);
    }

    pub(super) fn warn_if_waiting(&mut self, now: Instant) {
        let (n, oldest) = self.waiting();
        let Some(oldest) = oldest.map(|t| now.saturating_duration_since(t)).filter(|o| *o >= WAIT_WARN_AFTER) else {
            self.warned = None;
            return;
        };
        if self.warned.is_some_and(|t| now.saturating_duration_since(t) < WAIT_WARN_EVERY) {
            return;
        }
        self.warned = Some(now);
        let connected = self.peer.borrow().connected;
        let why = match (self.cfg.policy, connected) {
            (_, true) => "the peer is resyncing",
            (Policy::Strict, false) => "the peer is away and the policy is strict: they complete when it is back",
            (Policy::Degrade, false) => "the peer is away and the witness has not granted solo operation",
        };
        tracing::warn!(
            volume = %self.name,
            "{n} client operations waiting for the peer, the oldest for {:.1} s ({why}; `syncblock status` shows it)",
            oldest.as_secs_f64()
        );
    }
}
