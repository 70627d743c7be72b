//! The admin endpoint's metrics and status, through the real binary: what an operator's
//! Prometheus and `syncblock status` see, checked with `promtool` (Debian package `prometheus`,
//! installed by `.ci/run`; under CI a missing `promtool` fails the tests, elsewhere they skip).
//!
//! - An unreplicated `serve` counts requests, bytes, errors and latency per volume and operation.
//! - A pair with its witness reports role, epoch, RPO = 0, a connected peer and a reachable witness;
//!   once the secondary is killed and the primary writes alone, RPO > 0 with the lag in bytes and
//!   seconds, in the metrics, in `status --json` and in the human-readable `status`.
//! - The example alerting rules (docs/prometheus/alerts.yml) pass `promtool check rules` and their
//!   unit tests.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proc::{free_port_addr, Proc};
use common::tools::{can_run, missing_tool, ok, path, tool};
use syncblock_nbd::admin::StatusDoc;
use syncblock_replicator::StatusView;

const BIN: &str = env!("CARGO_BIN_EXE_syncblock");

/// True if promtool is here; under CI its absence fails the test.
fn have_promtool() -> bool {
    can_run("the metrics tests", missing_tool(&[("promtool", "prometheus")]).as_deref())
}

fn get(admin: &str, path: &str) -> String {
    let mut resp = ureq::get(&format!("http://{admin}{path}")).call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
    resp.body_mut().read_to_string().unwrap()
}

/// Checks the exposition with `promtool check metrics` (format and naming conventions).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .env("PATH", path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn status(admin: &str) -> StatusDoc {
    serde_json::from_str(&ok(BIN, &["status", "--json", "--admin", admin])).unwrap()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> (i32, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let (code, so, se) = tool("qemu-io", &args);
    (code, format!("{so}{se}"))
}

#[test]
fn an_unreplicated_server_counts_requests_bytes_errors_and_latency() {
    if !have_promtool() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.img");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--create", "--size=1GiB", "--volume=vol:64MiB", "--listen=127.0.0.1:0", "--admin=127.0.0.1:0"])
        .arg(format!("--store={}", store.display()));
    let p = Proc::spawn(cmd, &dir.path().join("serve.log"));
    let admin = p.wait_line("admin endpoint on http://").split_whitespace().next().unwrap().to_string();
    let uri = p.wait_line("nbd://").split_whitespace().next().map(|u| format!("nbd://{u}")).unwrap();
    assert!(uri.ends_with("/vol"), "{uri}");
    let (code, out) = qemu_io(&uri, &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 64k"]);
    assert!(code == 0 && !out.contains("failed"), "{out}");
    // Past the end of the 64 MiB volume: an error reply, counted as one.
    let (_, out) = qemu_io(&uri, &["write 64M 4k"]);
    assert!(out.contains("failed") || out.contains("error"), "a write past the end must fail: {out}");

    let text = get(&admin, "/metrics");
    promtool_accepts(&text);
    let w = r#"{volume="vol",op="write"}"#;
    assert_eq!(must(&text, &format!("syncblock_nbd_bytes_total{w}")), (1 << 20) as f64);
    assert!(must(&text, &format!("syncblock_nbd_requests_total{w}")) >= 1.0);
    assert!(must(&text, &format!("syncblock_nbd_request_duration_seconds_count{w}")) >= 1.0);
    assert_eq!(must(&text, r#"syncblock_nbd_bytes_total{volume="vol",op="read"}"#), (64 << 10) as f64);
    assert!(must(&text, r#"syncblock_nbd_requests_total{volume="vol",op="flush"}"#) >= 1.0);
    // qemu-io checks the range itself for a plain write; whether the server saw the request
    // depends on it, so errors are only checked to be exposed.
    assert!(sample(&text, &format!("syncblock_nbd_errors_total{w}")).is_some(), "{text}");
    assert_eq!(must(&text, "syncblock_store_poisoned{}"), 0.0);
    assert_eq!(must(&text, "syncblock_store_size_bytes{}"), (1u64 << 30) as f64);
    assert!(must(&text, "syncblock_store_client_written_bytes_total{}") >= (1 << 20) as f64);
    assert!(must(&text, "syncblock_store_write_amplification{}") >= 1.0);
    assert_eq!(must(&text, r#"syncblock_volume_size_bytes{volume="vol"}"#), (64 << 20) as f64);
    assert!(!text.contains("syncblock_replication_"), "nothing is replicated here:\n{text}");
    // OpenMetrics for a scraper that asks for it.
    let mut resp = ureq::get(&format!("http://{admin}/metrics"))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .call()
        .unwrap();
    assert!(resp.body_mut().read_to_string().unwrap().ends_with("# EOF\n"));

    let st = status(&admin);
    assert_eq!(st.volumes.len(), 1);
    assert!(st.volumes[0].replication.is_none() && st.volumes[0].mapped_bytes >= 1 << 20, "{st:?}");
    let human = ok(BIN, &["status", "--admin", &admin]);
    assert!(human.contains("volume vol: 64.0 MiB") && human.contains("not replicated"), "{human}");
    p.stop();
}

/// A witness and two `serve` nodes with the defaults; `a` starts as primary.
struct Pair {
    _witness: Proc,
    a: Option<Proc>,
    b: Option<Proc>,
    a_admin: String,
    a_uri: String,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn start() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Command::new(BIN);
        w.args(["witness", "--listen=127.0.0.1:0"]).arg(format!("--state={}", dir.path().join("w.state").display()));
        let witness = Proc::spawn(w, &dir.path().join("witness.log"));
        let wat = witness.wait_line("witness on ");
        let (a_repl, b_repl) = (free_port_addr(), free_port_addr());
        let node = |name: &str, role: &str, listen: &str, peer: &str| {
            let admin = free_port_addr();
            let mut cmd = Command::new(BIN);
            cmd.args(["serve", "--create", "--size=1GiB", "--volume=vol:64MiB", "--listen=127.0.0.1:0"])
                .arg(format!("--store={}", dir.path().join(format!("{name}.img")).display()))
                .args([
                    format!("--role={role}"),
                    format!("--repl-listen={listen}"),
                    format!("--peer={peer}"),
                    format!("--witness={wat}"),
                    format!("--admin={admin}"),
                    format!("--node={name}"),
                ]);
            let p = Proc::spawn(cmd, &dir.path().join(format!("{name}.log")));
            p.wait_line("admin endpoint on ");
            let uri = p.wait_line("nbd://").split_whitespace().next().map(|u| format!("nbd://{u}")).unwrap();
            (p, admin, uri)
        };
        let (b, _, _) = node("b", "secondary", &b_repl, &a_repl);
        let (a, a_admin, a_uri) = node("a", "primary", &a_repl, &b_repl);
        Pair { _witness: witness, a: Some(a), b: Some(b), a_admin, a_uri, _dir: dir }
    }

    fn primary_view(&self) -> syncblock_replicator::status::PrimaryView {
        match status(&self.a_admin).volumes.remove(0).replication {
            Some(StatusView::Primary(p)) => p,
            other => panic!("a is not primary: {other:?}"),
        }
    }

    /// Waits (bounded) until `a`'s status satisfies `cond`.
    fn wait(&self, what: &str, cond: impl Fn(&syncblock_replicator::status::PrimaryView) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.primary_view();
            if cond(&p) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within 30 s: {p:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        drop(self.a.take());
        drop(self.b.take());
    }
}

#[test]
fn a_pair_reports_rpo_zero_and_then_the_lag_of_a_lost_peer_in_bytes_and_seconds() {
    if !have_promtool() {
        return;
    }
    let mut pair = Pair::start();
    let out = ok(BIN, &["status", "--wait-sync", "--wait-max=30", "--admin", &pair.a_admin]);
    assert!(out.contains("RPO = 0"), "{out}");
    pair.wait("the peer in sync", |p| p.rpo_zero);
    let (code, out) = qemu_io(&pair.a_uri, &["write -P 0x11 0 256k", "flush"]);
    assert!(code == 0 && !out.contains("failed"), "{out}");
    let text = get(&pair.a_admin, "/metrics");
    promtool_accepts(&text);
    let v = r#"{volume="vol"}"#;
    assert_eq!(must(&text, r#"syncblock_replication_role{volume="vol",role="primary"}"#), 1.0);
    assert_eq!(must(&text, r#"syncblock_replication_role{volume="vol",role="secondary"}"#), 0.0);
    assert!(must(&text, &format!("syncblock_replication_epoch{v}")) >= 1.0);
    assert_eq!(must(&text, &format!("syncblock_replication_rpo_zero{v}")), 1.0);
    assert_eq!(must(&text, &format!("syncblock_replication_peer_connected{v}")), 1.0);
    assert_eq!(must(&text, &format!("syncblock_witness_reachable{v}")), 1.0);
    assert_eq!(must(&text, &format!("syncblock_replication_lag_bytes{v}")), 0.0);
    assert_eq!(must(&text, &format!("syncblock_replication_lag_seconds{v}")), 0.0);
    assert!(must(&text, &format!("syncblock_replication_resyncs_total{v}")) >= 1.0);

    // The secondary dies; the primary continues alone with the witness's consent (degrade, the
    // default with a witness), and what the peer lacks grows in bytes and in age.
    drop(pair.b.take());
    let (code, out) = qemu_io(&pair.a_uri, &["write -P 0x22 1M 128k", "flush"]);
    assert!(code == 0 && !out.contains("failed"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let p = pair.primary_view();
    assert!(!p.rpo_zero && !p.peer.connected && p.peer.acking_alone, "{p:?}");
    assert!(p.lag_bytes >= 128 << 10 && p.lag_tags >= 1, "{p:?}");
    assert!(p.lag_secs >= 0.3, "the oldest write the peer lacks is at least 0.3 s old: {p:?}");
    let text = get(&pair.a_admin, "/metrics");
    promtool_accepts(&text);
    assert_eq!(must(&text, &format!("syncblock_replication_rpo_zero{v}")), 0.0);
    assert_eq!(must(&text, &format!("syncblock_replication_peer_connected{v}")), 0.0);
    assert_eq!(must(&text, &format!("syncblock_replication_acking_alone{v}")), 1.0);
    assert!(must(&text, &format!("syncblock_replication_lag_bytes{v}")) >= (128 << 10) as f64);
    assert!(must(&text, &format!("syncblock_replication_lag_seconds{v}")) >= 0.3);
    let human = ok(BIN, &["status", "--admin", &pair.a_admin]);
    assert!(human.contains("PEER AWAY") && human.contains("RPO > 0"), "{human}");
}

#[test]
fn the_example_alerting_rules_pass_promtool() {
    if !have_promtool() {
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus");
    let rules = docs.join("alerts.yml");
    ok("promtool", &["check", "rules", rules.to_str().unwrap()]);
    let (code, so, se) = {
        let out = Command::new("promtool")
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(&docs)
            .env("PATH", path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "promtool test rules:\n{so}{se}");
    // Every metric an alert uses is one the server exports (names from the code, not typed twice).
    let text = std::fs::read_to_string(&rules).unwrap();
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs")).unwrap();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("syncblock_")) {
        let base = word.trim_end_matches("_bucket").trim_end_matches("_total");
        assert!(src.contains(&format!("\"{base}\"")), "alerts.yml uses {word}, which src/metrics.rs does not export");
    }
}
