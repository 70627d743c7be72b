//! Network partitions between real `syncblock` processes. Node A, node B and the witness W each run
//! in a network namespace of their own, joined by one veth pair per link (A–B, A–W, B–W, a /30
//! each), so that any link can be cut alone. A cut puts a `blackhole` qdisc on both ends of the
//! link: every packet is dropped silently, as in a real partition (no RST, no "unreachable", the
//! interfaces stay up and keep their addresses); deleting the qdiscs heals the link.
//!
//! Scenarios: the A–B link cut while both still see the witness (A continues alone with the
//! witness's consent, B is refused promotion: no split brain); A cut from everything (B is
//! promoted, A acknowledges nothing, and once healed A steps down, loses its unreplicated write and
//! is resynced); the witness unreachable from A only (nothing changes for clients, B stays
//! secondary); and in cluster mode, with etcd in W's place and `syncblock node`s in A and B, the
//! A–B link cut (the primary goes on alone with etcd's consent, the secondary is not promoted). Each ends with `syncblock verify` on the pair and fio's crc32c verification of a
//! store on its own.
//!
//! Needs root (ip netns, tc), iproute2, fio and qemu-utils; under CI (`CI` set) a missing
//! prerequisite fails the test, elsewhere the test says why and skips. Namespaces are named after
//! the test process's pid, so concurrent runs do not collide; a guard kills every process in them
//! and deletes them even after a panic (printing the nodes' logs), and namespaces left behind by a
//! killed run are deleted by the next one. The tests take turns: their timings (1 s heartbeat
//! timeouts) should not depend on each other's load. `SYNCBLOCK_NETNS_LOGS=1` prints the logs of
//! the witness and the nodes after passing runs too.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::proc::{Proc, WAIT_MAX};
use common::tools::{can_run, fio_crc32c_args, missing_root, missing_tool, path, tool};

/// Longest wait for a process to print its address or exit, or for the pair to settle.
/// Heartbeat timeout of both nodes (`--repl-timeout-ms`) and of the witness (`--timeout-ms`):
/// short, so that every outage in these tests is detected within seconds.
const TIMEOUT_MS: u64 = 1000;
/// How long B is watched during an outage: four timeouts, long enough for its failover watcher to
/// have asked the witness (it does after two).
const WATCH: Duration = Duration::from_secs(4);
/// Every namespace these tests create starts with this, then the pid of the test process.
const NS_PREFIX: &str = "sbnet-";
const BIN: &str = env!("CARGO_BIN_EXE_syncblock");
/// Inside each node's namespace: its NBD export, admin endpoint and replication port. Every host
/// has its own namespace, so fixed ports cannot collide with anything else on the machine.
const NBD_URI: &str = "nbd://127.0.0.1:10809/vol";
const SOLO_URI: &str = "nbd://127.0.0.1:10811/vol";
const ADMIN: &str = "127.0.0.1:7200";
const REPL_PORT: u16 = 7001;
const WITNESS_PORT: u16 = 7100;

/// One test at a time (see the file doc).
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    A,
    B,
    W,
}
use Host::{A, B, W};

impl Host {
    fn tag(self) -> &'static str {
        match self {
            A => "a",
            B => "b",
            W => "w",
        }
    }
}

/// The links: (x, y, n): x is 10.77.n.1 and y is 10.77.n.2 on link n; in x's namespace the
/// interface is named `to-y`, in y's `to-x`.
const LINKS: [(Host, Host, u8); 3] = [(A, B, 1), (A, W, 2), (B, W, 3)];

fn link(x: Host, y: Host) -> (Host, Host, u8) {
    *LINKS.iter().find(|l| (l.0, l.1) == (x, y) || (l.0, l.1) == (y, x)).expect("a link")
}

/// The address of `host` on its link to `other`.
fn addr(host: Host, other: Host) -> String {
    let (x, _, n) = link(host, other);
    format!("10.77.{n}.{}", if host == x { 1 } else { 2 })
}

/// Runs a command (no timeout: used for `ip` and `tc`, which do not block); its stdout, or why it
/// failed.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).env("PATH", path()).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd} {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(cmd: &str, args: &[&str]) -> String {
    run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Why this machine cannot run the tests, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Some(why) = missing_root("ip netns and tc", &[]) {
        return Some(why);
    }
    let tools = [("ip", "iproute2"), ("tc", "iproute2"), ("fio", "fio"), ("qemu-io", "qemu-utils")];
    if let Some(why) = missing_tool(&tools) {
        return Some(why);
    }
    // What a cut needs: a namespace, and a blackhole qdisc in it.
    let probe = format!("{NS_PREFIX}{}-probe", std::process::id());
    let r = run("ip", &["netns", "add", &probe])
        .and_then(|_| run("tc", &["-n", &probe, "qdisc", "add", "dev", "lo", "root", "blackhole"]));
    let _ = run("ip", &["netns", "del", &probe]);
    r.err().map(|e| format!("cannot set up a network namespace with a blackhole qdisc: {e}"))
}

/// The turn of one test, or None if the machine cannot run it; panics under CI when it cannot,
/// so CI never passes by skipping.
fn begin() -> Option<MutexGuard<'static, ()>> {
    // Probed once per process: the tests run on parallel threads.
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    if !can_run("the network namespace tests", MISSING.get_or_init(missing_prerequisite).as_deref()) {
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Kills every process in a namespace.
fn kill_all_in(ns: &str) {
    for pid in run("ip", &["netns", "pids", ns]).unwrap_or_default().split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Deletes the namespaces of test processes that no longer exist (a run killed before its guard
/// could clean up).
fn remove_stale_namespaces() {
    for line in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(ns);
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Three namespaces joined by three links, and a directory for the stores, logs and the witness's
/// state. Dropping it kills every process left in the namespaces and deletes them; their veth
/// interfaces go with them.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        static RUN: AtomicU32 = AtomicU32::new(0);
        remove_stale_namespaces();
        let prefix = format!("{NS_PREFIX}{}-{}-", std::process::id(), RUN.fetch_add(1, Ordering::Relaxed));
        // Not /tmp, which may be a tmpfs without O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        // From here on the guard undoes whatever part of the setup happened.
        let lab = Lab { prefix, dir };
        for h in [A, B, W] {
            must("ip", &["netns", "add", &lab.ns(h)]);
            must("ip", &["-n", &lab.ns(h), "link", "set", "lo", "up"]);
        }
        for (x, y, _) in LINKS {
            let (ix, iy) = (format!("to-{}", y.tag()), format!("to-{}", x.tag()));
            // Created directly in the namespaces: the names never exist in the host's.
            must(
                "ip",
                &["link", "add", &ix, "netns", &lab.ns(x), "type", "veth", "peer", "name", &iy, "netns", &lab.ns(y)],
            );
            for (h, other, i) in [(x, y, &ix), (y, x, &iy)] {
                must("ip", &["-n", &lab.ns(h), "addr", "add", &format!("{}/30", addr(h, other)), "dev", i]);
                must("ip", &["-n", &lab.ns(h), "link", "set", i, "up"]);
            }
        }
        lab
    }

    fn ns(&self, h: Host) -> String {
        format!("{}{}", self.prefix, h.tag())
    }

    /// Drops every packet between `x` and `y`, both ways.
    fn cut(&self, x: Host, y: Host) {
        for (h, other) in [(x, y), (y, x)] {
            let dev = format!("to-{}", other.tag());
            must("tc", &["-n", &self.ns(h), "qdisc", "add", "dev", &dev, "root", "blackhole"]);
        }
    }

    fn heal(&self, x: Host, y: Host) {
        for (h, other) in [(x, y), (y, x)] {
            let dev = format!("to-{}", other.tag());
            must("tc", &["-n", &self.ns(h), "qdisc", "del", "dev", &dev, "root"]);
        }
    }

    /// Runs `prog args…` in `host`'s namespace, under `tool`'s 60 s timeout.
    fn exec(&self, host: Host, prog: &str, args: &[&str]) -> (i32, String, String) {
        let ns = self.ns(host);
        let mut all = vec!["netns", "exec", ns.as_str(), prog];
        all.extend_from_slice(args);
        tool("ip", &all)
    }

    fn exec_ok(&self, host: Host, prog: &str, args: &[&str]) -> String {
        let (code, so, se) = self.exec(host, prog, args);
        assert_eq!(code, 0, "{prog} {args:?} in {host:?} failed:\nstdout:\n{so}\nstderr:\n{se}");
        so
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The witness's records, one line each: `volume epoch primary solo`.
    fn witness_state(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("witness.state")).unwrap_or_default();
        let Ok(state) = syncblock_replicator::witness::decode_state(&text) else { return text };
        let records = state.pairs.values().chain(state.unbound.values());
        records.map(|r| format!("{} {} {} {}\n", r.volume, r.epoch, r.primary, r.solo)).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SYNCBLOCK_NETNS_LOGS").is_some() {
            for name in ["witness.log", "etcd.log", "a.log", "b.log"] {
                let text = self.log(name);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("---- {name} of {} (last 300 lines)", self.prefix);
                for l in &lines[lines.len().saturating_sub(300)..] {
                    eprintln!("{l}");
                }
            }
        }
        for h in [A, B, W] {
            kill_all_in(&self.ns(h));
            let _ = run("ip", &["netns", "del", &self.ns(h)]);
        }
    }
}

/// `syncblock args…` in `host`'s namespace (see `common::proc`), stderr appended to `log` in the
/// lab's directory.
fn spawn(lab: &Lab, host: Host, log: &str, args: &[&str]) -> Proc {
    spawn_prog(lab, host, log, BIN, args)
}

/// [`spawn`] for any program.
fn spawn_prog(lab: &Lab, host: Host, log: &str, prog: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(host), prog]).args(args).env("PATH", path());
    // `ip netns exec` execs the binary in place, so this child is the syncblock process; it dies
    // with the test even when the test process is killed and no destructor runs.
    // SAFETY: prctl is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    Proc::spawn(cmd, &lab.dir.path().join(log))
}

/// The PSK file every host of a lab uses: the replication and witness links between namespaces
/// run TLS, as a deployment across hosts must (`--insecure` aside). Keys are random per lab.
fn psk_file(lab: &Lab) -> String {
    let path = lab.dir.path().join("keys.psk");
    if !path.exists() {
        use std::io::Read as _;
        let mut random = [0u8; 64];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).expect("random bytes");
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let text = format!("a:{}\nb:{}\n", hex(&random[..32]), hex(&random[32..]));
        std::fs::write(&path, text).expect("psk file");
    }
    format!("--tls-psk={}", path.display())
}

fn witness(lab: &Lab) -> Proc {
    let state = lab.dir.path().join("witness.state");
    let p = spawn(
        lab,
        W,
        "witness.log",
        &[
            "witness",
            &format!("--listen=0.0.0.0:{WITNESS_PORT}"),
            &psk_file(lab),
            &format!("--state={}", state.display()),
            &format!("--timeout-ms={TIMEOUT_MS}"),
        ],
    );
    p.wait_line("witness on ");
    p
}

/// Node A or B serving "vol" (64 MiB) on `NBD_URI` in its namespace, replicating over the A–B link
/// and reaching the witness over its own link to W.
fn node(lab: &Lab, host: Host, role: &str, policy: &str) -> Proc {
    let peer = if host == A { B } else { A };
    let store = lab.dir.path().join(format!("{}.img", host.tag()));
    let mut args: Vec<String> = [
        "serve",
        "--create",
        "--store",
        store.to_str().unwrap(),
        "--size=1GiB",
        "--volume=vol:64MiB",
        "--listen=127.0.0.1:10809",
        &format!("--role={role}"),
        &format!("--repl-listen={}:{REPL_PORT}", addr(host, peer)),
        &format!("--peer={}:{REPL_PORT}", addr(peer, host)),
        &format!("--witness={}:{WITNESS_PORT}", addr(W, host)),
        &format!("--policy={policy}"),
        &format!("--node={}", host.tag()),
        &format!("--repl-timeout-ms={TIMEOUT_MS}"),
        &format!("--admin={ADMIN}"),
        &psk_file(lab),
        // The clients here use plain NBD on the namespace's loopback; TLS is for the links.
        "--tls=off",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if policy == "strict" {
        // Strict waits for the peer, so it goes without automatic failover (refused otherwise).
        args.push("--no-auto-failover".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = spawn(lab, host, &format!("{}.log", host.tag()), &args);
    p.wait_line("admin endpoint on ");
    p.wait_line("nbd://");
    p
}

/// `host`'s store on its own (no replication), served on `SOLO_URI` in its namespace. The node
/// must be stopped.
fn solo(lab: &Lab, host: Host) -> Proc {
    let store = lab.dir.path().join(format!("{}.img", host.tag()));
    let p = spawn(
        lab,
        host,
        &format!("{}-solo.log", host.tag()),
        &["serve", "--create", "--store", store.to_str().unwrap(), "--listen=127.0.0.1:10811"],
    );
    p.wait_line("nbd://");
    p
}

/// `syncblock status` of a node, from inside its namespace.
fn status(lab: &Lab, host: Host) -> String {
    let psk = psk_file(lab);
    lab.exec_ok(host, BIN, &["status", "--json", "--admin", ADMIN, &psk, "--tls-user", host.tag()])
}

/// `syncblock verify` on the primary `host`: the replicas must not differ.
fn verify_clean(lab: &Lab, host: Host) {
    let psk = psk_file(lab);
    let out = lab.exec_ok(host, BIN, &["verify", "--json", "--admin", ADMIN, &psk, "--tls-user", host.tag()]);
    assert!(out.contains("\"ok\":true") && out.contains("\"blocks_differing\":0,"), "{out}");
}

/// A number field of a status line.
fn field_u64(json: &str, key: &str) -> u64 {
    let key = format!("\"{key}\":");
    let at = json.find(&key).unwrap_or_else(|| panic!("no {key} in {json}")) + key.len();
    json[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a number")
}

/// Polls `probe` every 100 ms until it holds; how long that took.
fn wait_for(what: &str, mut probe: impl FnMut() -> Result<(), String>) -> Duration {
    let t0 = Instant::now();
    loop {
        match probe() {
            Ok(()) => return t0.elapsed(),
            Err(last) => assert!(t0.elapsed() < WAIT_MAX, "{what}: not within {WAIT_MAX:?}; last: {last}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check(cond: bool, text: String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(text)
    }
}

/// The pair in sync: A primary with RPO = 0, B secondary.
fn wait_in_sync(lab: &Lab, primary: Host, secondary: Host) {
    wait_for("the pair in sync", || {
        let st = status(lab, primary);
        check(st.contains("\"role\":\"primary\"") && st.contains("\"rpo_zero\":true"), st)?;
        let st = status(lab, secondary);
        check(st.contains("\"role\":\"secondary\"") && st.contains("\"connected\":true"), st)
    });
}

/// fio's crc32c workload on 8 MiB at `offset` (see `fio_crc32c_args`) through `host`.
fn fio(lab: &Lab, host: Host, uri: &str, offset: &str, mode: &str) -> String {
    let args = fio_crc32c_args("netns", uri, offset, mode);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.exec_ok(host, "fio", &args);
    assert!(out.contains(if mode == "--verify_only" { "READ:" } else { "WRITE:" }), "{out}");
    out
}

/// One qemu-io command on `uri` from `host`, killed after `limit_secs`; whether it succeeded, and
/// its output.
fn qemu_io(lab: &Lab, host: Host, uri: &str, cmd: &str, limit_secs: u32) -> (bool, String) {
    let limit = limit_secs.to_string();
    let (code, so, se) = lab.exec(host, "timeout", &["-s", "KILL", &limit, "qemu-io", "-f", "raw", "-c", cmd, uri]);
    let failed = so.contains("failed") || so.contains("Pattern verification") || se.contains("failed");
    (code == 0 && !failed, format!("exit {code}\n{so}{se}"))
}

fn write_ok(lab: &Lab, host: Host, cmd: &str) {
    let (done, out) = qemu_io(lab, host, NBD_URI, cmd, 30);
    assert!(done, "{cmd:?} through {host:?}: {out}");
}

/// The witness, then B (secondary) and A (primary) with `policy`, in sync, and fio's workload
/// written through A at 0: where every scenario starts. Returns (witness, A, B).
fn pair_in_sync(lab: &Lab, policy: &str) -> (Proc, Proc, Proc) {
    let w = witness(lab);
    let b = node(lab, B, "secondary", policy);
    let a = node(lab, A, "primary", policy);
    wait_in_sync(lab, A, B);
    fio(lab, A, NBD_URI, "0", "--do_verify=1");
    (w, a, b)
}

/// fio's workload written through A at 16M while `check` runs every 200 ms, for at least `WATCH`
/// from `cut` and until fio is done.
fn watch_under_load(lab: &Lab, cut: Instant, what: &str, mut check: impl FnMut()) {
    std::thread::scope(|s| {
        let load = s.spawn(|| fio(lab, A, NBD_URI, "16M", "--do_verify=1"));
        while cut.elapsed() < WATCH || !load.is_finished() {
            check();
            std::thread::sleep(Duration::from_millis(200));
        }
        load.join().expect(what);
    });
}

fn wait_witness_state(lab: &Lab, want: &str) {
    wait_for("the witness hears that the pair is in sync again", || {
        check(lab.witness_state() == want, lab.witness_state())
    });
}

/// `host`'s store on its own, its node stopped: fio verifies both regions it wrote (0 and 16M),
/// and each qemu-io `read -P` of `reads` (command, what it shows) passes.
fn check_solo(lab: &Lab, host: Host, reads: &[(&str, &str)]) {
    let solo = solo(lab, host);
    fio(lab, host, SOLO_URI, "0", "--verify_only");
    fio(lab, host, SOLO_URI, "16M", "--verify_only");
    for (cmd, what) in reads {
        let (done, out) = qemu_io(lab, host, SOLO_URI, cmd, 30);
        assert!(done, "{what}: {out}");
    }
    solo.stop();
}

#[test]
fn primary_cut_from_its_secondary_continues_alone_and_the_secondary_is_not_promoted() {
    let Some(_turn) = begin() else { return };
    let lab = Lab::new();
    let (_w, a, b) = pair_in_sync(&lab, "degrade");
    assert_eq!(lab.witness_state(), "vol 1 a false\n");

    lab.cut(A, B);
    let cut = Instant::now();
    // A write right after the cut waits until A has missed B for the timeout and the witness
    // consents to A continuing alone; then it completes.
    write_ok(&lab, A, "write -P 0x31 40M 64k");
    println!("A–B cut: a write through A completed alone after {:?}", cut.elapsed());
    let st = status(&lab, A);
    assert!(
        st.contains("\"role\":\"primary\"")
            && st.contains("\"acking_alone\":true")
            && st.contains("\"rpo_zero\":false"),
        "{st}"
    );
    assert_eq!(lab.witness_state(), "vol 1 a true\n", "the witness records that A is alone");

    // A keeps serving; B, which lost A but still reaches the witness, must stay secondary.
    watch_under_load(&lab, cut, "fio through A during the cut", || {
        let st = status(&lab, B);
        assert!(st.contains("\"role\":\"secondary\"") && st.contains("\"connected\":false"), "{st}");
    });
    // Not vacuous: B did ask the witness to take over, and was refused.
    wait_for("B's refused takeover in its log", || {
        let log = lab.log("b.log");
        check(log.contains("not taking over"), "no \"not taking over\" in b.log".into())
    });
    assert!(!lab.log("b.log").contains("automatic failover"), "{}", lab.log("b.log"));
    // B's export stays read-only: no client can write on both sides.
    let (done, out) = qemu_io(&lab, B, NBD_URI, "write -P 0x66 48M 4k", 10);
    assert!(!done, "a write through the secondary succeeded during the cut: {out}");

    lab.heal(A, B);
    let healed = Instant::now();
    wait_in_sync(&lab, A, B);
    println!("A–B healed: B resynced and in sync after {:?}", healed.elapsed());
    wait_witness_state(&lab, "vol 1 a false\n");
    assert!(status(&lab, B).contains("\"role\":\"secondary\""));
    verify_clean(&lab, A);
    a.stop();
    b.stop();

    // B's store on its own holds every write A acknowledged, before and during the cut.
    check_solo(
        &lab,
        B,
        &[("read -P 0x31 40M 64k", "A's write acknowledged alone"), ("read -P 0 48M 4k", "the write refused on B")],
    );
}

#[test]
fn primary_isolated_from_everything_is_replaced_acknowledges_nothing_and_rejoins_rolled_back() {
    let Some(_turn) = begin() else { return };
    let lab = Lab::new();
    let (_w, a, b) = pair_in_sync(&lab, "degrade");
    let tag_before = field_u64(&status(&lab, A), "last_tag");

    lab.cut(A, B);
    lab.cut(A, W);
    let cut = Instant::now();
    let failover = std::thread::scope(|s| {
        // A client writing through the isolated A: it must never be acknowledged.
        let isolated = s.spawn(|| qemu_io(&lab, A, NBD_URI, "write -P 0x77 44M 64k", 6));
        // Meanwhile: time until B is primary and has accepted a write.
        wait_for("B promoted and accepting writes", || {
            let st = status(&lab, B);
            check(st.contains("\"role\":\"primary\""), st)?;
            let (done, out) = qemu_io(&lab, B, NBD_URI, "write -P 0x11 40M 4k", 30);
            check(done, out)
        });
        let failover = cut.elapsed();
        let (done, out) = isolated.join().expect("write through A");
        assert!(!done, "a write through the isolated primary completed: {out}");
        failover
    });
    println!("A isolated: B promoted and accepted a write {failover:?} after the cut");
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
    // A still thinks it is primary but is not alone with the witness's consent, and holds the
    // unacknowledged write in its log (so the rollback below is not vacuous).
    let st = status(&lab, A);
    assert!(st.contains("\"role\":\"primary\"") && st.contains("\"acking_alone\":false"), "{st}");
    assert!(field_u64(&st, "last_tag") > tag_before, "the isolated write never reached A's log: {st}");
    assert_eq!(lab.witness_state(), "vol 2 b true\n");
    // B serves alone.
    fio(&lab, B, NBD_URI, "16M", "--do_verify=1");

    lab.heal(A, B);
    lab.heal(A, W);
    let healed = Instant::now();
    wait_in_sync(&lab, B, A);
    println!("healed: A stepped down and was resynced after {:?}", healed.elapsed());
    assert!(lab.log("a.log").contains("stepping down"), "{}", lab.log("a.log"));
    wait_witness_state(&lab, "vol 2 b false\n");
    verify_clean(&lab, B);
    // Every write acknowledged, through A before the cut and through B after, is on B.
    fio(&lab, B, NBD_URI, "0", "--verify_only");
    fio(&lab, B, NBD_URI, "16M", "--verify_only");
    b.stop();
    a.stop();

    // A's store on its own: the surviving history, without A's unacknowledged write.
    check_solo(
        &lab,
        A,
        &[
            ("read -P 0x11 40M 4k", "B's write after the failover"),
            ("read -P 0 44M 64k", "A's unreplicated write was not rolled back"),
        ],
    );
}

#[test]
fn witness_unreachable_from_the_primary_only_changes_nothing_for_clients() {
    let Some(_turn) = begin() else { return };
    let lab = Lab::new();
    let (_w, a, b) = pair_in_sync(&lab, "strict");

    lab.cut(A, W);
    let cut = Instant::now();
    watch_under_load(&lab, cut, "fio through A without the witness", || {
        let st = status(&lab, B);
        assert!(st.contains("\"role\":\"secondary\"") && st.contains("\"connected\":true"), "{st}");
        let st = status(&lab, A);
        assert!(st.contains("\"role\":\"primary\"") && st.contains("\"rpo_zero\":true"), "{st}");
    });
    // Well after the witness stopped hearing from A, a write still completes at once.
    let t0 = Instant::now();
    write_ok(&lab, A, "write -P 0x33 40M 64k");
    println!("A–W cut for {:?}: a write through A took {:?}", cut.elapsed(), t0.elapsed());
    assert!(lab.log("a.log").contains("witness unreachable"), "{}", lab.log("a.log"));
    assert_eq!(lab.witness_state(), "vol 1 a false\n", "the witness changed its record");

    lab.heal(A, W);
    wait_in_sync(&lab, A, B);
    verify_clean(&lab, A);
    a.stop();
    b.stop();
    check_solo(&lab, B, &[("read -P 0x33 40M 64k", "A's write while the witness was unreachable")]);
}

// ---- cluster mode: etcd in W, `syncblock node`s in A and B -----------------------------------

const ETCD_PORT: u16 = 2379;

/// etcd's client URL as `host` reaches it, over its link to W.
fn etcd_url(host: Host) -> String {
    format!("http://{}:{ETCD_PORT}", addr(W, host))
}

/// One etcd member in W, serving A and B over their links to it (50 ms heartbeats and a 500 ms
/// election timeout, as docs/cluster.md advises, so 1 s node leases are allowed).
fn etcd(lab: &Lab) -> Proc {
    let data = lab.dir.path().join("etcd");
    let clients = format!("{},{}", etcd_url(A), etcd_url(B));
    let p = spawn_prog(
        lab,
        W,
        "etcd.log",
        "etcd",
        &[
            "--name=e",
            &format!("--data-dir={}", data.display()),
            &format!("--listen-client-urls={clients}"),
            &format!("--advertise-client-urls={clients}"),
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=e=http://127.0.0.1:2380",
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ],
    );
    for h in [A, B] {
        wait_for("etcd answering", || {
            let (code, so, se) = lab.exec(h, BIN, &["node", "list", "--etcd", &etcd_url(h)]);
            check(code == 0, format!("{so}{se}"))
        });
    }
    p
}

/// `syncblock node` in `host`'s namespace: NBD on the namespace's loopback (`NBD_URI`'s port), its
/// replication listener on the A–B link. Plain TCP between the namespaces (`--insecure`): this
/// test is about partitions; `tests/tls_pair.rs` and `tests/cluster.rs` cover TLS.
fn cluster_node(lab: &Lab, host: Host) -> Proc {
    let peer = if host == A { B } else { A };
    let store = lab.dir.path().join(format!("{}.img", host.tag()));
    let args = [
        "node".to_string(),
        format!("--etcd={}", etcd_url(host)),
        format!("--name={}", host.tag()),
        format!("--store={}", store.display()),
        "--size=1GiB".into(),
        "--listen=127.0.0.1:10809".into(),
        format!("--repl-listen={}:{REPL_PORT}", addr(host, peer)),
        format!("--admin={ADMIN}"),
        "--insecure".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = spawn(lab, host, &format!("{}.log", host.tag()), &args);
    p.wait_line(&format!("node {} joined the cluster", host.tag()));
    p
}

/// Volume `v` as `volume list` shows it from `host`.
fn cluster_volume(lab: &Lab, host: Host) -> serde_json::Value {
    let out = lab.exec_ok(host, BIN, &["volume", "list", "--json", "--etcd", &etcd_url(host)]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    list.as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "v"))
        .cloned()
        .unwrap_or_else(|| panic!("no v in {out}"))
}

fn host_named(name: &serde_json::Value) -> Host {
    match name.as_str() {
        Some("a") => A,
        Some("b") => B,
        other => panic!("not a node of this lab: {other:?}"),
    }
}

/// What every cluster scenario starts from (where etcd is installed): etcd in W, nodes in A and B,
/// and volume `v` (64 MiB) created and in sync, as `volume list` shows it. Bound in this order, the
/// nodes stop first and the lab last.
struct ClusterLab {
    lab: Lab,
    etcd: Proc,
    a: Proc,
    b: Proc,
    v: serde_json::Value,
    /// `v`'s primary and secondary.
    p: Host,
    s: Host,
}

/// Volume `v` through the NBD listener of the namespace's node.
const CLUSTER_URI: &str = "nbd://127.0.0.1:10809/v";

/// `syncblock verify` of `v` on its primary `host` (plain admin endpoint): the copies are equal.
fn cluster_verify(lab: &Lab, host: Host) {
    let (code, out, err) = lab.exec(host, BIN, &["verify", "--admin", ADMIN, "--volume", "v"]);
    assert_eq!(code, 0, "verify on {host:?}: {out}{err}");
}

fn cluster_lab() -> Option<ClusterLab> {
    let missing = missing_tool(&[("etcd", "etcd-server")]);
    if !can_run("the cluster network namespace test", missing.as_deref()) {
        return None;
    }
    let lab = Lab::new();
    let etcd = etcd(&lab);
    let a = cluster_node(&lab, A);
    let b = cluster_node(&lab, B);
    lab.exec_ok(A, BIN, &["volume", "create", "v", "--size=64MiB", "--etcd", &etcd_url(A)]);
    wait_for("v in sync", || {
        let v = cluster_volume(&lab, A);
        check(v["state"] == "in-sync", v.to_string())
    });
    let v = cluster_volume(&lab, A);
    let (p, s) = (host_named(&v["primary"]), host_named(&v["secondary"]));
    Some(ClusterLab { lab, etcd, a, b, v, p, s })
}

/// Cluster mode across namespaces: etcd in W instead of a witness, `syncblock node`s in A and B, one
/// volume. The A–B link is cut while both nodes still reach etcd: the primary's node link hears
/// nothing for a second and closes (docs/cluster.md, "Node links"), and the primary goes on alone
/// with etcd's consent; the secondary, which lost its primary but whose primary's `alive/` key
/// still holds, is not promoted. Healed, the secondary is resynced and both copies are equal.
#[test]
fn cluster_primary_cut_from_its_secondary_goes_on_alone_and_the_secondary_is_not_promoted() {
    let Some(_turn) = begin() else { return };
    let Some(ClusterLab { lab, etcd: _etcd, a, b, p, s, .. }) = cluster_lab() else { return };
    let (done, out) = qemu_io(&lab, p, CLUSTER_URI, "write -P 0x21 0 1M", 30);
    assert!(done, "{out}");

    lab.cut(A, B);
    let cut = Instant::now();
    // The write waits until the primary's link has been silent for a second and etcd lets it
    // acknowledge alone.
    let (done, out) = qemu_io(&lab, p, CLUSTER_URI, "write -P 0x31 40M 64k", 30);
    assert!(done, "a write through the primary during the cut: {out}");
    println!("A–B cut: a write through the primary completed alone after {:?}", cut.elapsed());
    let plog = lab.log(&format!("{}.log", p.tag()));
    assert!(plog.contains("nothing heard from the peer node"), "the node link did not notice the cut");
    // The secondary stays secondary, and its node refuses writes, while the cut lasts.
    while cut.elapsed() < WATCH {
        let v = cluster_volume(&lab, s);
        assert!(v["primary"] == p.tag() && v["state"] == "degraded", "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (done, out) = qemu_io(&lab, s, CLUSTER_URI, "write -P 0x66 48M 4k", 10);
    assert!(!done, "a write through the secondary's node succeeded during the cut: {out}");
    let slog = lab.log(&format!("{}.log", s.tag()));
    assert!(!slog.contains("promoting this node to primary"), "the cut-off secondary was promoted");
    // Not vacuous: the secondary's node also closed its silent link, asked etcd to take over, and
    // was refused.
    assert!(slog.contains("nothing heard from the peer node"), "the secondary's link did not notice the cut");
    assert!(slog.contains("not taking over"), "the secondary never asked to take over");

    lab.heal(A, B);
    let healed = Instant::now();
    wait_for("v in sync again", || {
        let v = cluster_volume(&lab, A);
        check(v["state"] == "in-sync" && v["primary"] == p.tag(), v.to_string())
    });
    println!("A–B healed: the secondary resynced after {:?}", healed.elapsed());
    cluster_verify(&lab, p);
    for (cmd, what) in [("read -P 0x21 0 1M", "written before the cut"), ("read -P 0x31 40M 64k", "written alone")] {
        let (done, out) = qemu_io(&lab, p, CLUSTER_URI, cmd, 30);
        assert!(done, "{what}: {out}");
    }
    drop((a, b));
}

/// Cluster mode: the primary's node isolated from everything (cut from etcd's W and from the
/// secondary's node). Its lease expires and the secondary takes over in a new epoch; the isolated
/// primary acknowledges nothing meanwhile, since neither its peer nor etcd can confirm anything.
/// Healed, it finds its lease gone, joins the cluster again under a new one, steps down, and is
/// resynced as the new primary's secondary: the write it held unacknowledged is rolled back.
#[test]
fn cluster_primary_isolated_from_everything_is_replaced_acknowledges_nothing_and_rejoins() {
    let Some(_turn) = begin() else { return };
    let Some(ClusterLab { lab, etcd: _etcd, a, b, p, s, .. }) = cluster_lab() else { return };
    let (done, out) = qemu_io(&lab, p, CLUSTER_URI, "write -P 0x21 0 1M", 30);
    assert!(done, "{out}");

    lab.cut(p, s);
    lab.cut(p, W);
    let cut = Instant::now();
    let failover = std::thread::scope(|sc| {
        // A client writing through the isolated primary: it must never be acknowledged.
        let isolated = sc.spawn(|| qemu_io(&lab, p, CLUSTER_URI, "write -P 0x77 44M 64k", 8));
        wait_for("the secondary promoted and accepting writes", || {
            let v = cluster_volume(&lab, s);
            check(v["primary"] == s.tag(), v.to_string())?;
            let (done, out) = qemu_io(&lab, s, CLUSTER_URI, "write -P 0x11 40M 4k", 30);
            check(done, out)
        });
        let failover = cut.elapsed();
        let (done, out) = isolated.join().expect("write through the isolated primary");
        assert!(!done, "a write through the isolated primary completed: {out}");
        failover
    });
    println!("primary isolated: the secondary took over and accepted a write {failover:?} after the cut");
    let v = cluster_volume(&lab, s);
    assert!(v["state"] == "degraded" && v["epoch"].as_u64().unwrap() >= 2, "{v}");

    lab.heal(p, s);
    lab.heal(p, W);
    let healed = Instant::now();
    wait_for("the old primary back as secondary, in sync", || {
        let v = cluster_volume(&lab, s);
        check(v["state"] == "in-sync" && v["primary"] == s.tag(), v.to_string())
    });
    println!("healed: the old primary joined again and was resynced after {:?}", healed.elapsed());
    wait_for("the old primary's node alive in the cluster again", || {
        let out = lab.exec_ok(s, BIN, &["node", "list", "--json", "--etcd", &etcd_url(s)]);
        let list: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let alive = list.as_array().is_some_and(|l| l.iter().any(|n| n["name"] == p.tag() && n["alive"] == true));
        check(alive, out)
    });
    let plog = lab.log(&format!("{}.log", p.tag()));
    assert!(plog.contains("registering again"), "the isolated node did not join again under a new lease");
    cluster_verify(&lab, s);
    for (cmd, what) in [
        ("read -P 0x21 0 1M", "written before the cut"),
        ("read -P 0x11 40M 4k", "written on the new primary"),
        ("read -P 0 44M 64k", "the isolated primary's unacknowledged write, rolled back"),
    ] {
        let (done, out) = qemu_io(&lab, s, CLUSTER_URI, cmd, 30);
        assert!(done, "{what}: {out}");
    }
    drop((a, b));
}

/// Cluster mode: the primary's node cut from etcd only, still linked to its secondary. Its lease
/// expires, so `volume list` shows the volume `down`, but nothing moves: the secondary still hears
/// its primary on their link and never asks to take over, and the pair goes on confirming every
/// write with each other, as a pair does when its witness is out of reach. Healed, the node joins
/// again under a new lease and is still the primary, in the same epoch.
#[test]
fn cluster_primary_cut_from_etcd_only_changes_nothing_for_clients() {
    let Some(_turn) = begin() else { return };
    let Some(ClusterLab { lab, etcd: _etcd, a, b, v, p, s }) = cluster_lab() else { return };

    lab.cut(p, W);
    let cut = Instant::now();
    let mut writes = 0u32;
    while cut.elapsed() < WATCH + Duration::from_secs(2) {
        let cmd = format!("write -P 0x{:02x} {}M 64k", 0x40 + writes, writes);
        let t = Instant::now();
        let (done, out) = qemu_io(&lab, p, CLUSTER_URI, &cmd, 30);
        assert!(done, "a write through the primary cut from etcd: {out}");
        assert!(t.elapsed() < Duration::from_secs(5), "a write took {:?} with the primary cut from etcd", t.elapsed());
        writes += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let seen = cluster_volume(&lab, s);
    assert!(seen["primary"] == p.tag() && seen["epoch"] == v["epoch"], "the volume moved: {seen}");
    assert_eq!(seen["state"], "down", "the primary's node still counts as alive: {seen}");
    let slog = lab.log(&format!("{}.log", s.tag()));
    assert!(!slog.contains("promoting this node to primary"), "the secondary was promoted");

    lab.heal(p, W);
    wait_for("the primary's node alive again, the volume in sync", || {
        let v = cluster_volume(&lab, s);
        check(v["state"] == "in-sync" && v["primary"] == p.tag(), v.to_string())
    });
    let after = cluster_volume(&lab, s);
    assert_eq!(after["epoch"], v["epoch"], "{after}");
    cluster_verify(&lab, p);
    let reads: Vec<String> = (0..writes).map(|i| format!("read -P 0x{:02x} {i}M 64k", 0x40 + i)).collect();
    for cmd in &reads {
        let (done, out) = qemu_io(&lab, s, CLUSTER_URI, cmd, 30);
        assert!(!done, "the secondary's node served {cmd}: {out}");
        let (done, out) = qemu_io(&lab, p, CLUSTER_URI, cmd, 30);
        assert!(done, "{cmd}: {out}");
    }
    drop((a, b));
}
