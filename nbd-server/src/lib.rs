//! The NBD server in front of the engine (issue 3): a thin adapter that turns NBD handshake options
//! and transmission requests into [`syncblock_engine::Store`] calls and engine errors into NBD
//! errnos. It holds no storage logic.
//!
//! - [`proto`]: the wire format, pure encoders and decoders.
//! - [`handshake`]: option negotiation as a pure state machine.
//! - [`server`]: listeners, connections, concurrent transmission with bounded requests in flight.
//! - [`size`]: human sizes (`10GiB`, `512M`) for the CLI.
//! - [`config`]: the `syncblock serve` options: TOML file, flags over it, defaults.
//! - [`admin`]: the HTTP admin endpoint (status, commands, metrics) and its JSON documents.
//! - [`metrics`]: the Prometheus metrics.
//! - [`target`]: what an export reads and writes (the local store or a replicated volume), and the
//!   one failure classification the server answers from.

pub mod admin;
pub mod config;
pub mod handshake;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod size;
pub mod target;

pub use server::{serve, Listener, ServerConfig, ServerError, HANDSHAKE_TIMEOUT, IN_FLIGHT_MAX};
