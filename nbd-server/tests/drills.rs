//! Drills for "failover that works with the defaults" (issue 12), on real `syncblock` processes over
//! loopback: a pair and its witness started with default settings lose their primary to SIGKILL
//! three times while a verifying NBD client writes, and every block the client saw acknowledged
//! as durable (FUA, or covered by a completed flush) must be on the survivor; probes on a
//! secondary's replication port must leave the live session alone; SIGTERM must stop a node whose
//! writes wait for its peer, failing those writes; `syncblock status` pointed at something other
//! than an admin endpoint must fail; and an unreplicated server SIGKILLed under load must come
//! back at once.
//!
//! The NBD client is a small Python program on libnbd (python3-libnbd, run by /usr/bin/python3:
//! the `nbd` module belongs to the system Python), written into each test's directory from
//! [`CLIENT_PY`]. It keeps a record file of every write it sent and of those that became durable,
//! and checks a server's blocks against that record.
//!
//! Every process is started through [`Proc`] (SIGKILLed and reaped when dropped), [`Client`]
//! (likewise) or under `timeout` (the short-lived CLI), so a failing test leaves nothing running; every port is a free one found by binding
//! port 0; every wait is bounded. The tests take turns: their timings (failover time, a write's
//! latency) should not depend on each other's load on a small machine. The random choices (when
//! to kill, where to write) come from a seed printed on stderr; `DRILL_SEED=n` repeats them.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pair::{serve_args, syncblock, vol_uri, Pair, PairSpec, BIN};
use common::proc::free_port_addr;
use common::rng::Rng;
use common::tools::{run, wait_until};

/// How often `wait_until` probes: status probes start a CLI process each.
const POLL: Duration = Duration::from_millis(100);
/// The Python whose `nbd` module is python3-libnbd (not whichever python3 comes first in PATH).
const PYTHON: &str = "/usr/bin/python3";
/// The replicated volume's size: the writer picks 4 KiB blocks all over it.
const VOLUME_SIZE: &str = "64MiB";
/// Longest a survivor may take to call itself primary after its primary was SIGKILLed (the spec
/// says about 1 s; this leaves room for a loaded machine).
const PROMOTION_MAX: Duration = Duration::from_secs(15);
/// Longest a survivor may take, from the kill, to acknowledge its first FUA write.
const FAILOVER_MAX: Duration = Duration::from_secs(15);
/// Longest a restarted node may take to rejoin: resynced, its peer in sync again.
const REJOIN_MAX: Duration = Duration::from_secs(30);
/// Longest a node may take to exit after SIGTERM while a write waits for its peer.
const SIGTERM_EXIT_MAX: Duration = Duration::from_secs(15);
/// Longest one NBD write or flush may take while probes hit the secondary's replication port.
const PROBED_LATENCY_SECS_MAX: f64 = 1.0;
/// Longest one `syncblock status` may run (its own timeout for a silent endpoint is 30 s).
const CLI_MAX: Duration = Duration::from_secs(35);
/// Longest a client run may take beyond its own deadline (start-up, a last poll).
const CLIENT_SLACK: Duration = Duration::from_secs(20);

/// One test at a time (see the file doc).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- The NBD client ----------------------------------------------------------------------------

/// The client program (see the file doc). Each mode prints one JSON object, with no spaces, as its
/// last line on stdout; the tests read its fields with [`json_field`].
const CLIENT_PY: &str = r##"
"""NBD client for nbd-server/tests/drills.rs, on libnbd.

  write URI RECORD SEED SECS   4 KiB writes of random contents at random blocks, 8 in flight, a
                               quarter with FUA, a flush now and then, until SECS have passed
                               (then a last flush) or a command fails; prints "connected" first
  verify URI RECORD            reads every block in RECORD and checks it; if all match, flushes
                               and records what it read as the blocks' durable contents
  fua URI RECORD SECS          one FUA write, waiting at most SECS for its answer
  fua-until URI RECORD SECS    FUA writes on fresh connections (2 s each) until one succeeds or
                               SECS have passed

RECORD has one line per event (sequence numbers increase across runs, per write, not per line):
  A seq offset digest   the write was sent: it may or may not have landed
  D seq offset digest   that write is durable: answered with FUA, or covered by a completed flush
  R seq offset digest   the block as `verify` read it and then flushed: durable from there on
A block written durably must read back as its last durable version or as any version sent after
it (such a write may have landed, acknowledged or not); a block never written durably as zeros
or any version sent.
"""
import hashlib, json, os, random, sys, time
import nbd

BLOCK = 4096
DEPTH = 8
FUA_SHARE = 0.25
FLUSH_SHARE = 0.1
ATTEMPT_SECS = 2.0


def digest(data):
    return hashlib.sha256(data).hexdigest()[:32]


ZERO = digest(bytes(BLOCK))


def emit(obj):
    print(json.dumps(obj, separators=(",", ":")), flush=True)


class Record:
    def __init__(self, path):
        self.versions = {}
        self.seq = 0
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) != 4:
                        continue  # a line cut short by a killed client
                    kind, seq, off, dig = parts[0], int(parts[1]), int(parts[2]), parts[3]
                    self.versions.setdefault(off, []).append((seq, kind, dig))
                    self.seq = max(self.seq, seq)
        self.f = open(path, "a")

    def add(self, kind, off, dig, seq=None):
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.f.write(f"{kind} {seq} {off} {dig}\n")
        self.f.flush()
        return seq

    def sync(self):
        self.f.flush()
        os.fsync(self.f.fileno())

    def acceptable(self, off):
        """(digests the block may hold, whether a version of it is durable)"""
        versions = self.versions[off]
        durable = [v for v in versions if v[1] in "DR"]
        sent = lambda after: {dig for (seq, kind, dig) in versions if kind == "A" and seq > after}
        if durable:
            seq, _, dig = max(durable)
            return {dig} | sent(seq), True
        return {ZERO} | sent(0), False


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def announce_durable(st):
    """Says once, on its own line, that a write is durable: the moment a drill may kill the server."""
    if st["durable"] > 0 and not st.get("announced"):
        st["announced"] = True
        print("durable", flush=True)


def write(uri, record, seed, secs):
    rng = random.Random(seed)
    rec = Record(record)
    st = {"writes": 0, "fua": 0, "flushes": 0, "durable": 0, "max_latency_secs": 0.0,
          "max_latency_op": None, "error": None}
    start = time.monotonic()
    deadline = start + secs
    try:
        h = connect(uri)
        print("connected", flush=True)
        n_blocks = h.get_size() // BLOCK
        inflight = {}  # cookie -> (op, sent at, payload)
        busy = set()  # offsets with a write in flight: one version of a block at a time
        unflushed = []  # (seq, offset, digest) of answered writes without FUA
        flushing = False
        while True:
            now = time.monotonic()
            while now < deadline and len(inflight) < DEPTH:
                if not flushing and unflushed and rng.random() < FLUSH_SHARE:
                    # Covers the writes answered before it is sent, and only those.
                    cookie = h.aio_flush()
                    inflight[cookie] = ("flush", now, unflushed)
                    unflushed, flushing = [], True
                    continue
                off = rng.randrange(n_blocks) * BLOCK
                if off in busy:
                    continue
                data = rng.randbytes(BLOCK)
                fua = rng.random() < FUA_SHARE
                dig = digest(data)
                seq = rec.add("A", off, dig)
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[cookie] = ("fua" if fua else "write", now, (seq, off, dig, buf))
                busy.add(off)
            if not inflight:
                break
            h.poll(100)
            for cookie in list(inflight):
                if not h.aio_command_completed(cookie):  # raises if the command failed
                    continue
                op, sent, payload = inflight.pop(cookie)
                latency = time.monotonic() - sent
                if latency > st["max_latency_secs"]:
                    st["max_latency_secs"], st["max_latency_op"] = latency, op
                if op == "flush":
                    flushing = False
                    st["flushes"] += 1
                    for (seq, off, dig) in payload:
                        rec.add("D", off, dig, seq)
                    st["durable"] += len(payload)
                    rec.sync()
                    announce_durable(st)
                    continue
                seq, off, dig, _ = payload
                busy.discard(off)
                st["writes"] += 1
                if op == "fua":
                    st["fua"] += 1
                    st["durable"] += 1
                    rec.add("D", off, dig, seq)
                    rec.sync()
                    announce_durable(st)
                else:
                    unflushed.append((seq, off, dig))
        h.flush()
        for (seq, off, dig) in unflushed:
            rec.add("D", off, dig, seq)
        st["durable"] += len(unflushed)
        rec.sync()
    except nbd.Error as e:
        st["error"] = str(e)
    st["secs"] = time.monotonic() - start
    st.pop("announced", None)
    emit(st)


def verify(uri, record):
    rec = Record(record)
    h = connect(uri)
    read, bad, n_durable = {}, [], 0
    todo, inflight = sorted(rec.versions), {}  # cookie -> (offset, buffer)
    while todo or inflight:
        while todo and len(inflight) < 4 * DEPTH:
            off = todo.pop()
            buf = nbd.Buffer(BLOCK)
            inflight[h.aio_pread(buf, off)] = (off, buf)
        h.poll(1000)
        for cookie in [c for c in inflight if h.aio_command_completed(c)]:
            off, buf = inflight.pop(cookie)
            read[off] = digest(buf.to_bytearray())
    for off, got in read.items():
        ok, durable = rec.acceptable(off)
        n_durable += durable
        if got not in ok:
            bad.append({"offset": off, "durable": durable, "got": got, "acceptable": sorted(ok)[:4]})
    if not bad:
        h.flush()
        for off, got in read.items():
            rec.add("R", off, got)
        rec.sync()
    emit({"checked": len(read), "durable": n_durable, "bad": len(bad), "examples": bad[:5]})


def fua_attempt(uri, rec, rng, deadline):
    h = connect(uri)
    off = rng.randrange(h.get_size() // BLOCK) * BLOCK
    data = rng.randbytes(BLOCK)
    dig = digest(data)
    seq = rec.add("A", off, dig)
    rec.sync()
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)
    while not h.aio_command_completed(cookie):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        h.poll(max(1, min(100, int(left * 1000))))
    rec.add("D", off, dig, seq)
    rec.sync()


def fua(uri, record, secs, retry):
    rec = Record(record)
    rng = random.Random()
    start = time.monotonic()
    deadline = start + secs
    attempts, error = 0, None
    while True:
        attempts += 1
        try:
            until = min(deadline, time.monotonic() + ATTEMPT_SECS) if retry else deadline
            fua_attempt(uri, rec, rng, until)
            emit({"ok": True, "attempts": attempts, "secs": time.monotonic() - start})
            return
        except (nbd.Error, TimeoutError) as e:
            error = str(e)
        if not retry or time.monotonic() >= deadline:
            emit({"ok": False, "attempts": attempts, "secs": time.monotonic() - start, "error": error})
            return
        time.sleep(0.05)


mode, uri, record = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "write":
    write(uri, record, int(sys.argv[4]), float(sys.argv[5]))
elif mode == "verify":
    verify(uri, record)
elif mode in ("fua", "fua-until"):
    fua(uri, record, float(sys.argv[4]), mode == "fua-until")
else:
    sys.exit(f"unknown mode {mode}")
"##;

/// A run of the client program; SIGKILLed and reaped when dropped.
struct Client {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    what: String,
}

/// How a client run ended: its exit code, its last stdout line (the JSON), its stderr.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    json: String,
    stderr: String,
}

impl Client {
    /// Runs `CLIENT_PY mode uri record extra…` in `dir`, its output in files there.
    fn spawn(dir: &Path, mode: &str, uri: &str, extra: &[&str]) -> Client {
        let script = dir.join("client.py");
        if !script.exists() {
            let probe = Command::new(PYTHON).args(["-c", "import nbd"]).output();
            assert!(
                probe.is_ok_and(|o| o.status.success()),
                "{PYTHON} cannot import nbd: install python3-libnbd (see .ci/run)"
            );
            std::fs::write(&script, CLIENT_PY).unwrap();
        }
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let (stdout, stderr) = (dir.join(format!("client-{n}.out")), dir.join(format!("client-{n}.err")));
        let record = dir.join("record");
        let child = Command::new(PYTHON)
            .arg(&script)
            .args([mode, uri, record.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn the client");
        Client { child, stdout, stderr, what: format!("client {mode} {uri} {extra:?}") }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// A writer connected to its server (it printed "connected"): from here on, killing the server
    /// interrupts its writes rather than its start-up.
    fn wait_connected(self) -> Client {
        self.wait_output(|out| out.starts_with("connected\n"), "did not connect")
    }

    /// A writer that has made a write durable (it printed "durable"), so that a kill from here on
    /// has acknowledged data to lose. Under load the first flush can take longer than a drill's
    /// random wait; the drills count on at least one durable write.
    fn wait_durable(self) -> Client {
        self.wait_output(|out| out.contains("\ndurable\n"), "made no write durable")
    }

    /// Waits at most [`CLIENT_SLACK`] for the client's output so far to pass `ready`; panics with
    /// `failed` and the client's outcome if it ends or the time runs out first.
    fn wait_output(mut self, ready: impl Fn(&str) -> bool, failed: &str) -> Client {
        let deadline = Instant::now() + CLIENT_SLACK;
        while !ready(&std::fs::read_to_string(&self.stdout).unwrap_or_default()) {
            if !self.running() || Instant::now() >= deadline {
                let what = self.what.clone();
                panic!("{what} {failed}: {:?}", self.finish(Duration::ZERO));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self
    }

    /// A writer of 60 s, connected, with a durable write, that has been writing for `for_` more
    /// and is still running: the moment to kill its server.
    fn writer_under_way(dir: &Path, uri: &str, rng: &mut Rng, round: u32, for_: (u64, u64)) -> Client {
        let mut writer =
            Client::spawn(dir, "write", uri, &[&rng.next().to_string(), "60"]).wait_connected().wait_durable();
        std::thread::sleep(rng.millis(for_.0, for_.1));
        assert!(
            writer.running(),
            "round {round}: the writer stopped before the kill: {:?}",
            writer.finish(CLIENT_SLACK)
        );
        writer
    }

    /// Waits at most `max` for the run to end.
    fn finish(mut self, max: Duration) -> Outcome {
        let deadline = Instant::now() + max;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{} did not end within {max:?}", self.what);
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let json = stdout.lines().last().unwrap_or_default().to_string();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        Outcome { code: status.code(), json, stderr }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Outcome {
    /// The JSON line of a run that exited cleanly.
    fn json(&self, what: &str) -> &str {
        assert!(
            self.code == Some(0) && self.json.starts_with('{'),
            "{what}: exit {:?}, last line {:?}, stderr:\n{}",
            self.code,
            self.json,
            self.stderr
        );
        &self.json
    }
}

/// Reads every recorded block through `uri` and checks it (see [`CLIENT_PY`]); returns the number
/// of blocks with a durable version.
fn verify_record(dir: &Path, uri: &str, what: &str) -> u64 {
    let out = Client::spawn(dir, "verify", uri, &[]).finish(Duration::from_secs(120));
    let json = out.json(what);
    assert_eq!(json_u64(json, &["bad"]), 0, "{what}: blocks differ from what was acknowledged: {json}");
    json_u64(json, &["durable"])
}

// ---- Processes and their answers --------------------------------------------------------------

/// `syncblock status --admin admin`: its JSON, or why there is none.
fn status(admin: &str) -> Result<String, String> {
    match run(CLI_MAX, BIN, &["status", "--json", "--admin", admin]) {
        (0, out, _) => Ok(out),
        (code, out, err) => Err(format!("status exited with {code}: {out}{err}")),
    }
}

/// The value of the field reached by `keys` in a one-line JSON object: each key is looked for
/// after the previous one, enough for the objects `status` and the client print, where a nested
/// key follows its parent. Strings are returned without their quotes.
fn json_field(json: &str, keys: &[&str]) -> Option<String> {
    let mut at = 0;
    for key in keys {
        at += json[at..].find(&format!("\"{key}\":"))? + key.len() + 3;
    }
    let rest = &json[at..];
    Some(match rest.strip_prefix('"') {
        Some(s) => s[..s.find('"')?].to_string(),
        None => rest[..rest.find([',', '}', ']']).unwrap_or(rest.len())].trim().to_string(),
    })
}

fn json_u64(json: &str, keys: &[&str]) -> u64 {
    let v = json_field(json, keys).unwrap_or_else(|| panic!("no {keys:?} in {json}"));
    v.parse().unwrap_or_else(|_| panic!("{keys:?} is {v}, not a count, in {json}"))
}

fn json_is(json: &str, keys: &[&str], want: &str) -> bool {
    json_field(json, keys).as_deref() == Some(want)
}

// ---- A pair and its witness -----------------------------------------------------------------

/// A pair and its witness (`common::pair`) in a directory of their own, started as
/// docs/replication.md does by hand, with `flags` added to each node's (none: the defaults).
fn start_pair(flags: &[&str]) -> Pair {
    let spec = PairSpec {
        store_size: "1GiB",
        volume_size: VOLUME_SIZE,
        flags,
        witness_flags: &[],
        client_flags: &[],
        poll: POLL,
        rejoin_max: REJOIN_MAX,
    };
    Pair::start_in_temp_dir(&spec)
}

// ---- The drills -----------------------------------------------------------------------------

/// A pair and witness with the defaults only. Three rounds: a verifying writer runs through the
/// primary, the primary is SIGKILLed at a random moment, the survivor must promote itself, hold
/// every block acknowledged as durable and accept a FUA write; the killed node restarts on its
/// store with its first arguments, rejoins as secondary and is resynced; the roles swap.
#[test]
fn failover_with_defaults_keeps_every_flushed_block() {
    let _serial = serial();
    let mut rng = Rng::from_env("DRILL_SEED", "failover_with_defaults_keeps_every_flushed_block");
    let mut pair = start_pair(&[]);
    let (mut p, mut s) = (0, 1);
    for round in 1..=3 {
        let writer = Client::writer_under_way(pair.dir(), &pair.nodes[p].uri, &mut rng, round, (500, 1500));
        let killed = Instant::now();
        pair.nodes[p].kill();
        let out = writer.finish(CLIENT_SLACK);
        let written = out.json("the writer").to_string();
        assert!(
            json_u64(&written, &["durable"]) > 0,
            "round {round}: nothing was written durably before the kill: {written}"
        );
        assert!(!json_is(&written, &["error"], "null"), "round {round}: the writer did not notice the kill: {written}");

        let (survivor, name) = (&pair.nodes[s], pair.nodes[s].name);
        pair.wait_promoted(s, &format!("round {round}: {name} promoted"), PROMOTION_MAX);
        let promoted = killed.elapsed();
        let left = FAILOVER_MAX.saturating_sub(promoted).as_secs_f64().max(1.0).to_string();
        let out = Client::spawn(pair.dir(), "fua-until", &survivor.uri, &[&left]).finish(FAILOVER_MAX + CLIENT_SLACK);
        let json = out.json("the FUA probe");
        let failover = killed.elapsed();
        assert!(
            json_is(json, &["ok"], "true"),
            "round {round}: {name}, promoted after {promoted:?}, acknowledged no FUA write within {FAILOVER_MAX:?}: \
             {json}\n{}\n{}",
            status(&survivor.admin).unwrap_or_else(|e| e),
            pair.logs()
        );
        let n_durable = verify_record(pair.dir(), &survivor.uri, &format!("round {round}: {name} after failover"));
        assert!(n_durable > 0, "round {round}: no durable block checked");
        eprintln!(
            "round {round}: {} SIGKILLed; {name} primary after {promoted:?}, first FUA write acknowledged after \
             {failover:?}; {n_durable} durable blocks verified on {name} (writer: {written})",
            pair.nodes[p].name
        );
        let st = status(&survivor.admin).unwrap();
        assert!(
            json_is(&st, &["policy"], "degrade"),
            "round {round}: with a witness the default policy is degrade: {st}"
        );

        pair.nodes[p].start();
        pair.wait_in_sync(s);
        (p, s) = (s, p);
    }
    // The last rejoined node holds the same blocks: read it alone, on its store.
    let last = pair.nodes[s].name;
    pair.nodes[p].kill();
    pair.nodes[s].kill();
    let log = pair.dir().join(format!("{last}-alone.log"));
    let store = pair.dir().join(format!("{last}.img"));
    let alone = syncblock(
        &log,
        &["serve".into(), format!("--store={}", store.display()), "--create".into(), "--listen=127.0.0.1:0".into()],
    );
    let uri = vol_uri(&alone, &log);
    verify_record(pair.dir(), &uri, &format!("{last}'s store on its own after rejoining"));
    alone.stop();
}

/// A healthy pair (defaults) under a writer; about 20 connections to the secondary's replication
/// port send garbage, a frame header with a bad checksum, an HTTP request, nothing at all, or stay
/// open and silent past the heartbeat timeout. The live session must not notice: no resync, the
/// peer still connected and in sync, and no write or flush slower than a second.
#[test]
fn probes_on_a_secondary_replication_port_leave_the_session_alone() {
    let _serial = serial();
    let mut rng = Rng::from_env("DRILL_SEED", "probes_on_a_secondary_replication_port_leave_the_session_alone");
    let pair = start_pair(&[]);
    let before = status(&pair.nodes[0].admin).unwrap();
    let resyncs = json_u64(&before, &["resync", "count"]);
    let writer =
        Client::spawn(pair.dir(), "write", &pair.nodes[0].uri, &[&rng.next().to_string(), "8"]).wait_connected();
    std::thread::sleep(Duration::from_millis(500));

    let target = pair.nodes[1].repl.to_socket_addrs().unwrap().next().unwrap();
    let mut silent = Vec::new();
    let started = Instant::now();
    for i in 0..20 {
        let mut conn = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(c) => c,
            Err(e) => panic!("probe {i}: cannot connect to the secondary's replication port {target}: {e}"),
        };
        // Writes may fail once the secondary has closed the connection: that is its right.
        match i % 5 {
            0 => {
                let junk: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
                let _ = conn.write_all(&junk);
            }
            1 => {
                // A Hello header (magic, version 3, kind 1) with a wrong checksum and a short body.
                let mut frame = b"SBRP".to_vec();
                frame.extend_from_slice(&3u16.to_le_bytes());
                frame.extend_from_slice(&[1, 0]);
                frame.extend_from_slice(&16u32.to_le_bytes());
                frame.extend_from_slice(&0xdead_beefu32.to_le_bytes());
                frame.extend_from_slice(&[0x55; 16]);
                let _ = conn.write_all(&frame);
            }
            2 => {
                let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n");
                let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
                let _ = conn.read(&mut [0u8; 256]);
            }
            3 => {}
            _ => {
                silent.push(conn);
                std::thread::sleep(rng.millis(100, 200));
                continue;
            }
        }
        drop(conn);
        std::thread::sleep(rng.millis(100, 200));
    }
    // The silent ones stay open past the heartbeat timeout (2 s by default).
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed()));
    drop(silent);

    let out = writer.finish(Duration::from_secs(8) + CLIENT_SLACK);
    let json = out.json("the writer");
    assert!(json_is(json, &["error"], "null"), "a write failed during the probes: {json}\n{}", pair.logs());
    let latency: f64 = json_field(json, &["max_latency_secs"]).unwrap().parse().unwrap();
    assert!(
        latency <= PROBED_LATENCY_SECS_MAX,
        "the writer stalled during the probes (slowest command {latency:.3} s): {json}\n{}",
        pair.logs()
    );
    assert!(json_u64(json, &["writes"]) > 100, "the writer barely wrote: {json}");
    let after = status(&pair.nodes[0].admin).unwrap();
    assert_eq!(
        json_u64(&after, &["resync", "count"]),
        resyncs,
        "the probes cost a resync:\nbefore {before}\nafter {after}\n{}",
        pair.logs()
    );
    assert!(
        json_is(&after, &["peer", "connected"], "true") && json_is(&after, &["peer", "in_sync"], "true"),
        "the session did not survive the probes: {after}\n{}",
        pair.logs()
    );
    verify_record(pair.dir(), &pair.nodes[0].uri, "the primary after the probes");
}

/// A strict pair with a witness and no automatic failover: the secondary is SIGKILLed, a FUA write
/// through the primary waits (and shows in `status` as waiting), then SIGTERM must stop the
/// primary in bounded time and the waiting write must fail, never succeed.
#[test]
fn sigterm_stops_a_node_whose_writes_wait_for_its_peer() {
    let _serial = serial();
    let mut pair = start_pair(&["--policy=strict", "--no-auto-failover"]);
    pair.nodes[1].kill();
    let mut write = Client::spawn(pair.dir(), "fua", &pair.nodes[0].uri, &["60"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        write.running(),
        "a strict FUA write ended without a peer (it must wait): {:?}",
        write.finish(CLIENT_SLACK)
    );
    let st = wait_until(POLL, "the primary shows a waiting write", Duration::from_secs(10), || {
        let st = status(&pair.nodes[0].admin)?;
        match json_field(&st, &["waiting", "writes"]).and_then(|n| n.parse::<u64>().ok()) {
            Some(n) if n >= 1 => Ok(st),
            _ => Err(st),
        }
    });
    assert!(json_field(&st, &["waiting", "oldest_secs"]).is_some(), "{st}");
    assert!(json_is(&st, &["policy"], "strict"), "{st}");

    let primary = pair.nodes[0].proc.take().unwrap();
    let signalled = Instant::now();
    // `stop` fails (and the process is killed) unless it exits cleanly within a minute.
    let stopped = catch_unwind(AssertUnwindSafe(|| primary.stop()));
    let exited = signalled.elapsed();
    assert!(
        stopped.is_ok(),
        "the primary, with a write waiting for its peer, did not exit cleanly after SIGTERM (waited {exited:?})\n{}",
        pair.logs()
    );
    assert!(exited <= SIGTERM_EXIT_MAX, "the primary took {exited:?} to exit after SIGTERM");
    let out = write.finish(CLIENT_SLACK);
    let json = out.json("the waiting write");
    assert!(
        json_is(json, &["ok"], "false"),
        "a write waiting for a dead peer was acknowledged when its primary stopped: {json}"
    );
    eprintln!("primary exited {exited:?} after SIGTERM; the waiting write failed: {json}");
}

/// `syncblock status --admin` at a node's NBD port, the witness, a secondary's replication port
/// and a closed port must fail with a message about the admin endpoint; at the admin port it
/// succeeds.
#[test]
fn admin_commands_at_a_wrong_port_fail() {
    let _serial = serial();
    let pair = start_pair(&[]);
    let nbd_port = pair.nodes[0].uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
    let wrong = [
        ("a node's NBD port", nbd_port),
        ("the witness", pair.witness_addr.clone()),
        ("a secondary's replication port", pair.nodes[1].repl.clone()),
        ("a port nobody listens on", free_port_addr()),
    ];
    let mut failures = Vec::new();
    for (what, addr) in &wrong {
        let started = Instant::now();
        let (code, out, err) = run(CLI_MAX, BIN, &["status", "--admin", addr]);
        let took = started.elapsed();
        eprintln!("status at {what} ({addr}): exit {code} after {took:?}; stdout {out:?}; stderr {err:?}");
        if code == 0 || !err.to_lowercase().contains("admin") {
            failures.push(format!(
                "{what} ({addr}): exit {code}, stdout {out:?}, stderr {err:?} (want non-zero and a message about \
                 the admin endpoint)"
            ));
        }
    }
    let (code, out, err) = run(CLI_MAX, BIN, &["status", "--json", "--admin", &pair.nodes[0].admin]);
    if code != 0 || !json_is(&out, &["role"], "primary") {
        failures.push(format!("the admin port: exit {code}, stdout {out:?}, stderr {err:?}"));
    }
    assert!(failures.is_empty(), "status at the wrong port:\n{}", failures.join("\n"));
}

/// An unreplicated server under a writer, SIGKILLed at a random moment and restarted at once on
/// its store, ten times: every restart must come up, with every block acknowledged as durable.
#[test]
fn immediate_restart_after_sigkill_succeeds() {
    let _serial = serial();
    let mut rng = Rng::from_env("DRILL_SEED", "immediate_restart_after_sigkill_succeeds");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("store.img");
    let args = serve_args(&store, "1GiB", VOLUME_SIZE);
    let start = |round: u32| {
        let log = dir.path().join(format!("serve-{round}.log"));
        let p = syncblock(&log, &args);
        let uri = vol_uri(&p, &log);
        (p, uri)
    };
    let (mut server, mut uri) = start(0);
    for round in 1..=10 {
        let writer = Client::writer_under_way(dir.path(), &uri, &mut rng, round, (200, 800));
        let killed = Instant::now();
        drop(server);
        (server, uri) = start(round);
        let up = killed.elapsed();
        let out = writer.finish(CLIENT_SLACK);
        assert!(json_u64(out.json("the writer"), &["durable"]) > 0, "round {round}: {out:?}");
        let n_durable = verify_record(dir.path(), &uri, &format!("round {round}: after the restart"));
        eprintln!("round {round}: serving again {up:?} after the SIGKILL; {n_durable} durable blocks verified");
    }
    server.stop();
}

/// A node's disk is replaced while its peer, promoted, serves the volume, and the node comes back
/// with its first configuration (`--create --role primary`) on the new, empty store: a new pair,
/// unknown to its peer. It must acknowledge no write (the witness refuses solo operation to a
/// pair that was never in sync), the real primary keeps serving, and a new store started as
/// secondary is resynced from it.
#[test]
fn a_replaced_store_started_as_primary_acknowledges_nothing() {
    let _serial = serial();
    let mut pair = start_pair(&[]);
    let out = Client::spawn(pair.dir(), "fua-until", &pair.nodes[0].uri.clone(), &["10"]).finish(CLIENT_SLACK);
    assert!(json_is(out.json("a write before"), &["ok"], "true"));
    pair.nodes[0].kill();
    pair.wait_promoted(1, "b promoted", PROMOTION_MAX);
    // The new disk: an empty store, and the node's original flags.
    let a_store = pair.dir().join("a.img");
    std::fs::remove_file(&a_store).unwrap();
    pair.nodes[0].start();
    let a_uri = pair.nodes[0].uri.clone();
    let (code, out, err) =
        run(Duration::from_secs(6), "qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 4k", "-c", "flush", &a_uri]);
    assert!(
        code != 0 || out.contains("failed") || err.contains("failed"),
        "the new store's primary acknowledged a write: exit {code}, {out}{err}\n{}",
        pair.logs()
    );
    let st = status(&pair.nodes[0].admin).unwrap();
    assert!(st.contains("never been in sync"), "the witness's refusal shows in a's status: {st}");
    // The real primary serves on.
    let out = Client::spawn(pair.dir(), "fua-until", &pair.nodes[1].uri.clone(), &["10"]).finish(CLIENT_SLACK);
    assert!(json_is(out.json("a write through b"), &["ok"], "true"), "{}", pair.logs());

    // The fix docs/operations.md gives: a new store started as secondary.
    pair.nodes[0].kill();
    std::fs::remove_file(&a_store).unwrap();
    for arg in &mut pair.nodes[0].args {
        if arg == "--role=primary" {
            *arg = "--role=secondary".into();
        }
    }
    pair.nodes[0].start();
    pair.wait_in_sync(1);
    let out = run(CLI_MAX, BIN, &["verify", "--admin", &pair.nodes[1].admin]);
    assert_eq!(out.0, 0, "verify after the resync: {}{}", out.1, out.2);
}
