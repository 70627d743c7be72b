//! A witness and a pair of `syncblock serve` nodes on loopback, started as docs/replication.md
//! starts them by hand: what the failover drills (`drills.rs`) and the PostgreSQL failover test
//! (`postgres.rs`) run on. Each node's command line is kept, so that a restart reuses its store and
//! ports; every process is a [`Proc`] (SIGKILLed and reaped when dropped); every port is a free one
//! found by binding port 0; every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::{free_port_addr, tail, wait_line, Proc};
use super::tools::{run, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_syncblock");
/// The volume every node serves.
pub const VOLUME: &str = "vol";
/// Longest one `syncblock status` may run (its own timeout for a silent endpoint is 30 s).
pub const STATUS_MAX: Duration = Duration::from_secs(35);

/// `syncblock args…` with stderr appended to `log`.
pub fn syncblock(log: &Path, args: &[String]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    Proc::spawn(cmd, log)
}

/// The `nbd://host:port/vol` URI a server printed (`nbds://` when it requires TLS).
pub fn vol_uri(p: &Proc, log: &Path) -> String {
    let rest = wait_line(p, "nbd", log);
    let (scheme, rest) = rest.split_once("://").unwrap_or_else(|| panic!("not a URI: nbd{rest}"));
    let base = rest.split_whitespace().next().unwrap().split('/').next().unwrap().to_string();
    format!("nbd{scheme}://{base}/{VOLUME}")
}

/// `serve` on `store` (created if missing, a file of `store_size`) with the volume `vol` of
/// `volume_size`, its NBD export on a free port: an unreplicated server, or the start of a node's
/// command line. `--create` on every start: it creates the store only if missing.
pub fn serve_args(store: &Path, store_size: &str, volume_size: &str) -> Vec<String> {
    vec![
        "serve".into(),
        format!("--store={}", store.display()),
        "--create".into(),
        format!("--size={store_size}"),
        format!("--volume={VOLUME}:{volume_size}"),
        "--listen=127.0.0.1:0".into(),
    ]
}

/// `syncblock status --json --admin ADDR`: the node's document (its store and its volumes, each
/// with its replication status), parsed, or why there is none.
pub fn status_doc(admin: &str, client_flags: &[String]) -> Result<serde_json::Value, String> {
    let mut args = vec!["status", "--json", "--admin", admin];
    args.extend(client_flags.iter().map(String::as_str));
    let (code, out, err) = run(STATUS_MAX, BIN, &args);
    if code != 0 {
        return Err(format!("status exited with {code}: {out}{err}"));
    }
    serde_json::from_str(&out).map_err(|e| format!("status printed {out:?}: {e}"))
}

/// The replication status of the volume, from [`status_doc`], or why there is none.
pub fn replication_status(admin: &str, client_flags: &[String]) -> Result<serde_json::Value, String> {
    let doc = status_doc(admin, client_flags)?;
    let volumes = doc["volumes"].as_array().ok_or_else(|| format!("no volumes in {doc}"))?;
    match volumes.iter().find(|v| v["name"] == VOLUME) {
        Some(v) if v["replication"].is_object() => Ok(v["replication"].clone()),
        _ => Err(format!("no replication status for volume {VOLUME} in {doc}")),
    }
}

/// One node: its settings are kept so that a restart reuses its store and ports.
pub struct Node {
    pub name: &'static str,
    pub args: Vec<String>,
    /// Its stderr, appended to across restarts.
    log: PathBuf,
    pub admin: String,
    /// Its replication address.
    pub repl: String,
    /// The NBD URI of its volume, from the current process.
    pub uri: String,
    pub proc: Option<Proc>,
    /// Credentials for its admin endpoint (`status --tls-…`).
    pub client_flags: Vec<String>,
}

impl Node {
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "node {} is running", self.name);
        let p = syncblock(&self.log, &self.args);
        wait_line(&p, "admin endpoint on ", &self.log);
        self.uri = vol_uri(&p, &self.log);
        self.proc = Some(p);
    }

    /// SIGKILL, and reaped before this returns.
    pub fn kill(&mut self) {
        drop(self.proc.take().unwrap_or_else(|| panic!("node {} is not running", self.name)));
    }

    pub fn replication(&self) -> Result<serde_json::Value, String> {
        replication_status(&self.admin, &self.client_flags)
    }
}

/// How a pair is started and waited for.
pub struct PairSpec<'a> {
    /// Each node's store file (sparse: it costs only what is written).
    pub store_size: &'a str,
    /// The volume `vol`.
    pub volume_size: &'a str,
    /// Added to each node's command line (none: the defaults); `{node}` becomes the node's name,
    /// `{peer}` its peer's.
    pub flags: &'a [&'a str],
    /// Added to the witness's command line.
    pub witness_flags: &'a [&'a str],
    /// Added to every admin command (`status`): the credentials of the caller.
    pub client_flags: &'a [&'a str],
    /// How often waits probe the nodes' status (each probe starts a CLI process).
    pub poll: Duration,
    /// Longest a node may take to be in sync with its primary: at the start, or restarted, resynced.
    pub rejoin_max: Duration,
}

/// Node `a` (first primary) and `b` (first secondary) on their own stores in `root`, and their
/// witness. The processes go before the directory holding their stores and logs (if the pair owns
/// it).
pub struct Pair {
    pub nodes: [Node; 2],
    pub witness: Option<Proc>,
    pub witness_addr: String,
    pub root: PathBuf,
    poll: Duration,
    rejoin_max: Duration,
    _dir: Option<tempfile::TempDir>,
}

impl Pair {
    /// Starts the witness, then `b` and `a`; returns once a's volume is in sync.
    pub fn start(root: &Path, spec: &PairSpec) -> Pair {
        let log = root.join("witness.log");
        let state = root.join("witness.state");
        let mut witness_args =
            vec!["witness".into(), "--listen=127.0.0.1:0".into(), format!("--state={}", state.display())];
        witness_args.extend(spec.witness_flags.iter().map(|f| f.to_string()));
        let witness = syncblock(&log, &witness_args);
        let witness_addr = wait_line(&witness, "witness on ", &log);
        let (a_repl, b_repl) = (free_port_addr(), free_port_addr());
        let node = |name: &'static str, role: &str, repl: &str, peer: &str| {
            let admin = free_port_addr();
            let mut args = serve_args(&root.join(format!("{name}.img")), spec.store_size, spec.volume_size);
            args.extend([
                format!("--role={role}"),
                format!("--repl-listen={repl}"),
                format!("--peer={peer}"),
                format!("--admin={admin}"),
                format!("--node={name}"),
                format!("--witness={witness_addr}"),
            ]);
            let peer_name = if name == "a" { "b" } else { "a" };
            args.extend(spec.flags.iter().map(|f| f.replace("{node}", name).replace("{peer}", peer_name)));
            let log = root.join(format!("{name}.log"));
            let client_flags = spec.client_flags.iter().map(|f| f.to_string()).collect();
            Node { name, args, log, admin, repl: repl.to_string(), uri: String::new(), proc: None, client_flags }
        };
        let mut pair = Pair {
            nodes: [node("a", "primary", &a_repl, &b_repl), node("b", "secondary", &b_repl, &a_repl)],
            witness: Some(witness),
            witness_addr,
            root: root.to_path_buf(),
            poll: spec.poll,
            rejoin_max: spec.rejoin_max,
            _dir: None,
        };
        pair.nodes[1].start();
        pair.nodes[0].start();
        pair.wait_in_sync(0);
        pair
    }

    /// `start` in a fresh directory under the target directory (not /tmp, which may be tmpfs: the
    /// stores are real io_uring files), which the pair owns.
    pub fn start_in_temp_dir(spec: &PairSpec) -> Pair {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut pair = Pair::start(dir.path(), spec);
        pair._dir = Some(dir);
        pair
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Waits until node `primary` says it is primary with its peer connected and in sync, and the
    /// other node says it is secondary; returns the primary's replication status.
    pub fn wait_in_sync(&self, primary: usize) -> serde_json::Value {
        let (p, s) = (&self.nodes[primary], &self.nodes[1 - primary]);
        wait_until(self.poll, &format!("{} primary with {} in sync", p.name, s.name), self.rejoin_max, || {
            let st = p.replication()?;
            let st_s = s.replication()?;
            let ok = st["role"] == "primary"
                && st["peer"]["connected"] == true
                && st["peer"]["in_sync"] == true
                && st_s["role"] == "secondary";
            if ok {
                Ok(st)
            } else {
                Err(format!("{}: {st}\n{}: {st_s}\n{}", p.name, s.name, self.logs()))
            }
        })
    }

    /// Waits up to `max` until node `i` says it is primary (`what` names the wait).
    pub fn wait_promoted(&self, i: usize, what: &str, max: Duration) {
        wait_until(self.poll, what, max, || {
            let st = self.nodes[i].replication()?;
            if st["role"] == "primary" {
                Ok(())
            } else {
                Err(format!("{st}\n{}", self.logs()))
            }
        });
    }

    /// The end of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["witness", "a", "b"] {
            let log = self.root.join(format!("{name}.log"));
            if log.exists() {
                out += &format!("--- {name}.log (end)\n{}\n", tail(&log, 15));
            }
        }
        out
    }

    /// SIGTERM to each node, then the witness; each must exit cleanly.
    pub fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(p) = node.proc.take() {
                p.stop();
            }
        }
        self.witness.take().unwrap().stop();
    }
}
