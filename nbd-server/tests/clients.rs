//! Real NBD clients against the server: qemu-io, qemu-img and nbdinfo (libnbd). A missing tool
//! fails the test (`.ci/run` installs them). Every process runs under `timeout`, so none outlives
//! its test even when the server misbehaves.

mod common;

use std::process::Command;

use common::*;

/// Runs `tool args…` under a 60 s timeout; returns (exit code, stdout, stderr).
fn tool(tool: &str, args: &[&str]) -> (i32, String, String) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().expect("sh");
    assert!(found.status.success(), "{tool} is not installed; install it (see .ci/run: qemu-utils, libnbd-bin)");
    let out = Command::new("timeout").arg("60").arg(tool).args(args).output().expect("spawn");
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out.status.code().unwrap_or(-1), so, se)
}

fn ok(name: &str, args: &[&str]) -> String {
    let (code, so, se) = tool(name, args);
    assert_eq!(code, 0, "{name} {args:?} failed:\nstdout:\n{so}\nstderr:\n{se}");
    so
}

/// Starts a server over a real store on a runtime of its own, runs `body` (blocking tool calls)
/// on this thread, then shuts the server down gracefully and closes the store.
fn with_server(body: impl FnOnce(&TestServer)) {
    let rt = rt();
    let (store, dir) = file_store();
    let server = rt.block_on(TestServer::start(store.clone(), Some(dir)));
    body(&server);
    rt.block_on(server.stop()).expect("graceful stop");
    drop(rt);
    store.close().expect("close");
}

#[test]
fn qemu_io_patterns_fua_zeroes_discard_flush_and_aio_then_reread() {
    with_server(|s| {
        let uri = s.uri("vol");
        let out = ok(
            "qemu-io",
            &[
                "-t",
                "writeback",
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "write -f -P 0x11 4M 64k",
                "-c",
                "write -z 1M 1M",
                "-c",
                "read -P 0 1M 1M",
                "-c",
                "write -z -u 2M 1M",
                "-c",
                "discard 3M 1M",
                "-c",
                "flush",
                "-c",
                "aio_write -P 0x22 8M 64k",
                "-c",
                "aio_flush",
                "-c",
                "map",
                &uri,
            ],
        );
        assert!(!out.contains("failed"), "{out}");
        // A fresh process sees the data.
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0x11 4M 64k",
                "-c",
                "read -P 0x22 8M 64k",
                "-c",
                "read -P 0 1M 1M",
                &uri,
            ],
        );
        // And a wrong pattern is detected (the check above is not vacuous).
        let (code, _, _) = tool("qemu-io", &["-f", "raw", "-c", "read -P 0xac 0 4k", &uri]);
        assert_ne!(code, 0);
    });
}

#[test]
fn nbdinfo_json_list_map_and_can_flags() {
    with_server(|s| {
        let json = ok("nbdinfo", &["--json", &s.uri("vol")]);
        for needle in [
            "\"export-size\": 67108864",
            "\"can_multi_conn\": true",
            "\"can_flush\": true",
            "\"can_fua\": true",
            "\"can_trim\": true",
            "\"can_zero\": true",
            "\"can_fast_zero\": true",
            "\"can_cache\": true",
            "\"can_df\": true",
            "\"is_read_only\": false",
            "\"base:allocation\"",
            "\"block_size_maximum\": 33554432",
        ] {
            assert!(json.contains(needle), "nbdinfo --json lacks {needle}:\n{json}");
        }
        let list = ok("nbdinfo", &["--list", &s.uri("")]);
        assert!(list.contains("vol") && list.contains("ro"), "{list}");
        let map = ok("nbdinfo", &["--map", &s.uri("vol")]);
        assert!(map.contains("hole"), "{map}");
        for can in ["flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "df", "structured-reply"] {
            ok("nbdinfo", &["--can", can, &s.uri("vol")]);
        }
        ok("nbdinfo", &["--is", "read-only", &s.uri("ro")]);
        let (code, _, _) = tool("nbdinfo", &[&s.uri("nope")]);
        assert_eq!(code, 1, "a missing export fails");
    });
}

#[test]
fn qemu_img_convert_in_and_out_compares_identical() {
    with_server(|s| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let src = dir.path().join("src.img");
        // 8 MiB: random data, a zero gap, more data.
        let mut img = vec![0u8; 8 << 20];
        let mut x = 0x1234_5678_9abc_def1u64;
        for (i, b) in img.iter_mut().enumerate() {
            if (2 << 20..5 << 20).contains(&i) {
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&src, &img).unwrap();
        let uri = s.uri("vol");
        let src = src.to_str().unwrap();
        ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]);
        // The export is larger than the image: compare only the image's length.
        let out_path = dir.path().join("out.img");
        let out = out_path.to_str().unwrap();
        ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, out]);
        let back = std::fs::read(out).unwrap();
        assert_eq!(back.len() as u64, VOL_BYTES);
        assert!(back[..img.len()] == img[..], "round trip differs");
        assert!(back[img.len()..].iter().all(|&b| b == 0));
        ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", out, &uri]);
        let info = ok("qemu-img", &["info", "-f", "raw", &uri]);
        assert!(info.contains("64 MiB"), "{info}");
        ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    });
}
