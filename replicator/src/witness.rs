//! The witness: a small process that decides, per replicated pair, which node is primary in which
//! epoch, and whether the primary is acknowledging writes alone ("solo").
//!
//! Every decision is made here, one request at a time, and recorded durably before it is answered,
//! so two nodes can never both be granted the primary role of the same epoch, and a secondary is
//! never promoted over a primary that acknowledged writes without it. [`Decider`] holds the rules and
//! is tested on its own; [`run`] serves them over TCP.
//!
//! Records are keyed by the pair's **id** (drawn by the pair's first primary, fixed on the
//! secondary at its first sync), not by volume name: every pair's default volume is `default`,
//! and two pairs sharing a witness must not share a record.
//!
//! The rules, per pair record `(epoch, primary, solo)`:
//! - **Report** from the primary of the current epoch refreshes its liveness; an in-sync report
//!   clears `solo`. From anyone else: refused with [`Refusal::Deposed`] (a deposed primary learns
//!   it here).
//! - **Solo** from the current primary: granted, `solo` set. The secondary is now stale.
//! - **Promote** from another node: granted (epoch + 1, it becomes primary, `solo` set, since it
//!   will be alone) only if it is consistent, the record is not `solo`, and the current primary has
//!   not reported for the *takeover window* (1.5 leases). `force` skips the last two checks (an
//!   operator accepting loss), but never hands over while a solo primary's lease may run: a solo
//!   primary stops acknowledging alone one lease after it *sent* its last answered request, and
//!   the witness counts the window from when it *received* it.
//!   From the current primary (restarting): a fresh epoch, always.
//! - **Handover** from the current primary, which has stopped acknowledging writes and whose peer
//!   holds every one it acknowledged (a planned switchover): granted (epoch + 1, the named peer
//!   becomes primary, `solo` clear) only if the record is not `solo` and the pair has been in
//!   sync. The new primary takes the role at its next Promote, as the recorded primary.
//! - The first Report of an unknown pair registers its sender as primary of its epoch.
//!
//! Every grant carries the lease, so nodes and witness cannot disagree on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use syncblock_engine::Epoch;
use tokio::time::Instant;

use tokio::sync::Mutex;

use crate::link::write_frame;
use crate::net::{BoxListener, Net, Peer};
use crate::wire::{Frame, Refusal};
use crate::{ReplError, Result};

/// The default lease: how long a primary may acknowledge writes alone after it sent a request the
/// witness answered. 500 ms: primaries report every heartbeat (125 ms by default), so a lease
/// survives three lost reports; the takeover window is 1.5 leases (750 ms), which with the
/// heartbeat bounds a failover after a primary's death to about 0.75–0.9 s.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(500);

/// How long after the primary's last report the witness may hand its role to another node: 1.5
/// leases, so a primary whose clock runs up to a third slow has still stopped acknowledging alone.
pub fn takeover_window(lease: Duration) -> Duration {
    lease * 3 / 2
}

/// One pair's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The replicated volume's name, for messages and the state file (not a key).
    pub volume: String,
    pub epoch: Epoch,
    pub primary: String,
    pub solo: bool,
    /// The pair has been in sync at least once (both copies existed). Until then the primary may
    /// not acknowledge alone: a new store started as primary beside a peer of another pair (a
    /// replaced disk started with the wrong role) would otherwise serve an empty volume's writes
    /// while the real pair serves the other.
    pub synced: bool,
}

/// What the witness keeps: records by pair id, and records of the first format (keyed by volume
/// name only) that no pair has claimed yet. The first request naming such a volume binds its
/// record to the requester's pair id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessState {
    pub pairs: BTreeMap<u64, Record>,
    pub unbound: BTreeMap<String, Record>,
}

/// A decision: the record after it, or why it was refused.
pub type Decision = std::result::Result<Record, (Refusal, String)>;

/// A request, for the witness's log.
fn describe_request(req: &Frame) -> String {
    match req {
        Frame::WitnessReport { pair, volume, node, epoch, in_sync } => format!(
            "{node} reports {volume} (pair {pair:016x}) as primary in epoch {epoch}, peer {}",
            if *in_sync { "in sync" } else { "not in sync" }
        ),
        Frame::WitnessSolo { pair, volume, node, epoch } => {
            format!("{node} asks to acknowledge {volume} (pair {pair:016x}) alone in epoch {epoch}")
        }
        Frame::WitnessPromote { pair, volume, node, epoch, consistent, force, reclaim } => format!(
            "{node} asks to {} {volume} (pair {pair:016x}) from epoch {epoch} ({}{})",
            if *reclaim { "reclaim the primary role of" } else { "become primary of" },
            if *consistent { "consistent replica" } else { "inconsistent replica" },
            if *force { ", forced" } else { "" }
        ),
        Frame::WitnessHandover { pair, volume, node, epoch, to } => {
            format!("{node} asks to hand {volume} (pair {pair:016x}, epoch {epoch}) over to {to}")
        }
        other => format!("{other:?}"),
    }
}

/// A decision, for the witness's log. `solo` in a record is the witness's consent that the
/// primary may acknowledge writes alone (the status calls the primary's use of it `acking_alone`).
fn describe_decision(d: &Decision) -> String {
    match d {
        Ok(r) => format!(
            "granted: {} is primary of {} in epoch {}{}",
            r.primary,
            r.volume,
            r.epoch,
            if r.solo { ", may acknowledge alone" } else { "" }
        ),
        Err((why, reason)) => format!("refused ({why:?}): {reason}"),
    }
}

/// The witness's decisions, without I/O. `now` is passed in so tests (and the simulator) control
/// time.
#[derive(Debug)]
pub struct Decider {
    pub state: WitnessState,
    /// When each pair's primary last reported (not persisted: after a restart every primary
    /// counts as just seen, which only delays a promotion).
    seen: BTreeMap<u64, Instant>,
    pub lease: Duration,
    started: Instant,
}

impl Decider {
    pub fn new(state: WitnessState, lease: Duration, now: Instant) -> Decider {
        Decider { state, seen: BTreeMap::new(), lease, started: now }
    }

    /// Time since the pair's primary last reported (or since the witness started).
    fn silent_for(&self, pair: u64, now: Instant) -> Duration {
        let last = self.seen.get(&pair).copied().unwrap_or(self.started);
        now.saturating_duration_since(last)
    }

    /// The pair's record, binding a first-format record of the same volume name to it.
    fn record(&mut self, pair: u64, volume: &str) -> (Option<&mut Record>, bool) {
        let mut bound = false;
        if !self.state.pairs.contains_key(&pair) {
            if let Some(r) = self.state.unbound.remove(volume) {
                self.state.pairs.insert(pair, r);
                bound = true;
            }
        }
        (self.state.pairs.get_mut(&pair), bound)
    }

    /// Applies a request; returns the decision and whether the state changed (and must be made
    /// durable before the answer goes out).
    pub fn decide(&mut self, req: &Frame, now: Instant) -> (Decision, bool) {
        let Some((pair, _, _)) = req.authority_request() else {
            return (Err((Refusal::Protocol, format!("not a witness request: {req:?}"))), false);
        };
        if pair == 0 {
            return (
                Err((
                    Refusal::NotRegistered,
                    "the request carries no pair id: the node has never been part of a synced pair".into(),
                )),
                false,
            );
        }
        self.decide_pair(pair, req, now)
    }

    fn decide_pair(&mut self, pair: u64, req: &Frame, now: Instant) -> (Decision, bool) {
        let silent = self.silent_for(pair, now);
        let Some((_, volume, _)) = req.authority_request() else { unreachable!("checked by decide") };
        let (_, bound) = self.record(pair, volume);
        let mut record = self.state.pairs.remove(&pair);
        let (decision, changed) = decide_record(&mut record, pair, req, silent, self.lease);
        if let Some(r) = record {
            self.state.pairs.insert(pair, r);
        }
        if decision.is_ok() {
            self.seen.insert(pair, now);
        }
        (decision, changed || bound)
    }
}

/// The rules (the module's doc states them), applied to one pair's record: `record` is updated in
/// place (created by a first report or a forced promotion), and the answer says whether it changed
/// and must be made durable before the requester hears of it. `silent`: how long the record's
/// primary has given no sign of life (the witness: since its last granted request; etcd: zero while
/// the primary's node lease exists, unbounded once it has expired). Both authorities decide with
/// this one function, so a pair behaves the same whichever it has.
pub fn decide_record(
    record: &mut Option<Record>,
    pair: u64,
    req: &Frame,
    silent: Duration,
    lease: Duration,
) -> (Decision, bool) {
    let window = takeover_window(lease);
    match req {
        Frame::WitnessReport { volume, node, epoch, in_sync, .. } => {
            let Some(r) = record else {
                let r = Record {
                    volume: volume.clone(),
                    epoch: *epoch,
                    primary: node.clone(),
                    solo: false,
                    synced: *in_sync,
                };
                *record = Some(r.clone());
                return (Ok(r), true);
            };
            if r.primary != *node || r.epoch != *epoch {
                let why = format!(
                    "{} is primary of {volume} in epoch {}; {node} (epoch {epoch}) was deposed",
                    r.primary, r.epoch
                );
                return (Err((Refusal::Deposed { epoch: r.epoch }, why)), false);
            }
            let changed = *in_sync && (r.solo || !r.synced);
            if *in_sync {
                r.solo = false;
                r.synced = true;
            }
            (Ok(r.clone()), changed)
        }
        Frame::WitnessSolo { volume, node, epoch, .. } => match record.as_mut() {
            Some(r) if r.primary == *node && r.epoch == *epoch && !r.synced => {
                let why = format!(
                    "{volume} (pair {pair:016x}) has never been in sync: a new pair acknowledges writes only once \
                         both copies exist; if the peer belongs to another pair (a replaced store started as \
                         primary), start this node as secondary to be resynced from it"
                );
                (Err((Refusal::NeverSynced, why)), false)
            }
            Some(r) if r.primary == *node && r.epoch == *epoch => {
                let changed = !r.solo;
                r.solo = true;
                (Ok(r.clone()), changed)
            }
            Some(r) => {
                let why = format!("{} is primary of {volume} in epoch {}", r.primary, r.epoch);
                (Err((Refusal::Deposed { epoch: r.epoch }, why)), false)
            }
            None => (Err((Refusal::NotRegistered, format!("{volume} has no primary registered"))), false),
        },
        Frame::WitnessPromote { volume, node, epoch, consistent, force, reclaim, .. } => {
            let Some(r) = record else {
                if *force {
                    // Forced by an operator: the candidate's copy is the one to keep.
                    let r = Record {
                        volume: volume.clone(),
                        epoch: epoch.next(),
                        primary: node.clone(),
                        solo: true,
                        synced: true,
                    };
                    debug_assert!(!*reclaim || *force, "a reclaim is never forced");
                    *record = Some(r.clone());
                    return (Ok(r), true);
                }
                let why = format!("{volume} has no primary registered yet; nothing to take over");
                return (Err((Refusal::NotRegistered, why)), false);
            };
            if r.primary == *node {
                // The primary itself, restarting: a fresh epoch, so that no (epoch, tag) it
                // assigns after a crash can collide with one it assigned before (which its
                // peer may hold while the crash lost it here).
                r.epoch = r.epoch.next();
                return (Ok(r.clone()), true);
            }
            let refuse = |why: Refusal, msg: String| (Err((why, msg)), false);
            if *reclaim {
                let msg = format!("{} is primary of {volume} in epoch {}; {node} is not", r.primary, r.epoch);
                return refuse(Refusal::Deposed { epoch: r.epoch }, msg);
            }
            if *epoch < r.epoch && !*force {
                let msg = format!("{node} has seen epoch {epoch} only; {volume} is in epoch {}", r.epoch);
                return refuse(Refusal::Behind { epoch: r.epoch }, msg);
            }
            if !*consistent {
                return refuse(
                    Refusal::Inconsistent,
                    format!("{node} holds a half-applied resync of {volume}; it cannot take over"),
                );
            }
            let wait_ms = |d: Duration| (d.saturating_sub(silent).as_millis() as u64).max(1);
            if *force && r.solo && silent < window {
                let msg = format!(
                    "{} may still be acknowledging writes of {volume} alone (its solo lease has not \
                         expired); try again in {:?}",
                    r.primary,
                    window.saturating_sub(silent)
                );
                return refuse(Refusal::LeaseLive { retry_after_ms: wait_ms(window) }, msg);
            }
            if !*force {
                if r.solo {
                    let msg = format!(
                        "{} acknowledged writes of {volume} alone; {node} lacks them (use --force to accept the loss)",
                        r.primary
                    );
                    return refuse(Refusal::SoloPrimary, msg);
                }
                if silent < window {
                    let msg = format!("{} (primary of {volume}) reported {silent:?} ago", r.primary);
                    return refuse(Refusal::PrimaryAlive { retry_after_ms: wait_ms(window) }, msg);
                }
            }
            r.epoch = r.epoch.next();
            r.primary = node.clone();
            r.solo = true;
            (Ok(r.clone()), true)
        }
        Frame::WitnessHandover { volume, node, epoch, to, .. } => {
            let Some(r) = record.as_mut() else {
                let why = format!("{volume} has no primary registered; nothing to hand over");
                return (Err((Refusal::NotRegistered, why)), false);
            };
            if r.primary != *node || r.epoch != *epoch {
                let why =
                    format!("{} is primary of {volume} in epoch {}; {node} (epoch {epoch}) is not", r.primary, r.epoch);
                return (Err((Refusal::Deposed { epoch: r.epoch }, why)), false);
            }
            if to == node {
                return (Err((Refusal::Protocol, format!("{node} cannot hand {volume} over to itself"))), false);
            }
            if !r.synced {
                let why = format!("{volume} has never been in sync: {to} holds nothing to serve");
                return (Err((Refusal::NeverSynced, why)), false);
            }
            if r.solo {
                let why = format!(
                    "{node} may have acknowledged writes of {volume} alone, which {to} may lack: a switchover \
                     waits until the pair is in sync again (reported so)"
                );
                return (Err((Refusal::SoloPrimary, why)), false);
            }
            // The new primary starts with its peer holding everything it holds: it acknowledges
            // nothing alone until it asks, so the old primary (which steps down having seen this
            // epoch, `Primary::handed_over`) may take the role back by the ordinary rules if the
            // new one dies before they are in sync again, or before it takes the role at all.
            r.epoch = r.epoch.next();
            r.primary = to.clone();
            r.solo = false;
            (Ok(r.clone()), true)
        }
        other => (Err((Refusal::Protocol, format!("not an authority request: {other:?}"))), false),
    }
}

/// First line of a state file of the current format.
const STATE_HEADER: &str = "syncblock-witness-state 3";
/// The previous format (no `synced` flag: its pairs all predate the rule, and count as synced).
const STATE_HEADER_V2: &str = "syncblock-witness-state 2";

/// A name as one whitespace-free token: bytes that are whitespace, `%` or control characters
/// become `%XX`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() || c == '%' {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// The state file's bytes: a header line, one line per record (`pair epoch solo volume primary`,
/// pair in hex, 0 for a first-format record no pair has claimed), and a last line with the record
/// count and the CRC32 of every byte before it. A torn or corrupted file fails that check.
pub fn encode_state(state: &WitnessState) -> String {
    let mut text = format!("{STATE_HEADER}\n");
    let unbound = state.unbound.values().map(|r| (0, r));
    for (pair, r) in state.pairs.iter().map(|(p, r)| (*p, r)).chain(unbound) {
        text.push_str(&format!(
            "{pair:016x} {} {} {} {}\n",
            r.epoch.0,
            u8::from(r.solo) | u8::from(r.synced) << 1,
            escape(&r.volume),
            escape(&r.primary)
        ));
    }
    let n = state.pairs.len() + state.unbound.len();
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("end {n} {crc:08x}\n"));
    text
}

/// Parses a state file; the error says what is wrong.
pub fn decode_state(text: &str) -> std::result::Result<WitnessState, String> {
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    let v2 = text.starts_with(&format!("{STATE_HEADER_V2}\n"));
    if !v2 && !text.starts_with(STATE_HEADER) {
        return decode_first_format(text);
    }
    let cut = || "no trailer line (the file was cut short)".to_string();
    if !text.ends_with('\n') {
        return Err(cut());
    }
    // The trailer is the last line; everything before it is covered by its checksum.
    let body_end = text[..text.len() - 1].rfind('\n').map(|i| i + 1).ok_or_else(cut)?;
    let (n, crc) = match text[body_end..].split_whitespace().collect::<Vec<_>>()[..] {
        ["end", n, crc] => (n.parse::<usize>().map_err(|_| cut())?, u32::from_str_radix(crc, 16).map_err(|_| cut())?),
        _ => return Err(cut()),
    };
    let computed = crc32fast::hash(&text.as_bytes()[..body_end]);
    if crc != computed {
        return Err(format!("checksum mismatch (stored {crc:08x}, computed {computed:08x})"));
    }
    let lines: Vec<&str> = text[..body_end].lines().skip(1).collect();
    if text[..body_end].lines().next() != Some(if v2 { STATE_HEADER_V2 } else { STATE_HEADER }) {
        return Err("unknown format version in the header line".into());
    }
    if lines.len() != n {
        return Err(format!("{} records where the trailer says {n}", lines.len()));
    }
    let mut state = WitnessState::default();
    for (k, line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = (f.len() == 5).then(|| {
            let pair = u64::from_str_radix(f[0], 16).ok()?;
            let epoch = Epoch(f[1].parse().ok()?);
            // Bit 0: solo; bit 1: synced (version 3; every version-2 pair counts as synced).
            let flags: u8 = match f[2] {
                "0" | "1" if v2 => f[2].parse::<u8>().ok()? | 2,
                "0" | "1" | "2" | "3" if !v2 => f[2].parse().ok()?,
                _ => return None,
            };
            let (solo, synced) = (flags & 1 != 0, flags & 2 != 0);
            Some((pair, Record { volume: unescape(f[3])?, epoch, primary: unescape(f[4])?, solo, synced }))
        });
        match parsed.flatten() {
            Some((0, r)) => state.unbound.insert(r.volume.clone(), r),
            Some((pair, r)) => state.pairs.insert(pair, r),
            None => return Err(format!("record {} is malformed: {line:?}", k + 1)),
        };
    }
    Ok(state)
}

/// The first format: one line per volume, `volume epoch primary solo`, no checksum. Its records
/// are unbound until their pair claims them.
fn decode_first_format(text: &str) -> std::result::Result<WitnessState, String> {
    let mut state = WitnessState::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed =
            (f.len() == 4).then(|| Some((f[1].parse().ok()?, f[3].parse().ok()?))).flatten().map(|(epoch, solo)| {
                Record { volume: f[0].to_string(), epoch: Epoch(epoch), primary: f[2].to_string(), solo, synced: true }
            });
        let Some(r) = parsed else {
            return Err(format!("no format header, and line {} is not a first-format record: {line:?}", n + 1));
        };
        state.unbound.insert(r.volume.clone(), r);
    }
    Ok(state)
}

/// Reads the state file (a missing file is an empty state). A torn or corrupt file is an error,
/// never an empty state: a witness that forgot its records could hand a volume to a deposed node.
pub fn load(path: &Path) -> Result<WitnessState> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(WitnessState::default()),
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8(text).map_err(|_| "not UTF-8".to_string());
    text.and_then(|t| decode_state(&t)).map_err(|why| {
        ReplError::Invalid(format!(
            "witness state {} is torn or corrupt: {why}; likely cause: a crash of the disk under it or an \
             edit by hand. Restore it from a backup, or move it away and name each pair's primary with \
             `syncblock promote --force` (the witness never guesses)",
            path.display()
        ))
    })
}

/// Writes the state file atomically and durably (temporary file, fsync, rename, fsync dir).
pub fn save(path: &Path, state: &WitnessState) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(encode_state(state).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Who may make requests of a witness (`syncblock witness --allow`). Each entry is one node, which
/// may act in any pair, or the two nodes of one pair (`a,b`), each of which may act only in a pair
/// whose record names one of the two as primary. A node of another pair that the witness also
/// serves can then neither report for, nor be promoted in, a pair that is not its own, even
/// though its certificate is signed by the same CA. A pair the witness has no record of yet may be
/// registered by any listed node: the record names its registering primary from then on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    entries: Vec<Vec<String>>,
}

impl Allow {
    /// Parses `--allow` values: `NODE` or `NODE,NODE`.
    pub fn parse<S: AsRef<str>>(flags: &[S]) -> std::result::Result<Allow, String> {
        let mut entries = Vec::new();
        for flag in flags {
            let flag = flag.as_ref();
            let names: Vec<String> = flag.split(',').map(|n| n.trim().to_string()).collect();
            if names.iter().any(String::is_empty) || names.len() > 2 || (names.len() == 2 && names[0] == names[1]) {
                return Err(format!(
                    "invalid --allow {flag:?}: expected NODE (any pair) or NODE,NODE (the two nodes of one pair), \
                     e.g. a,b"
                ));
            }
            entries.push(names);
        }
        Ok(Allow { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Why the request's node may not make it, given the witness's records; `None` if it may.
    fn refuses(&self, req: &Frame, state: &WitnessState) -> Option<String> {
        let (pair, volume, node) = req.authority_request()?;
        if self.entries.is_empty() {
            return None;
        }
        let names = |e: &Vec<String>, n: &str| e.iter().any(|x| x == n);
        let mine: Vec<&Vec<String>> = self.entries.iter().filter(|e| names(e, node)).collect();
        if mine.is_empty() {
            return Some(format!("node {node:?} is not on this witness's list of nodes (--allow {self}); refused"));
        }
        if mine.iter().any(|e| e.len() == 1) {
            return None;
        }
        if let Frame::WitnessHandover { to, .. } = req {
            if !mine.iter().any(|e| names(e, to)) {
                return Some(format!(
                    "node {node:?} may hand {volume} over only to a node of its own pair, not {to:?}"
                ));
            }
        }
        // The record the request would act on: the pair's, or a first-format record it would bind.
        let record = state.pairs.get(&pair).or_else(|| state.unbound.get(volume))?;
        if mine.iter().any(|e| e.contains(&record.primary)) {
            return None;
        }
        let own = Allow { entries: mine.into_iter().cloned().collect() };
        Some(format!(
            "node {node:?} may act only in its own pair (--allow {own}), but {volume} (pair {pair:016x}) has {:?} as \
             primary; refused",
            record.primary
        ))
    }
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self.entries.iter().map(|e| e.join(",")).collect();
        f.write_str(&entries.join(" --allow "))
    }
}

/// Serves witness requests on `listener`, keeping records in `state_path`; grants carry `lease`.
///
/// `allow`: who may make requests ([`Allow`]); empty, every identity the listener's credentials
/// prove (the caller checks that a list comes with credentials that prove identities).
pub async fn run(mut listener: BoxListener, state_path: PathBuf, lease: Duration, allow: Allow) -> Result<()> {
    let state = load(&state_path)?;
    tracing::info!(
        "witness on {} with {} pair records (lease {lease:?}){}",
        listener.local_addr()?,
        state.pairs.len() + state.unbound.len(),
        if allow.is_empty() { String::new() } else { format!(", only --allow {allow}") }
    );
    let allow = Arc::new(allow);
    let decider = Arc::new(Mutex::new(Decider::new(state, lease, Instant::now())));
    let state_path = Arc::new(state_path);
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    // The connections' tasks belong to this future: when the witness stops (its task aborted, as
    // the simulation's power cut does, or `pair` ending), every connection closes with it. A node
    // keeps its connection between requests (`Link`), and a connection outliving its witness
    // would answer from a decider that is no longer the witness's.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            a = listener.accept() => a?,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let from = incoming.from;
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%from, "witness: {CONNECTIONS_MAX} connections open; refusing one more");
            continue;
        };
        let decider = decider.clone();
        let state_path = state_path.clone();
        let allow = allow.clone();
        tasks.spawn(async move {
            let peer = match incoming.establish().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%from, "witness: TLS handshake failed: {e}; connection dropped");
                    drop(permit);
                    return;
                }
            };
            if let Err(e) = serve_one(peer, &decider, &state_path, &allow).await {
                tracing::debug!(%from, "witness connection: {e}");
            }
            drop(permit);
        });
    }
}

/// Connections the witness serves at once: each replicated volume of each node keeps one (`Link`);
/// 1024 leaves room for hundreds of pairs while a flood cannot exhaust descriptors.
const CONNECTIONS_MAX: usize = 1024;

/// Bound on a witness request's wait for its frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve_one(peer: Peer, decider: &Mutex<Decider>, state_path: &Path, allow: &Allow) -> Result<()> {
    let (mut rd, mut wr) = crate::net::split(peer.stream);
    let who = peer.who;
    loop {
        let req = match rd.read_frame(REQUEST_TIMEOUT * 4).await {
            Ok(f) => f,
            Err(_) => return Ok(()),
        };
        let claimed = req.authority_request().and_then(|(_, _, node)| who.check_claim(node).err());
        // One decision at a time, made durable before it is answered.
        let mut d = decider.lock().await;
        let claimed = claimed.or_else(|| allow.refuses(&req, &d.state).map(|r| format!("{}: {r}", who.from)));
        let answer = if let Some(reason) = claimed {
            tracing::warn!("witness: {reason}");
            Frame::Refuse { why: Refusal::Protocol, reason }
        } else {
            let before = d.state.clone();
            let (decision, changed) = d.decide(&req, Instant::now());
            let lease = d.lease;
            if changed {
                if let Err(e) = save(state_path, &d.state) {
                    d.state = before;
                    tracing::error!("witness cannot record a decision: {e}");
                    let reason = format!("witness cannot record decisions: {e}");
                    Frame::Refuse { why: Refusal::WitnessStorage, reason }
                } else {
                    tracing::info!("witness: {} → {}", describe_request(&req), describe_decision(&decision));
                    decision_frame(decision, lease)
                }
            } else {
                decision_frame(decision, lease)
            }
        };
        drop(d);
        write_frame(&mut wr, &answer).await?;
    }
}

fn decision_frame(d: Decision, lease: Duration) -> Frame {
    match d {
        Ok(r) => Frame::WitnessGrant {
            epoch: r.epoch,
            primary: r.primary,
            solo: r.solo,
            lease_ms: lease.as_millis().min(u32::MAX as u128) as u32,
        },
        Err((why, reason)) => Frame::Refuse { why, reason },
    }
}

/// What the witness granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub epoch: Epoch,
    pub primary: String,
    pub solo: bool,
    /// How long after sending the request the requester may act on a solo grant.
    pub lease: Duration,
    /// When that lease ends: the request's sending time plus the lease.
    pub valid_until: Instant,
}

/// A node's connection to its witness, kept between requests: a request then costs one round trip
/// instead of a connection and, with TLS, a full handshake (about a millisecond of CPU on each
/// side, eight times a second per replicated volume; under load those handshakes were late
/// enough for the witness to hand a busy primary's role to its peer). Clones share the connection.
/// A connection that fails or times out is dropped, never reused: an answer arriving late must
/// not be read as the answer to the next request.
#[derive(Clone, Default)]
pub struct Link(Arc<std::sync::Mutex<Option<(SocketAddr, crate::net::ReadPart, crate::net::WritePart)>>>);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("witness::Link")
    }
}

/// Asks the witness at `addr` over `link` (reusing its connection if it has one to `addr`, opening
/// one otherwise); a refusal is [`ReplError::Refused`] with its [`Refusal`].
pub async fn ask(net: &dyn Net, link: &Link, addr: SocketAddr, req: &Frame, timeout: Duration) -> Result<Grant> {
    let sent = Instant::now();
    let kept = link.0.lock().expect("witness link").take().filter(|(at, _, _)| *at == addr);
    let reused = kept.is_some();
    let exchange = |conn: Option<(SocketAddr, crate::net::ReadPart, crate::net::WritePart)>| async move {
        let (mut rd, mut wr) = match conn {
            Some((_, rd, wr)) => (rd, wr),
            None => crate::net::split(net.connect(addr).await?),
        };
        write_frame(&mut wr, req).await?;
        let answer = rd.read_frame(timeout).await?;
        Ok::<_, ReplError>((answer, rd, wr))
    };
    let fut = async {
        match exchange(kept).await {
            // The kept connection may have died in the meantime (the witness restarted, or closed
            // it as idle): one more try on a new one.
            Err(_) if reused => exchange(None).await,
            other => other,
        }
    };
    let (answer, rd, wr) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ReplError::Stopped(format!("witness {addr} did not answer within {timeout:?}")))??;
    *link.0.lock().expect("witness link") = Some((addr, rd, wr));
    match answer {
        Frame::WitnessGrant { epoch, primary, solo, lease_ms } => {
            let lease = Duration::from_millis(lease_ms.into());
            Ok(Grant { epoch, primary, solo, lease, valid_until: sent + lease })
        }
        Frame::Refuse { why, reason } => Err(ReplError::Refused { why, reason }),
        other => Err(ReplError::Refused {
            why: Refusal::Protocol,
            reason: format!("unexpected answer from the witness {addr}: {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests;
