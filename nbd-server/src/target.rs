//! What an export reads and writes: one storage seam for the NBD layer. A volume is either served
//! from the local store or, replicated, through its node (writes, trims, zeroing and flushes go
//! through the primary's replicator; reads stay local); the server does not know which it has.
//! Every failure comes back as a [`Failure`]: the engine's one [`ErrorClass`] and the message.

use bytes::Bytes;
use syncblock_engine::{ErrorClass, Extent, Store, VolumeId};
use syncblock_replicator::{Node, Primary};

/// A failed operation: its class (which decides the NBD errno) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
}

impl From<syncblock_engine::Error> for Failure {
    fn from(e: syncblock_engine::Error) -> Failure {
        Failure { class: e.class(), message: e.to_string() }
    }
}

impl From<syncblock_replicator::ReplError> for Failure {
    fn from(e: syncblock_replicator::ReplError) -> Failure {
        Failure { class: e.class(), message: e.to_string() }
    }
}

pub type Outcome<T = ()> = Result<T, Failure>;

/// One export's storage.
#[derive(Debug, Clone)]
pub enum Target {
    /// The local store; `write_back`: answer writes without FUA once queued (docs/durability.md).
    Local { store: Store, volume: VolumeId, write_back: bool },
    /// A replicated volume: writes go through the node while it is primary.
    Replicated { store: Store, volume: VolumeId, node: Node },
}

impl Target {
    fn store(&self) -> (&Store, VolumeId) {
        match self {
            Target::Local { store, volume, .. } | Target::Replicated { store, volume, .. } => (store, *volume),
        }
    }

    /// The primary to write through, or why there is none.
    fn primary(node: &Node) -> Outcome<Primary> {
        node.primary().ok_or_else(|| Failure {
            class: ErrorClass::Forbidden,
            message: "this node is no longer the primary of the volume".into(),
        })
    }

    pub async fn read(&self, offset: u64, len: u64) -> Outcome<Bytes> {
        let (store, volume) = self.store();
        Ok(store.read(volume, offset, len).await?)
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Outcome<Vec<Extent>> {
        let (store, volume) = self.store();
        Ok(store.block_status(volume, offset, len).await?)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Outcome {
        match self {
            Target::Local { store, volume, write_back: true } if !fua => {
                Ok(store.write_back(*volume, offset, data).await?)
            }
            Target::Local { store, volume, .. } => Ok(store.write(*volume, offset, data, fua).await?),
            Target::Replicated { node, .. } => Ok(Self::primary(node)?.write(offset, data, fua).await?),
        }
    }

    pub async fn flush(&self) -> Outcome {
        match self {
            Target::Local { store, .. } => Ok(store.flush().await?),
            Target::Replicated { node, .. } => Ok(Self::primary(node)?.flush().await?),
        }
    }

    /// Unmaps the whole blocks in the range; with `fua`, durable when answered.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Outcome {
        match self {
            Target::Local { store, volume, .. } => store.trim(*volume, offset, len).await?,
            Target::Replicated { node, .. } => Self::primary(node)?.trim(offset, len).await?,
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Outcome {
        match self {
            Target::Local { store, volume, .. } => Ok(store.write_zeroes(*volume, offset, len, may_trim, fua).await?),
            Target::Replicated { node, .. } => {
                Ok(Self::primary(node)?.write_zeroes(offset, len, may_trim, fua).await?)
            }
        }
    }

    /// Whether writes can succeed now (a replica that is not the primary serves reads only).
    pub fn writable(&self) -> bool {
        match self {
            Target::Local { .. } => true,
            Target::Replicated { node, .. } => node.is_primary(),
        }
    }
}

/// Cluster mode's view of the exports: a volume is served by its primary only; another node
/// answers a client with an error naming the node that serves it.
pub trait Directory: Send + Sync + std::fmt::Debug + 'static {
    /// The replicator node of `volume`, if this node holds a replica.
    fn node(&self, volume: &str) -> Option<syncblock_replicator::Node>;
    /// Why this node does not serve `export`, naming the node that does; `None` if it serves it
    /// (or no such volume exists).
    fn elsewhere(&self, export: &str) -> Option<String>;
}
