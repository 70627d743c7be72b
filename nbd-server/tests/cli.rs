//! The command line as a new user meets it: a start that fails creates nothing, a missing store is
//! never created without `--create`, sizes mean what they say, and each failure names the cause
//! and the fix.

mod common;

use std::path::Path;
use std::process::Command;

use common::proc::Proc;
use common::tools::{can_run, missing_root, tool};

const BIN: &str = env!("CARGO_BIN_EXE_syncblock");

/// Runs `syncblock args…` to completion (every case here fails fast); returns (code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let (code, _, err) = tool(BIN, args);
    (code, err)
}

/// The directory's entries, hidden ones too.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_missing_store_is_created_only_with_create() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("data/store.img");
    let s = format!("--store={}", store.display());
    let (code, err) = run(&["serve", &s, "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("no store at") && err.contains("--create"), "{err}");
    assert!(entries(dir.path()).is_empty(), "nothing may be created: {:?}", entries(dir.path()));
    // `volume` never creates one either.
    let (code, err) = run(&["volume", "list", &s]);
    assert!(code != 0 && err.contains("serve --create"), "{err}");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn a_failed_start_leaves_nothing_behind_and_names_the_fix() {
    let (dir, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = dir.path().join("store.img");
    let s = format!("--store={}", store.display());
    // Too small: the message names the minimum.
    let (code, err) = run(&["serve", "--create", &s, "--size=1k", "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("too small") && err.contains("the minimum is"), "{err}");
    // Too large for the format.
    let (code, err) = run(&["serve", "--create", &s, "--size=100TiB", "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("at most 16 TiB"), "{err}");
    // The NBD port and the admin port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["serve", "--create", &s, "--size=1GiB", &format!("--listen={at}")]);
    assert!(code != 0 && err.contains("--listen"), "{err}");
    let (code, err) = run(&["serve", "--create", &s, "--size=1GiB", "--listen=127.0.0.1:0", &format!("--admin={at}")]);
    assert!(code != 0 && err.contains("--admin"), "{err}");
    // A replication setting that cannot work.
    let (code, err) = run(&["serve", "--create", &s, "--size=1GiB", "--listen=127.0.0.1:0", "--role=primary"]);
    assert!(code != 0, "{err}");
    assert!(entries(dir.path()).is_empty(), "a failed start left {:?}", entries(dir.path()));
    // The retry that works creates the store, and only it.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--create", &s, "--size=1GiB", "--listen=127.0.0.1:0"]);
    let p = Proc::spawn(cmd, &logs.path().join("serve.log"));
    p.wait_line("nbd://");
    assert_eq!(entries(dir.path()), ["store.img"]);
    p.stop();
    // And then serves it without --create.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", &s, "--listen=127.0.0.1:0"]);
    let p = Proc::spawn(cmd, &logs.path().join("serve.log"));
    p.wait_line("nbd://");
    p.stop();
}

#[test]
fn sizes_mean_what_they_say() {
    let (dir, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = dir.path().join("store.img");
    let s = format!("--store={}", store.display());
    // 100 MB is 10^8 bytes: not a whole number of blocks, refused with the nearest sizes that are.
    let (code, err) = run(&["serve", "--create", &s, "--size=2GB", "--volume=b:100 MB", "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("use 99999744 or 100003840 bytes"), "{err}");
    assert!(entries(dir.path()).is_empty());
    // 2 GB is 2 * 10^9 bytes; 100 MiB is 100 * 2^20; 4096 KB is 4096 * 1000.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--create", &s, "--size=2GB", "--volume=a:100MiB", "--volume=b:4096KB", "--listen=127.0.0.1:0"]);
    let p = Proc::spawn(cmd, &logs.path().join("serve.log"));
    let a = p.wait_line("nbd://");
    let b = p.wait_line("nbd://");
    p.stop();
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 2_000_000_000);
    assert!(a.ends_with("/a  (100MiB)"), "{a}");
    assert!(b.ends_with("/b  (4000KiB)"), "{b}");
    let (code, err) = run(&["serve", "--size=10XB", "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("powers of 1000"), "{err}");
}

#[test]
fn flags_are_refused_where_they_would_do_nothing() {
    for args in [
        &["witness", "--store=x"][..],
        &["status", "--admin=127.0.0.1:1", "--threads=2"],
        &["pair", "--store=x"],
        &["promote", "--admin=127.0.0.1:1", "--store=x"],
    ] {
        let (code, err) = run(args);
        assert!(code == 2 && err.contains("unexpected argument"), "{args:?}: {err}");
    }
    let (code, _, _) = tool(BIN, &["volume", "create", "--help"]);
    assert_eq!(code, 0);
}

/// `--create` formats a blank block device (all of it) and refuses one that holds data. Needs
/// root and loop devices: under CI their absence fails the test, elsewhere it skips.
#[test]
fn create_formats_a_blank_block_device_and_refuses_one_that_holds_data() {
    if !can_run("the block device test", missing_root("losetup", &["/dev/loop-control"]).as_deref()) {
        return;
    }
    let (dir, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    /// A loop device over a file, detached when dropped.
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let attach = |file: &Path| {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(64 << 20).unwrap();
    let used = dir.path().join("used.img");
    let mut data = vec![0u8; 64 << 20];
    data[512..520].copy_from_slice(b"EFI PART");
    std::fs::write(&used, &data).unwrap();
    let (blank_dev, used_dev) = (attach(&blank), attach(&used));

    let (code, err) = run(&["serve", "--create", "--store", &used_dev.0, "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("holds data but no syncblock store") && err.contains("wipefs"), "{err}");
    assert_eq!(std::fs::read(&used).unwrap(), data, "a device holding data was written to");

    let (code, err) = run(&["serve", "--store", &blank_dev.0, "--listen=127.0.0.1:0"]);
    assert!(code != 0 && err.contains("not a syncblock store"), "without --create: {err}");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--create", "--store", &blank_dev.0, "--listen=127.0.0.1:0"]);
    let p = Proc::spawn(cmd, &logs.path().join("serve.log"));
    let line = p.wait_line("nbd://");
    p.stop();
    assert!(line.ends_with("/default  (64MiB)"), "the default volume is as large as the device: {line}");
    // And it is a store now: served again without --create.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--store", &blank_dev.0, "--listen=127.0.0.1:0"]);
    let p = Proc::spawn(cmd, &logs.path().join("serve.log"));
    p.wait_line("nbd://");
    p.stop();
}
