//! A replicated pair with every link under TLS: NBD (required), replication and witness (mutual,
//! each node proving its node name), and the admin endpoint (callers must present credentials).
//! The pair replicates, fails over when its primary is killed, and keeps every write; impostors
//! and callers without credentials are refused with the reason.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pair::{syncblock, Pair, PairSpec};
use common::pki::Pki;
use common::proc::{tail, wait_line};
use common::tools::{run, tool, wait_until};

const POLL: Duration = Duration::from_millis(200);
const REJOIN_MAX: Duration = Duration::from_secs(60);
const FAILOVER_MAX: Duration = Duration::from_secs(30);

/// qemu-io `cmds` on `uri` (nbds://host:port/vol) with the x509 credentials in `dir`.
fn qemu_io(uri: &str, dir: &Path, cmds: &[&str]) -> (i32, String, String) {
    let rest = uri.strip_prefix("nbds://").expect("a TLS URI");
    let (hostport, export) = rest.split_once('/').unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let mut a = vec![
        "--object".to_string(),
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()),
        "--image-opts".into(),
        format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
    ];
    for c in cmds {
        a.push("-c".into());
        a.push(c.to_string());
    }
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    tool("qemu-io", &args)
}

#[test]
fn pair_over_tls_replicates_fails_over_and_refuses_impostors() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pki = Pki::new(&dir.path().join("pki"), &["a", "b", "witness", "ops", "prom", "app1"]);
    let d = pki.dir.display().to_string();
    let flags: Vec<String> = vec![
        format!("--tls-cert={d}/{{node}}-cert.pem"),
        format!("--tls-key={d}/{{node}}-key.pem"),
        format!("--tls-ca={d}/ca-cert.pem"),
        // Each node names its peer: only it may connect as primary, and it must prove the name.
        "--peer-node={peer}".into(),
        // And the witness must prove its name.
        "--witness-node=witness".into(),
        // The admin endpoint's access list: ops may do everything, prom only read.
        "--admin-allow=ops".into(),
        "--admin-allow=prom:ro".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let witness_flags = [
        format!("--tls-cert={d}/witness-cert.pem"),
        format!("--tls-key={d}/witness-key.pem"),
        format!("--tls-ca={d}/ca-cert.pem"),
        // Only the pair's nodes may ask the witness for anything, and only about their pair.
        "--allow=a,b".into(),
    ];
    let witness_flags: Vec<&str> = witness_flags.iter().map(String::as_str).collect();
    let client = [
        format!("--tls-cert={d}/ops-cert.pem"),
        format!("--tls-key={d}/ops-key.pem"),
        format!("--tls-ca={d}/ca-cert.pem"),
    ];
    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    let spec = PairSpec {
        store_size: "1GiB",
        volume_size: "64MiB",
        flags: &flags,
        witness_flags: &witness_flags,
        client_flags: &client,
        poll: POLL,
        rejoin_max: REJOIN_MAX,
    };
    // In sync means the replication link, the witness link and the admin endpoint all work over TLS.
    std::fs::create_dir_all(dir.path().join("pair")).unwrap();
    let mut pair = Pair::start(&dir.path().join("pair"), &spec);
    let ops = pki.client_dir("ops");
    let a_uri = pair.nodes[0].uri.clone();
    assert!(a_uri.starts_with("nbds://"), "{a_uri}");
    let (code, out, err) = qemu_io(&a_uri, &ops, &["write -f -P 0x6b 0 1M", "flush"]);
    assert_eq!(code, 0, "{out}{err}\n{}", pair.logs());

    // The admin endpoint refuses a caller without credentials, and one from another CA.
    let (code, _, err) =
        run(Duration::from_secs(30), env!("CARGO_BIN_EXE_syncblock"), &["status", "--admin", &pair.nodes[0].admin]);
    assert_ne!(code, 0, "status without credentials was answered");
    assert!(err.contains("TLS"), "the refusal should say TLS is required: {err}");
    // An admin command as `who` (its certificate), with `extra` flags.
    let admin_as = |who: &str, cmd: &str, extra: &[&str]| {
        let mut args = vec![
            cmd.to_string(),
            "--admin".into(),
            pair.nodes[0].admin.clone(),
            format!("--tls-cert={d}/{who}-cert.pem"),
            format!("--tls-key={d}/{who}-key.pem"),
            format!("--tls-ca={d}/ca-cert.pem"),
        ];
        args.extend(extra.iter().map(|e| e.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(Duration::from_secs(60), env!("CARGO_BIN_EXE_syncblock"), &args)
    };
    let (code, _, _) = admin_as("mallory", "status", &[]);
    assert_ne!(code, 0, "status with a certificate of another CA was answered");
    // The access list: prom reads but may not command; app1, signed by the same CA, is not on it.
    let (code, out, err) = admin_as("prom", "status", &[]);
    assert_eq!(code, 0, "a reader's status was refused: {out}{err}");
    let (code, out, err) = admin_as("prom", "verify", &[]);
    assert_ne!(code, 0, "a reader ran a verify: {out}");
    assert!(err.contains("may only read"), "{err}");
    let (code, _, err) = admin_as("app1", "status", &[]);
    assert_ne!(code, 0, "an identity not on the list read the status");
    assert!(err.contains("not on the admin access list"), "{err}");
    let (code, out, err) = admin_as("ops", "verify", &[]);
    assert_eq!(code, 0, "the operator's verify failed: {out}{err}");
    // --admin-node: the endpoint must be the node named; a's endpoint is not b.
    let (code, out, err) = admin_as("ops", "status", &["--admin-node=a"]);
    assert_eq!(code, 0, "status of a, expecting a: {out}{err}");
    let (code, _, err) = admin_as("ops", "status", &["--admin-node=b"]);
    assert_ne!(code, 0, "a's endpoint passed for b");
    assert!(err.contains(r#"certificate is for "a", not "b""#), "{err}");
    let a_log = std::fs::read_to_string(pair.root.join("a.log")).unwrap();
    assert!(a_log.contains("admin endpoint: refused POST /verify: identity \"prom\" may only read"), "{a_log}");

    // An impostor on b's replication port: a certificate from another CA is refused in the handshake.
    let imp_log = dir.path().join("impostor.log");
    let imp_store = dir.path().join("impostor.img");
    let mut imp_args = common::pair::serve_args(&imp_store, "1GiB", "64MiB");
    imp_args.extend([
        "--role=primary".to_string(),
        format!("--peer={}", pair.nodes[1].repl),
        "--node=mallory".into(),
        format!("--tls-cert={d}/mallory-cert.pem"),
        format!("--tls-key={d}/mallory-key.pem"),
        format!("--tls-ca={d}/rogue-ca-cert.pem"),
    ]);
    let imp = syncblock(&imp_log, &imp_args);
    wait_line(&imp, "nbd", &imp_log);
    let b_log = pair.root.join("b.log");
    wait_until(POLL, "b to refuse the impostor's handshake", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&b_log).unwrap_or_default();
        if text.contains("TLS handshake failed") {
            Ok(())
        } else {
            Err(tail(&b_log, 10))
        }
    });
    imp.stop();
    // b is still a's secondary, in sync.
    pair.wait_in_sync(0);

    // A node told to expect another name of its witness refuses the real one (signed by the CA).
    let w_log = dir.path().join("wrong-witness.log");
    let mut w_args = common::pair::serve_args(&dir.path().join("ww.img"), "1GiB", "64MiB");
    w_args.extend([
        "--role=primary".to_string(),
        "--peer=127.0.0.1:9".into(),
        "--repl-listen=127.0.0.1:0".into(),
        "--node=ops".into(),
        format!("--witness={}", pair.witness_addr),
        "--witness-node=elsewhere".into(),
        format!("--tls-cert={d}/ops-cert.pem"),
        format!("--tls-key={d}/ops-key.pem"),
        format!("--tls-ca={d}/ca-cert.pem"),
    ]);
    let ww = syncblock(&w_log, &w_args);
    wait_until(POLL, "the node to refuse its witness's name", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&w_log).unwrap_or_default();
        if text.contains(r#"certificate is for "witness", not "elsewhere""#) {
            Ok(())
        } else {
            Err(tail(&w_log, 10))
        }
    });
    ww.stop();

    // A node whose certificate is for another name does not start.
    let (code, _, err) = run(
        Duration::from_secs(30),
        env!("CARGO_BIN_EXE_syncblock"),
        &[
            "serve",
            "--create",
            "--store",
            dir.path().join("x.img").to_str().unwrap(),
            "--size=1GiB",
            "--role=secondary",
            "--repl-listen=127.0.0.1:0",
            "--node=b",
            &format!("--tls-cert={d}/a-cert.pem"),
            &format!("--tls-key={d}/a-key.pem"),
            &format!("--tls-ca={d}/ca-cert.pem"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("certificate is for \"a\" but this node is named \"b\""), "{err}");

    // Failover over TLS: kill a; b is promoted through the witness and serves what a acknowledged.
    pair.nodes[0].kill();
    pair.wait_promoted(1, "b promoted after a was killed", FAILOVER_MAX);
    let b_uri = pair.nodes[1].uri.clone();
    let (code, out, err) = qemu_io(&b_uri, &ops, &["read -P 0x6b 0 1M", "write -f -P 0x6c 1M 64k"]);
    assert!(code == 0 && !out.contains("Pattern verification failed"), "{out}{err}\n{}", pair.logs());
    // a returns as b's secondary and resyncs over TLS.
    pair.nodes[0].start();
    pair.wait_in_sync(1);
    pair.stop();
}
