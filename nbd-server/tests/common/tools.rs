//! Running external tools from tests: each under `timeout`, with the system directories first in
//! PATH; a missing tool fails the test, naming the package that provides it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `tool args…` under a 60 s timeout; returns (exit code, stdout, stderr).
pub fn tool(tool: &str, args: &[&str]) -> (i32, String, String) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).env("PATH", path()).output().expect("sh");
    assert!(
        found.status.success(),
        "{tool} is not installed; install it (see .ci/run: qemu-utils, libnbd-bin, python3-libnbd, fio, e2fsprogs)"
    );
    let out = Command::new("timeout").arg("60").arg(tool).args(args).env("PATH", path()).output().expect("spawn");
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out.status.code().unwrap_or(-1), so, se)
}

/// PATH with the system directories first: `nbdsh` runs `python3 -mnbd`, and the `nbd` module of
/// python3-libnbd belongs to the system Python, not to whatever python3 (pyenv, venv) comes first.
pub fn path() -> String {
    format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default())
}

pub fn ok(name: &str, args: &[&str]) -> String {
    let (code, so, se) = tool(name, args);
    assert_eq!(code, 0, "{name} {args:?} failed:\nstdout:\n{so}\nstderr:\n{se}");
    so
}

/// The first of `tools` (name, Debian package) that is not installed, as a message naming the
/// package; None when all are.
pub fn missing_tool(tools: &[(&str, &str)]) -> Option<String> {
    tools.iter().find_map(|(name, package)| {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).env("PATH", path()).output();
        (!found.is_ok_and(|o| o.status.success()))
            .then(|| format!("{name} is not installed (package {package}; .ci/run installs it)"))
    })
}

/// Runs a cleanup command, bounded, ignoring failure; true if it succeeded.
pub fn quiet(cmd: &str, args: &[&str]) -> bool {
    let out = Command::new("timeout").args(["-k", "5", "20", cmd]).args(args).env("PATH", path()).output();
    out.is_ok_and(|o| o.status.success())
}

/// Waits up to `max` for `child` to exit; its status, or None if it still runs.
pub fn wait_exit(child: &mut Child, max: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + max;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `program args…` for at most `max` (under `timeout`); returns (exit code, stdout, stderr).
pub fn run(max: Duration, program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("timeout")
        .args(["--kill-after=5", &format!("{}", max.as_secs())])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn timeout");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Calls `probe` every `every` until it returns `Ok`, for at most `max`; the failure names `what`
/// and the last error.
pub fn wait_until<T>(every: Duration, what: &str, max: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + max;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: not within {max:?}; last: {e}"),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Whether this runs under CI (`CI` set, and not to `false` or `0`): there a test whose
/// prerequisites are missing fails instead of skipping, so CI never passes by skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// True if `what` can run here (`missing` is None); otherwise panics under CI, or says why it
/// skips and returns false.
pub fn can_run(what: &str, missing: Option<&str>) -> bool {
    let Some(why) = missing else { return true };
    assert!(!in_ci(), "{what} cannot run in CI: {why}");
    eprintln!("skipping {what}: {why}");
    false
}

/// Why this process cannot do what needs root and `devices`, if it cannot: not root (`for_what`
/// says what root is for), or a device node missing.
pub fn missing_root(for_what: &str, devices: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(format!("needs root for {for_what}"));
    }
    devices
        .iter()
        .find(|d| !std::path::Path::new(d).exists())
        .map(|d| format!("{d} is missing (a container without FUSE or loop devices?)"))
}

/// fio's crc32c workload on the 8 MiB at `offset` of `uri` (4 KiB random writes 16 deep, seed 77,
/// an fsync at the end), job `name`: `mode` `--do_verify=1` writes and then verifies, and
/// `--verify_only` checks a region written earlier with the same seed.
pub fn fio_crc32c_args(name: &str, uri: &str, offset: &str, mode: &str) -> Vec<String> {
    let args: [&str; 13] = [
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--offset={offset}"),
        "--size=8M",
        "--iodepth=16",
        "--verify=crc32c",
        "--randseed=77",
        "--end_fsync=1",
        "--verify_state_save=0",
        mode,
    ];
    args.iter().map(|a| a.to_string()).collect()
}

/// Unmounts `dir`, retrying for up to 10 s: a loop device detached a moment ago may still hold the
/// file system.
pub fn umount_retrying(dir: &std::path::Path) {
    let d = dir.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tool("umount", &[d]).0 != 0 {
        assert!(Instant::now() < deadline, "umount {d} keeps failing");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Unmounts `dir` in a cleanup, lazily if a plain unmount fails; never panics.
pub fn umount_quietly(dir: &std::path::Path) {
    let d = dir.to_str().unwrap_or_default();
    if !quiet("umount", &[d]) {
        quiet("umount", &["-l", d]);
    }
}
