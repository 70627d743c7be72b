//! Prometheus metrics (`GET /metrics` on the admin endpoint), with `prometheus-client`.
//!
//! Two kinds:
//! - **I/O**, counted as requests complete: requests, bytes and errors per volume and operation,
//!   and a latency histogram per volume and operation ([`IoMetrics`], [`VolumeIo`]).
//! - **State**, read at scrape time from the same snapshot `GET /status` shows ([`StatusDoc`]):
//!   store space and activity, each volume's replication role, epoch, lag in bytes and seconds,
//!   RPO, resync and verify progress, and whether the peer and the witness answer.
//!
//! Names follow the Prometheus conventions: a `syncblock_` prefix, the unit as a suffix
//! (`_bytes`, `_seconds`), `_total` on counters (added by the encoder), 0/1 gauges for yes/no.
//! `docs/operations.md` lists them, and CI checks the output with `promtool check metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use syncblock_replicator::StatusView;

use crate::admin::StatusDoc;

/// An NBD operation, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Op {
    read,
    write,
    flush,
    trim,
    write_zeroes,
    block_status,
    cache,
}

impl Op {
    const ALL: [Op; 7] = [Op::read, Op::write, Op::flush, Op::trim, Op::write_zeroes, Op::block_status, Op::cache];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    volume: String,
    op: Op,
}

/// Latency buckets: 25 µs (a write-back answer) doubling up to 1.6 s (a write waiting through a
/// failover), 17 buckets; finer than that costs memory per volume and operation for no alert.
const LATENCY_BUCKET_FIRST_SECS: f64 = 25e-6;
const LATENCY_BUCKETS: u16 = 17;

/// The I/O metrics of every volume, registered once per process.
#[derive(Debug, Clone)]
pub struct IoMetrics {
    requests: Family<OpLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
}

impl IoMetrics {
    fn new(registry: &mut Registry) -> IoMetrics {
        let m = IoMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(LATENCY_BUCKET_FIRST_SECS, 2.0, LATENCY_BUCKETS))
            }),
        };
        registry.register(
            "syncblock_nbd_requests",
            "NBD requests answered, by volume and operation",
            m.requests.clone(),
        );
        registry.register(
            "syncblock_nbd_bytes",
            "Bytes read, written, trimmed or zeroed through NBD, by volume and operation",
            m.bytes.clone(),
        );
        registry.register(
            "syncblock_nbd_errors",
            "NBD requests answered with an error, by volume and operation",
            m.errors.clone(),
        );
        registry.register(
            "syncblock_nbd_request_duration_seconds",
            "Time from an NBD request being read whole to its answer being ready, by volume and operation",
            m.latency.clone(),
        );
        m
    }

    /// The handles of one volume, resolved once per connection so that a request costs no label
    /// lookup.
    pub fn volume(&self, volume: &str) -> VolumeIo {
        let ops = Op::ALL.map(|op| {
            let l = OpLabels { volume: volume.to_string(), op };
            OpIo {
                requests: self.requests.get_or_create(&l).clone(),
                bytes: self.bytes.get_or_create(&l).clone(),
                errors: self.errors.get_or_create(&l).clone(),
                latency: self.latency.get_or_create(&l).clone(),
            }
        });
        VolumeIo { ops: Arc::new(ops) }
    }
}

#[derive(Debug)]
struct OpIo {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

/// One volume's I/O metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VolumeIo {
    ops: Arc<[OpIo; 7]>,
}

impl VolumeIo {
    /// Counts one answered request.
    pub fn record(&self, op: Op, bytes: u64, took: Duration, ok: bool) {
        let m = &self.ops[op as usize];
        m.requests.inc();
        if ok {
            m.bytes.inc_by(bytes);
        } else {
            m.errors.inc();
        }
        m.latency.observe(took.as_secs_f64());
    }
}

/// The registry: I/O metrics, and the state read from the latest status snapshot.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub io: IoMetrics,
    state: Arc<Mutex<Option<StatusDoc>>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let io = IoMetrics::new(&mut registry);
        let state = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(StateCollector(state.clone())));
        Metrics { registry, io, state }
    }

    /// The OpenMetrics exposition, with the state metrics taken from `doc` (a fresh status
    /// snapshot).
    pub fn render(&self, doc: StatusDoc) -> String {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc);
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding the metrics failed: {e}");
        }
        out
    }
}

/// The same exposition in the Prometheus text format (0.0.4), for scrapers and tools that do not
/// ask for OpenMetrics (`promtool check metrics`, older agents). `prometheus-client` writes only
/// OpenMetrics; the two differ, for what it writes, in three ways, undone here: a counter's
/// `# HELP`/`# TYPE` lines name it without its `_total` suffix, `# UNIT` lines, and the closing
/// `# EOF`.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")) {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or(line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{kind}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct StateCollector(Arc<Mutex<Option<StatusDoc>>>);

fn b(v: bool) -> i64 {
    i64::from(v)
}

/// Encodes one metric family: every (labels, value) of it under one descriptor.
fn family<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let samples: Vec<_> = samples.into_iter().collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<N>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    family(e, name, help, MetricType::Gauge, samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v))))
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    family(e, name, help, MetricType::Counter, samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v))))
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(doc) = guard.as_ref() else { return Ok(()) };
        let e = &mut e;
        let none = || Vec::<(&'static str, String)>::new();
        let s = &doc.store;
        gauge(
            e,
            "syncblock_node_info",
            "This node: its name and version (always 1)",
            [(vec![("node", doc.node.clone()), ("version", env!("CARGO_PKG_VERSION").to_string())], 1i64)],
        )?;
        gauge(e, "syncblock_store_size_bytes", "Size of the store file or device", [(none(), s.size_bytes)])?;
        gauge(e, "syncblock_store_log_bytes", "Capacity of the store's log", [(none(), s.log_bytes)])?;
        gauge(e, "syncblock_store_used_bytes", "Log space in segments holding data", [(none(), s.used_bytes)])?;
        gauge(e, "syncblock_store_free_bytes", "Log space in free segments", [(none(), s.free_bytes)])?;
        gauge(e, "syncblock_store_live_bytes", "Bytes of current data in the log", [(none(), s.live_bytes)])?;
        gauge(e, "syncblock_store_provisioned_bytes", "Sum of the volumes' sizes", [(none(), s.provisioned_bytes)])?;
        gauge(
            e,
            "syncblock_store_overcommitted",
            "1 if the volumes' sizes add up to more than the store holds, or a sparse store file is larger than its file system's free space",
            [(none(), b(s.overcommitted()))],
        )?;
        gauge(
            e,
            "syncblock_store_backing_shortfall_bytes",
            "Bytes a sparse store file still needs that its file system does not have free",
            [(none(), s.backing_shortfall_bytes)],
        )?;
        gauge(
            e,
            "syncblock_store_write_amplification",
            "Bytes written to the device per byte clients wrote, since start",
            [(none(), s.write_amplification)],
        )?;
        counter(
            e,
            "syncblock_store_client_written_bytes",
            "Data bytes clients wrote",
            [(none(), s.client_written_bytes)],
        )?;
        counter(
            e,
            "syncblock_store_log_written_bytes",
            "Bytes written to the log: data, record and segment headers",
            [(none(), s.log_written_bytes)],
        )?;
        counter(
            e,
            "syncblock_store_cleaner_copied_bytes",
            "Bytes the cleaner copied forward to free segments",
            [(none(), s.cleaner_copied_bytes)],
        )?;
        counter(e, "syncblock_store_cleaner_segments", "Segments the cleaner freed", [(none(), s.segments_cleaned)])?;
        counter(e, "syncblock_store_checkpoints", "Checkpoints written", [(none(), s.checkpoints)])?;
        counter(e, "syncblock_store_syncs", "fdatasync calls on the store", [(none(), s.syncs)])?;
        counter(e, "syncblock_store_io_errors", "Device operations that failed", [(none(), s.io_errors)])?;
        gauge(
            e,
            "syncblock_store_poisoned",
            "1 if an I/O error stopped the store: it refuses writes until restarted",
            [(none(), b(s.poisoned))],
        )?;
        let vols = &doc.volumes;
        let vl = |name: &str| vec![("volume", name.to_string())];
        gauge(
            e,
            "syncblock_volume_size_bytes",
            "Size of the volume",
            vols.iter().map(|v| (vl(&v.name), v.size_bytes)),
        )?;
        gauge(
            e,
            "syncblock_volume_mapped_bytes",
            "Bytes of the volume that hold written data",
            vols.iter().map(|v| (vl(&v.name), v.mapped_bytes)),
        )?;
        let repl: Vec<(&str, &StatusView)> =
            vols.iter().filter_map(|v| v.replication.as_ref().map(|r| (v.name.as_str(), r))).collect();
        let roles = ["primary", "secondary", "stopped"];
        gauge(
            e,
            "syncblock_replication_role",
            "1 for the role this node has for the volume now, 0 for the others",
            repl.iter().flat_map(|(n, r)| {
                roles.map(|role| (vec![("volume", n.to_string()), ("role", role.to_string())], b(r.role() == role)))
            }),
        )?;
        gauge(
            e,
            "syncblock_replication_epoch",
            "The volume's replication epoch",
            repl.iter().map(|(n, r)| (vl(n), r.epoch())),
        )?;
        let prim: Vec<_> = repl
            .iter()
            .filter_map(|(n, r)| match r {
                StatusView::Primary(p) => Some((*n, p)),
                _ => None,
            })
            .collect();
        gauge(
            e,
            "syncblock_replication_rpo_zero",
            "1 if every acknowledged write is on both nodes now (primary only)",
            prim.iter().map(|(n, p)| (vl(n), b(p.rpo_zero))),
        )?;
        gauge(
            e,
            "syncblock_replication_lag_bytes",
            "Bytes of writes the peer lacks",
            prim.iter().map(|(n, p)| (vl(n), p.lag_bytes)),
        )?;
        gauge(
            e,
            "syncblock_replication_lag_seconds",
            "Age of the oldest write the peer lacks (0 when it has every write)",
            prim.iter().map(|(n, p)| (vl(n), p.lag_secs)),
        )?;
        gauge(
            e,
            "syncblock_replication_lag_writes",
            "Writes the peer lacks",
            prim.iter().map(|(n, p)| (vl(n), p.lag_tags)),
        )?;
        gauge(
            e,
            "syncblock_replication_waiting_writes",
            "Client operations in the local log waiting for the peer",
            prim.iter().map(|(n, p)| (vl(n), p.waiting.writes)),
        )?;
        gauge(
            e,
            "syncblock_replication_peer_connected",
            "1 if the replication link to the peer is up",
            repl.iter().map(|(n, r)| {
                let up = match r {
                    StatusView::Primary(p) => p.peer.connected,
                    StatusView::Secondary(s) => s.connected,
                    StatusView::Stopped { .. } => false,
                };
                (vl(n), b(up))
            }),
        )?;
        gauge(
            e,
            "syncblock_replication_peer_in_sync",
            "1 if the peer is a complete, current copy (primary only)",
            prim.iter().map(|(n, p)| (vl(n), b(p.peer.in_sync))),
        )?;
        gauge(
            e,
            "syncblock_replication_acking_alone",
            "1 if the primary acknowledges writes without its peer, under the witness's lease",
            prim.iter().map(|(n, p)| (vl(n), b(p.peer.acking_alone))),
        )?;
        gauge(
            e,
            "syncblock_witness_reachable",
            "1 if the witness answered the primary's last request",
            prim.iter().filter_map(|(n, p)| p.witness.as_ref().map(|w| (vl(n), b(w.reachable)))),
        )?;
        counter(
            e,
            "syncblock_replication_resyncs",
            "Resyncs started since this node became primary",
            prim.iter().map(|(n, p)| (vl(n), p.resync.count)),
        )?;
        counter(
            e,
            "syncblock_replication_resync_shipped_bytes",
            "Data bytes resyncs shipped to the peer",
            prim.iter().map(|(n, p)| (vl(n), p.resync.bytes_shipped)),
        )?;
        counter(
            e,
            "syncblock_replication_resync_skipped_bytes",
            "Bytes resyncs skipped because the peer's checksums matched",
            prim.iter().map(|(n, p)| (vl(n), p.resync.bytes_skipped)),
        )?;
        for (what, pick) in [
            ("resync", (|p: &syncblock_replicator::status::PrimaryView| &p.resync.progress) as fn(_) -> _),
            ("verify", |p| &p.verify.progress),
        ] {
            gauge(
                e,
                &format!("syncblock_replication_{what}_active"),
                &format!("1 while a {what} pass runs"),
                prim.iter().map(|(n, p)| (vl(n), b(pick(p).active))),
            )?;
            gauge(
                e,
                &format!("syncblock_replication_{what}_done_bytes"),
                &format!("Bytes the current (or last) {what} pass has covered"),
                prim.iter().map(|(n, p)| (vl(n), pick(p).bytes_done)),
            )?;
            gauge(
                e,
                &format!("syncblock_replication_{what}_total_bytes"),
                &format!("Bytes the current (or last) {what} pass covers in all"),
                prim.iter().map(|(n, p)| (vl(n), pick(p).bytes_total)),
            )?;
        }
        gauge(
            e,
            "syncblock_replication_verify_differing_blocks",
            "Blocks the last completed verify found different on the two replicas",
            prim.iter().filter_map(|(n, p)| p.verify.last.as_ref().map(|l| (vl(n), l.blocks_differing))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_counters_with_their_suffix() {
        let m = Metrics::new();
        let io = m.io.volume("db");
        io.record(Op::write, 4096, Duration::from_micros(300), true);
        io.record(Op::read, 4096, Duration::from_micros(30), false);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &m.registry).unwrap();
        assert!(om.contains("# TYPE syncblock_nbd_requests counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"));
        let text = openmetrics_to_prometheus(&om);
        assert!(text.contains("# TYPE syncblock_nbd_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP syncblock_nbd_requests_total NBD requests"), "{text}");
        assert!(text.contains("syncblock_nbd_requests_total{volume=\"db\",op=\"write\"} 1\n"), "{text}");
        assert!(text.contains("syncblock_nbd_errors_total{volume=\"db\",op=\"read\"} 1\n"), "{text}");
        assert!(text.contains("syncblock_nbd_bytes_total{volume=\"db\",op=\"read\"} 0\n"), "an error moves no bytes");
        assert!(text.contains("# TYPE syncblock_nbd_request_duration_seconds histogram\n"), "{text}");
        assert!(
            text.contains("syncblock_nbd_request_duration_seconds_bucket{le=\"0.0004\",volume=\"db\",op=\"write\"} 1"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
