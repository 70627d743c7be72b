//! etcd as the authority: a volume's record (`grants/NAME`) changes only by a transaction that
//! compares the record's revision with the one the decision was made from, and that this node's
//! `alive/` key still carries its own lease. The rules are the witness's
//! ([`crate::witness::decide_record`]); what the witness learns from reports (is the primary
//! alive?) comes here from the primary's node lease: `alive/PRIMARY` exists or not.
//!
//! Solo operation (the primary acknowledging alone) is bounded by this node's lease: a grant is
//! valid until two thirds of the lease's TTL after the last keep-alive etcd answered was *sent*.
//! etcd can expire the lease (and so let another node take the volume over) no earlier than a TTL
//! after it *received* that keep-alive, so a node whose clock runs up to a third slow has stopped
//! acknowledging alone by then. docs/cluster.md gives the whole argument, and where etcd can break it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Compare, CompareOp};
use syncblock_engine::Epoch;
use tokio::sync::watch;
use tokio::time::Instant;

use super::batch::Batcher;
use super::{Cluster, GrantDoc};
use crate::authority::{Authority, BoxFuture};
use crate::wire::{Frame, Refusal};
use crate::witness::{decide_record, Grant, Record};
use crate::{ReplError, Result};

/// How long a request refused because the primary's node is alive is held before the refusal is
/// answered: 200 ms, while the cluster's watch may report that node's `alive/` key gone (its lease
/// expired), in which case the request is decided again at once. A failover then starts within
/// milliseconds of etcd expiring the dead node's lease, not on a 200 ms grid of asking again; the
/// node, refused after the hold, asks again at once (`retry_after_ms` 1), so it asks at most five
/// times a second per volume while it waits, as before, and with the watch broken (etcd lost and
/// read again) a failover still starts within this long of the expiry.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

/// How long a report is answered from the record this node last read, without asking etcd: 5 s.
/// Reports only confirm what the record says (a primary learns it was deposed from its peer and
/// from the epoch checks on the data path within a heartbeat; here within 5 s), so an idle
/// primary costs etcd one read every 5 s, not one per heartbeat. At 1 s, 100,000 idle volumes
/// were 100,000 etcd reads a second. Reports that would change the record (an in-sync report of
/// a solo or never-synced record) always read.
pub const CACHE_FOR: Duration = Duration::from_secs(5);

/// How long a report waits for etcd before it is answered from the record last read under the same
/// lease: 300 ms, well inside the grant (two thirds of a TTL), so a slow etcd read never lets a
/// solo grant lapse while this node's lease is kept.
pub const REPORT_WAIT: Duration = Duration::from_millis(300);

/// This node's standing in the cluster: its lease, and until when it may act on a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub lease: i64,
    /// `None`: no keep-alive answered recently (etcd unreachable, or the lease lost).
    pub valid_until: Option<Instant>,
    /// What a grant's lease is: two thirds of the TTL.
    pub grant_lease: Duration,
}

/// The authority of one node's volumes in a cluster.
pub struct Etcd {
    cluster: Cluster,
    node: String,
    standing: watch::Receiver<Standing>,
    /// Counts the `alive/` keys the cluster's watch has seen deleted (see [`RETRY_AFTER`]).
    alive_gone: watch::Receiver<u64>,
    /// The record each volume had when this node last read or wrote it, under which lease, and
    /// when. An entry serves reports only under the same lease: a node whose lease expired (and
    /// that registered again) may have lost its role meanwhile, even by a forced takeover.
    cache: Mutex<HashMap<String, (GrantDoc, i64, Instant)>>,
    /// This node's record changes, sent together when they come together.
    batch: Batcher,
}

impl Etcd {
    /// `alive_gone` changes each time the cluster's watch sees a node's `alive/` key deleted.
    pub fn new(
        cluster: Cluster,
        node: String,
        standing: watch::Receiver<Standing>,
        alive_gone: watch::Receiver<u64>,
    ) -> Etcd {
        let batch = Batcher::new(cluster.clone());
        Etcd { cluster, node, standing, alive_gone, cache: Mutex::new(HashMap::new()), batch }
    }

    /// The record a report may be answered from without asking etcd, and when it was read: read
    /// under `lease` (the current one), naming the reporter as primary of the reported epoch, and
    /// not one the report would change.
    fn cached_report(&self, req: &Frame, lease: i64) -> Option<(GrantDoc, Instant)> {
        let Frame::WitnessReport { pair, volume, node, epoch, in_sync } = req else { return None };
        let (g, l, at) = self.cache.lock().expect("cache").get(volume.as_str()).cloned()?;
        let current = g.primary == *node && g.epoch == epoch.0 && g.pair == *pair && l == lease;
        (current && !(*in_sync && (g.solo || !g.synced))).then_some((g, at))
    }

    fn grant(&self, doc: &GrantDoc, standing: &Standing) -> Result<Grant> {
        let valid_until = standing.valid_until.ok_or_else(|| {
            ReplError::Stopped(format!("{}: no etcd keep-alive answered recently; granting nothing", self.node))
        })?;
        Ok(Grant {
            epoch: Epoch(doc.epoch),
            primary: doc.primary.clone(),
            solo: doc.solo,
            lease: standing.grant_lease,
            valid_until,
        })
    }

    async fn decide(&self, req: &Frame) -> Result<Grant> {
        let Some((pair, volume, node)) = req.authority_request() else {
            return Err(ReplError::refused(Refusal::Protocol, format!("not an authority request: {req:?}")));
        };
        // A handover names its new primary: it must hold a replica and be alive.
        let handed_to = match req {
            Frame::WitnessHandover { to, .. } => Some(to.as_str()),
            _ => None,
        };
        if *node != self.node {
            return Err(ReplError::Invalid(format!("{} cannot ask on behalf of {node}", self.node)));
        }
        let standing = *self.standing.borrow();
        if standing.valid_until.is_none_or(|t| Instant::now() >= t) {
            return Err(ReplError::Stopped(format!(
                "{}: this node's etcd lease is not current (no keep-alive answered); granting nothing",
                self.node
            )));
        }
        if let Some((g, _)) = self.cached_report(req, standing.lease).filter(|(_, at)| at.elapsed() < CACHE_FOR) {
            return self.grant(&g, &standing);
        }
        let grant_key = self.cluster.key(&format!("grants/{volume}"));
        let mine = self.cluster.key(&format!("alive/{node}"));
        // A promotion (or handover) also reads the volume's record, in the same request.
        let vkey = matches!(req, Frame::WitnessPromote { .. } | Frame::WitnessHandover { .. })
            .then(|| self.cluster.key(&format!("volumes/{volume}")));
        // The hold for a live primary's alive key to go ends here, however many other nodes' keys
        // go meanwhile (each wakes the request, which decides again, within the same hold).
        let hold_until = Instant::now() + RETRY_AFTER;
        for _ in 0..5 {
            // Deletions seen from here on wake a request held because the primary is alive.
            let mut gone = self.alive_gone.clone();
            gone.borrow_and_update();
            // Read with the other volumes' reads queued meanwhile, in one request (`batch.rs`).
            let read = self.batch.get(std::iter::once(grant_key.clone()).chain(vkey.clone()).collect()).await?;
            let (doc, rev) = match &read[0] {
                Some((value, rev)) => {
                    let doc: GrantDoc =
                        super::decode(&grant_key, value).map_err(|e| ReplError::Stopped(e.to_string()))?;
                    (Some(doc), *rev)
                }
                None => (None, 0),
            };
            // A promotion (or reclaim) only of a node the volume's record lists, and only while that
            // record is the one read: a replica that re-protection moved away, still running on a
            // node that was cut off from etcd, must never take the volume over (found by the
            // control-plane simulation: it was promoted, then deleted its copy).
            let mut listed_rev = None;
            if let (Some(vkey), Some(Some((value, vrev)))) = (&vkey, read.get(1)) {
                let spec: super::VolumeSpec =
                    super::decode(vkey, value).map_err(|e| ReplError::Stopped(e.to_string()))?;
                if !spec.replicas.iter().any(|r| r == node) {
                    let why = format!(
                        "{node} holds no replica of {volume} any more (its replicas are on {})",
                        spec.replicas.join(", ")
                    );
                    return Err(ReplError::refused(Refusal::NotRegistered, why));
                }
                if let Some(to) = handed_to.filter(|to| !spec.replicas.iter().any(|r| r == to)) {
                    let why =
                        format!("{to} holds no replica of {volume} (its replicas are on {})", spec.replicas.join(", "));
                    return Err(ReplError::refused(Refusal::NotRegistered, why));
                }
                listed_rev = Some((vkey.clone(), *vrev));
            }
            if let Some(d) = &doc {
                if pair != 0 && d.pair != pair {
                    let why = format!(
                        "{volume} in the cluster is pair {:016x}; this replica is of pair {pair:016x} (a volume of \
                         the same name that was deleted)",
                        d.pair
                    );
                    return Err(ReplError::refused(Refusal::NotRegistered, why));
                }
            }
            let mut record = doc.as_ref().map(|d| Record {
                volume: volume.to_string(),
                epoch: Epoch(d.epoch),
                primary: d.primary.clone(),
                solo: d.solo,
                synced: d.synced,
            });
            let other = record.as_ref().map(|r| r.primary.clone()).filter(|p| p != node);
            // Whether the record's primary (another node) and a handover's new primary are alive,
            // in one request.
            let alive_keys: Vec<String> = other
                .iter()
                .map(String::as_str)
                .chain(handed_to)
                .map(|n| self.cluster.key(&format!("alive/{n}")))
                .collect();
            let alive = if alive_keys.is_empty() { Vec::new() } else { self.batch.get(alive_keys).await? };
            let other_alive = other.is_none() || alive.first().is_some_and(Option::is_some);
            if let Some(to) = handed_to.filter(|_| alive.last().is_none_or(Option::is_none)) {
                let why = format!("{to} is not alive (no etcd lease): {volume} cannot be handed over to it");
                return Err(ReplError::refused(Refusal::NotRegistered, why));
            }
            let silent = if other_alive { Duration::ZERO } else { Duration::MAX };
            let (decision, changed) = decide_record(&mut record, pair, req, silent, RETRY_AFTER * 2 / 3);
            let r = match decision {
                Ok(r) => r,
                Err((Refusal::PrimaryAlive { .. }, _)) => {
                    if let Ok(Ok(())) = tokio::time::timeout_at(hold_until, gone.changed()).await {
                        // A node's lease expired meanwhile, perhaps the primary's: decide again
                        // (at most five decisions in all, as for records that keep changing).
                        continue;
                    }
                    let why = format!(
                        "{} (primary of {volume}) is alive: its node's etcd lease holds",
                        other.as_deref().unwrap_or("?")
                    );
                    return Err(ReplError::refused(Refusal::PrimaryAlive { retry_after_ms: 1 }, why));
                }
                Err((why, reason)) => return Err(ReplError::refused(why, reason)),
            };
            let new = GrantDoc {
                pair: doc.as_ref().map_or(pair, |d| d.pair),
                epoch: r.epoch.0,
                primary: r.primary.clone(),
                solo: r.solo,
                synced: r.synced,
            };
            if changed {
                let mut when = vec![
                    if rev == 0 {
                        Compare::version(grant_key.clone(), CompareOp::Equal, 0)
                    } else {
                        Compare::mod_revision(grant_key.clone(), CompareOp::Equal, rev)
                    },
                    Compare::lease(mine.clone(), CompareOp::Equal, standing.lease),
                ];
                if let Some((vkey, vrev)) = &listed_rev {
                    when.push(Compare::mod_revision(vkey.clone(), CompareOp::Equal, *vrev));
                }
                if let Some(to) = handed_to {
                    // Handed over only to a live node: one whose lease holds when the record moves.
                    when.push(Compare::version(self.cluster.key(&format!("alive/{to}")), CompareOp::Greater, 0));
                }
                if let (Some(p), false) = (&other, other_alive) {
                    if r.primary == *node {
                        // Taken over because the primary's node is gone: only while it still is.
                        when.push(Compare::version(self.cluster.key(&format!("alive/{p}")), CompareOp::Equal, 0));
                    }
                }
                let value = serde_json::to_vec(&new).expect("serialisable");
                // With the other volumes' changes queued meanwhile, in one request (`batch.rs`).
                if !self.batch.put_if(when, grant_key.clone(), value).await? {
                    // The record moved, or this node's lease did: decide again from what is there now.
                    continue;
                }
            }
            self.cache.lock().expect("cache").insert(volume.to_string(), (new.clone(), standing.lease, Instant::now()));
            return self.grant(&new, &standing);
        }
        Err(ReplError::Stopped(format!("{volume}: its etcd record kept changing (five tries)")))
    }
}

impl Authority for Etcd {
    fn ask<'a>(&'a self, req: &'a Frame, timeout: Duration) -> BoxFuture<'a, Result<Grant>> {
        Box::pin(async move {
            // A report that etcd is slow to answer (a loaded node or etcd) is answered from the
            // record last read under this same lease: nobody can have taken the volume over
            // meanwhile, since a takeover needs this node's alive key gone, which ends the lease
            // (a forced one of a volume not solo leaves it, but this node then acknowledges
            // nothing alone: solo needs a fresh grant, which never comes from the cache).
            let fallback = self.cached_report(req, self.standing.borrow().lease).map(|(g, _)| g);
            let limit = if fallback.is_some() { REPORT_WAIT } else { timeout.max(Duration::from_secs(1)) };
            // A request that failed without an answer (an etcd member lost since the client
            // connected) is made once more: the client's channel now avoids that member
            // (`channel.rs`, `FAILED_AVOID`).
            let twice = async {
                match self.decide(req).await {
                    Err(e) if e.refusal().is_none() => {
                        tracing::debug!("etcd request failed ({e}); asking once more");
                        self.decide(req).await
                    }
                    r => r,
                }
            };
            match tokio::time::timeout(limit, twice).await {
                Ok(Ok(g)) => Ok(g),
                Ok(Err(e)) if e.refusal().is_some() => Err(e),
                Ok(Err(e)) => fallback.map_or(Err(e), |g| self.grant(&g, &self.standing.borrow())),
                Err(_) => fallback.map_or_else(
                    || Err(ReplError::Stopped(format!("etcd did not answer within {limit:?}"))),
                    |g| self.grant(&g, &self.standing.borrow()),
                ),
            }
        })
    }

    fn describe(&self) -> String {
        format!("etcd ({})", self.cluster.endpoints)
    }

    fn quiet_reports(&self) -> bool {
        true
    }
}
