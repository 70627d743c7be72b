//! A `syncblock` child process whose stdout lines a test can wait for; killed (SIGKILL) and reaped
//! when dropped, so a failing test leaves nothing running. Also the helpers every process test
//! needs: a free port, the end of a log.

use std::io::{BufRead, BufReader};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long to wait for a line, or for a clean exit after SIGTERM.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Spawns `cmd` with its stdout piped here (for [`Proc::wait_line`]) and its stderr appended
    /// to `log`.
    pub fn spawn(mut cmd: Command, log_path: &Path) -> Proc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().expect("spawn syncblock");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Proc { child, lines, log: log_path.to_path_buf() }
    }

    /// The rest of the first printed line that starts with `prefix`.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line[prefix.len()..].to_string(),
                Ok(_) => {}
                Err(e) => panic!(
                    "syncblock printed no line starting with {prefix:?} ({e}); its log ends:\n{}",
                    tail(&self.log, 20)
                ),
            }
        }
    }

    /// Sends `signal` (SIGSTOP and SIGCONT freeze and thaw the process: its sockets stay open and
    /// nothing answers on them, as with a host that hangs).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(r, 0, "kill({signal}): {}", std::io::Error::last_os_error());
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "syncblock exited with {status} after SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "syncblock did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An address nobody listens on now, for a process to bind later.
///
/// The port is taken from below the kernel's ephemeral range (`ip_local_port_range`), where
/// `bind(port 0)` never lands: a port picked here and released cannot be handed meanwhile to a
/// process binding port 0 (an NBD listener, an outgoing connection), which is how CI once lost a
/// node's replication address to another node's NBD listener. Within this range the picks are
/// spread by pid, time and a counter, and each is checked free by binding it.
pub fn free_port_addr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // A range of ports below the ephemeral ones, clear of the well-known ports.
    let (start, span) = if low > 12_000 { (low - 10_000, 10_000) } else { (1024, low.saturating_sub(1024).max(1)) };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let seed = std::process::id().wrapping_mul(2_654_435_761) ^ nanos;
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = start + seed.wrapping_add(n.wrapping_mul(7919)) % span;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap().to_string();
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The last `n` lines of a log file, without the colour codes of its log lines.
pub fn tail(log: &Path, n: usize) -> String {
    let raw = std::fs::read_to_string(log).unwrap_or_default();
    let mut text = String::with_capacity(raw.len());
    let mut rest = raw.as_str();
    while let Some(at) = rest.find("\x1b[") {
        text += &rest[..at];
        let code = &rest[at + 2..];
        rest = code.find('m').map_or("", |end| &code[end + 1..]);
    }
    text += rest;
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The rest of the first line `p` prints starting with `prefix`; fails with the end of `log` if
/// the process exits or stays silent.
pub fn wait_line(p: &Proc, prefix: &str, log: &Path) -> String {
    catch_unwind(AssertUnwindSafe(|| p.wait_line(prefix))).unwrap_or_else(|_| {
        // Its stdout is closed: give its last words a moment to reach the log.
        std::thread::sleep(Duration::from_millis(300));
        panic!("no line {prefix:?} from syncblock; its log {}:\n{}", log.display(), tail(log, 40))
    })
}
