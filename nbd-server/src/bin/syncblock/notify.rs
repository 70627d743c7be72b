//! Readiness and stop notifications for a service manager (systemd's `Type=notify`, the
//! `sd_notify(3)` protocol): one datagram of `KEY=value` lines sent to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract socket written with a leading `@`). Without
//! `$NOTIFY_SOCKET` every call does nothing, so the binary behaves the same outside systemd.
//!
//! Written here rather than taken from a crate: the protocol is one `sendto` and the standard
//! library has everything it needs (abstract addresses included).

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Ready to serve: every listener is bound and replication has started. `status` is a short line
/// for `systemctl status`.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
}

/// A stop signal arrived: the process is finishing the requests in flight.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping\n");
}

/// A status message may not span lines: a newline would start another `KEY=value`.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn send(msg: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = try_send(&target, msg) {
        // Not fatal: the service manager will time the start out and say so; the node itself
        // serves either way.
        tracing::warn!("cannot notify the service manager at NOTIFY_SOCKET={}: {e}", target.to_string_lossy());
    }
}

fn try_send(target: &std::ffi::OsStr, msg: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = target.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        Some((b'/', _)) => SocketAddr::from_pathname(target)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract socket (@name)",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(msg.as_bytes(), &addr)?;
    if sent != msg.len() {
        return Err(std::io::Error::other(format!("sent {sent} of {} bytes", msg.len())));
    }
    Ok(())
}
