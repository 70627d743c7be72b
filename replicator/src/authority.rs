//! The authority: whoever grants a replicated volume's epochs, its primary role and its consent to
//! acknowledge writes alone. A pair has its witness (`witness.rs`); a cluster has etcd
//! (`cluster::etcd`). Both take the same three requests (the witness frames: a primary's report, a
//! primary asking to go solo, a node asking to become primary), decide them with the same rules
//! ([`crate::witness::decide_record`]) and answer with a [`Grant`], so the pair's logic (`node.rs`,
//! the primary's timers) does not know which it has, and the simulation can stand in for either.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::net::Net;
use crate::wire::Frame;
use crate::witness::Grant;
use crate::Result;

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Grants epochs, the primary role and solo operation. `req` is one of `Frame::WitnessReport`,
/// `Frame::WitnessSolo` and `Frame::WitnessPromote`; a refusal is `ReplError::Refused` with its
/// `Refusal`, anything else an error that grants nothing (a solo lease then runs out).
pub trait Authority: Send + Sync + 'static {
    fn ask<'a>(&'a self, req: &'a Frame, timeout: Duration) -> BoxFuture<'a, Result<Grant>>;
    /// For logs and the status: "witness 10.0.0.3:7100", "etcd".
    fn describe(&self) -> String;
    /// Whether a primary that is in sync, connected and not solo may report only every
    /// [`crate::QUIET_EVERY`]. A witness may not: it takes a primary whose reports stop for its
    /// lease as gone. etcd may: it tells a primary's node gone by its own lease, and its answers
    /// to such reports confirm a cached record (`cluster::authority::CACHE_FOR`).
    fn quiet_reports(&self) -> bool {
        false
    }
}

pub type SharedAuthority = Arc<dyn Authority>;

/// A witness process reached over the network, its connection kept between requests.
pub struct Witness {
    pub net: Arc<dyn Net>,
    pub addr: SocketAddr,
    pub link: crate::witness::Link,
}

impl Witness {
    pub fn shared(net: Arc<dyn Net>, addr: SocketAddr) -> SharedAuthority {
        Arc::new(Witness { net, addr, link: Default::default() })
    }
}

impl Authority for Witness {
    fn ask<'a>(&'a self, req: &'a Frame, timeout: Duration) -> BoxFuture<'a, Result<Grant>> {
        Box::pin(crate::witness::ask(self.net.as_ref(), &self.link, self.addr, req, timeout))
    }

    fn describe(&self) -> String {
        format!("witness {}", self.addr)
    }
}
