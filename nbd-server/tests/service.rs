//! Running `syncblock` as a systemd service: the unit files in `dist/systemd/` pass
//! `systemd-analyze verify` without a warning, and the binary tells a `Type=notify` service manager
//! when it is ready (`READY=1`, once its ports answer) and when it stops (`STOPPING=1` on SIGTERM).
//! The service manager's side is played by a unix datagram socket named in `NOTIFY_SOCKET`, so no
//! running systemd is needed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::proc::{Proc, WAIT_MAX};
use common::tools::can_run;

const BIN: &str = env!("CARGO_BIN_EXE_syncblock");

/// The path the unit files give the binary (docs/operations.md installs it there).
const INSTALLED_BIN: &str = "/usr/local/bin/syncblock";

/// The unit files, each under the name systemd-analyze checks it as: the template as an instance.
const UNITS: &[(&str, &str)] =
    &[("syncblock@.service", "syncblock@a.service"), ("syncblock-witness.service", "syncblock-witness.service")];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd")
}

/// `systemd-analyze`, or None where it is missing and the test may skip (not under CI).
fn systemd_analyze() -> Option<&'static str> {
    const PATH: &str = "/usr/bin/systemd-analyze";
    if Path::new(PATH).exists() {
        return Some(PATH);
    }
    let why = format!("{PATH} is missing (package systemd; .ci/run installs it)");
    can_run("the unit file check", Some(&why));
    None
}

/// Writes each unit into `dir` with its ExecStart pointing at the binary under test (verify fails
/// on a command that is not there); `extra` is appended to every [Service] section.
fn write_units(dir: &Path, extra: &str) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|(file, as_name)| {
            let text = std::fs::read_to_string(units_dir().join(file)).unwrap();
            assert!(text.contains(&format!("ExecStart={INSTALLED_BIN} ")), "{file}: ExecStart is not {INSTALLED_BIN}");
            let text = text.replace(INSTALLED_BIN, BIN).replace("[Service]\n", &format!("[Service]\n{extra}"));
            let path = dir.join(as_name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// Runs `systemd-analyze verify` on `units`; returns (success, every line it printed).
fn verify(analyze: &str, units: &[PathBuf]) -> (bool, Vec<String>) {
    // --man=no: a missing man page (Documentation=man:…) is the machine's state, not our unit's.
    let out = Command::new("timeout")
        .arg("60")
        .arg(analyze)
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("run systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.lines().map(str::to_owned).collect())
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else { return };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    // The check is not vacuous: an unknown option in our units is reported, naming the unit.
    let bad = write_units(dir.path(), "NoSuchOption=1\n");
    let (_, lines) = verify(analyze, &bad);
    for (_, as_name) in UNITS {
        assert!(
            lines.iter().any(|l| l.contains(as_name) && l.contains("NoSuchOption")),
            "systemd-analyze verify did not report an unknown option in {as_name}; it printed:\n{}",
            lines.join("\n")
        );
    }

    let units = write_units(dir.path(), "");
    let (ok, lines) = verify(analyze, &units);
    // Lines about other units (a system's own, pulled in by After=) are not ours to fix: shown only.
    let ours: Vec<&String> = lines.iter().filter(|l| l.contains("syncblock")).collect();
    if lines.len() > ours.len() {
        eprintln!("systemd-analyze verify, about other units:\n{}", lines.join("\n"));
    }
    assert!(ok && ours.is_empty(), "systemd-analyze verify on dist/systemd:\n{}", lines.join("\n"));
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    /// Every datagram received so far, for failure messages.
    got: Vec<String>,
}

impl Manager {
    /// Waits for a datagram with the line `line`; returns it.
    fn wait_for(&mut self, line: &str) -> String {
        let deadline = Instant::now() + WAIT_MAX;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {line} notification within {WAIT_MAX:?}; received {:?}", self.got);
            self.socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.got.push(msg.clone());
                    if msg.lines().any(|l| l == line) {
                        return msg;
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("receiving notifications: {e}"),
            }
        }
    }
}

/// A datagram socket at a path (as systemd's /run/systemd/notify) and the NOTIFY_SOCKET value
/// naming it. The socket lives in the system temp dir: a unix socket path is limited to 107 bytes.
fn path_manager(dir: &Path) -> (Manager, String) {
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    (Manager { socket, got: Vec::new() }, path.to_str().unwrap().to_owned())
}

/// An abstract datagram socket (no file; NOTIFY_SOCKET starts with '@').
fn abstract_manager() -> (Manager, String) {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("syncblock-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
    (Manager { socket, got: Vec::new() }, format!("@{name}"))
}

fn status_line(msg: &str) -> &str {
    msg.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("no STATUS= in {msg:?}"))
}

/// The NBD greeting, read from `addr` right after READY=1: the port answers by then.
fn assert_nbd_answers(addr: &str) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to NBD at {addr} after READY=1: {e}"));
    s.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let mut greeting = [0u8; 16];
    s.read_exact(&mut greeting).expect("NBD greeting");
    assert_eq!(&greeting, b"NBDMAGICIHAVEOPT");
}

/// The admin endpoint answers GET /status.
fn assert_admin_answers(addr: &str) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to the admin endpoint {addr}: {e}"));
    s.set_read_timeout(Some(WAIT_MAX)).unwrap();
    write!(s, "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("admin reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "GET /status: {reply}");
}

#[test]
fn serve_notifies_ready_once_its_ports_answer_and_stopping_on_sigterm() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let (mut manager, notify_socket) = path_manager(sock_dir.path());
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--create", "--size", "1GiB", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--store"])
        .arg(data.path().join("s.img"))
        .env("NOTIFY_SOCKET", &notify_socket);
    let node = Proc::spawn(cmd, &data.path().join("serve.log"));

    let ready = manager.wait_for("READY=1");
    // Printed (and flushed) before the notification.
    let admin = node.wait_line("admin endpoint on http://");
    let admin = admin.split_whitespace().next().unwrap();
    let nbd = node.wait_line("nbd://");
    let nbd = nbd.split('/').next().unwrap();
    assert_eq!(status_line(&ready), format!("serving 1 volume(s) on nbd://{nbd}"));
    assert_nbd_answers(nbd);
    assert_admin_answers(admin);

    node.stop(); // SIGTERM, and a clean exit
    let stopping = manager.wait_for("STOPPING=1");
    assert_eq!(status_line(&stopping), "stopping");
}

#[test]
fn witness_notifies_ready_once_it_listens_and_stopping_on_sigterm() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut manager, notify_socket) = abstract_manager();
    let mut cmd = Command::new(BIN);
    cmd.args(["witness", "--listen", "127.0.0.1:0", "--state"])
        .arg(data.path().join("w.state"))
        .env("NOTIFY_SOCKET", &notify_socket);
    let witness = Proc::spawn(cmd, &data.path().join("witness.log"));

    let ready = manager.wait_for("READY=1");
    let addr = witness.wait_line("witness on ");
    assert_eq!(status_line(&ready), format!("witness on {addr}"));
    TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to the witness at {addr} after READY=1: {e}"));

    witness.stop();
    manager.wait_for("STOPPING=1");
}
