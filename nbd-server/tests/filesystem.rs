//! A real filesystem on an export, through the `syncblock` binary: nbdfuse shows the export as a
//! file, a loop device on that file carries ext4; files are written and synced, everything is torn
//! down, the server is restarted on the same store, `e2fsck -fn` finds the filesystem clean and
//! every file's sha256 matches.
//!
//! Needs root (losetup, mount), /dev/fuse, loop devices, libnbd-bin (nbdfuse) and e2fsprogs;
//! `.ci/run` installs the packages. Under CI (`CI` set) a missing prerequisite fails the test;
//! elsewhere the test says why and skips. Every command runs under `timeout` and every wait is
//! bounded; a guard unmounts, detaches and kills whatever is still set up, even after a panic.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::random_image;
use common::tools::{
    can_run, missing_root, missing_tool, ok, path, quiet, tool, umount_quietly, umount_retrying, wait_exit,
};

const VOLUME_BYTES: u64 = 256 << 20;
/// Longest wait for a process to start serving or to exit.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Some(why) = missing_root("losetup and mount", &["/dev/fuse", "/dev/loop-control"]) {
        return Some(why);
    }
    missing_tool(&[
        ("nbdfuse", "libnbd-bin"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("sha256sum", "coreutils"),
    ])
}

/// True if the test can run; panics under CI when it cannot, so CI never passes by skipping.
fn prerequisites_met() -> bool {
    can_run("the filesystem test", missing_prerequisite().as_deref())
}

/// Something set up that must be undone.
enum Held {
    /// `stop`: the signal that asks it to exit (None: it exits on its own once its mount is gone).
    Process {
        name: &'static str,
        child: Child,
        stop: Option<i32>,
        log: PathBuf,
    },
    Mount(PathBuf),
    Loop(String),
}

/// What the test has set up, oldest first. Dropping it undoes everything left, newest first, by
/// force and without panicking.
#[derive(Default)]
struct Setup(Vec<Held>);

impl Setup {
    /// Undoes the newest item and checks that it worked. On failure the item stays, so that the
    /// panic's `drop` still forces it away.
    fn release(&mut self) {
        match self.0.last_mut().expect("something to release") {
            Held::Mount(dir) => umount_retrying(dir),
            Held::Loop(dev) => {
                ok("losetup", &["-d", dev]);
            }
            Held::Process { name, child, stop, log } => {
                if let Some(signal) = *stop {
                    // SAFETY: kill has no memory preconditions; the pid is our child, not yet reaped.
                    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
                }
                let status = wait_exit(child, WAIT_MAX);
                let shown = std::fs::read_to_string(&*log).unwrap_or_default();
                let status = status.unwrap_or_else(|| panic!("{name} did not exit within {WAIT_MAX:?}:\n{shown}"));
                assert!(status.success(), "{name} exited with {status}:\n{shown}");
            }
        }
        self.0.pop();
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        while let Some(held) = self.0.pop() {
            match held {
                Held::Mount(dir) => umount_quietly(&dir),
                Held::Loop(dev) => {
                    quiet("losetup", &["-d", &dev]);
                }
                Held::Process { name, mut child, log, .. } => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if std::thread::panicking() {
                        let shown = std::fs::read_to_string(&log).unwrap_or_default();
                        eprintln!("--- {name} log ---\n{shown}");
                    }
                }
            }
        }
    }
}

/// Every path the test uses, under one temp dir in the target directory.
struct Paths {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    fuse_dir: PathBuf,
    mount_dir: PathBuf,
}

impl Paths {
    fn new() -> Paths {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let root = dir.path().to_path_buf();
        let (fuse_dir, mount_dir) = (root.join("fuse"), root.join("mnt"));
        std::fs::create_dir(&fuse_dir).unwrap();
        std::fs::create_dir(&mount_dir).unwrap();
        // The documented file format, with relative paths (resolved against the file's directory)
        // and a TCP port the kernel picks, so parallel tests never collide.
        let config = root.join("syncblock.toml");
        std::fs::write(
            &config,
            format!(
                "store = \"store.img\"\ncreate = true\nstore_size = \"1GiB\"\nlisten = \"127.0.0.1:0\"\nunix = \"nbd.sock\"\n\n\
                 [[volume]]\nname = \"fs\"\nsize = {VOLUME_BYTES}\n"
            ),
        )
        .unwrap();
        Paths { socket: root.join("nbd.sock"), config, fuse_dir, mount_dir, root, _dir: dir }
    }
}

/// Starts `syncblock serve --config …` and waits until it prints its unix-socket URI, which it does
/// once its listeners are bound.
fn start_server(setup: &mut Setup, paths: &Paths) {
    let log = paths.root.join("server.log");
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncblock"))
        .arg("serve")
        .arg("--config")
        .arg(&paths.config)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn syncblock");
    let stdout = child.stdout.take().unwrap();
    setup.0.push(Held::Process { name: "syncblock serve", child, stop: Some(libc::SIGTERM), log });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("nbd+unix:///fs?socket=") => return,
            Ok(_) => {}
            Err(e) => panic!("syncblock serve printed no nbd+unix URI ({e})"),
        }
    }
}

/// Starts nbdfuse on the export and waits until it has written its pid file, which it does once
/// the FUSE file is ready; returns the path of that file.
fn start_nbdfuse(setup: &mut Setup, paths: &Paths) -> PathBuf {
    let pid_file = paths.root.join("nbdfuse.pid");
    let _ = std::fs::remove_file(&pid_file);
    let log = paths.root.join("nbdfuse.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let file = paths.fuse_dir.join("disk");
    let uri = format!("nbd+unix:///fs?socket={}", paths.socket.display());
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pid_file)
        .arg(&file)
        .arg(&uri)
        .env("PATH", path())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn nbdfuse");
    setup.0.push(Held::Process { name: "nbdfuse", child, stop: None, log });
    let deadline = Instant::now() + WAIT_MAX;
    while !std::fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty()) {
        if let Some(Held::Process { child, .. }) = setup.0.last_mut() {
            assert!(child.try_wait().unwrap().is_none(), "nbdfuse exited before it was ready");
        }
        assert!(Instant::now() < deadline, "nbdfuse not ready within {WAIT_MAX:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Unmounting the FUSE directory is what makes nbdfuse exit.
    setup.0.push(Held::Mount(paths.fuse_dir.clone()));
    let len = std::fs::metadata(&file).expect("the nbdfuse file").len();
    assert_eq!(len, VOLUME_BYTES);
    file
}

/// Server, nbdfuse, loop device: returns the loop device.
fn attach(setup: &mut Setup, paths: &Paths) -> String {
    start_server(setup, paths);
    let file = start_nbdfuse(setup, paths);
    let dev = ok("losetup", &["--find", "--show", file.to_str().unwrap()]).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    setup.0.push(Held::Loop(dev.clone()));
    dev
}

fn mount(setup: &mut Setup, dev: &str, dir: &Path) {
    ok("mount", &["-t", "ext4", dev, dir.to_str().unwrap()]);
    setup.0.push(Held::Mount(dir.to_path_buf()));
}

/// Unmounts the filesystem, detaches the loop device, unmounts FUSE (nbdfuse exits), stops the
/// server with SIGTERM: each checked.
fn detach(setup: &mut Setup) {
    for _ in 0..5 {
        setup.release();
    }
    assert!(setup.0.is_empty());
}

/// `sha256sum` of every file under `dir`, sorted by path: a listing that also catches a missing
/// or an extra file.
fn checksums(dir: &Path) -> String {
    let script = format!("cd '{}' && find . -type f | LC_ALL=C sort | xargs sha256sum", dir.display());
    ok("sh", &["-c", &script])
}

/// A few MiB of random data, and many small files of assorted sizes in a few directories.
fn write_files(root: &Path) -> usize {
    std::fs::write(root.join("big.bin"), random_image(1, 6 << 20)).unwrap();
    std::fs::write(root.join("odd.bin"), random_image(2, (3 << 20) + 4097)).unwrap();
    let mut n_files = 2;
    for d in 0..8 {
        let dir = root.join(format!("dir{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..50u64 {
            let len = ((f * 997 + d * 131) % 9000) as usize;
            std::fs::write(dir.join(format!("f{f}")), random_image(1000 * d + f + 3, len)).unwrap();
            n_files += 1;
        }
    }
    n_files
}

#[test]
fn ext4_on_nbdfuse_survives_a_server_restart_fsck_clean_with_matching_checksums() {
    if !prerequisites_met() {
        return;
    }
    let paths = Paths::new();
    let mut setup = Setup::default();

    let dev = attach(&mut setup, &paths);
    ok("mkfs.ext4", &["-q", "-F", &dev]);
    mount(&mut setup, &dev, &paths.mount_dir);
    let n_files = write_files(&paths.mount_dir);
    let before = checksums(&paths.mount_dir);
    assert_eq!(before.lines().count(), n_files, "{before}");
    ok("sync", &["-f", paths.mount_dir.to_str().unwrap()]);
    detach(&mut setup);

    // A new server process over the same store; the data comes back from the engine.
    let dev = attach(&mut setup, &paths);
    let (code, so, se) = tool("e2fsck", &["-fn", &dev]);
    assert_eq!(code, 0, "e2fsck -fn found problems:\n{so}\n{se}");
    mount(&mut setup, &dev, &paths.mount_dir);
    let after = checksums(&paths.mount_dir);
    assert!(before == after, "checksums differ after the restart:\nbefore:\n{before}\nafter:\n{after}");
    detach(&mut setup);
}
