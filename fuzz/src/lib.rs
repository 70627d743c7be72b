//! The fuzz targets' bodies live in `checks.rs` (engine decoders), which `engine/tests/fuzz_smoke.rs`
//! also includes, and `nbd_checks.rs` (NBD handshake and requests), which
//! `nbd-server/tests/fuzz_smoke.rs` includes, and `repl_checks.rs` (replication frames), which
//! `replicator/tests/fuzz_smoke.rs` includes, so that the stable-Rust smoke runs and libFuzzer
//! exercise exactly the same properties.

#[path = "checks.rs"]
pub mod checks;
#[path = "nbd_checks.rs"]
pub mod nbd_checks;
#[path = "repl_checks.rs"]
pub mod repl_checks;
