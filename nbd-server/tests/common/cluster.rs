//! Real etcd (one member or three) and `syncblock node` processes on loopback, for the cluster
//! tests: every port a free one, every process killed and reaped when dropped, every wait bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::pair::{syncblock, BIN};
use super::proc::{free_port_addr, Proc};
use super::tools::{run, wait_until};

/// How long a cluster command may take (its own etcd timeout is 5 s).
pub const CMD_MAX: Duration = Duration::from_secs(30);

struct EtcdMember {
    name: String,
    client: String,
    peer: String,
    child: Option<Child>,
}

/// An etcd cluster of one or more members, with the election settings docs/cluster.md gives
/// (50 ms heartbeats, 500 ms election timeout: 1 s leases are allowed).
pub struct Etcd {
    members: Vec<EtcdMember>,
    dir: PathBuf,
    /// Server certificate, key and the CA clients must present a certificate from (TLS etcd).
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Etcd {
    pub fn start(dir: &Path, n: usize) -> Etcd {
        Self::start_tls(dir, n, None)
    }

    /// `n` members whose clients must use TLS with a certificate signed by `ca` (`cert` and `key`
    /// are the server's, and also serve etcdctl's health check as a client).
    pub fn start_tls(dir: &Path, n: usize, tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("e{i}"),
                client: format!("{scheme}://{}", free_port_addr()),
                peer: format!("http://{}", free_port_addr()),
                child: None,
            })
            .collect();
        let mut etcd = Etcd { members, dir: dir.to_path_buf(), tls };
        for i in 0..n {
            etcd.spawn(i);
        }
        let endpoints = etcd.endpoints();
        let mut health = vec!["--endpoints".to_string(), endpoints.clone()];
        if let Some((cert, key, ca)) = &etcd.tls {
            for (flag, p) in [("--cert", cert), ("--key", key), ("--cacert", ca)] {
                health.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        health.extend(["endpoint".to_string(), "health".to_string()]);
        let health: Vec<&str> = health.iter().map(String::as_str).collect();
        wait_until(Duration::from_millis(200), "etcd healthy", Duration::from_secs(30), || {
            let (code, out, err) = run(Duration::from_secs(10), "etcdctl", &health);
            if code == 0 {
                Ok(())
            } else {
                Err(format!("{out}{err}"))
            }
        });
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}={}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let mut cmd = Command::new("etcd");
        if let Some((cert, key, ca)) = &self.tls {
            cmd.args(["--cert-file", &cert.display().to_string(), "--key-file", &key.display().to_string()]).args([
                "--trusted-ca-file",
                &ca.display().to_string(),
                "--client-cert-auth",
            ]);
        }
        let child = cmd
            .args(["--name", &m.name])
            .args(["--data-dir", &self.dir.join(&m.name).display().to_string()])
            .args(["--listen-client-urls", &m.client, "--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer, "--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "syncblock-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (package etcd-server; .ci/run installs it)");
        self.members[i].child = Some(child);
    }

    /// The client endpoints, comma-separated, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| m.client.clone()).collect::<Vec<_>>().join(",")
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) member `i`: stopped, its connections stay open and
    /// every request to it hangs, unlike a killed member's, which are refused.
    pub fn freeze(&self, i: usize, frozen: bool) {
        let pid = self.members[i].child.as_ref().expect("member running").id();
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a signal to a child this handle owns and has not reaped.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0, "signal to etcd member {i}");
    }

    /// Which member leads now (asked of each member in turn; plain etcd only).
    pub fn leader(&self) -> usize {
        wait_until(Duration::from_millis(100), "an etcd leader", Duration::from_secs(10), || {
            for (i, m) in self.members.iter().enumerate() {
                let (code, out, err) = run(
                    Duration::from_secs(5),
                    "etcdctl",
                    &["--endpoints", &m.client, "endpoint", "status", "-w", "json"],
                );
                let status: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}{err}"))?;
                let s = &status[0]["Status"];
                if code == 0 && s["leader"] == s["header"]["member_id"] {
                    return Ok(i);
                }
            }
            Err("no member says it leads".to_string())
        })
    }

    /// Starts member `i` again (after [`Etcd::kill`]), with its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `syncblock node`: its command line (a restart reuses store and ports) and its process.
pub struct ClusterNode {
    pub name: String,
    args: Vec<String>,
    pub log: PathBuf,
    pub nbd: String,
    pub admin: String,
    /// The replication listener's address.
    pub repl: String,
    proc: Option<Proc>,
}

impl ClusterNode {
    /// Starts node `name` (store `DIR/NAME.img`, 1 GiB) and waits until it has joined.
    pub fn start(dir: &Path, etcd: &str, name: &str, zone: Option<&str>) -> ClusterNode {
        Self::start_with(dir, etcd, name, zone, &[])
    }

    /// [`ClusterNode::start`] with more flags.
    pub fn start_with(dir: &Path, etcd: &str, name: &str, zone: Option<&str>, extra: &[&str]) -> ClusterNode {
        // A free port is found by binding port 0 and letting it go, so another process may take
        // it before the node binds it: then the node exits naming the port, and starts again on
        // fresh ones.
        for _ in 0..4 {
            let mut node = Self::configure(dir, etcd, name, zone, extra);
            let log_before = std::fs::read_to_string(&node.log).unwrap_or_default().len();
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.restart()));
            match started {
                Ok(()) => return node,
                Err(e) => {
                    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                    if !log[log_before.min(log.len())..].contains("Address already in use") {
                        std::panic::resume_unwind(e);
                    }
                }
            }
        }
        panic!("node {name}: every port tried was taken");
    }

    fn configure(dir: &Path, etcd: &str, name: &str, zone: Option<&str>, extra: &[&str]) -> ClusterNode {
        let nbd = free_port_addr();
        let admin = free_port_addr();
        let repl = free_port_addr();
        let mut args = vec![
            "node".to_string(),
            format!("--etcd={etcd}"),
            format!("--name={name}"),
            format!("--store={}", dir.join(format!("{name}.img")).display()),
            "--size=1GiB".into(),
            format!("--listen={nbd}"),
            format!("--repl-listen={repl}"),
            format!("--admin={admin}"),
        ];
        if let Some(z) = zone {
            args.push(format!("--zone={z}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        ClusterNode { name: name.into(), args, log: dir.join(format!("{name}.log")), nbd, admin, repl, proc: None }
    }

    /// Starts the node again with the same command line (after [`ClusterNode::kill`]).
    pub fn restart(&mut self) {
        let p = syncblock(&self.log, &self.args);
        super::proc::wait_line(&p, &format!("node {} joined the cluster", self.name), &self.log);
        self.proc = Some(p);
    }

    /// SIGKILL: the process dies without closing anything in order, as in a crash.
    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a node that hangs with its sockets open, and
    /// resumes.
    pub fn freeze(&self, frozen: bool) {
        self.proc.as_ref().expect("running").signal(if frozen { libc::SIGSTOP } else { libc::SIGCONT });
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }
}

/// `syncblock ARGS… --etcd=ETCD`: (exit code, stdout, stderr).
pub fn cli(etcd: &str, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push(format!("--etcd={etcd}"));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    run(CMD_MAX, BIN, &refs)
}

/// `volume list --json`, parsed.
/// The names of the nodes `node list` shows alive, or why it could not be read.
pub fn alive_nodes(etcd: &str) -> Result<Vec<String>, String> {
    let (code, out, err) = cli(etcd, &["node", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}{err}"))?;
    let nodes = list.as_array().filter(|_| code == 0).ok_or(format!("{out}{err}"))?;
    Ok(nodes.iter().filter(|n| n["alive"] == true).filter_map(|n| n["name"].as_str().map(String::from)).collect())
}

pub fn volumes(etcd: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = cli(etcd, &["volume", "list", "--json"]);
    assert_eq!(code, 0, "volume list: {out}{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
}

/// The `volume list` entry of `name`.
pub fn volume(etcd: &str, name: &str) -> serde_json::Value {
    volumes(etcd).into_iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no volume {name} listed"))
}

/// Established TCP connections on this machine to `addr` (`IP:PORT`, IPv4), counted on the
/// connecting side, from `/proc/net/tcp`.
pub fn connections_to(addr: &str) -> usize {
    let sa: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 address");
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(sa.ip().octets()), sa.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // f[2]: the remote address; f[3]: the state, 01 = ESTABLISHED.
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}
