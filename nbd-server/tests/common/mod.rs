//! Test harness: an in-process server on 127.0.0.1:0 over a fresh store, and a small hand-written
//! NBD client that speaks the wire format byte by byte (independent of the server's encoders).
#![allow(dead_code)]

pub mod cluster;
pub mod pair;
pub mod pki;
pub mod proc;
pub mod rng;
pub mod tools;

use std::net::SocketAddr;

use syncblock_engine::sim::{Rng, SimDevice, SimDisk};
use syncblock_engine::{Config, CreateOptions, Store};
use syncblock_nbd::{Listener, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const VOL_BYTES: u64 = 64 << 20;

/// A running server. Dropping it without `stop` still ends everything: the runtime it lives on
/// owns its tasks, and the store's last handle stops the engine thread.
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), syncblock_nbd::ServerError>>>,
    _dir: Option<tempfile::TempDir>,
}

pub fn sim_store() -> Store {
    let disk = SimDisk::formatted(128 << 20, 1 << 20).expect("format");
    Store::open_device(Box::new(SimDevice::new(disk)), Config::default(), "sim").expect("open")
}

/// A real io_uring store in a temp dir under the target directory (not /tmp, which may be tmpfs).
pub fn file_store() -> (Store, tempfile::TempDir) {
    file_store_sized(512 << 20)
}

/// `file_store` with a store file of `size_bytes` (sparse: it costs only what is written).
pub fn file_store_sized(size_bytes: u64) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let opts = CreateOptions { size_bytes, ..CreateOptions::default() };
    let store = Store::create(&dir.path().join("store.img"), &opts, Config::default()).expect("create store");
    (store, dir)
}

/// The volumes `TestServer::start` creates: "vol" read-write, "ro" read-only.
pub const TEST_VOLUMES: &[(&str, u64)] = &[("vol", VOL_BYTES), ("ro", 1 << 20)];

/// "vol" is the default export, "ro" is read-only.
pub fn test_config() -> ServerConfig {
    ServerConfig { default_export: Some("vol".into()), read_only: vec!["ro".into()], ..ServerConfig::default() }
}

impl TestServer {
    /// Must be called inside a tokio runtime (with `enable_all`).
    pub async fn start(store: Store, dir: Option<tempfile::TempDir>) -> TestServer {
        TestServer::start_with(store, dir, TEST_VOLUMES, test_config()).await
    }

    /// Creates `volumes` (name, bytes), then serves them with `config`.
    pub async fn start_with(
        store: Store,
        dir: Option<tempfile::TempDir>,
        volumes: &[(&str, u64)],
        config: ServerConfig,
    ) -> TestServer {
        for &(name, size) in volumes {
            store.create_volume(name, size).await.expect("volume");
        }
        TestServer::start_existing_with(store, dir, config).await
    }

    /// Serves a store whose volumes `start` already created (a restart on the same store).
    pub async fn start_existing(store: Store, dir: Option<tempfile::TempDir>) -> TestServer {
        TestServer::start_existing_with(store, dir, test_config()).await
    }

    pub async fn start_existing_with(store: Store, dir: Option<tempfile::TempDir>, config: ServerConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(syncblock_nbd::serve(store.clone(), config, vec![Listener::Tcp(listener)], async {
            let _ = rx.await;
        }));
        TestServer { addr, store, stop: Some(tx), task: Some(task), _dir: dir }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), syncblock_nbd::ServerError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.expect("server task")
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// `len` pseudo-random bytes (the simulator's `Rng` from `seed`): incompressible, so a copy that
/// drops or shifts a block cannot compare equal by accident.
pub fn random_image(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    v.truncate(len);
    v
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

// ---- The client ----------------------------------------------------------------------------

pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub struct Client {
    pub s: TcpStream,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
}

/// Connects and checks the greeting; returns the raw stream before client flags are sent.
pub async fn greet(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&g[16..], &[0, 3], "FIXED_NEWSTYLE|NO_ZEROES");
    s
}

pub async fn send_option<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// (option, reply type, payload)
pub async fn read_option_reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REP_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, typ, d)
}

pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (export.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Fixed newstyle + GO, optionally with structured replies and base:allocation.
pub async fn connect(addr: SocketAddr, export: &str, structured: bool, meta: bool) -> Client {
    let mut s = greet(addr).await;
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    if structured {
        send_option(&mut s, 8, &[]).await;
        assert_eq!(read_option_reply(&mut s).await.1, 1);
    }
    if meta {
        send_option(&mut s, 10, &meta_payload(export, &["base:allocation"])).await;
        let (_, typ, d) = read_option_reply(&mut s).await;
        assert_eq!(typ, 4);
        assert_eq!(&d[..4], &1u32.to_be_bytes());
        assert_eq!(read_option_reply(&mut s).await.1, 1);
    }
    send_option(&mut s, 7, &info_payload(export, &[3])).await;
    let (mut size, mut flags) = (0, 0);
    loop {
        let (_, typ, d) = read_option_reply(&mut s).await;
        match typ {
            3 if d[..2] == [0, 0] => {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
            }
            3 => {}
            1 => break,
            other => panic!("GO failed with reply type {other:#x}: {}", String::from_utf8_lossy(&d)),
        }
    }
    Client { s, structured, size, flags }
}

/// One reply chunk (a simple reply is returned as type u16::MAX with its error in `error`).
#[derive(Debug)]
pub struct Chunk {
    pub cookie: u64,
    pub flags: u16,
    pub kind: u16,
    pub error: u32,
    pub payload: Vec<u8>,
}

impl Client {
    pub async fn send(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply or structured chunk. For a simple reply to a READ, `read_len` bytes
    /// of data follow on success.
    pub async fn recv(&mut self, read_len: usize) -> Chunk {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.expect("reply");
        match u32::from_be_bytes(m) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).await.unwrap();
                let error = u32::from_be_bytes(h[..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..].try_into().unwrap());
                let mut payload = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut payload).await.unwrap();
                Chunk { cookie, flags: 1, kind: u16::MAX, error, payload }
            }
            0x668e_33ef => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).await.unwrap();
                let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
                let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..].try_into().unwrap());
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).await.unwrap();
                let error = if kind & 0x8000 != 0 { u32::from_be_bytes(payload[..4].try_into().unwrap()) } else { 0 };
                Chunk { cookie, flags, kind, error, payload }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Sends a command and waits for its (only) reply; returns the errno.
    pub async fn cmd(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        self.send(flags, cmd, 7, offset, len, data).await;
        let c = self.recv(0).await;
        assert_eq!(c.cookie, 7);
        assert_eq!(c.flags & 1, 1, "single-chunk reply must be DONE");
        c.error
    }

    /// READ; returns the bytes, reassembled from chunks (holes as zeros), and the chunk kinds.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<(Vec<u8>, Vec<u16>), u32> {
        self.send(0, 0, 9, offset, len, &[]).await;
        if !self.structured {
            let c = self.recv(len as usize).await;
            return if c.error == 0 { Ok((c.payload, vec![])) } else { Err(c.error) };
        }
        let mut out = vec![0xeeu8; len as usize];
        let mut kinds = Vec::new();
        loop {
            let c = self.recv(0).await;
            assert_eq!(c.cookie, 9);
            kinds.push(c.kind);
            if c.error != 0 {
                return Err(c.error);
            }
            match c.kind {
                1 => {
                    let off = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                    let at = (off - offset) as usize;
                    out[at..at + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
                }
                2 => {
                    let off = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    let at = (off - offset) as usize;
                    out[at..at + n].fill(0);
                }
                0 => {}
                k => panic!("unexpected chunk type {k}"),
            }
            if c.flags & 1 != 0 {
                return Ok((out, kinds));
            }
        }
    }
}
