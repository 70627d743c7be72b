//! An in-memory network for simulation tests, with seeded faults: per-chunk delays (so a new
//! connection can overtake an old one still delivering), connection resets, and partitions between
//! hosts (existing connections cut, new ones refused after a connect timeout).
//!
//! Each simulated host gets its own [`Net`] from [`SimNet::host`], which knows its address, so the
//! network can tell which pairs of hosts a partition separates.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncblock_engine::sim::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};

use crate::net::{BoxFuture, BoxListener, BoxStream, Incoming, Listener, Net};

/// Bytes buffered in each direction of a simulated connection, like a socket buffer.
const PIPE_BYTES: usize = 256 << 10;
/// How long a connection attempt across a partition takes to fail.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(50);

struct Conn {
    a: IpAddr,
    b: IpAddr,
    kill: watch::Sender<bool>,
}

struct State {
    rng: Rng,
    listeners: HashMap<SocketAddr, mpsc::UnboundedSender<(BoxStream, SocketAddr)>>,
    cut: HashSet<(IpAddr, IpAddr)>,
    conns: Vec<Conn>,
    max_delay_us: u64,
    next_port: u16,
}

fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The simulated network. Cheap to clone.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet").finish_non_exhaustive()
    }
}

impl SimNet {
    pub fn new(seed: u64) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(State {
                rng: Rng::new(seed),
                listeners: HashMap::new(),
                cut: HashSet::new(),
                conns: Vec::new(),
                max_delay_us: 0,
                next_port: 20_000,
            })),
        }
    }

    /// The network as seen from the host with address `ip`.
    pub fn host(&self, ip: IpAddr) -> Arc<dyn Net> {
        Arc::new(SimHost { net: self.clone(), ip })
    }

    /// Every chunk of bytes is delayed by up to this much (seeded).
    pub fn set_max_delay(&self, d: Duration) {
        self.state.lock().expect("simnet").max_delay_us = d.as_micros() as u64;
    }

    /// Cuts `a` from `b`: their connections break, new ones fail.
    pub fn partition(&self, a: IpAddr, b: IpAddr) {
        let mut st = self.state.lock().expect("simnet");
        st.cut.insert(pair(a, b));
        st.conns.retain(|c| {
            if pair(c.a, c.b) == pair(a, b) {
                let _ = c.kill.send(true);
                false
            } else {
                true
            }
        });
    }

    /// Isolates `a` from every host in `others`.
    pub fn isolate(&self, a: IpAddr, others: &[IpAddr]) {
        for o in others {
            self.partition(a, *o);
        }
    }

    pub fn heal_all(&self) {
        self.state.lock().expect("simnet").cut.clear();
    }

    /// Resets one connection, chosen by the seed (like a TCP RST).
    pub fn reset_one(&self) {
        let mut st = self.state.lock().expect("simnet");
        st.conns.retain(|c| !c.kill.is_closed() && !*c.kill.borrow());
        if st.conns.is_empty() {
            return;
        }
        let n = st.conns.len() as u64;
        let i = st.rng.below(n) as usize;
        let c = st.conns.swap_remove(i);
        let _ = c.kill.send(true);
    }

    fn delay(&self) -> Duration {
        let mut st = self.state.lock().expect("simnet");
        let max = st.max_delay_us;
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(st.rng.below(max + 1))
    }
}

struct SimHost {
    net: SimNet,
    ip: IpAddr,
}

struct SimListener {
    net: SimNet,
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<(BoxStream, SocketAddr)>,
}

impl Drop for SimListener {
    fn drop(&mut self) {
        self.net.state.lock().expect("simnet").listeners.remove(&self.addr);
    }
}

impl Listener for SimListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Incoming>> {
        Box::pin(async move {
            let (s, from) =
                self.rx.recv().await.ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "listener closed"))?;
            Ok(Incoming::plain(s, from))
        })
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Copies one direction of a connection, delaying each chunk, until either side closes or the
/// connection is killed.
async fn pump(
    net: SimNet,
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    mut kill: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Biased: the simulation must replay the same schedule for the same seed.
        let n = tokio::select! {
            biased;
            _ = kill.wait_for(|k| *k) => return,
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let d = net.delay();
        if !d.is_zero() {
            tokio::select! {
                biased;
                _ = kill.wait_for(|k| *k) => return,
                _ = tokio::time::sleep(d) => {}
            }
        }
        if *kill.borrow() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

impl Net for SimHost {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let (cut, listener) = {
                let st = self.net.state.lock().expect("simnet");
                (st.cut.contains(&pair(self.ip, addr.ip())), st.listeners.get(&addr).cloned())
            };
            if cut {
                tokio::time::sleep(CONNECT_TIMEOUT).await;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "partitioned"));
            }
            let Some(listener) = listener else {
                return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "nothing listens there"));
            };
            let (client, relay_c) = tokio::io::duplex(PIPE_BYTES);
            let (server, relay_s) = tokio::io::duplex(PIPE_BYTES);
            let (kill, kill_rx) = watch::channel(false);
            let from = {
                let mut st = self.net.state.lock().expect("simnet");
                st.conns.push(Conn { a: self.ip, b: addr.ip(), kill });
                st.next_port = st.next_port.wrapping_add(1).max(20_000);
                SocketAddr::new(self.ip, st.next_port)
            };
            let (c_rd, c_wr) = tokio::io::split(relay_c);
            let (s_rd, s_wr) = tokio::io::split(relay_s);
            tokio::spawn(pump(self.net.clone(), c_rd, s_wr, kill_rx.clone()));
            tokio::spawn(pump(self.net.clone(), s_rd, c_wr, kill_rx));
            listener
                .send((Box::new(server) as BoxStream, from))
                .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "listener gone"))?;
            Ok(Box::new(client) as BoxStream)
        })
    }

    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxListener>> {
        Box::pin(async move {
            let mut st = self.net.state.lock().expect("simnet");
            let addr = if addr.port() == 0 {
                st.next_port = st.next_port.wrapping_add(1).max(20_000);
                SocketAddr::new(self.ip, st.next_port)
            } else {
                SocketAddr::new(self.ip, addr.port())
            };
            if st.listeners.get(&addr).is_some_and(|l| !l.is_closed()) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "address in use"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            st.listeners.insert(addr, tx);
            Ok(Box::new(SimListener { net: self.net.clone(), addr, rx }) as BoxListener)
        })
    }
}
