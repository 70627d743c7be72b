//! Synchronous mirroring of engine volumes to a peer (issue 4).
//!
//! Not implemented yet: this crate exists so the workspace has its final shape. The engine already
//! exposes what replication will build on: the durable LSN and iteration of live blocks written after
//! an LSN (`syncblock_engine::Store::changed_since`).
