//! The status of a replicated volume as the admin endpoint shows it (`GET /status`, `syncblock
//! status --json`): plain serialisable views of [`NodeStatus`], with times in seconds, epochs as
//! plain numbers and the derived figures (lag, RPO) computed once. The CLI reads them back with
//! the same types.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::node::NodeStatus;
use crate::primary::{PrimaryStatus, Progress, VerifyReport};
use crate::secondary::SecondaryStatus;

/// One replicated volume on one node, by its current role.
// A snapshot built per status request; boxing the primary's view would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum StatusView {
    Primary(PrimaryView),
    Secondary(SecondaryView),
    /// Between roles, or stopping.
    Stopped {
        volume: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryView {
    pub volume: String,
    pub epoch: u64,
    /// `strict` or `degrade`.
    pub policy: String,
    pub last_tag: u64,
    pub waiting: WaitingView,
    pub stages: StagesView,
    pub peer: PeerSide,
    /// Without a witness: None.
    pub witness: Option<WitnessView>,
    /// Writes, bytes and seconds (the oldest write's age) the peer lacks.
    pub lag_tags: u64,
    pub lag_bytes: u64,
    pub lag_secs: f64,
    /// Every acknowledged write is on both nodes right now.
    pub rpo_zero: bool,
    pub resync: ResyncView,
    pub verify: VerifyView,
}

/// Client operations in the local log waiting for the peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingView {
    pub writes: u64,
    pub oldest_secs: Option<f64>,
}

/// Where answered operations spent their time (sums in microseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagesView {
    pub ops: u64,
    pub handoff_us: u64,
    pub local_us: u64,
    pub peer_us: u64,
    pub answer_us: u64,
}

/// The peer as the primary sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerSide {
    pub connected: bool,
    pub in_sync: bool,
    pub applied_tag: u64,
    pub durable_tag: u64,
    /// The primary acknowledges writes without the peer right now, under the witness's lease
    /// (degrade policy).
    pub acking_alone: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WitnessView {
    /// The witness answered the last request this node sent it.
    pub reachable: bool,
    pub last_error: Option<String>,
}

/// A long pass over the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    pub active: bool,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub elapsed_secs: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncView {
    /// Resyncs started since this node became primary.
    pub count: u64,
    /// The current (or last) one is a full sync, comparing checksums.
    pub full: bool,
    pub bytes_shipped: u64,
    pub bytes_skipped: u64,
    #[serde(flatten)]
    pub progress: ProgressView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyView {
    #[serde(flatten)]
    pub progress: ProgressView,
    /// The last completed pass's findings.
    pub last: Option<VerifyReportView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReportView {
    pub bytes_compared: u64,
    pub blocks_differing: u64,
    /// Differing ranges as [byte offset, byte length].
    pub ranges: Vec<(u64, u64)>,
    pub ranges_truncated: bool,
    pub blocks_repaired: u64,
    pub elapsed_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondaryView {
    pub volume: String,
    pub epoch: u64,
    pub connected: bool,
    pub primary: Option<String>,
    /// A consistent copy (no resync half done).
    pub consistent: bool,
    pub resyncing: bool,
    pub applied_tag: u64,
    pub durable_tag: u64,
    pub last_error: Option<String>,
    pub stages: ApplyStagesView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyStagesView {
    pub ops: u64,
    pub apply_us: u64,
}

/// Seconds, to the millisecond (what a human or an alert needs, without float noise).
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl StatusView {
    pub fn volume(&self) -> &str {
        match self {
            StatusView::Primary(p) => &p.volume,
            StatusView::Secondary(s) => &s.volume,
            StatusView::Stopped { volume } => volume,
        }
    }

    pub fn role(&self) -> &'static str {
        match self {
            StatusView::Primary(_) => "primary",
            StatusView::Secondary(_) => "secondary",
            StatusView::Stopped { .. } => "stopped",
        }
    }

    pub fn epoch(&self) -> u64 {
        match self {
            StatusView::Primary(p) => p.epoch,
            StatusView::Secondary(s) => s.epoch,
            StatusView::Stopped { .. } => 0,
        }
    }
}

impl From<&NodeStatus> for StatusView {
    fn from(s: &NodeStatus) -> StatusView {
        match s {
            NodeStatus::Primary(p) => StatusView::Primary(p.into()),
            NodeStatus::Secondary(x) => StatusView::Secondary(x.into()),
            NodeStatus::Stopped { volume } => StatusView::Stopped { volume: volume.clone() },
        }
    }
}

impl From<&PrimaryStatus> for PrimaryView {
    fn from(p: &PrimaryStatus) -> PrimaryView {
        let now = Instant::now();
        PrimaryView {
            volume: p.volume.clone(),
            epoch: p.epoch.0,
            policy: p.policy.name().into(),
            last_tag: p.last_tag,
            waiting: WaitingView { writes: p.waiting as u64, oldest_secs: p.waiting_oldest.map(secs) },
            stages: StagesView {
                ops: p.stages.ops,
                handoff_us: p.stages.handoff_us,
                local_us: p.stages.local_us,
                peer_us: p.stages.peer_us,
                answer_us: p.stages.answer_us,
            },
            peer: PeerSide {
                connected: p.peer.connected,
                in_sync: p.peer.in_sync,
                applied_tag: p.peer.applied,
                durable_tag: p.peer.durable,
                acking_alone: p.peer.solo,
                last_error: p.peer.last_error.clone(),
            },
            witness: p.witness.as_ref().map(|w| WitnessView { reachable: w.is_ok(), last_error: w.clone().err() }),
            lag_tags: p.lag_tags(),
            lag_bytes: p.lag_bytes,
            lag_secs: p.lag_age.map_or(0.0, secs),
            rpo_zero: p.rpo_zero(),
            resync: ResyncView {
                count: p.peer.resyncs,
                full: p.peer.resync_full,
                bytes_shipped: p.peer.resync_bytes_shipped,
                bytes_skipped: p.peer.resync_bytes_skipped,
                progress: ProgressView::at(&p.peer.resync, now),
            },
            verify: VerifyView {
                progress: ProgressView::at(&p.peer.verify, now),
                last: p.peer.last_verify.as_ref().map(VerifyReportView::from),
            },
        }
    }
}

impl ProgressView {
    pub fn at(p: &Progress, now: Instant) -> ProgressView {
        ProgressView {
            active: p.active(),
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            elapsed_secs: secs(p.elapsed_at(now)),
            rate_bytes_per_sec: p.rate_bytes_per_sec_at(now),
            eta_secs: p.eta_at(now).map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        }
    }
}

impl From<&VerifyReport> for VerifyReportView {
    fn from(r: &VerifyReport) -> VerifyReportView {
        VerifyReportView {
            bytes_compared: r.bytes_compared,
            blocks_differing: r.blocks_differing,
            ranges: r.ranges.iter().map(|r| (r.offset, r.len)).collect(),
            ranges_truncated: r.ranges_truncated,
            blocks_repaired: r.blocks_repaired,
            elapsed_secs: secs(r.elapsed),
        }
    }
}

impl From<&SecondaryStatus> for SecondaryView {
    fn from(x: &SecondaryStatus) -> SecondaryView {
        SecondaryView {
            volume: x.volume.clone(),
            epoch: x.epoch.0,
            connected: x.connected,
            primary: x.primary.clone(),
            consistent: x.consistent,
            resyncing: x.resyncing,
            applied_tag: x.applied,
            durable_tag: x.durable,
            last_error: x.last_error.clone(),
            stages: ApplyStagesView { ops: x.apply_ops, apply_us: x.apply_us },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_back_as_itself() {
        let v = StatusView::Secondary(SecondaryView {
            volume: "db".into(),
            epoch: 3,
            connected: true,
            primary: Some("a".into()),
            consistent: true,
            resyncing: false,
            applied_tag: 10,
            durable_tag: 9,
            last_error: None,
            stages: ApplyStagesView { ops: 10, apply_us: 2000 },
        });
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.starts_with("{\"role\":\"secondary\",\"volume\":\"db\""), "{json}");
        assert_eq!(serde_json::from_str::<StatusView>(&json).unwrap(), v);
        let stopped = serde_json::to_string(&StatusView::Stopped { volume: "x".into() }).unwrap();
        assert_eq!(stopped, "{\"role\":\"stopped\",\"volume\":\"x\"}");
    }
}
