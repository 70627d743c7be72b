//! A planned switchover: the primary hands its role to its in-sync peer without losing or
//! refusing an acknowledged write (`docs/replication.md`, "Switchover").
//!
//! The loop stops taking client operations, lets those in flight finish (each is confirmed by the
//! peer, as always), and once the peer holds every tag and the pair is in sync asks its authority
//! to make the peer primary (`WitnessHandover`). Granted, it deposes itself: its node steps down to
//! secondary, the link closes, and the peer, finding itself the recorded primary, takes the role
//! at its next request and resyncs this node (nothing to ship). Refused, or not ready within
//! [`HANDOVER_WAIT_MAX`], it takes client operations again as before.

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;

/// How long a switchover waits for the operations in flight to be confirmed by the peer before it
/// gives up (and the volume takes writes again): 5 s. In sync, a write is confirmed within a round
/// trip and a log write on each node, milliseconds; one still waiting after seconds means the
/// peer is in trouble, and handing it the role then would be the wrong move.
pub(super) const HANDOVER_WAIT_MAX: Duration = Duration::from_secs(5);

/// A switchover under way.
pub(super) struct Handover {
    to: String,
    reply: oneshot::Sender<Result<Grant>>,
    until: Instant,
    /// The authority has been asked.
    asked: bool,
}

impl Handover {
    pub(super) fn until(&self) -> Instant {
        self.until
    }
}

impl Owner {
    /// Starts a switchover to the peer node `to`, or answers at once why it cannot.
    pub(super) fn start_handover(&mut self, to: String, reply: oneshot::Sender<Result<Grant>>) {
        match self.handover_refusal() {
            Some(why) => {
                let _ = reply.send(Err(ReplError::Invalid(why)));
            }
            None => {
                tracing::info!(volume = %self.name, to = %to, "switchover: holding new client operations until those in flight are confirmed");
                self.handover = Some(Handover { to, reply, until: Instant::now() + HANDOVER_WAIT_MAX, asked: false });
            }
        }
    }

    /// Why a switchover cannot start now, if it cannot.
    fn handover_refusal(&self) -> Option<String> {
        if self.handover.is_some() {
            return Some(format!("a switchover of {} is already under way", self.name));
        }
        if self.cfg.authority.is_none() {
            return Some(format!(
                "{} has no witness: a switchover is granted by one (without, use `demote` here, then `promote` on \
                 the peer)",
                self.name
            ));
        }
        let v = self.peer.borrow();
        if !v.connected || !v.in_sync || v.solo || self.resync.is_some() {
            return Some(format!(
                "the peer of {} is not in sync ({}): it may lack acknowledged writes; switch over once \
                 `syncblock status` shows it in sync",
                self.name,
                if v.connected { "resyncing" } else { "not connected" }
            ));
        }
        None
    }

    /// Whether the peer holds everything this primary acknowledged or will: no client operation
    /// in flight, the pair in sync, every tag applied by the peer.
    fn handover_ready(&self) -> bool {
        let v = self.peer.borrow();
        self.ops.is_empty()
            && self.resync.is_none()
            && self.link_up()
            && v.connected
            && v.in_sync
            && !v.solo
            && v.applied >= self.next_tag - 1
    }

    /// Each turn: asks the authority once the switchover is ready; gives up past its deadline.
    pub(super) fn step_handover(&mut self) {
        let Some(h) = &self.handover else { return };
        if h.asked {
            return;
        }
        if Instant::now() >= h.until {
            let h = self.handover.take().expect("checked");
            let why = format!(
                "switchover of {} abandoned: {} client operations still waited for the peer after {:?}; writes \
                 continue on this node",
                self.name,
                self.ops.len(),
                HANDOVER_WAIT_MAX
            );
            tracing::warn!(volume = %self.name, "{why}");
            let _ = h.reply.send(Err(ReplError::Stopped(why)));
            return;
        }
        if self.witness_asking || !self.handover_ready() {
            return;
        }
        let req = Frame::WitnessHandover {
            pair: self.state.pair,
            volume: self.name.clone(),
            node: self.cfg.node.clone(),
            epoch: self.state.epoch,
            to: h.to.clone(),
        };
        self.handover.as_mut().expect("checked").asked = true;
        self.ask_witness(Ask::Handover, req);
    }

    /// The authority's answer to the switchover: granted, this primary steps down; refused (or not
    /// answered), it takes client operations again. A grant whose answer was lost leaves this node
    /// writing in its old epoch with its peer, which still confirms every write: its next report
    /// is refused as deposed, and it steps down then, its peer holding every write it acknowledged
    /// (and it records the grant's epoch as seen, as after an answered grant: `on_deposed_in`).
    pub(super) fn on_handover_answer(&mut self, r: Result<Grant>) {
        let Some(h) = self.handover.take() else { return };
        match r {
            Ok(grant) => {
                tracing::warn!(volume = %self.name, to = %grant.primary, epoch = grant.epoch.0, "switchover granted: stepping down to secondary");
                // Known before the deposition is: the node records the grant's epoch as seen when
                // it steps down (see `Primary::handed_over`).
                self.handed_over.store(grant.epoch.0, std::sync::atomic::Ordering::Release);
                self.depose(format!("handed over to {} in epoch {}", grant.primary, grant.epoch));
                let _ = h.reply.send(Ok(grant));
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, "switchover refused: {e}; writes continue on this node");
                if e.refusal().is_none() {
                    // No answer: the authority may have granted it. If so, this node learns it
                    // from a refusal naming the next epoch (`on_deposed_in`).
                    self.handover_unanswered = Some(self.state.epoch);
                }
                if self.deposed_by(&e) {
                    self.depose(e.to_string());
                }
                let _ = h.reply.send(Err(e));
            }
        }
    }

    /// A refusal from the authority deposed this primary: it names the record's epoch. One
    /// exactly past the epoch of a switchover whose answer never came is taken for that
    /// switchover's grant, and the node steps down having seen it, as after an answered grant. (A
    /// report granted since does not clear the mark: etcd may answer it from the record it held
    /// before the switchover. Were the epoch a takeover's instead, the record would be solo, and
    /// the rules refuse this node the role for that; solo is cleared only once the new primary's
    /// peer is in sync, and that peer is either this node, which then has seen the epoch anyway,
    /// or in a cluster another node, which leaves this one without a replica to promote.)
    pub(super) fn on_deposed_in(&mut self, epoch: syncblock_engine::Epoch) {
        if self.handover_unanswered.is_some_and(|asked| asked.next() == epoch) {
            tracing::warn!(volume = %self.name, epoch = epoch.0, "deposed in the epoch of a switchover whose grant was not heard: the switchover was granted");
            self.handed_over.store(epoch.0, std::sync::atomic::Ordering::Release);
        }
    }
}
