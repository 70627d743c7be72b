//! Opening a store whose lock another process holds (issue 12, "restart after a crash").
//!
//! A running holder, in another process or in this one, is refused at once. A killed holder keeps
//! the lock until the kernel has torn down its io_uring, after the process itself is gone; `open`
//! waits for that, so `syncblock serve` restarted right after a SIGKILL always comes up.
//!
//! The test binary re-executes itself (as `kill9.rs` does): with `SYNCBLOCK_LOCK_WAIT_CHILD` set,
//! the `lock_wait_child` test opens the store and holds it, idle or writing, until it is killed.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::child_test_command;
use syncblock_engine::uring::LOCK_EXIT_WAIT_MAX;
use syncblock_engine::{Config, CreateOptions, Error, Store};

/// Set (to the store's path) in the child's environment: open it and hold it.
const CHILD_ENV: &str = "SYNCBLOCK_LOCK_WAIT_CHILD";
/// `hold` (open and sit idle) or `write` (keep FUA writes in flight).
const CHILD_MODE_ENV: &str = "SYNCBLOCK_LOCK_WAIT_MODE";
/// A file the child creates once it has the store open (and, writing, once its first write is in).
const CHILD_READY_ENV: &str = "SYNCBLOCK_LOCK_WAIT_READY";
/// The name of the child's test fn, passed to the re-executed binary as an exact filter.
const CHILD_TEST: &str = "lock_wait_child";
/// A child still alive after this long was forgotten by its parent: it exits.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(60);
/// How long the parent waits for a child to have the store open.
const CHILD_READY_MAX: Duration = Duration::from_secs(60);

/// Kill-and-reopen rounds: each takes a fraction of a second.
const RESTART_ROUNDS: u64 = 20;
/// A refusal must come at once; this only tells "at once" from "after waiting out the bound" on a
/// loaded machine, it is no benchmark.
const REFUSAL_MAX: Duration = Duration::from_secs(2);

const STORE_BYTES: u64 = 64 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;
const VOLUME_NAME: &str = "lock-wait";
const VOLUME_BYTES: u64 = 16 << 20;
/// Concurrent writers in a writing child, each with one FUA write of [`WRITE_BYTES`] in flight.
const WRITERS: u64 = 4;
const WRITE_BYTES: u64 = 256 << 10;
const _: () = assert!(VOLUME_BYTES % (WRITERS * WRITE_BYTES) == 0);

// ---------------------------------------------------------------------------------------------
// The child.

/// Selected (by exact name) in the re-executed binary; a no-op in a normal test run.
#[test]
fn lock_wait_child() {
    let Some(store_path) = std::env::var_os(CHILD_ENV) else { return };
    let mode = std::env::var(CHILD_MODE_ENV).expect("child mode");
    let ready = PathBuf::from(std::env::var_os(CHILD_READY_ENV).expect("ready path"));
    let store = Store::open(Path::new(&store_path), Config::default()).unwrap_or_else(|e| die("open", e));
    match mode.as_str() {
        "hold" => {
            File::create(&ready).unwrap_or_else(|e| die("ready file", e));
            std::thread::sleep(CHILD_LIFETIME_MAX);
        }
        "write" => write_until_killed(store, &ready),
        _ => die("mode", &mode),
    }
    die("lifetime", "the parent never killed this child")
}

fn die(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("lock_wait child: {what}: {e}");
    std::process::exit(2)
}

/// Keeps [`WRITERS`] FUA writes in flight, so that a kill finds the ring busy and its teardown has
/// requests to wait for.
fn write_until_killed(store: Store, ready: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let volume = store.volume(VOLUME_NAME).await.unwrap_or_else(|e| die("volume", e)).id;
        let data = Bytes::from(vec![0x5a; WRITE_BYTES as usize]);
        store.write(volume, 0, data.clone(), true).await.unwrap_or_else(|e| die("first write", e));
        File::create(ready).unwrap_or_else(|e| die("ready file", e));
        let region_bytes = VOLUME_BYTES / WRITERS;
        for writer_idx in 0..WRITERS {
            let (store, data) = (store.clone(), data.clone());
            tokio::spawn(async move {
                for write_idx in 0.. {
                    let offset = writer_idx * region_bytes + write_idx * WRITE_BYTES % region_bytes;
                    store.write(volume, offset, data.clone(), true).await.unwrap_or_else(|e| die("write", e));
                }
            });
        }
        tokio::time::sleep(CHILD_LIFETIME_MAX).await;
    });
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// Owns a child process: kills and reaps it however the test ends.
struct ChildGuard {
    child: Option<Child>,
    out: PathBuf,
}

impl ChildGuard {
    /// Starts this binary's [`lock_wait_child`] on `store` in `mode`; returns once it holds the store.
    fn start(dir: &Path, store: &Path, mode: &str, name: &str) -> ChildGuard {
        let out = dir.join(format!("{name}.out"));
        let ready = dir.join(format!("{name}.ready"));
        let child = child_test_command(CHILD_TEST, File::create(&out).expect("child output"))
            .env(CHILD_ENV, store)
            .env(CHILD_MODE_ENV, mode)
            .env(CHILD_READY_ENV, &ready)
            .spawn()
            .expect("spawning the child");
        let mut guard = ChildGuard { child: Some(child), out };
        let deadline = Instant::now() + CHILD_READY_MAX;
        while !ready.exists() {
            if let Some(status) = guard.child().try_wait().expect("try_wait") {
                panic!("{name}: child exited ({status}) before it had the store open:\n{}", guard.output());
            }
            assert!(
                Instant::now() < deadline,
                "{name}: child not ready after {CHILD_READY_MAX:?}:\n{}",
                guard.output()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        guard
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Sends SIGKILL, after checking the child is still running; does not reap it.
    fn kill(&mut self) {
        let running = self.child().try_wait().expect("try_wait").is_none();
        assert!(running, "the child died before it was killed:\n{}", self.output());
        self.child().kill().expect("kill");
    }

    /// Reaps the child, which must have died of SIGKILL.
    fn reap(&mut self) {
        let status = self.child().wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "child ended with {status}:\n{}", self.output());
        self.child = None;
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh store with one volume, closed. `None` (after printing why) where the engine cannot run
/// on a real file here.
fn new_store(dir: &Path) -> Option<PathBuf> {
    let path = dir.join("store.img");
    let opts = CreateOptions { size_bytes: STORE_BYTES, segment_bytes: SEGMENT_BYTES, zero_fill: false };
    let store = match Store::create(&path, &opts, Config::default()) {
        Ok(store) => store,
        Err(Error::UringUnavailable { cause }) => {
            println!("SKIP: io_uring unavailable: {cause}");
            return None;
        }
        Err(Error::Io { what, source }) if source.raw_os_error() == Some(libc::EINVAL) => {
            println!("SKIP: O_DIRECT unsupported in {}: {what}; set TMPDIR to ext4/xfs", dir.display());
            return None;
        }
        Err(e) => panic!("creating a store in {}: {e}", dir.display()),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(store.create_volume(VOLUME_NAME, VOLUME_BYTES)).expect("create volume");
    store.close().expect("close");
    Some(path)
}

/// A fresh store (`new_store`) in a temp dir, for a test of the parent process. `None` in the child
/// (whose binary runs every test: only `lock_wait_child` does anything there) or where the engine
/// cannot run on a real file.
fn parent_store() -> Option<(tempfile::TempDir, PathBuf)> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = new_store(dir.path())?;
    Some((dir, path))
}

/// Log lines the engine writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Opens the store, returning what the engine logged on this thread meanwhile (the lock is taken
/// on the calling thread).
fn open_logged(path: &Path) -> (Result<Store, Error>, String) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, || Store::open(path, Config::default()));
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    (result, log)
}

/// The engine's log line announcing a wait for an exiting lock holder.
const WAIT_LOG: &str = "waiting up to";

/// Opens `path`, held by `holder` (a running process): the open must be refused at once, as in
/// use, without waiting. The refusal's message, and how long it took.
fn refused_at_once(path: &Path, holder: &str) -> (String, Duration) {
    let started = Instant::now();
    let (result, log) = open_logged(path);
    let took = started.elapsed();
    let message = result.expect_err(&format!("the store is held by {holder}")).to_string();
    assert!(message.contains("in use by another process"), "{message}");
    assert!(!log.contains(WAIT_LOG), "waited for {holder}:\n{log}");
    assert!(took < REFUSAL_MAX, "refused only after {took:?}");
    (message, took)
}

#[test]
fn running_holder_in_another_process_is_refused_at_once() {
    let Some((dir, path)) = parent_store() else { return };
    let mut holder = ChildGuard::start(dir.path(), &path, "hold", "holder");

    let (message, took) = refused_at_once(&path, "a running holder");
    assert!(message.contains(&format!("pid {}", holder.pid())), "{message}");
    assert!(message.contains("stop it first"), "{message}");
    println!("refused in {took:?}: {message}");

    // The refusal left the holder alone.
    assert!(holder.child().try_wait().expect("try_wait").is_none(), "the holder died:\n{}", holder.output());
    holder.kill();
    holder.reap();
}

#[test]
fn second_open_in_the_same_process_is_refused_at_once() {
    let Some((_dir, path)) = parent_store() else { return };
    let store = Store::open(&path, Config::default()).expect("first open");
    let (message, _) = refused_at_once(&path, "this very process");
    assert!(message.contains(&format!("this one, pid {}", std::process::id())), "{message}");
    store.close().expect("close");
}

/// A lock that outlives its holder, as a killed process's lock outlives it while the kernel tears
/// down its io_uring: a forked child takes the lock on a descriptor it shares with this process,
/// exits and is reaped. Returns that descriptor (dropping it releases the lock) and the child's pid.
fn lock_held_by_a_dead_process(path: &Path) -> (File, i32) {
    let file = File::open(path).expect("open for the lock holder");
    let fd = file.as_raw_fd();
    // SAFETY: the forked child calls only flock, nanosleep and _exit, which are async-signal-safe, so forking
    // this multithreaded process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // The store was just created and closed in this process: its lock goes only once the
        // kernel has torn down that engine's io_uring (the very delay `open` waits out), so the
        // child retries for up to 10 s (nanosleep is async-signal-safe too).
        let mut rc = -1;
        for _ in 0..1000 {
            // SAFETY: as above; `fd` is open in the child too.
            rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let pause = libc::timespec { tv_sec: 0, tv_nsec: 10_000_000 };
            // SAFETY: as above; `pause` is a live timespec and the remainder may be null.
            unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
        }
        // SAFETY: as above.
        unsafe { libc::_exit(i32::from(rc != 0)) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child, writing its status into a live int.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child could not take the lock");
    (file, pid)
}

/// Deterministic: the holder is gone for sure, and the lock goes 300 ms later.
#[test]
fn open_waits_for_a_lock_whose_holder_is_gone() {
    let Some((_dir, path)) = parent_store() else { return };
    let (holder, pid) = lock_held_by_a_dead_process(&path);
    let release_after = Duration::from_millis(300);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(release_after);
        drop(holder);
    });
    let started = Instant::now();
    let (result, log) = open_logged(&path);
    let took = started.elapsed();
    releaser.join().expect("releaser");
    let store = result.unwrap_or_else(|e| panic!("open after the lock was released: {e}\nlog:\n{log}"));
    print!("opened after {took:?}; log:\n{log}");
    assert!(took >= release_after - Duration::from_millis(50), "opened after {took:?}, while the lock was held");
    assert!(took < LOCK_EXIT_WAIT_MAX, "waited {took:?}");
    let wait_line = log.lines().find(|l| l.contains(WAIT_LOG)).unwrap_or_else(|| panic!("no wait logged:\n{log}"));
    assert!(wait_line.contains("WARN"), "{wait_line}");
    assert!(wait_line.contains(&format!("process {pid}, which has exited")), "{wait_line}");
    assert!(log.contains(&format!("exiting process {pid} released the store's lock")), "{log}");
    store.close().expect("close");
}

/// The reported failure: the killed server's lock is still held while its ring is torn down. Even
/// rounds open before the kill is reaped (the child is running into SIGKILL, exiting or a zombie),
/// odd rounds after it (the child is gone, its file not yet closed).
#[test]
fn store_reopens_at_once_after_its_server_is_sigkilled() {
    let Some((dir, path)) = parent_store() else { return };
    let started = Instant::now();
    let mut n_waited = 0;
    for round in 0..RESTART_ROUNDS {
        let mut child = ChildGuard::start(dir.path(), &path, "write", &format!("writer-{round}"));
        let pid = child.pid();
        // Let the writes get going: kill with requests in the ring.
        std::thread::sleep(Duration::from_millis(10 + round * 17 % 50));
        child.kill();
        let reaped = round % 2 == 1;
        if reaped {
            child.reap();
        }
        let open_started = Instant::now();
        let (result, log) = open_logged(&path);
        let took = open_started.elapsed();
        let store = result.unwrap_or_else(|e| {
            panic!("round {round}: reopening right after SIGKILL failed after {took:?}: {e}\nlog:\n{log}")
        });
        let waited = log.contains(WAIT_LOG);
        n_waited += u64::from(waited);
        println!(
            "round {round}: child {pid} killed, {} reaped; reopened in {took:?}{}",
            if reaped { "then" } else { "not yet" },
            if waited { " after waiting for its lock" } else { "" }
        );
        if waited {
            print!("{log}");
        }
        store.close().expect("close");
        if !reaped {
            child.reap();
        }
    }
    println!(
        "lock_wait: in {n_waited} of {RESTART_ROUNDS} rounds the killed child still held the lock and open waited \
         for it ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}
