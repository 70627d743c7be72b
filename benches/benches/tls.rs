//! What a TLS record costs on each of syncblock's two stacks (replicator/src/tls), in process and
//! in memory (a `tokio::io::duplex` pipe: no sockets, no system calls), so that the figure is
//! the stacks' CPU time alone: one iteration is a 4 KiB NBD-sized request from client to server
//! and a 16-byte reply back, each its own record, encrypted and decrypted once, on one thread.
//!
//! - `rustls`: a server and a client with certificates only (what serves certificate links).
//! - `openssl`: the same certificates plus a PSK file on both sides, so that the client offers a
//!   PSK and the server hands it to OpenSSL (what serves PSK links, and served every link before).
//!
//! Credentials are made with the `openssl` command, as docs/security.md shows.
//!
//!   cargo bench -p syncblock-benches --bench tls

use std::path::Path;
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use syncblock_replicator::tls::{Tls, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REQUEST_BYTES: usize = 4096 + 28;
const REPLY_BYTES: usize = 16;

fn make_pki(dir: &Path) {
    let script = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
         -subj '/CN=bench CA' -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
         for n in server client; do
           openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$n \
             -keyout $n-key.pem -out $n.csr 2>/dev/null
           printf 'extendedKeyUsage=serverAuth,clientAuth\\n' > $n.ext
           openssl x509 -req -in $n.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
             -extfile $n.ext -out $n-cert.pem 2>/dev/null
         done
         echo client:$(openssl rand -hex 32) > keys.psk";
    let ok = Command::new("sh").arg("-ec").arg(script).current_dir(dir).status().expect("sh");
    assert!(ok.success(), "making credentials needs the openssl command");
}

fn files(dir: &Path, who: &str, psk: bool) -> TlsFiles {
    TlsFiles {
        cert: Some(dir.join(format!("{who}-cert.pem"))),
        key: Some(dir.join(format!("{who}-key.pem"))),
        ca: Some(dir.join("ca-cert.pem")),
        psk: psk.then(|| dir.join("keys.psk")),
    }
}

fn tls(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("tls");
    group.throughput(Throughput::Bytes(REQUEST_BYTES as u64));
    for (stack, psk) in [("rustls", false), ("openssl", true)] {
        let server = Tls::load(&files(dir.path(), "server", psk), None).expect("server credentials");
        let client = Tls::load_client(&files(dir.path(), "client", psk), None).expect("client credentials");
        let (a, b) = tokio::io::duplex(1 << 20);
        let (mut s, mut c) = rt.block_on(async {
            let (s, c) = tokio::join!(server.accept(a), client.connect(b, None));
            (s.expect("server handshake").0, c.expect("client handshake"))
        });
        assert_eq!(s.stack(), if psk { "OpenSSL" } else { "rustls" });
        let request = vec![0x5a; REQUEST_BYTES];
        let mut got = vec![0; REQUEST_BYTES];
        let reply = [0u8; REPLY_BYTES];
        let mut got_reply = [0u8; REPLY_BYTES];
        group.bench_function(format!("4k_request_and_reply/{stack}"), |bench| {
            bench.iter(|| {
                rt.block_on(async {
                    c.write_all(&request).await.unwrap();
                    c.flush().await.unwrap();
                    s.read_exact(&mut got).await.unwrap();
                    s.write_all(&reply).await.unwrap();
                    s.flush().await.unwrap();
                    c.read_exact(&mut got_reply).await.unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tls);
criterion_main!(benches);
