//! The witness: a small process that decides, per volume, which node is primary in which epoch,
//! and whether the primary is acknowledging writes alone ("solo").
//!
//! Every decision is made here, one request at a time, and recorded durably before it is answered,
//! so two nodes can never both be granted the primary role of the same epoch, and a secondary is
//! never promoted over a primary that acknowledged writes without it. [`Decider`] holds the rules and
//! is tested on its own; [`run`] serves them over TCP.
//!
//! The rules, per volume record `(epoch, primary, solo)`:
//! - **Report** from the primary of the current epoch refreshes its liveness; an in-sync report
//!   clears `solo`. From anyone else: refused (a deposed primary learns it here).
//! - **Solo** from the current primary: granted, `solo` set. The secondary is now stale.
//! - **Promote** from another node: granted (epoch + 1, it becomes primary, `solo` set, since it
//!   will be alone) only if it is consistent, the record is not `solo`, and the current primary has
//!   not reported for `timeout`. `force` skips the last two checks (an operator accepting loss), but
//!   never hands over while a solo primary's lease may run: it waits 1.5 × `timeout` after its last
//!   report, and a solo primary stops acknowledging alone one `timeout` after its last answered
//!   request.
//!   From the current primary (restarting): a fresh epoch, always.
//! - The first Report for an unknown volume registers its sender as primary of its epoch.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

use crate::link::{read_frame, write_frame};
use crate::net::{BoxListener, BoxStream, Net};
use crate::wire::Frame;
use crate::{ReplError, Result};

/// One volume's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub epoch: u64,
    pub primary: String,
    pub solo: bool,
}

/// The witness's decisions, without I/O. `now` is passed in so tests (and the simulator) control
/// time.
#[derive(Debug, Default)]
pub struct Decider {
    pub records: BTreeMap<String, Record>,
    /// When each volume's primary last reported (not persisted: after a restart every primary
    /// counts as just seen, which only delays a promotion).
    seen: BTreeMap<String, Instant>,
    pub timeout: Duration,
    started: Option<Instant>,
}

/// A decision: the record after it, or why it was refused.
pub type Decision = std::result::Result<Record, String>;

impl Decider {
    pub fn new(records: BTreeMap<String, Record>, timeout: Duration, now: Instant) -> Decider {
        Decider { records, seen: BTreeMap::new(), timeout, started: Some(now) }
    }

    /// Whether the volume's primary reported within `window`.
    fn seen_within(&self, volume: &str, now: Instant, window: Duration) -> bool {
        let last = self.seen.get(volume).copied().or(self.started).unwrap_or(now);
        now.saturating_duration_since(last) < window
    }

    /// Applies a request; returns the decision and whether the record changed (and must be made
    /// durable before the answer goes out).
    pub fn decide(&mut self, req: &Frame, now: Instant) -> (Decision, bool) {
        match req {
            Frame::WitnessReport { volume, node, epoch, in_sync } => {
                let Some(r) = self.records.get_mut(volume) else {
                    let r = Record { epoch: *epoch, primary: node.clone(), solo: false };
                    self.records.insert(volume.clone(), r.clone());
                    self.seen.insert(volume.clone(), now);
                    return (Ok(r), true);
                };
                if r.primary != *node || r.epoch != *epoch {
                    return (
                        Err(format!(
                            "stale: {} is primary of {volume} in epoch {}; {node} (epoch {epoch}) was deposed",
                            r.primary, r.epoch
                        )),
                        false,
                    );
                }
                let changed = *in_sync && r.solo;
                if *in_sync {
                    r.solo = false;
                }
                let r = r.clone();
                self.seen.insert(volume.clone(), now);
                (Ok(r), changed)
            }
            Frame::WitnessSolo { volume, node, epoch } => match self.records.get_mut(volume) {
                Some(r) if r.primary == *node && r.epoch == *epoch => {
                    let changed = !r.solo;
                    r.solo = true;
                    let r = r.clone();
                    self.seen.insert(volume.clone(), now);
                    (Ok(r), changed)
                }
                Some(r) => (Err(format!("stale: {} is primary of {volume} in epoch {}", r.primary, r.epoch)), false),
                None => (Err(format!("{volume} has no primary registered")), false),
            },
            Frame::WitnessPromote { volume, node, epoch, consistent, force } => {
                let alive = self.seen_within(volume, now, self.timeout);
                // A solo primary's lease ends one timeout after its last answered request (sent
                // before we received it); a forced promotion waits half a timeout more, so the old
                // primary has stopped acknowledging alone before the new one starts.
                let lease_live = self.seen_within(volume, now, self.timeout * 3 / 2);
                let Some(r) = self.records.get_mut(volume) else {
                    if *force {
                        let r = Record { epoch: epoch + 1, primary: node.clone(), solo: true };
                        self.records.insert(volume.clone(), r.clone());
                        self.seen.insert(volume.clone(), now);
                        return (Ok(r), true);
                    }
                    return (Err(format!("{volume} has no primary registered yet; nothing to take over")), false);
                };
                if r.primary == *node {
                    // The primary itself, restarting: a fresh epoch, so that no (epoch, tag) it
                    // assigns after a crash can collide with one it assigned before (which its
                    // peer may hold while the crash lost it here).
                    r.epoch += 1;
                    let r = r.clone();
                    self.seen.insert(volume.clone(), now);
                    return (Ok(r), true);
                }
                if *epoch < r.epoch && !*force {
                    return (
                        Err(format!("{node} has seen epoch {epoch} only; the volume is in epoch {}", r.epoch)),
                        false,
                    );
                }
                if !*consistent {
                    return (
                        Err(format!("{node} holds a half-applied resync of {volume}; it cannot take over")),
                        false,
                    );
                }
                if *force && r.solo && lease_live {
                    return (
                        Err(format!(
                            "{} may still be acknowledging writes of {volume} alone (its solo lease has not \
                             expired); try again in {:?}",
                            r.primary,
                            self.timeout * 3 / 2
                        )),
                        false,
                    );
                }
                if !*force {
                    if r.solo {
                        return (
                            Err(format!(
                                "{} acknowledged writes of {volume} alone; {node} lacks them (use --force to accept the loss)",
                                r.primary
                            )),
                            false,
                        );
                    }
                    if alive {
                        return (
                            Err(format!("{} (primary of {volume}) reported within {:?}", r.primary, self.timeout)),
                            false,
                        );
                    }
                }
                r.epoch += 1;
                r.primary = node.clone();
                r.solo = true;
                let r = r.clone();
                self.seen.insert(volume.clone(), now);
                (Ok(r), true)
            }
            other => (Err(format!("not a witness request: {other:?}")), false),
        }
    }
}

/// Reads the records file: one line per volume, `volume epoch primary solo`.
pub fn load(path: &Path) -> Result<BTreeMap<String, Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = (f.len() == 4)
            .then(|| Some((f[1].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
            .map(|(epoch, solo)| Record { epoch, primary: f[2].to_string(), solo });
        let Some(r) = parsed else {
            return Err(ReplError::Refused(format!("{}: line {} is corrupt: {line:?}", path.display(), n + 1)));
        };
        out.insert(f[0].to_string(), r);
    }
    Ok(out)
}

/// Writes the records file atomically and durably (temporary file, fsync, rename, fsync dir).
pub fn save(path: &Path, records: &BTreeMap<String, Record>) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for (v, r) in records {
        writeln!(f, "{v} {} {} {}", r.epoch, r.primary, r.solo)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Serves witness requests on `listener`, keeping records in `state_path`.
pub async fn run(mut listener: BoxListener, state_path: PathBuf, timeout: Duration) -> Result<()> {
    let records = load(&state_path)?;
    tracing::info!("witness on {} with {} volume records", listener.local_addr()?, records.len());
    let decider = Arc::new(Mutex::new(Decider::new(records, timeout, Instant::now())));
    let state_path = Arc::new(state_path);
    loop {
        let (stream, from) = listener.accept().await?;
        let decider = decider.clone();
        let state_path = state_path.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &decider, &state_path).await {
                tracing::debug!(%from, "witness connection: {e}");
            }
        });
    }
}

/// Bound on a witness request's wait for its frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve_one(stream: BoxStream, decider: &Mutex<Decider>, state_path: &Path) -> Result<()> {
    let (mut rd, mut wr) = crate::net::split(stream);
    loop {
        let req = match read_frame(&mut rd, REQUEST_TIMEOUT * 4).await {
            Ok(f) => f,
            Err(_) => return Ok(()),
        };
        let answer = {
            // One decision at a time, made durable before it is answered.
            let mut d = decider.lock().await;
            let before = d.records.clone();
            let (decision, changed) = d.decide(&req, Instant::now());
            if changed {
                if let Err(e) = save(state_path, &d.records) {
                    d.records = before;
                    tracing::error!("witness cannot record a decision: {e}");
                    Frame::Refuse { reason: format!("witness cannot record decisions: {e}") }
                } else {
                    tracing::info!("witness: {req:?} → {decision:?}");
                    decision_frame(decision)
                }
            } else {
                decision_frame(decision)
            }
        };
        write_frame(&mut wr, &answer).await?;
    }
}

fn decision_frame(d: Decision) -> Frame {
    match d {
        Ok(r) => Frame::WitnessGrant { epoch: r.epoch, primary: r.primary, solo: r.solo },
        Err(reason) => Frame::Refuse { reason },
    }
}

/// Asks the witness at `addr`; a refusal is `ReplError::Refused`.
pub async fn ask(net: &dyn Net, addr: SocketAddr, req: &Frame, timeout: Duration) -> Result<Record> {
    let fut = async {
        let stream = net.connect(addr).await?;
        let (mut rd, mut wr) = crate::net::split(stream);
        write_frame(&mut wr, req).await?;
        read_frame(&mut rd, timeout).await
    };
    let answer = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ReplError::Stopped(format!("witness {addr} did not answer within {timeout:?}")))??;
    match answer {
        Frame::WitnessGrant { epoch, primary, solo } => Ok(Record { epoch, primary, solo }),
        Frame::Refuse { reason } => Err(ReplError::Refused(reason)),
        other => Err(ReplError::Refused(format!("unexpected answer from the witness: {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, epoch: u64, in_sync: bool) -> Frame {
        Frame::WitnessReport { volume: "v".into(), node: node.into(), epoch, in_sync }
    }
    fn promote(node: &str, epoch: u64, force: bool) -> Frame {
        Frame::WitnessPromote { volume: "v".into(), node: node.into(), epoch, consistent: true, force }
    }
    fn solo(node: &str, epoch: u64) -> Frame {
        Frame::WitnessSolo { volume: "v".into(), node: node.into(), epoch }
    }

    #[test]
    fn a_live_primary_keeps_its_role_and_a_dead_one_is_replaced_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Decider::new(BTreeMap::new(), 2 * s, t0);
        assert_eq!(d.decide(&report("a", 1, true), t0).0.unwrap().primary, "a");
        assert!(d.decide(&promote("b", 1, false), t0 + s).0.is_err(), "primary reported 1 s ago");
        let granted = d.decide(&promote("b", 1, false), t0 + 3 * s).0.unwrap();
        assert_eq!((granted.epoch, granted.primary.as_str()), (2, "b"));
        // The deposed primary learns it at its next report, and cannot go solo.
        assert!(d.decide(&report("a", 1, true), t0 + 3 * s).0.unwrap_err().contains("deposed"));
        assert!(d.decide(&solo("a", 1), t0 + 3 * s).0.is_err());
        // Nor be promoted back while b is alive.
        assert!(d.decide(&report("b", 2, false), t0 + 4 * s).0.is_ok());
        assert!(d.decide(&promote("a", 2, false), t0 + 5 * s).0.is_err());
    }

    #[test]
    fn a_secondary_is_never_promoted_over_a_primary_that_went_solo() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Decider::new(BTreeMap::new(), 2 * s, t0);
        d.decide(&report("a", 1, true), t0).0.unwrap();
        assert!(d.decide(&solo("a", 1), t0 + s).0.unwrap().solo);
        let why = d.decide(&promote("b", 1, false), t0 + 10 * s).0.unwrap_err();
        assert!(why.contains("alone"), "{why}");
        // Once a reports its peer in sync again, b may take over when a dies.
        d.decide(&report("a", 1, true), t0 + 11 * s).0.unwrap();
        assert!(d.decide(&promote("b", 1, false), t0 + 14 * s).0.is_ok());
    }

    #[test]
    fn force_overrides_solo_and_liveness_but_not_inconsistency_nor_a_running_solo_lease() {
        let t0 = Instant::now();
        let mut d = Decider::new(BTreeMap::new(), Duration::from_secs(2), t0);
        d.decide(&report("a", 1, true), t0).0.unwrap();
        d.decide(&solo("a", 1), t0).0.unwrap();
        // Not while the solo primary's lease may still run (1.5 × the timeout after it was seen).
        let why = d.decide(&promote("b", 1, true), t0 + Duration::from_secs(2)).0.unwrap_err();
        assert!(why.contains("lease"), "{why}");
        let t0 = t0 + Duration::from_secs(4);
        let inconsistent =
            Frame::WitnessPromote { volume: "v".into(), node: "b".into(), epoch: 1, consistent: false, force: true };
        assert!(d.decide(&inconsistent, t0).0.is_err());
        assert_eq!(d.decide(&promote("b", 1, true), t0).0.unwrap().epoch, 2);
    }

    #[test]
    fn records_survive_a_restart_and_a_restarted_witness_waits_before_promoting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.state");
        let mut records = BTreeMap::new();
        records.insert("v".to_string(), Record { epoch: 3, primary: "a".into(), solo: false });
        save(&path, &records).unwrap();
        assert_eq!(load(&path).unwrap(), records);
        let t0 = Instant::now();
        let mut d = Decider::new(load(&path).unwrap(), Duration::from_secs(2), t0);
        assert!(d.decide(&promote("b", 3, false), t0 + Duration::from_secs(1)).0.is_err());
        assert_eq!(d.decide(&promote("b", 3, false), t0 + Duration::from_secs(3)).0.unwrap().epoch, 4);
        std::fs::write(&path, "v x a false\n").unwrap();
        assert!(load(&path).is_err());
    }
}
