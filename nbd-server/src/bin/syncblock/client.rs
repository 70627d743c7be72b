//! The admin endpoint's clients: `status`, `promote`, `demote`, `switchover`, `verify`. They speak HTTP to the
//! node's `--admin` address and read its JSON with the same types the node writes
//! (`syncblock_nbd::admin`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use syncblock_nbd::admin::{Answer, StatusDoc, VolumeDoc};
use syncblock_nbd::size::format_size;
use syncblock_replicator::status::{PrimaryView, ProgressView};
use syncblock_replicator::StatusView;

/// How long `status`, `promote` and `demote` wait for the node's answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `verify` waits: a pass compares checksums only (about 1 GB of volume per few ms on
/// loopback), but a large volume on a busy pair can take minutes.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest admin answer read: a status with many volumes, a verify report's ranges.
const ADMIN_ANSWER_BYTES_MAX: u64 = 4 << 20;
/// How often a running verify's progress is read.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often progress is printed as a plain line when the output is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the admin endpoint is and how to reach it.
#[derive(Clone)]
pub struct AdminAt {
    pub addr: SocketAddr,
    /// TLS credentials, when the node's admin endpoint requires them.
    pub tls: Option<std::sync::Arc<syncblock_replicator::tls::Tls>>,
    /// The name the endpoint's certificate must carry (`--admin-node`).
    pub node: Option<String>,
}

struct Client {
    admin: SocketAddr,
    tls: Option<std::sync::Arc<syncblock_replicator::tls::Tls>>,
    node: Option<String>,
    timeout: Duration,
}

/// The admin endpoint speaks HTTP/1.1; this client sends one request per connection
/// (`Connection: close`) over plain TCP or TLS with the caller's credentials and reads the
/// answer to its end. (ureq, used before, cannot present a PSK.)
impl Client {
    fn new(at: &AdminAt, timeout: Duration) -> Client {
        Client { admin: at.addr, tls: at.tls.clone(), node: at.node.clone(), timeout }
    }

    /// Sends a request; returns the HTTP status and the body, or an error naming the likely cause.
    fn call(&self, post: bool, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let admin = self.admin;
        let io_err = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
                "nothing listens on {admin}; likely cause: the node is not running, was started without --admin, \
                 or --admin names another address"
            ),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
                "the admin endpoint {admin} did not answer in time; likely cause: the node is overloaded or stuck, \
                 or --admin points at a port that never answers"
            ),
            _ => anyhow::anyhow!("the admin endpoint {admin}: {e}"),
        };
        let tcp =
            std::net::TcpStream::connect_timeout(&admin, self.timeout.min(Duration::from_secs(30))).map_err(io_err)?;
        tcp.set_read_timeout(Some(self.timeout)).map_err(io_err)?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(io_err)?;
        let request = format!(
            "{} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            if post { "POST" } else { "GET" }
        );
        let mut raw = Vec::new();
        let limit = ADMIN_ANSWER_BYTES_MAX + (64 << 10);
        match &self.tls {
            None => {
                let mut s = tcp;
                s.write_all(request.as_bytes()).map_err(io_err)?;
                match (&mut s).take(limit).read_to_end(&mut raw) {
                    Ok(_) => {}
                    // A TLS endpoint resets a plaintext request (the bytes were not a handshake).
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && raw.is_empty() => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            Some(tls) => {
                let mut s = tls.connect_blocking(tcp, self.node.as_deref()).map_err(|e| {
                    anyhow::anyhow!(
                        "TLS with the admin endpoint {admin}: {e}; likely cause: the node's admin endpoint does \
                         not use TLS, these credentials are not the ones it trusts, or (with --admin-node) it is \
                         another node"
                    )
                })?;
                s.write_all(request.as_bytes()).map_err(io_err)?;
                match (&mut s).take(limit).read_to_end(&mut raw) {
                    Ok(_) => {}
                    // A server that closes without close_notify still sent the whole answer.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof || !raw.is_empty() => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
        }
        // A TLS endpoint closes a plaintext request unanswered, or answers with a TLS alert record
        // (content type 21, version 3.x).
        let tls_alert = raw.len() >= 2 && raw[0] == 21 && raw[1] == 3;
        if (raw.is_empty() || tls_alert) && self.tls.is_none() {
            bail!(
                "the admin endpoint {admin} closed the connection without answering over plaintext; likely cause: \
                 it requires TLS: give --tls-cert/--tls-key/--tls-ca or --tls-psk"
            );
        }
        parse_response(&raw).map_err(|why| not_admin(admin, &why))
    }

    /// A request whose answer is `T` (on success) or an [`Answer`] with the error.
    fn json<T: DeserializeOwned>(&self, post: bool, path: &str) -> Result<T> {
        let (status, body) = self.call(post, path)?;
        if (200..300).contains(&status) {
            return serde_json::from_str(&body)
                .map_err(|e| not_admin(self.admin, &format!("it answered {}: {e}", shown(&body))));
        }
        match serde_json::from_str::<Answer>(&body) {
            Ok(Answer { error: Some(error), .. }) => bail!("{error}"),
            _ => Err(not_admin(self.admin, &format!("it answered HTTP {status} {}", shown(&body)))),
        }
    }
}

/// Splits an HTTP/1.1 answer into its status and body (`Content-Length` or chunked).
fn parse_response(raw: &[u8]) -> std::result::Result<(u16, String), String> {
    let text_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("its answer is not HTTP")?;
    let head = String::from_utf8_lossy(&raw[..text_end]);
    let mut body = &raw[text_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("its answer is not HTTP ({})", shown(status_line)))?;
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("a chunk is cut short")?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| "a chunk size is not hexadecimal")?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size).ok_or("a chunk is cut short")?);
            body = body.get(size + 2..).unwrap_or_default();
        }
        return Ok((status, String::from_utf8_lossy(&out).into_owned()));
    }
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = body.get(..len).ok_or("its answer is cut short")?;
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

/// The start of an answer, printable.
fn shown(body: &str) -> String {
    let s: String = body.chars().take(60).map(|c| if c.is_control() { '.' } else { c }).collect();
    format!("{s:?}")
}

fn not_admin(admin: SocketAddr, seen: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{admin} is not a syncblock admin endpoint ({seen}); likely cause: --admin points at the NBD, \
         replication or witness port instead of the node's --admin address"
    )
}

fn query(volume: Option<&str>, flag: Option<(&str, bool)>) -> String {
    let mut q = Vec::new();
    if let Some(v) = volume {
        q.push(format!("volume={}", encode(v)));
    }
    if let Some((name, true)) = flag {
        q.push(format!("{name}=true"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Percent-encodes a query value (volume names are plain, but nothing is assumed).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn status(admin: &AdminAt, volume: Option<&str>, json: bool) -> Result<()> {
    let doc: StatusDoc = Client::new(admin, ADMIN_TIMEOUT).json(false, &format!("/status{}", query(volume, None)))?;
    if json {
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        print!("{}", render_status(&doc));
    }
    Ok(())
}

pub fn promote(admin: &AdminAt, volume: Option<&str>, force: bool) -> Result<()> {
    let path = format!("/promote{}", query(volume, Some(("force", force))));
    let a: Answer = Client::new(admin, ADMIN_TIMEOUT).json(true, &path).context("promotion refused")?;
    println!("promoted {} to primary in epoch {}", a.volume.unwrap_or_default(), a.epoch.unwrap_or_default());
    Ok(())
}

pub fn demote(admin: &AdminAt, volume: Option<&str>) -> Result<()> {
    let path = format!("/demote{}", query(volume, None));
    let a: Answer = Client::new(admin, ADMIN_TIMEOUT).json(true, &path).context("demotion failed")?;
    println!("{} is now secondary", a.volume.unwrap_or_default());
    Ok(())
}

pub fn switchover(admin: &AdminAt, volume: Option<&str>) -> Result<()> {
    let a = hand_over(admin, volume)?;
    println!(
        "{} handed over to {} (epoch {}); this node is now secondary",
        a.volume.unwrap_or_default(),
        a.primary.unwrap_or_default(),
        a.epoch.unwrap_or_default()
    );
    Ok(())
}

/// Asks the primary at `admin` to hand `volume` over to its peer; the answer names the new primary.
pub fn hand_over(admin: &AdminAt, volume: Option<&str>) -> Result<Answer> {
    let path = format!("/switchover{}", query(volume, None));
    Client::new(admin, ADMIN_TIMEOUT).json(true, &path).context("switchover refused")
}

/// Runs a verify pass, showing its progress (a bar on a terminal, a line every few seconds
/// otherwise), and fails if the replicas differ (unless `repair` rewrote them).
pub fn verify(admin: &AdminAt, volume: Option<&str>, repair: bool, json: bool) -> Result<()> {
    let path = format!("/verify{}", query(volume, Some(("repair", repair))));
    let volume = volume.map(str::to_string);
    let worker_at = admin.clone();
    let worker = std::thread::spawn(move || Client::new(&worker_at, VERIFY_TIMEOUT).json::<Answer>(true, &path));
    let poller = Client::new(admin, ADMIN_TIMEOUT);
    let mut progress = Progress::new("verify");
    while !worker.is_finished() {
        std::thread::sleep(PROGRESS_EVERY);
        let Ok(doc) = poller.json::<StatusDoc>(false, &format!("/status{}", query(volume.as_deref(), None))) else {
            continue;
        };
        let first = primaries(&doc.volumes).next();
        if let Some(p) = first.filter(|p| p.verify.progress.active) {
            progress.show(&p.verify.progress);
        }
    }
    progress.finish();
    let a =
        worker.join().map_err(|_| anyhow::anyhow!("the verify request's thread panicked"))?.context("verify failed")?;
    let Some(report) = a.verify.clone() else { bail!("the node's answer has no verify report") };
    if json {
        println!("{}", serde_json::to_string(&a)?);
    } else {
        println!(
            "verify {}: {} compared in {:.1} s, {} block(s) differ{}",
            a.volume.unwrap_or_default(),
            format_size(report.bytes_compared),
            report.elapsed_secs,
            report.blocks_differing,
            if repair { format!(", {} repaired", report.blocks_repaired) } else { String::new() }
        );
        for (offset, len) in &report.ranges {
            println!("  differs: offset {offset}, {len} bytes");
        }
        if report.ranges_truncated {
            println!("  (more ranges differ than the report lists)");
        }
    }
    if report.blocks_differing > 0 && !repair {
        bail!("the replicas differ (see the ranges above); `syncblock verify --repair` rewrites them from the primary");
    }
    Ok(())
}

/// Waits until every replicated volume this node is primary of (or `volume`) has RPO = 0,
/// showing the progress of a running resync.
pub fn wait_sync(admin: &AdminAt, volume: Option<&str>, max: Duration) -> Result<()> {
    let client = Client::new(admin, ADMIN_TIMEOUT);
    let path = format!("/status{}", query(volume, None));
    let deadline = Instant::now() + max;
    let mut progress = Progress::new("resync");
    let mut said = None;
    loop {
        let doc: StatusDoc = client.json(false, &path)?;
        let primaries: Vec<&PrimaryView> = primaries(&doc.volumes).collect();
        if primaries.is_empty() {
            bail!(
                "{} is primary of no replicated volume{}: run --wait-sync against the primary's --admin",
                admin.addr,
                volume.map_or(String::new(), |v| format!(" named {v}"))
            );
        }
        let Some(p) = primaries.iter().find(|p| !p.rpo_zero) else {
            progress.finish();
            return Ok(());
        };
        if p.resync.progress.active {
            progress.show(&p.resync.progress);
        } else {
            let why =
                if p.peer.connected { "peer connected, resync starting" } else { "waiting for the peer to connect" };
            if said != Some(why) {
                eprintln!("{}: {why}", p.volume);
            }
            said = Some(why);
        }
        if Instant::now() >= deadline {
            progress.finish();
            bail!("{} is still not in sync after {max:?}", p.volume);
        }
        std::thread::sleep(PROGRESS_EVERY);
    }
}

/// The replicated volumes this node is primary of.
fn primaries(volumes: &[VolumeDoc]) -> impl Iterator<Item = &PrimaryView> {
    volumes.iter().filter_map(|v| match &v.replication {
        Some(StatusView::Primary(p)) => Some(p),
        _ => None,
    })
}

/// A long operation's progress: an indicatif bar with rate and ETA on a terminal, a plain line
/// every [`PLAIN_PROGRESS_EVERY`] otherwise.
struct Progress {
    what: &'static str,
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress { what, bar: None, last_line: None }
    }

    fn show(&mut self, p: &ProgressView) {
        if std::io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(p.bytes_total);
                let style = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                bar.set_style(style.progress_chars("=> "));
                bar.set_message(self.what);
                bar
            });
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
        } else if self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY) {
            self.last_line = Some(Instant::now());
            eprintln!("{}: {}", self.what, progress_text(p));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn progress_text(p: &ProgressView) -> String {
    let pct = if p.bytes_total > 0 { p.bytes_done as f64 * 100.0 / p.bytes_total as f64 } else { 0.0 };
    let eta = p.eta_secs.map_or(String::new(), |s| format!(", ETA {s:.0} s"));
    format!(
        "{pct:.0}% ({} of {}) at {}/s{eta}",
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total),
        human_bytes(p.rate_bytes_per_sec)
    )
}

/// A byte count with one decimal in the largest binary unit.
fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The human-readable status: the store, then each volume and its replication.
fn render_status(doc: &StatusDoc) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = &doc.store;
    let _ = writeln!(o, "node {} (syncblock {})", doc.node, doc.version);
    let mut flags = Vec::new();
    if s.poisoned {
        flags.push("POISONED: an I/O error stopped it; it refuses writes until restarted (see the log)".to_string());
    }
    if s.provisioned_bytes > s.size_bytes {
        flags.push(format!("overcommitted: volumes add up to {}", human_bytes(s.provisioned_bytes)));
    }
    if s.backing_shortfall_bytes > 0 {
        flags.push(format!("its file system lacks {} to fill the sparse file", human_bytes(s.backing_shortfall_bytes)));
    }
    let _ = writeln!(
        o,
        "store {}: {} log, {} free, {} live data, write amplification {:.2}{}",
        s.path,
        human_bytes(s.size_bytes),
        human_bytes(s.free_bytes),
        human_bytes(s.live_bytes),
        s.write_amplification,
        flags.iter().map(|f| format!("; {f}")).collect::<String>()
    );
    for v in &doc.volumes {
        let _ = writeln!(
            o,
            "volume {}: {}, {} written{}",
            v.name,
            human_bytes(v.size_bytes),
            human_bytes(v.mapped_bytes),
            if v.read_only { ", read-only" } else { "" }
        );
        match &v.replication {
            None => {
                let _ = writeln!(o, "  not replicated");
            }
            Some(StatusView::Stopped { .. }) => {
                let _ = writeln!(o, "  replication: between roles (stopping or changing role)");
            }
            Some(StatusView::Secondary(x)) => {
                let _ = writeln!(
                    o,
                    "  secondary in epoch {}; primary {}; {}{}; applied through write {}",
                    x.epoch,
                    if x.connected {
                        format!("{} connected", x.primary.as_deref().unwrap_or("?"))
                    } else {
                        "not connected".into()
                    },
                    if x.consistent { "consistent" } else { "INCONSISTENT until its resync completes" },
                    if x.resyncing { ", resyncing" } else { "" },
                    x.applied_tag
                );
                if let Some(e) = &x.last_error {
                    let _ = writeln!(o, "  last error: {e}");
                }
            }
            Some(StatusView::Primary(p)) => {
                let peer = match (p.peer.connected, p.peer.in_sync) {
                    (true, true) => "peer connected and in sync".to_string(),
                    (true, false) => "peer connected, resyncing".to_string(),
                    (false, _) => "PEER AWAY".to_string(),
                };
                let _ = writeln!(
                    o,
                    "  primary in epoch {} (policy {}); {peer}; {}",
                    p.epoch,
                    p.policy,
                    if p.rpo_zero {
                        "RPO = 0: every acknowledged write is on both nodes".to_string()
                    } else {
                        format!(
                            "RPO > 0: the peer lacks {} write(s), {}, the oldest {:.1} s old{}",
                            p.lag_tags,
                            human_bytes(p.lag_bytes),
                            p.lag_secs,
                            if p.peer.acking_alone { "; acknowledging alone under the witness's lease" } else { "" }
                        )
                    }
                );
                if let Some(w) = &p.witness {
                    if !w.reachable {
                        let _ =
                            writeln!(o, "  witness unreachable: {}", w.last_error.as_deref().unwrap_or("no answer"));
                    }
                }
                if p.waiting.writes > 0 {
                    let _ = writeln!(
                        o,
                        "  {} operation(s) waiting for the peer, the oldest for {:.1} s",
                        p.waiting.writes,
                        p.waiting.oldest_secs.unwrap_or(0.0)
                    );
                }
                if p.resync.progress.active {
                    let _ = writeln!(
                        o,
                        "  {} resync: {}",
                        if p.resync.full { "full" } else { "incremental" },
                        progress_text(&p.resync.progress)
                    );
                } else if p.resync.count > 0 {
                    let _ = writeln!(
                        o,
                        "  resyncs: {} (last {}: {} shipped, {} equal and skipped)",
                        p.resync.count,
                        if p.resync.full { "full" } else { "incremental" },
                        human_bytes(p.resync.bytes_shipped),
                        human_bytes(p.resync.bytes_skipped)
                    );
                }
                if p.verify.progress.active {
                    let _ = writeln!(o, "  verify: {}", progress_text(&p.verify.progress));
                }
                if let Some(l) = &p.verify.last {
                    let _ = writeln!(
                        o,
                        "  last verify: {} compared, {} block(s) differ",
                        human_bytes(l.bytes_compared),
                        l.blocks_differing
                    );
                }
                if let Some(e) = &p.peer.last_error {
                    if !p.peer.connected {
                        let _ = writeln!(o, "  last link error: {e}");
                    }
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(encode("a b/ç"), "a%20b%2F%C3%A7");
        assert_eq!(query(Some("db"), Some(("force", true))), "?volume=db&force=true");
        assert_eq!(query(None, Some(("force", false))), "");
    }
}
