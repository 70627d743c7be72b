//! PostgreSQL survives the loss of its host (issue 14, part 1), on real processes. A witness and two
//! `syncblock serve` nodes run with the defaults (degrade policy, automatic failover); on the
//! primary's "host", nbdfuse shows the replicated volume as a file, a loop device on it carries ext4,
//! and PostgreSQL runs on that with `fsync`, `synchronous_commit` and `full_page_writes` on. Client
//! sessions (psql, outside the volume) commit transactions of one to four rows, and the test records
//! in memory every transaction it sent and every one whose COMMIT was answered.
//!
//! Each round, at a random moment a few seconds into the load, the host dies: the primary's
//! `serve`, PostgreSQL and nbdfuse are SIGKILLed together, and that host's mount, loop device and
//! FUSE mount are only detached lazily afterwards (nothing can reach the dead server). On the
//! survivor, once it has promoted itself: nbdfuse on its export, a loop device, `e2fsck -f -p`, mount,
//! PostgreSQL with no help (its own crash recovery), and a new commit; the time from the kill to
//! that commit is the recovery time. Then every committed transaction must be in the table with all
//! its rows, no transaction that was never sent, none torn. The dead node restarts on its store with
//! its first arguments, must rejoin as secondary and be resynced incrementally, and
//! `syncblock verify` must find the replicas identical. The roles swap and the database carries
//! over, so later rounds also check what earlier rounds committed, on the node that was resynced.
//!
//! What counts as a file system that recovered by itself: `e2fsck -f -p` exits 0 or 1. Preen mode
//! replays the journal and makes only the repairs it may make without asking (orphan inodes, summary
//! counts), and with `-f` it checks the whole file system; anything else ("UNEXPECTED
//! INCONSISTENCY; RUN fsck MANUALLY", exit 4) fails the test.
//!
//! `PG_ROUNDS=n` sets the number of rounds (default [`ROUNDS_DEFAULT`]); `PG_SEED=n` repeats the
//! random choices (printed on stderr); `PG_KEEP=1` leaves the temp dir with every log. Each round
//! prints one `pg-failover round:` line and the end a `pg-failover summary:` line
//! (`benches/pg-failover.sh` runs many rounds and adds them up).
//!
//! PostgreSQL runs as user postgres, as the first process of a PID namespace of its own: SIGKILL
//! to it takes every backend with it, as a host's death would.
//!
//! Needs root (losetup, mount, unshare), /dev/fuse, loop devices, PID namespaces, libnbd-bin
//! (nbdfuse), fuse3, e2fsprogs and PostgreSQL's server (Debian's `postgresql`, found under
//! /usr/lib/postgresql/VERSION/bin); `.ci/run` installs the packages. Under CI (`CI` set) a missing
//! prerequisite fails the test; elsewhere the test says why and skips. Every process is killed and
//! reaped, every mount and loop device undone, also after a panic ([`Setup`], `common::proc::Proc`);
//! every wait is bounded; the ports are free ones found by binding port 0; everything lives in a temp
//! dir under the target directory.
//!
//! Size: one scenario on real processes. The witness and the two nodes are `common::pair`'s, shared
//! with the drills; the rest of the harness (a host's FUSE, loop and mount stack, PostgreSQL in its
//! own PID namespace, the clients and their record of commits) serves only this test, and each piece
//! reads best next to the check that uses it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::pair::{Pair, PairSpec, BIN};
use common::proc::tail;
use common::rng::Rng;
use common::tools::{
    can_run, missing_root, missing_tool, ok, path, quiet, run, tool, umount_quietly, umount_retrying, wait_exit,
    wait_until,
};

/// How often `wait_until` probes: recovery times are measured with it.
const POLL: Duration = Duration::from_millis(20);
/// The replicated volume (`vol`): ext4 with PostgreSQL's ~40 MiB cluster and a few 16 MiB WAL
/// segments.
const VOLUME_BYTES: u64 = 256 << 20;
/// Each node's store (sparse: it costs only what is written).
const STORE_SIZE: &str = "1GiB";
/// Rounds when `PG_ROUNDS` is not set: CI runs these (about 25 s each on the 2-core machine).
const ROUNDS_DEFAULT: usize = 3;
/// Concurrent client sessions, each its own psql process and PostgreSQL backend.
const CLIENTS: usize = 6;
/// The host dies this long into a round's load (uniformly random in the range).
const LOAD_MS: (u64, u64) = (2000, 5000);
/// PostgreSQL's settings, on its command line so that nothing the test writes on the volume needs
/// syncing: durability as in production, a socket only, small memory and WAL for a 256 MiB volume,
/// and checkpoints often enough that later rounds recover across one.
const PG_SETTINGS: &[&str] = &[
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "listen_addresses=",
    "max_connections=20",
    "shared_buffers=32MB",
    "min_wal_size=32MB",
    "max_wal_size=64MB",
    "checkpoint_timeout=30s",
];
/// Each row's payload: `repeat(md5(…), n)`, 32·n bytes, so a round's load fills many heap pages.
const PAYLOAD_REPEAT: u32 = 8;

/// Longest a process may take to start serving, an external command to run, or a node to exit.
const WAIT_MAX: Duration = Duration::from_secs(60);
/// Longest the survivor may take to call itself primary after the kill (the default takeover
/// window is 750 ms; this leaves room for a loaded machine).
const PROMOTION_MAX: Duration = Duration::from_secs(15);
/// Longest from the kill to the first commit on the survivor.
const RECOVERY_MAX: Duration = Duration::from_secs(120);
/// Longest a restarted node may take to rejoin: resynced, its peer in sync again.
const REJOIN_MAX: Duration = Duration::from_secs(60);
/// Longest a client session may take to notice that its server died.
const CLIENT_END_MAX: Duration = Duration::from_secs(30);
/// Longest one `syncblock verify` may run.
const CLI_MAX: Duration = Duration::from_secs(120);

// ---- Prerequisites ----------------------------------------------------------------------------

/// PostgreSQL's programs and the user that runs them.
struct Pg {
    /// /usr/lib/postgresql/VERSION/bin, the newest version installed.
    bin: PathBuf,
    uid: u32,
    gid: u32,
}

impl Pg {
    fn program(&self, name: &str) -> String {
        self.bin.join(name).to_str().unwrap().to_string()
    }
}

/// The newest /usr/lib/postgresql/VERSION/bin holding initdb (Debian's layout; the wrappers in
/// /usr/bin do not include the server programs).
fn find_pg_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// What this machine lacks to run the test, if anything.
fn missing_prerequisite() -> Result<Pg, String> {
    let root_for = "losetup, mount and running PostgreSQL as its own user";
    if let Some(why) = missing_root(root_for, &["/dev/fuse", "/dev/loop-control"]) {
        return Err(why);
    }
    if let Some(why) = missing_tool(&[
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("unshare", "util-linux"),
        ("setpriv", "util-linux"),
    ]) {
        return Err(why);
    }
    let pid_ns = Command::new("unshare").args(["--pid", "--fork", "true"]).env("PATH", path()).output();
    if !pid_ns.is_ok_and(|o| o.status.success()) {
        return Err("`unshare --pid --fork true` fails: PostgreSQL runs in a PID namespace of its own".into());
    }
    let bin = find_pg_bin().ok_or(
        "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb (package postgresql; .ci/run installs it)",
    )?;
    for program in ["postgres", "psql"] {
        if !bin.join(program).exists() {
            return Err(format!("{} is missing (package postgresql)", bin.join(program).display()));
        }
    }
    let (Some(uid), Some(gid)) = (id_of("-u"), id_of("-g")) else {
        return Err("there is no user postgres (the postgresql package creates it)".into());
    };
    Ok(Pg { bin, uid, gid })
}

/// PostgreSQL's programs if the test can run; panics under CI when it cannot, so CI never passes by
/// skipping.
fn prerequisites() -> Option<Pg> {
    match missing_prerequisite() {
        Ok(pg) => Some(pg),
        Err(why) => {
            can_run("the PostgreSQL failover test", Some(&why));
            None
        }
    }
}

// ---- What a host has set up -------------------------------------------------------------------

/// Something set up on a host that must be undone.
enum Held {
    /// nbdfuse: exits by itself once its FUSE mount is gone.
    Nbdfuse {
        child: Child,
        log: PathBuf,
    },
    /// PostgreSQL in a PID namespace of its own: `child` is `unshare`, `init` the postmaster (its
    /// pid outside the namespace), whose death takes every backend with it.
    Postgres {
        child: Child,
        init: libc::pid_t,
        log: PathBuf,
    },
    /// nbdfuse's FUSE mount.
    Fuse(PathBuf),
    /// The ext4 mount.
    Mount(PathBuf),
    Loop(String),
}

/// What the test has set up, oldest first, each with the host ("a" or "b") it belongs to. Dropping
/// it undoes everything left, newest first, by force and without panicking.
#[derive(Default)]
struct Setup(Vec<(&'static str, Held)>);

impl Setup {
    fn push(&mut self, host: &'static str, held: Held) {
        self.0.push((host, held));
    }

    /// The host dies: SIGKILL to PostgreSQL's process group and to nbdfuse, without waiting; then
    /// [`Setup::reap_processes`]. Reaping the postmaster matters: a new postmaster refuses a data directory whose
    /// `postmaster.pid` names a process that still exists, and on this one machine the dead
    /// host's pid is visible (a zombie until reaped). Its mounts and loop device stay until
    /// [`Setup::release_host`].
    fn kill_processes(&mut self, host: &str) {
        for (_, held) in self.0.iter().filter(|(h, _)| *h == host) {
            match held {
                Held::Postgres { init, .. } => signal_pid(*init, libc::SIGKILL),
                Held::Nbdfuse { child, .. } => signal(child, libc::SIGKILL),
                _ => {}
            }
        }
    }

    /// Reaps what [`Setup::kill_processes`] killed.
    fn reap_processes(&mut self, host: &str) {
        for (_, held) in self.0.iter_mut().filter(|(h, _)| *h == host) {
            if let Held::Postgres { child, .. } | Held::Nbdfuse { child, .. } = held {
                assert!(wait_exit(child, WAIT_MAX).is_some(), "a SIGKILLed process of host {host} did not exit");
            }
        }
    }

    /// Undoes what `host` holds, newest first. For a `dead` host (its processes SIGKILLed), the
    /// mounts are detached lazily and the processes only reaped; otherwise PostgreSQL gets a fast
    /// shutdown, everything is unmounted and detached normally, and each step is checked. An item
    /// whose undoing fails stays, so that the panic's `drop` still forces it away.
    fn release_host(&mut self, host: &str, dead: bool) {
        while let Some(at) = self.0.iter().rposition(|(h, _)| *h == host) {
            match &mut self.0[at].1 {
                Held::Postgres { child, init, log } => {
                    if dead {
                        signal_pid(*init, libc::SIGKILL);
                        let _ = wait_exit(child, WAIT_MAX);
                    } else {
                        // SIGINT: fast shutdown (abort the sessions, write a checkpoint). The
                        // postmaster's exit ends unshare, with its status.
                        signal_pid(*init, libc::SIGINT);
                        let status = wait_exit(child, WAIT_MAX);
                        let shown = tail(log, 30);
                        let status =
                            status.unwrap_or_else(|| panic!("postgres did not stop within {WAIT_MAX:?}:\n{shown}"));
                        assert!(status.success(), "postgres exited with {status}:\n{shown}");
                    }
                }
                Held::Nbdfuse { child, log } => {
                    if dead {
                        signal(child, libc::SIGKILL);
                    }
                    let status = wait_exit(child, WAIT_MAX);
                    let shown = tail(log, 30);
                    let status = status.unwrap_or_else(|| panic!("nbdfuse did not exit within {WAIT_MAX:?}:\n{shown}"));
                    assert!(dead || status.success(), "nbdfuse exited with {status}:\n{shown}");
                }
                Held::Mount(dir) | Held::Fuse(dir) if dead => {
                    let d = dir.to_str().unwrap();
                    ok("umount", &["-l", d]);
                }
                Held::Mount(dir) | Held::Fuse(dir) => umount_retrying(dir),
                Held::Loop(dev) => {
                    // On a dead host the lazily unmounted ext4 may still hold it: then the kernel
                    // frees it once ext4 lets go (autoclear), and losetup -d still succeeds.
                    ok("losetup", &["-d", dev]);
                }
            }
            self.0.remove(at);
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        while let Some((host, held)) = self.0.pop() {
            match held {
                Held::Postgres { mut child, init, log } => {
                    // While unshare runs, it has not reaped the postmaster: `init` is still its.
                    if child.try_wait().is_ok_and(|s| s.is_none()) {
                        signal_pid(init, libc::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    if std::thread::panicking() {
                        eprintln!("--- postgres on {host} (end of {}) ---\n{}", log.display(), tail(&log, 40));
                    }
                }
                Held::Nbdfuse { mut child, log } => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if std::thread::panicking() {
                        eprintln!("--- nbdfuse on {host} ---\n{}", tail(&log, 20));
                    }
                }
                Held::Mount(dir) | Held::Fuse(dir) => umount_quietly(&dir),
                Held::Loop(dev) => {
                    quiet("losetup", &["-d", &dev]);
                }
            }
        }
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Signals a postmaster by its pid outside its namespace. Callers make sure it is not yet reaped
/// (its parent, our `unshare` child, is still running), so the pid has not been reused.
fn signal_pid(pid: libc::pid_t, signal: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// One host's directories under the test's temp dir.
struct Host {
    name: &'static str,
    root: PathBuf,
    fuse_dir: PathBuf,
    mount_dir: PathBuf,
    /// PostgreSQL's unix socket directory (outside the volume).
    sock_dir: PathBuf,
}

impl Host {
    fn new(root: &Path, name: &'static str, pg: &Pg) -> Host {
        let dir = |what: &str| {
            let d = root.join(format!("{what}-{name}"));
            std::fs::create_dir(&d).unwrap();
            d
        };
        let host = Host {
            name,
            root: root.to_path_buf(),
            fuse_dir: dir("fuse"),
            mount_dir: dir("mnt"),
            sock_dir: dir("sock"),
        };
        chown(&host.sock_dir, pg);
        host
    }

    fn pgdata(&self) -> PathBuf {
        self.mount_dir.join("pgdata")
    }

    /// nbdfuse on `uri`, then a loop device on its file; returns the loop device.
    fn attach(&self, setup: &mut Setup, uri: &str) -> String {
        let pid_file = self.root.join(format!("nbdfuse-{}.pid", self.name));
        let _ = std::fs::remove_file(&pid_file);
        let log = self.root.join(format!("nbdfuse-{}.log", self.name));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let file = self.fuse_dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pid_file)
            .arg(&file)
            .arg(uri)
            .env("PATH", path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn nbdfuse");
        setup.push(self.name, Held::Nbdfuse { child, log: log.clone() });
        // nbdfuse writes its pid file once the FUSE file is ready.
        let deadline = Instant::now() + WAIT_MAX;
        while !std::fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty()) {
            if let Some((_, Held::Nbdfuse { child, .. })) = setup.0.last_mut() {
                assert!(child.try_wait().unwrap().is_none(), "nbdfuse exited before it was ready:\n{}", tail(&log, 20));
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within {WAIT_MAX:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Unmounting the FUSE directory is what makes nbdfuse exit.
        setup.push(self.name, Held::Fuse(self.fuse_dir.clone()));
        let len = std::fs::metadata(&file).expect("the nbdfuse file").len();
        assert_eq!(len, VOLUME_BYTES);
        let dev = ok("losetup", &["--find", "--show", file.to_str().unwrap()]).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        setup.push(self.name, Held::Loop(dev.clone()));
        dev
    }

    fn mount(&self, setup: &mut Setup, dev: &str) {
        ok("mount", &["-t", "ext4", dev, self.mount_dir.to_str().unwrap()]);
        setup.push(self.name, Held::Mount(self.mount_dir.clone()));
    }

    /// Starts the postmaster on this host's mount, as user postgres, as the first process of a PID
    /// namespace of its own: SIGKILL to it then kills every backend at once, as a host's death
    /// would (a process group would not do: each backend calls setsid). It also sees the pid in
    /// the dead host's `postmaster.pid` as its own (1) and so as stale, as in a container.
    fn start_postgres(&self, setup: &mut Setup, pg: &Pg) {
        let log = self.root.join(format!("postgres-{}.log", self.name));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--", "setpriv"])
            .arg(format!("--reuid={}", pg.uid))
            .arg(format!("--regid={}", pg.gid))
            .args(["--clear-groups", "--", &pg.program("postgres"), "-D"])
            .arg(self.pgdata())
            .arg("-k")
            .arg(&self.sock_dir);
        for setting in PG_SETTINGS {
            cmd.args(["-c", setting]);
        }
        let mut child = cmd
            .env("PATH", path())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn unshare");
        // unshare's only child is the namespace's first process, which execs setpriv, then postgres.
        let children = format!("/proc/{0}/task/{0}/children", child.id());
        let deadline = Instant::now() + WAIT_MAX;
        let init = loop {
            let listed = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = listed.split_whitespace().next() {
                break pid.parse().unwrap();
            }
            if Instant::now() >= deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("unshare started no postmaster:\n{}", tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        setup.push(self.name, Held::Postgres { child, init, log });
    }

    fn postgres_log(&self) -> String {
        tail(&self.root.join(format!("postgres-{}.log", self.name)), 30)
    }

    /// Runs `sql` through psql (bounded); returns its unaligned output.
    fn sql(&self, pg: &Pg, sql: &str) -> String {
        let sock = self.sock_dir.to_str().unwrap();
        let args = ["-X", "-At", "-F", " ", "-v", "ON_ERROR_STOP=1", "-h", sock, "-U", "postgres", "-d", "postgres"];
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", sql]);
        let (code, out, err) = tool(&pg.program("psql"), &all);
        assert_eq!(code, 0, "psql -c {sql:?} failed: {out}{err}\n{}", self.postgres_log());
        out
    }
}

fn chown(p: &Path, pg: &Pg) {
    std::os::unix::fs::chown(p, Some(pg.uid), Some(pg.gid)).unwrap();
}

// ---- Clients ----------------------------------------------------------------------------------

/// Every transaction sent and every one whose COMMIT was answered, kept in the test process.
#[derive(Default)]
struct Ledger {
    sent: BTreeSet<u64>,
    committed: BTreeSet<u64>,
}

/// Rows of transaction `tx`: one to four, so a torn transaction would show.
fn parts(tx: u64) -> u64 {
    1 + tx % 4
}

/// A psql session's pipes: it reads statements from stdin and echoes a marker after each COMMIT.
struct Session {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// psql on `host`'s socket; its stderr goes to `log`.
    fn spawn(pg: &Pg, host: &Host, log: &Path) -> (Child, Session) {
        let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(pg.program("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(&host.sock_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn psql");
        let session =
            Session { stdin: child.stdin.take().unwrap(), stdout: BufReader::new(child.stdout.take().unwrap()) };
        (child, session)
    }

    /// One transaction: BEGIN, an INSERT of `parts(tx)` rows, COMMIT. Ok once psql printed COMMIT
    /// (the server answered the COMMIT with success); Err if psql printed anything else (ROLLBACK)
    /// or ended (ON_ERROR_STOP: an error, such as a lost connection, ends it).
    fn commit(&mut self, tx: u64) -> Result<(), String> {
        let rows: Vec<String> =
            (1..=parts(tx)).map(|part| format!("({tx},{part},repeat(md5('{tx}-{part}'),{PAYLOAD_REPEAT}))")).collect();
        let script = format!(
            "BEGIN;\nINSERT INTO t (tx, part, payload) VALUES {};\nCOMMIT;\n\\echo done {tx}\n",
            rows.join(",")
        );
        self.stdin.write_all(script.as_bytes()).and_then(|()| self.stdin.flush()).map_err(|e| format!("send: {e}"))?;
        let marker = format!("done {tx}");
        let mut last = String::new();
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) => return Err(format!("psql ended before transaction {tx} was answered")),
                Ok(_) => {}
                Err(e) => return Err(format!("reading psql: {e}")),
            }
            let line = line.trim_end();
            if line == marker {
                return if last == "COMMIT" { Ok(()) } else { Err(format!("transaction {tx} ended with {last:?}")) };
            }
            last = line.to_string();
        }
    }
}

/// How a client session ended.
#[derive(Debug)]
struct ClientEnd {
    commits: u64,
    /// None if it was asked to stop; else why it stopped (after the kill: the lost connection).
    error: Option<String>,
}

/// Client sessions committing transactions with ids from `next_tx`, each recorded in the ledger as
/// sent before it is sent and as committed once its COMMIT is answered.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<ClientEnd>>,
    /// The psql processes; the threads own their pipes. Killed and reaped here.
    children: Vec<Child>,
}

impl Load {
    fn start(pg: &Pg, host: &Host, ledger: &Arc<Mutex<Ledger>>, next_tx: &Arc<AtomicU64>, round: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (mut threads, mut children) = (Vec::new(), Vec::new());
        for client in 0..CLIENTS {
            let log = host.root.join(format!("psql-{round}-{client}.log"));
            let (child, mut session) = Session::spawn(pg, host, &log);
            children.push(child);
            let (stop, ledger, next_tx) = (stop.clone(), ledger.clone(), next_tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut commits = 0;
                while !stop.load(Ordering::Relaxed) {
                    let tx = next_tx.fetch_add(1, Ordering::Relaxed);
                    ledger.lock().unwrap().sent.insert(tx);
                    if let Err(e) = session.commit(tx) {
                        return ClientEnd { commits, error: Some(e) };
                    }
                    ledger.lock().unwrap().committed.insert(tx);
                    commits += 1;
                }
                ClientEnd { commits, error: None }
            }));
        }
        Load { stop, threads, children }
    }

    /// Sessions still running (none has failed).
    fn all_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Waits for every session to end (after the host's death they end by themselves); those
    /// still running after `CLIENT_END_MAX` are killed, and then the second value is false.
    fn finish(mut self) -> (Vec<ClientEnd>, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + CLIENT_END_MAX;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let in_time = self.threads.iter().all(|t| t.is_finished());
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let ends = std::mem::take(&mut self.threads).into_iter().map(|t| t.join().expect("client thread")).collect();
        (ends, in_time)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Commits one transaction on `host`, retrying on fresh sessions (PostgreSQL refuses connections
/// while it recovers) until one commits or `deadline` passes.
fn first_commit(pg: &Pg, host: &Host, ledger: &Mutex<Ledger>, next_tx: &AtomicU64, deadline: Instant) -> u64 {
    let log = host.root.join(format!("psql-probe-{}.log", host.name));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (mut child, mut session) = Session::spawn(pg, host, &log);
        let tx = next_tx.fetch_add(1, Ordering::Relaxed);
        ledger.lock().unwrap().sent.insert(tx);
        let done = session.commit(tx);
        let _ = child.kill();
        let _ = child.wait();
        if done.is_ok() {
            ledger.lock().unwrap().committed.insert(tx);
            return attempts;
        }
        assert!(
            Instant::now() < deadline,
            "no commit on {} within {RECOVERY_MAX:?} of the kill ({attempts} attempts; last: {done:?}); psql said:\n{}\n\
             postgres:\n{}",
            host.name,
            tail(&log, 10),
            host.postgres_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the table holds, against the ledger.
struct Check {
    /// Committed transactions, all looked for.
    checked: usize,
    /// Committed but missing (must be 0).
    lost: Vec<u64>,
    /// Present but never sent (must be 0).
    never_sent: Vec<u64>,
    /// Present with a wrong number of rows (must be 0).
    torn: Vec<(u64, u64)>,
    /// Present but without an answered COMMIT: sent, and the host died before the answer.
    uncertain: usize,
}

fn check_table(pg: &Pg, host: &Host, ledger: &Mutex<Ledger>) -> Check {
    let out = host.sql(pg, "SELECT tx, count(*) FROM t GROUP BY tx");
    let present: BTreeMap<u64, u64> = out
        .lines()
        .map(|l| {
            let (tx, n) = l.split_once(' ').unwrap_or_else(|| panic!("psql printed {l:?}"));
            (tx.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    let ledger = ledger.lock().unwrap();
    Check {
        checked: ledger.committed.len(),
        lost: ledger.committed.iter().filter(|tx| !present.contains_key(tx)).copied().collect(),
        never_sent: present.keys().filter(|tx| !ledger.sent.contains(tx)).copied().collect(),
        torn: present.iter().filter(|&(&tx, &n)| n != parts(tx)).map(|(&tx, &n)| (tx, n)).collect(),
        uncertain: present.keys().filter(|tx| !ledger.committed.contains(tx)).count(),
    }
}

// ---- The nodes ---------------------------------------------------------------------------------

/// `syncblock verify --json --admin ADDR` on a primary: its answer, parsed, if the CLI succeeded
/// (which it does only when the replicas are identical).
fn verify(admin: &str) -> Result<serde_json::Value, String> {
    let (code, out, err) = run(CLI_MAX, BIN, &["verify", "--json", "--admin", admin]);
    let report = out.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    match (code, report) {
        (0, Some(v)) => Ok(v),
        (code, _) => Err(format!("verify exited with {code}: {out}{err}")),
    }
}

/// A witness and nodes `a` (first primary) and `b` (first secondary) in `root` (`common::pair`),
/// started as docs/replication.md does by hand, with the defaults: the default policy and
/// automatic failover, so no `--policy`.
fn start_cluster(root: &Path) -> Pair {
    let volume_size = VOLUME_BYTES.to_string();
    let spec = PairSpec {
        store_size: STORE_SIZE,
        volume_size: &volume_size,
        flags: &[],
        witness_flags: &[],
        client_flags: &[],
        poll: POLL,
        rejoin_max: REJOIN_MAX,
    };
    Pair::start(root, &spec)
}

// ---- Processes and waits -----------------------------------------------------------------------

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---- The test ----------------------------------------------------------------------------------

/// The test's temp dir: under the target directory (not /tmp, which may be tmpfs: the stores are
/// real io_uring files), unless user postgres cannot reach it there (a checkout under /root, say);
/// then under /var/tmp. User postgres must reach its socket directory and the mounts.
fn temp_dir(pg: &Pg) -> tempfile::TempDir {
    for base in [env!("CARGO_TARGET_TMPDIR"), "/var/tmp"] {
        let dir = tempfile::tempdir_in(base).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let reachable = Command::new("setpriv")
            .arg(format!("--reuid={}", pg.uid))
            .arg(format!("--regid={}", pg.gid))
            .args(["--clear-groups", "--", "test", "-x"])
            .arg(dir.path())
            .env("PATH", path())
            .status();
        if reachable.is_ok_and(|s| s.success()) {
            return dir;
        }
        eprintln!("user postgres cannot reach {}; trying the next place", dir.path().display());
    }
    panic!("user postgres can reach neither {} nor /var/tmp", env!("CARGO_TARGET_TMPDIR"));
}

/// ext4 and a new PostgreSQL cluster on the primary's export, and the test's table.
fn first_host(setup: &mut Setup, pg: &Pg, host: &Host, uri: &str) {
    let dev = host.attach(setup, uri);
    ok("mkfs.ext4", &["-q", "-F", &dev]);
    host.mount(setup, &dev);
    let pgdata = host.pgdata();
    std::fs::create_dir(&pgdata).unwrap();
    chown(&pgdata, pg);
    std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700)).unwrap();
    // initdb syncs the cluster it wrote; `sync -f` covers the directory the test made for it.
    let out = Command::new("timeout")
        .arg(WAIT_MAX.as_secs().to_string())
        .arg(pg.program("initdb"))
        .args(["-D", pgdata.to_str().unwrap(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
        .arg("--no-instructions")
        .uid(pg.uid)
        .gid(pg.gid)
        .current_dir(&host.root)
        .output()
        .expect("spawn initdb");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "initdb failed: {}{}", text(&out.stdout), text(&out.stderr));
    ok("sync", &["-f", host.mount_dir.to_str().unwrap()]);
    host.start_postgres(setup, pg);
    wait_until(POLL, "postgres accepts connections", WAIT_MAX, || {
        let sock = host.sock_dir.to_str().unwrap();
        match tool(&pg.program("psql"), &["-X", "-h", sock, "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"]) {
            (0, _, _) => Ok(()),
            (code, out, err) => Err(format!("psql exited with {code}: {out}{err}\n{}", host.postgres_log())),
        }
    });
    host.sql(
        pg,
        "CREATE TABLE t (tx bigint NOT NULL, part int NOT NULL, payload text NOT NULL, PRIMARY KEY (tx, part))",
    );
}

#[test]
fn postgres_survives_the_loss_of_its_host_with_every_committed_transaction() {
    let Some(pg) = prerequisites() else { return };
    let rounds: usize = std::env::var("PG_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(ROUNDS_DEFAULT);
    let mut rng = Rng::from_env("PG_SEED", "postgres failover test");
    let started = Instant::now();
    let dir = temp_dir(&pg);
    let root = dir.path().to_path_buf();
    let root = &root;
    if std::env::var("PG_KEEP").is_ok() {
        eprintln!("PG_KEEP: keeping {}", root.display());
        std::mem::forget(dir);
    }
    let mut cluster = start_cluster(root);
    // Declared after the cluster, so dropped before it: unmounting while the nodes still run.
    let mut setup = Setup::default();
    let hosts = [Host::new(root, "a", &pg), Host::new(root, "b", &pg)];
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next_tx = Arc::new(AtomicU64::new(1));

    first_host(&mut setup, &pg, &hosts[0], &cluster.nodes[0].uri);
    eprintln!("cluster, ext4 and PostgreSQL ready on a after {:?}", started.elapsed());

    let (mut p, mut s) = (0, 1);
    let mut recoveries = Vec::new();
    for round in 1..=rounds {
        let (dead, survivor) = (&hosts[p], &hosts[s]);
        let before = ledger.lock().unwrap().committed.len();
        let load = Load::start(&pg, dead, &ledger, &next_tx, round);
        let load_for = rng.millis(LOAD_MS.0, LOAD_MS.1);
        std::thread::sleep(load_for);
        if !load.all_running() {
            let (ends, _) = load.finish();
            panic!("round {round}: a client stopped before the kill: {ends:?}\n{}", dead.postgres_log());
        }

        // The host dies: its storage node, PostgreSQL and nbdfuse at once.
        setup.kill_processes(dead.name);
        let killed = Instant::now();
        cluster.nodes[p].kill();
        setup.reap_processes(dead.name);
        let (ends, in_time) = load.finish();
        assert!(
            in_time,
            "round {round}: a client session was still waiting {CLIENT_END_MAX:?} after its host died: {ends:?}"
        );
        let committed_round = ledger.lock().unwrap().committed.len() - before;
        assert!(committed_round > 0, "round {round}: nothing committed before the kill: {ends:?}");
        assert!(
            ends.iter().all(|e| e.error.is_some()),
            "round {round}: a client did not notice the host's death: {ends:?}"
        );
        let commits_min = ends.iter().map(|e| e.commits).min().unwrap();

        // The survivor: promoted by itself, then ext4 and PostgreSQL recover on its export.
        let node = &cluster.nodes[s];
        cluster.wait_promoted(s, &format!("round {round}: {} promoted", node.name), PROMOTION_MAX);
        let promoted = killed.elapsed();
        let st = node.replication().unwrap();
        assert_eq!(st["policy"], "degrade", "round {round}: with a witness the default policy is degrade: {st}");
        let dev = survivor.attach(&mut setup, &node.uri);
        let (code, out, err) = tool("e2fsck", &["-f", "-p", &dev]);
        assert!(
            code == 0 || code == 1,
            "round {round}: e2fsck -f -p on {} could not recover ext4 by itself (exit {code}):\n{out}\n{err}",
            survivor.name
        );
        let fsck_said: Vec<&str> = out.lines().chain(err.lines()).filter(|l| !l.trim().is_empty()).collect();
        survivor.mount(&mut setup, &dev);
        let fs_ready = killed.elapsed();
        survivor.start_postgres(&mut setup, &pg);
        let attempts = first_commit(&pg, survivor, &ledger, &next_tx, killed + RECOVERY_MAX);
        let recovery = killed.elapsed();

        // The dead host's leftovers, now that the survivor serves.
        setup.release_host(dead.name, true);

        let check = check_table(&pg, survivor, &ledger);
        eprintln!(
            "pg-failover round: round={round} killed={} survivor={} load_ms={} committed_round={committed_round} \
             clients={CLIENTS} commits_min={commits_min} checked={} lost={} never_sent_present={} torn={} \
             uncertain_present={} promoted_ms={} fs_ready_ms={} recovery_ms={} probe_attempts={attempts} fsck={:?}",
            cluster.nodes[p].name,
            survivor.name,
            ms(load_for),
            check.checked,
            check.lost.len(),
            check.never_sent.len(),
            check.torn.len(),
            check.uncertain,
            ms(promoted),
            ms(fs_ready),
            ms(recovery),
            fsck_said.join(" | "),
        );
        assert!(
            check.lost.is_empty() && check.never_sent.is_empty() && check.torn.is_empty(),
            "round {round}: after failover to {}: committed but missing {:?}; present but never sent {:?}; \
             torn (tx, rows) {:?}\n{}",
            survivor.name,
            &check.lost[..check.lost.len().min(20)],
            &check.never_sent[..check.never_sent.len().min(20)],
            &check.torn[..check.torn.len().min(20)],
            survivor.postgres_log()
        );
        recoveries.push(recovery);

        // The old primary returns with its first arguments: it must rejoin as secondary and be
        // resynced incrementally, and then the replicas must be identical.
        let resyncs = |st: &serde_json::Value| st["resync"]["count"].as_u64().unwrap_or_else(|| panic!("{st}"));
        let resyncs_before = resyncs(&cluster.nodes[s].replication().unwrap());
        let rejoin_started = Instant::now();
        cluster.nodes[p].start();
        let st = cluster.wait_in_sync(s);
        let rejoined = rejoin_started.elapsed();
        assert!(
            resyncs(&st) > resyncs_before && st["resync"]["full"] == false,
            "round {round}: {} was not resynced incrementally (before the rejoin: {resyncs_before} resyncs): {st}",
            cluster.nodes[p].name
        );
        let report = verify(&cluster.nodes[s].admin)
            .unwrap_or_else(|e| panic!("round {round}: verify after the rejoin: {e}\n{}", cluster.logs()));
        assert_eq!(report["verify"]["blocks_differing"], 0, "round {round}: {report}");
        assert_eq!(report["verify"]["bytes_compared"], VOLUME_BYTES, "round {round}: {report}");
        eprintln!(
            "round {round}: {} rejoined and in sync after {:?} (resync: {} bytes shipped, {} skipped); verify: {}",
            cluster.nodes[p].name,
            rejoined,
            st["resync"]["bytes_shipped"],
            st["resync"]["bytes_skipped"],
            report["verify"]
        );
        (p, s) = (s, p);
    }

    let ledger = ledger.lock().unwrap();
    let mut recovery_ms: Vec<u128> = recoveries.iter().map(|&r| ms(r)).collect();
    recovery_ms.sort();
    eprintln!(
        "pg-failover summary: rounds={rounds} committed_checked={} sent={} lost=0 never_sent_present=0 torn=0 \
         recovery_ms_min={} recovery_ms_median={} recovery_ms_max={} test_secs={:.1}",
        ledger.committed.len(),
        ledger.sent.len(),
        recovery_ms.first().unwrap_or(&0),
        recovery_ms.get(recovery_ms.len() / 2).unwrap_or(&0),
        recovery_ms.last().unwrap_or(&0),
        started.elapsed().as_secs_f64()
    );
    drop(ledger);

    // Everything stops cleanly: PostgreSQL (fast shutdown), ext4, the loop device, FUSE; then the
    // nodes and the witness with SIGTERM.
    setup.release_host(hosts[p].name, false);
    assert!(setup.0.is_empty());
    cluster.stop();
}
