//! TLS on NBD: real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) with X.509 and PSK, the
//! STARTTLS rules of the protocol, per-export access lists, refusals logged with their cause, and
//! clients that misbehave around the handshake. Credentials are made with openssl and psktool
//! (`common::pki`), as docs/security.md shows.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::proc::tail;
use common::tools::{ok, tool};
use common::*;
use syncblock_nbd::handshake::TlsMode;
use syncblock_nbd::server::AccessRule;
use syncblock_replicator::tls::{Tls, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

fn pki(dir: &Path) -> Pki {
    Pki::new(&dir.join("pki"), &["server", "app1", "backup", "other"])
}

/// The server's credentials: its certificate, the CA its clients' certificates must be signed by,
/// and with `psk` the PSK file. With a PSK file the server runs OpenSSL; with certificates only,
/// rustls (replicator/src/tls): the tests of certificate clients run on both.
fn server_tls(p: &Pki, psk: bool) -> std::sync::Arc<Tls> {
    let files = TlsFiles {
        cert: Some(p.cert("server")),
        key: Some(p.key("server")),
        ca: Some(p.ca()),
        psk: psk.then(|| p.psk()),
    };
    Tls::load(&files, None).expect("server credentials")
}

/// An in-process server over a real store with volumes "vol" (default) and "ro" (read-only) and
/// "open", with `tls_mode` and `access`, and the PSK file too if `psk`; runs `body`, then stops.
fn with_tls_server(
    dir: &Path,
    psk: bool,
    tls_mode: TlsMode,
    access: &[(&str, &str, bool)],
    body: impl FnOnce(&TestServer, &Pki),
) {
    let p = pki(dir);
    let mut acl: HashMap<String, Vec<AccessRule>> = HashMap::new();
    for (volume, identity, read_only) in access {
        acl.entry(volume.to_string())
            .or_default()
            .push(AccessRule { identity: identity.to_string(), read_only: *read_only });
    }
    let config = syncblock_nbd::ServerConfig { tls: Some(server_tls(&p, psk)), tls_mode, access: acl, ..test_config() };
    let rt = rt();
    let (store, sdir) = file_store();
    let volumes = [("vol", VOL_BYTES), ("ro", 1 << 20), ("open", 1 << 20)];
    let server = rt.block_on(TestServer::start_with(store.clone(), Some(sdir), &volumes, config));
    body(&server, &p);
    rt.block_on(server.stop()).expect("graceful stop");
    drop(rt);
    store.close().expect("close");
}

fn nbds(s: &TestServer, export: &str) -> String {
    format!("nbds://{}/{export}", s.addr)
}

fn x509_uri(s: &TestServer, p: &Pki, who: &str, export: &str) -> String {
    format!("{}?tls-certificates={}", nbds(s, export), p.client_dir(who).display())
}

fn psk_uri(s: &TestServer, who: &str, file: &Path, export: &str) -> String {
    format!("nbds://{who}@{}/{export}?tls-psk-file={}", s.addr, file.display())
}

/// qemu's `--object` and `--image-opts` for `export` over TLS with `creds` (an x509 or psk object).
fn qemu_opts(s: &TestServer, creds: &str, export: &str) -> [String; 4] {
    [
        "--object".into(),
        creds.into(),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0", s.addr.port()),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn x509_clients_write_and_read_back_through_starttls() {
    for psk in [true, false] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        x509_clients(dir.path(), psk);
    }
}

fn x509_clients(dir: &Path, psk: bool) {
    with_tls_server(dir, psk, TlsMode::Require, &[], |s, p| {
        let info = ok("nbdinfo", &[&x509_uri(s, p, "app1", "vol")]);
        assert!(info.contains("with TLS"), "{info}");
        // nbdcopy writes an image over TLS; qemu-img reads it back over TLS with its own client.
        let image = random_image(7, 4 << 20);
        let src = dir.join("in.img");
        std::fs::write(&src, &image).unwrap();
        ok("nbdcopy", &[src.to_str().unwrap(), &x509_uri(s, p, "app1", "vol")]);
        let back = dir.join("back.img");
        let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", p.client_dir("app1").display());
        let mut a = vec!["convert".to_string(), "-O".into(), "raw".into()];
        a.extend(qemu_opts(s, &creds, "vol"));
        a.push(back.to_str().unwrap().into());
        ok("qemu-img", &args(&a));
        let got = std::fs::read(&back).unwrap();
        assert!(got[..image.len()] == image[..], "qemu-img read back other bytes than nbdcopy wrote");
        // qemu-io: a FUA write, a flush, and the reads that must see them.
        let mut a: Vec<String> = ["-c", "write -f -P 0x5c 1M 64k", "-c", "flush", "-c", "read -P 0x5c 1M 64k"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(qemu_opts(s, &creds, "vol"));
        let out = ok("qemu-io", &args(&a));
        assert!(!out.contains("Pattern verification failed"), "{out}");
    });
}

#[test]
fn psk_clients_of_libnbd_and_qemu_read_and_write() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    with_tls_server(dir.path(), true, TlsMode::Require, &[], |s, p| {
        let info = ok("nbdinfo", &[&psk_uri(s, "app1", &p.psk(), "vol")]);
        assert!(info.contains("with TLS"), "{info}");
        let creds =
            format!("tls-creds-psk,id=tls0,dir={},username=backup,endpoint=client", p.psk_dir(&p.psk()).display());
        let mut a: Vec<String> =
            ["-c", "write -P 0x3e 0 1M", "-c", "read -P 0x3e 0 1M"].iter().map(|x| x.to_string()).collect();
        a.extend(qemu_opts(s, &creds, "vol"));
        let out = ok("qemu-io", &args(&a));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        // What qemu wrote, libnbd reads.
        let image = dir.path().join("psk.img");
        ok("nbdcopy", &[&psk_uri(s, "app1", &p.psk(), "vol"), image.to_str().unwrap()]);
        assert!(std::fs::read(&image).unwrap()[..1 << 20].iter().all(|&b| b == 0x3e));
    });
}

/// A server with certificates and a PSK file hands each client to the stack its first record
/// asks for: certificate clients to rustls, PSK clients to OpenSSL (rustls has no external PSK);
/// a server with certificates only runs rustls, one with a PSK file only OpenSSL. Each client
/// proves its identity either way.
#[test]
fn each_client_gets_the_tls_stack_its_credentials_need() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = pki(dir.path());
    let cert_client = TlsFiles { cert: Some(p.cert("app1")), key: Some(p.key("app1")), ca: Some(p.ca()), psk: None };
    let psk_client = TlsFiles { psk: Some(p.psk()), ..TlsFiles::default() };
    let psk_only = TlsFiles { psk: Some(p.psk()), ..TlsFiles::default() };
    let cases = [
        (server_tls(&p, true), &cert_client, "rustls"),
        (server_tls(&p, true), &psk_client, "OpenSSL"),
        (server_tls(&p, false), &cert_client, "rustls"),
        (Tls::load(&psk_only, None).unwrap(), &psk_client, "OpenSSL"),
    ];
    rt().block_on(async {
        for (case, (server, client, stack)) in cases.into_iter().enumerate() {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let accept = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                server.accept(s).await.map(|(s, id)| (s.stack(), id))
            });
            let tls = Tls::load_client(client, Some("app1").filter(|_| client.psk.is_some())).unwrap();
            let c = tls.connect(tokio::net::TcpStream::connect(addr).await.unwrap(), None).await.unwrap();
            let (got, id) = accept.await.unwrap().unwrap();
            assert_eq!(got, stack, "case {case}: the server's stack");
            assert_eq!(c.stack(), if client.psk.is_some() { "OpenSSL" } else { "rustls" }, "case {case}: the client's");
            assert_eq!(id.as_deref(), Some("app1"), "case {case}");
        }
    });
}

/// Greets, sends fixed-newstyle flags; the raw stream in negotiation.
async fn negotiating(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut c = greet(addr).await;
    c.write_all(&3u32.to_be_bytes()).await.unwrap();
    c
}

// libssl's, linked through openssl-sys, which does not declare it.
extern "C" {
    fn SSL_renegotiate(ssl: *mut openssl_sys::SSL) -> std::ffi::c_int;
}

/// A TLS 1.2 client (app1's certificate, and app1's PSK offered too, so that a server with a PSK
/// file hands it to OpenSSL) connected over `raw` and asking to renegotiate: its next handshake
/// step sends a new ClientHello.
async fn renegotiating(raw: tokio::net::TcpStream, p: &Pki) -> tokio_openssl::SslStream<tokio::net::TcpStream> {
    use foreign_types::ForeignTypeRef;
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_certificate_file(p.cert("app1"), SslFiletype::PEM).unwrap();
    b.set_private_key_file(p.key("app1"), SslFiletype::PEM).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    let keys = syncblock_replicator::tls::PskKeys::load(&p.psk()).unwrap();
    let key = keys.get("app1").unwrap().to_vec();
    // SslConnector's default list leaves PSK suites out.
    b.set_cipher_list("ECDHE-ECDSA-AES128-GCM-SHA256:PSK-AES128-GCM-SHA256").unwrap();
    b.set_psk_client_callback(move |_, _, id, k| {
        id[..5].copy_from_slice(b"app1\0");
        k[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let ssl = b.build().configure().unwrap().into_ssl("localhost").unwrap();
    let mut t = tokio_openssl::SslStream::new(ssl, raw).unwrap();
    std::pin::Pin::new(&mut t).connect().await.expect("TLS 1.2 handshake");
    // SAFETY: the pointer is the stream's live SSL; SSL_renegotiate only marks it to renegotiate.
    assert_eq!(unsafe { SSL_renegotiate(t.ssl().as_ptr()) }, 1);
    t
}

/// Whether the server closed the connection (EOF or reset) within `max`; what it sends before
/// (a TLS alert) is read and dropped.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, max: Duration) -> bool {
    let mut b = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + max;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[test]
fn require_mode_reveals_nothing_before_starttls_and_follows_the_spec_after() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    with_tls_server(dir.path(), true, TlsMode::Require, &[], |s, p| {
        let client = Tls::load_client(
            &TlsFiles { cert: Some(p.cert("app1")), key: Some(p.key("app1")), ca: Some(p.ca()), psk: None },
            None,
        )
        .unwrap();
        let rt = rt();
        rt.block_on(async {
            let mut c = negotiating(s.addr).await;
            for (opt, data) in [
                (OPT_LIST, vec![]),
                (OPT_INFO, info_payload("vol", &[])),
                (OPT_GO, info_payload("vol", &[])),
                (OPT_STRUCTURED_REPLY, vec![]),
                (99, vec![]),
            ] {
                send_option(&mut c, opt, &data).await;
                let (o, typ, msg) = read_option_reply(&mut c).await;
                assert_eq!((o, typ), (opt, REP_ERR_TLS_REQD), "option {opt}: {}", String::from_utf8_lossy(&msg));
                assert!(!String::from_utf8_lossy(&msg).contains("vol"), "an export name leaked before TLS");
            }
            send_option(&mut c, OPT_STARTTLS, b"x").await;
            assert_eq!(read_option_reply(&mut c).await.1, REP_ERR_INVALID, "STARTTLS takes no payload");
            // EXPORT_NAME before TLS cannot be answered with an error: the connection is closed.
            send_option(&mut c, 1, b"vol").await;
            assert!(closed_within(&mut c, Duration::from_secs(5)).await, "EXPORT_NAME before TLS must close");

            // With TLS: the exports appear, and a second STARTTLS is invalid.
            let mut c = negotiating(s.addr).await;
            send_option(&mut c, OPT_STARTTLS, &[]).await;
            assert_eq!(read_option_reply(&mut c).await.1, REP_ACK);
            let mut t = client.connect(c, None).await.expect("TLS handshake");
            send_option(&mut t, OPT_LIST, &[]).await;
            let mut names = Vec::new();
            loop {
                let (_, typ, d) = read_option_reply(&mut t).await;
                if typ == REP_ACK {
                    break;
                }
                assert_eq!(typ, REP_SERVER);
                let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&d[4..4 + len]).into_owned());
            }
            names.sort();
            assert_eq!(names, ["open", "ro", "vol"]);
            send_option(&mut t, OPT_STARTTLS, &[]).await;
            assert_eq!(read_option_reply(&mut t).await.1, REP_ERR_INVALID, "STARTTLS twice");
            send_option(&mut t, OPT_ABORT, &[]).await;
            assert_eq!(read_option_reply(&mut t).await.1, REP_ACK);
        });
        // A plaintext real client fails at once with the reason, not after a timeout.
        let started = Instant::now();
        let (code, _, err) = tool("nbdinfo", &[&s.uri("vol")]);
        assert_ne!(code, 0, "a plaintext client must not get the export");
        assert!(started.elapsed() < Duration::from_secs(10), "the refusal took {:?}", started.elapsed());
        assert!(err.contains("TLS") || err.contains("not supported"), "{err}");
    });
}

#[test]
fn tls_off_refuses_starttls_and_on_mode_serves_both_kinds_of_client() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Off: STARTTLS is refused with POLICY, and negotiation goes on in plaintext.
    let runtime = rt();
    let (store, sdir) = file_store();
    let server = runtime.block_on(TestServer::start(store.clone(), Some(sdir)));
    runtime.block_on(async {
        let mut c = negotiating(server.addr).await;
        send_option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(read_option_reply(&mut c).await.1, REP_ERR_POLICY);
        send_option(&mut c, OPT_GO, &info_payload("vol", &[])).await;
        assert_ne!(read_option_reply(&mut c).await.1 & (1 << 31), 1 << 31, "GO after a refused STARTTLS");
    });
    runtime.block_on(server.stop()).unwrap();
    drop(runtime);
    store.close().unwrap();

    // On: plaintext clients reach exports without an access list; one with a list answers
    // TLS_REQD until TLS is on, then serves the identities on it.
    with_tls_server(dir.path(), true, TlsMode::On, &[("vol", "app1", false)], |s, p| {
        ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4k", &s.uri("open")]);
        let rt = rt();
        rt.block_on(async {
            let mut c = negotiating(s.addr).await;
            send_option(&mut c, OPT_GO, &info_payload("vol", &[])).await;
            assert_eq!(read_option_reply(&mut c).await.1, REP_ERR_TLS_REQD);
        });
        ok("nbdinfo", &[&x509_uri(s, p, "app1", "vol")]);
    });
}

#[test]
fn access_lists_decide_who_opens_which_export_and_how() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let acl = [("vol", "app1", false), ("vol", "backup", true)];
    with_tls_server(dir.path(), true, TlsMode::Require, &acl, |s, p| {
        // app1 writes; backup reads what app1 wrote but cannot write; other cannot open it at all.
        let qemu_io = |who: &str, cmd: &str| {
            let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", p.client_dir(who).display());
            let mut a = vec!["-c".to_string(), cmd.to_string()];
            if cmd.starts_with("read") {
                a.push("-r".into());
            }
            a.extend(qemu_opts(s, &creds, "vol"));
            tool("qemu-io", &args(&a))
        };
        let (code, out, err) = qemu_io("app1", "write -P 0x42 0 64k");
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = qemu_io("backup", "read -P 0x42 0 64k");
        assert!(code == 0 && !out.contains("Pattern verification failed"), "{out}{err}");
        let info = ok("nbdinfo", &[&psk_uri(s, "backup", &p.psk(), "vol")]);
        assert!(info.contains("is_read_only: true"), "backup must get vol read-only:\n{info}");
        qemu_io("backup", "write -P 1 0 4k");
        let (code, out, err) = qemu_io("app1", "read -P 0x42 0 64k");
        assert!(
            code == 0 && !out.contains("Pattern verification failed"),
            "backup, read-only, changed vol:\n{out}{err}"
        );
        let (code, _, _) = tool("nbdinfo", &[&x509_uri(s, p, "other", "vol")]);
        assert_ne!(code, 0, "an identity not on the list opened vol");
        ok("nbdinfo", &[&x509_uri(s, p, "other", "open")]);
        // The list an identity sees holds only what it may open.
        let list = ok("nbdinfo", &["--list", &x509_uri(s, p, "other", "")]);
        assert!(!list.contains("export=\"vol\""), "vol listed to an identity that may not open it:\n{list}");
        assert!(list.contains("export=\"open\""), "{list}");
        // The mallory certificate (CN=app1 from another CA) is no key to app1's export.
        let (code, _, _) = tool("nbdinfo", &[&x509_uri(s, p, "mallory", "vol")]);
        assert_ne!(code, 0, "a certificate from another CA was accepted");
    });
}

#[test]
fn misbehaving_clients_around_the_handshake_are_cut_off_without_touching_others() {
    // The renegotiating client offers a PSK. A server with a PSK file hands it to OpenSSL, which
    // answers a renegotiation with a fatal handshake_failure. A server with certificates only
    // runs rustls, which has no renegotiation: it answers with a no_renegotiation warning (and a
    // second request with a fatal alert); OpenSSL's client then gives up and the connection
    // closes.
    for (psk, renegotiation_alert) in [(true, "alert handshake failure"), (false, "unexpected EOF")] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        misbehaving_clients(dir.path(), psk, renegotiation_alert);
    }
}

fn misbehaving_clients(dir: &Path, psk: bool, renegotiation_alert: &str) {
    let p = pki(dir);
    let config = syncblock_nbd::ServerConfig {
        tls: Some(server_tls(&p, psk)),
        tls_mode: TlsMode::Require,
        handshake_timeout: Duration::from_secs(2),
        ..test_config()
    };
    let client = Tls::load_client(
        &TlsFiles { cert: Some(p.cert("app1")), key: Some(p.key("app1")), ca: Some(p.ca()), psk: None },
        None,
    )
    .unwrap();
    let rt = rt();
    let (store, sdir) = file_store();
    let s = rt.block_on(TestServer::start_with(store.clone(), Some(sdir), TEST_VOLUMES, config));
    rt.block_on(async {
        // A client in transmission over TLS, kept through everything below.
        let mut good = negotiating(s.addr).await;
        send_option(&mut good, OPT_STARTTLS, &[]).await;
        assert_eq!(read_option_reply(&mut good).await.1, REP_ACK);
        let mut good = client.connect(good, None).await.unwrap();
        send_option(&mut good, OPT_GO, &info_payload("vol", &[])).await;
        while read_option_reply(&mut good).await.1 != REP_ACK {}

        // Garbage after STARTTLS's ack, where the TLS ClientHello belongs.
        let mut g = negotiating(s.addr).await;
        send_option(&mut g, OPT_STARTTLS, &[]).await;
        read_option_reply(&mut g).await;
        g.write_all(&[0x17; 600]).await.unwrap();
        assert!(closed_within(&mut g, Duration::from_secs(5)).await, "garbage instead of a handshake");
        // Garbage inside the handshake: a ClientHello record header and nonsense.
        let mut g = negotiating(s.addr).await;
        send_option(&mut g, OPT_STARTTLS, &[]).await;
        read_option_reply(&mut g).await;
        g.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40]).await.unwrap();
        g.write_all(&[0xee; 64]).await.unwrap();
        assert!(closed_within(&mut g, Duration::from_secs(5)).await, "a broken ClientHello");
        // A client that stalls mid-handshake is cut off by the negotiation timeout.
        let mut g = negotiating(s.addr).await;
        send_option(&mut g, OPT_STARTTLS, &[]).await;
        read_option_reply(&mut g).await;
        g.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        assert!(closed_within(&mut g, Duration::from_secs(6)).await, "a stalled handshake");
        // Garbage after the handshake, inside TLS.
        let mut g = negotiating(s.addr).await;
        send_option(&mut g, OPT_STARTTLS, &[]).await;
        read_option_reply(&mut g).await;
        let mut g = client.connect(g, None).await.unwrap();
        g.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(closed_within(&mut g, Duration::from_secs(5)).await, "garbage over TLS");

        // A TLS 1.2 client that asks to renegotiate after the handshake gets a fatal alert (not
        // the warning that would let it carry on) and is closed.
        let mut g = negotiating(s.addr).await;
        send_option(&mut g, OPT_STARTTLS, &[]).await;
        read_option_reply(&mut g).await;
        let mut r = renegotiating(g, &p).await;
        let e = std::pin::Pin::new(&mut r).do_handshake().await.expect_err("the server let a renegotiation run");
        assert!(e.to_string().contains(renegotiation_alert), "renegotiation refused how? {e}");
        assert!(closed_within(&mut r, Duration::from_secs(5)).await, "a renegotiating client");

        // A flood of connections that never negotiate: at most HANDSHAKES_MAX wait; the next is
        // closed at once; the client in transmission is untouched.
        let mut flood = Vec::new();
        for _ in 0..syncblock_nbd::server::HANDSHAKES_MAX {
            flood.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_secs(1)).await, "a connection past the handshake limit");

        // The good client reads and writes through it all (simple replies: no structured option).
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&[0, 0, 0, 1]); // flags 0, WRITE
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.extend_from_slice(&[0xa5; 4096]);
        good.write_all(&req).await.unwrap();
        let mut reply = [0u8; 16];
        good.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the write over TLS failed");
        assert_eq!(&reply[8..16], &7u64.to_be_bytes());

        // Once the flood's handshakes time out, new clients are served again.
        drop(flood);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = negotiating(s.addr).await;
        send_option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(read_option_reply(&mut c).await.1, REP_ACK);
    });
    rt.block_on(s.stop()).unwrap();
    drop(rt);
    store.close().unwrap();
}

/// The binary serving a new store `DIR/TAG.img` with the server's certificate and the CA, and the
/// PSK file if `psk`: the process, its log (`DIR/TAG.log`) and its `host:port`.
fn tls_serve(dir: &Path, tag: &str, p: &Pki, psk: bool) -> (common::proc::Proc, std::path::PathBuf, String) {
    let log = dir.join(format!("{tag}.log"));
    let mut a = common::pair::serve_args(&dir.join(format!("{tag}.img")), "1GiB", "64MiB");
    let mut creds = vec![("--tls-cert", p.cert("server")), ("--tls-key", p.key("server")), ("--tls-ca", p.ca())];
    if psk {
        creds.push(("--tls-psk", p.psk()));
    }
    for (flag, path) in creds {
        a.push(format!("{flag}={}", path.display()));
    }
    let server = common::pair::syncblock(&log, &a);
    let at = common::proc::wait_line(&server, "nbds://", &log);
    let base = at.split_whitespace().next().unwrap().split('/').next().unwrap().to_string();
    (server, log, base)
}

/// `nbdinfo` on `uri` fails, and the server's `log` names `cause` within 10 s.
fn refused_and_logged(what: &str, uri: &str, cause: &str, log: &Path) {
    let (code, _, _) = tool("nbdinfo", &[uri]);
    assert_ne!(code, 0, "{what} was accepted");
    common::tools::wait_until(
        Duration::from_millis(50),
        &format!("the log line for {what}"),
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(cause) {
                Ok(())
            } else {
                Err(tail(log, 10))
            }
        },
    );
}

/// The binary: refusals are logged with the cause an operator needs (wrong key, unknown identity,
/// untrusted or missing certificate), and a plaintext listener off loopback needs --insecure.
#[test]
fn refusals_name_their_cause_in_the_log() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = pki(dir.path());
    let (server, log, base) = tls_serve(dir.path(), "serve", &p, true);
    let uri = |user: &str, query: String| format!("nbds://{user}{base}/vol?{query}");
    let wrong = p.wrong_psk();
    let unknown = dir.path().join("unknown.psk");
    std::fs::write(&unknown, format!("carol:{}\n", "11".repeat(32))).unwrap();
    let mallory = p.client_dir("mallory");
    let no_cert = dir.path().join("nocert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(p.ca(), no_cert.join("ca-cert.pem")).unwrap();
    let certificate_refusals = |uri: &dyn Fn(&str, String) -> String| {
        [
            (
                "a certificate of another CA",
                uri("", format!("tls-certificates={}", mallory.display())),
                "certificate was refused",
            ),
            (
                "no certificate",
                uri("", format!("tls-certificates={}", no_cert.display())),
                "the client has no certificate",
            ),
        ]
    };
    let psk_refusals = [
        ("a wrong key", uri("app1@", format!("tls-psk-file={}", wrong.display())), "likely cause: a wrong key"),
        (
            "an unknown identity",
            uri("carol@", format!("tls-psk-file={}", unknown.display())),
            "unknown PSK identity \"carol\"",
        ),
    ];
    for (what, uri, cause) in psk_refusals.into_iter().chain(certificate_refusals(&uri)) {
        refused_and_logged(what, &uri, cause, &log);
    }
    ok("nbdinfo", &[&uri("app1@", format!("tls-psk-file={}", p.psk().display()))]);
    server.stop();

    // The same certificate refusals from a server with certificates only (rustls).
    let (server, log, base) = tls_serve(dir.path(), "serve-certs", &p, false);
    let uri = |user: &str, query: String| format!("nbds://{user}{base}/vol?{query}");
    for (what, uri, cause) in certificate_refusals(&uri) {
        refused_and_logged(what, &uri, cause, &log);
    }
    ok("nbdinfo", &[&uri("", format!("tls-certificates={}", p.client_dir("app1").display()))]);
    server.stop();

    // Plaintext on an address other hosts can reach: refused with the way out named.
    let (code, _, err) = common::tools::run(
        Duration::from_secs(30),
        env!("CARGO_BIN_EXE_syncblock"),
        &[
            "serve",
            "--create",
            "--store",
            dir.path().join("t.img").to_str().unwrap(),
            "--size=1GiB",
            "--listen=0.0.0.0:0",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--insecure") && err.contains("without TLS"), "{err}");
    assert!(!dir.path().join("t.img").exists(), "a refused start created the store");
}
