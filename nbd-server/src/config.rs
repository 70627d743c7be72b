//! The options of `syncblock serve`: a TOML file (`--config FILE`), command-line flags that
//! override it, and the defaults that fill in the rest. Parsing and merging are pure functions so
//! that they are unit-tested here; `main.rs` only collects the flags.
//!
//! ```toml
//! store = "store.img"          # relative paths are relative to this file's directory
//! store_size = "100GiB"        # used only when the store does not exist yet
//! listen = "0.0.0.0:10809"
//! unix = "/run/syncblock.sock"
//! default_export = "db"
//! write_back = true            # answer writes without FUA once queued (docs/durability.md)
//! zero_fill = false            # write zeros over a new store file first (--zero-fill)
//! create = true                # create the store if missing (--create; otherwise an error)
//! # admin_allow = ["ops", "prometheus:ro"]   # who may call the admin endpoint (needs a CA or PSK)
//!
//! [[volume]]
//! name = "db"
//! size = "50GiB"               # created with this size if missing
//!
//! [[volume]]
//! name = "golden"
//! size = "8GiB"
//! read_only = true
//!
//! # Synchronous replication (docs/replication.md): settings of this node, then one `replicate`
//! # table per replicated volume, each with its own replication port.
//! [replication]
//! node = "a"                   # this node's name at the witness and in its peer's logs
//! witness = "10.0.0.3:7100"
//! witness_node = "witness"     # with a CA: the name the witness's certificate must carry
//! timeout_ms = 1000
//! admin = "127.0.0.1:7200"     # for `syncblock status`, `promote`, `verify`
//!
//! [[volume]]
//! name = "logs"
//! size = "10GiB"
//! replicate = { role = "primary", peer = "10.0.0.2:7001", listen = "0.0.0.0:7001", policy = "degrade" }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use std::collections::HashMap;

use syncblock_replicator::tls::TlsFiles;

use crate::handshake::TlsMode;
use crate::server::AccessRule;
use crate::size::parse_size;

/// The store `syncblock serve` creates when neither the flags nor the file name one.
pub const DEFAULT_STORE: &str = "syncblock-data/store.img";
/// Size of a store created without `--size` or `store_size`: large enough to try things, and the
/// file is sparse, so it costs only what is written.
pub const DEFAULT_STORE_BYTES: u64 = 10 << 30;
/// The IANA-assigned NBD port on loopback: nothing is exposed to the network unless asked for.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read the config file")]
    Read(#[from] std::io::Error),
    /// Syntax, an unknown key (the message names it and lists the valid ones), a bad size or address.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("volume {0:?} is listed twice; likely cause: a copied [[volume]] block; keep one")]
    DuplicateVolume(String),
    #[error("invalid --volume {0:?}: expected NAME:SIZE, e.g. db:10GiB")]
    BadVolumeFlag(String),
    #[error("volume {0:?} is replicated twice; likely cause: --replicate names a volume the config file already replicates with other settings; keep one")]
    DuplicateReplication(String),
    #[error("replicated volume {volume:?}: {problem}")]
    BadReplication { volume: String, problem: String },
    #[error("invalid --allow {0:?}: expected VOLUME:IDENTITY or VOLUME:IDENTITY:ro, e.g. db:app1")]
    BadAllowFlag(String),
    #[error("invalid --admin-allow {0:?}: expected IDENTITY or IDENTITY:ro, e.g. ops or prometheus:ro")]
    BadAdminAllowFlag(String),
    #[error("{0}")]
    Tls(String),
    /// A listener on an address other hosts can reach, without TLS.
    #[error(
        "{what} listens on {addr}, which other hosts can reach, without TLS that authenticates its clients: anyone \
         who reaches it can {risk}. Configure TLS (--tls-cert/--tls-key with --tls-ca, or --tls-psk; \
         docs/security.md), bind a loopback address, or pass --insecure to accept the risk"
    )]
    Exposed { what: &'static str, addr: SocketAddr, risk: &'static str },
}

/// A replicated volume's role the first time its node runs (afterwards the role the store
/// recorded wins: promotion and deposition change it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReplRole {
    Primary,
    Secondary,
}

/// What the primary does while its peer is away (see `syncblock_replicator::Policy`). Not given:
/// degrade with a witness, strict without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReplPolicy {
    /// Writes wait until the peer is back and resynced: RPO = 0 always; no automatic failover.
    Strict,
    /// Continue alone, only with the witness's consent; a node promoted by failover serves alone.
    Degrade,
}

/// One replicated volume: its role, where it reaches its peer and where its peer reaches it.
/// Each replicated volume has a replication port of its own, as each DRBD resource does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplVolume {
    /// `None`: the default export (the command-line form without `--replicate`).
    pub volume: Option<String>,
    pub role: ReplRole,
    /// The peer's replication listener, dialed while this node is primary.
    pub peer: Option<SocketAddr>,
    /// The peer's node name: only it may connect as this volume's primary or successor, and with
    /// TLS certificates it must prove that name when this node connects to it.
    pub peer_node: Option<String>,
    /// This node's replication listener, where the primary connects while this node is secondary.
    pub listen: Option<SocketAddr>,
    /// `None`: the default for the node (degrade with a witness, strict without).
    pub policy: Option<ReplPolicy>,
    /// Promote this node automatically when its primary is gone and the witness agrees (only with
    /// a witness).
    pub auto_failover: bool,
}

impl ReplVolume {
    /// Refuses a role that lacks the address it needs.
    pub fn check(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |problem: &str| ConfigError::BadReplication { volume: name.into(), problem: problem.into() };
        match self.role {
            ReplRole::Primary if self.peer.is_none() => {
                Err(bad("a primary needs the peer's replication address (--peer, or `peer` in the file)"))
            }
            ReplRole::Secondary if self.listen.is_none() => Err(bad(
                "a secondary needs a replication address to listen on (--repl-listen, or `listen` in the file)",
            )),
            _ => Ok(()),
        }
    }
}

/// This node's replication settings, shared by its replicated volumes (the file's
/// `[replication]` table). `None`: not given here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplNodeOptions {
    pub node: Option<String>,
    pub witness: Option<SocketAddr>,
    /// The name the witness must prove (its certificate's CN) when this node dials it.
    pub witness_node: Option<String>,
    pub timeout_ms: Option<u64>,
    pub admin: Option<SocketAddr>,
}

/// Default node name (in logs and at the witness).
pub const DEFAULT_NODE: &str = "syncblock";
/// Default heartbeat timeout: see `syncblock_replicator::ReplConfig::timeout`.
pub const DEFAULT_REPL_TIMEOUT_MS: u64 = 1000;

/// A volume to create if the store lacks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: u64,
}

impl VolumeSpec {
    /// Parses the `--volume NAME:SIZE` flag.
    pub fn from_flag(spec: &str) -> Result<VolumeSpec, ConfigError> {
        let bad = || ConfigError::BadVolumeFlag(spec.to_string());
        let (name, size) = spec.split_once(':').ok_or_else(bad)?;
        let size_bytes = parse_size(size).ok_or_else(bad)?;
        Ok(VolumeSpec { name: name.to_string(), size_bytes })
    }
}

/// Serve options from one source (file or flags). `None` or empty means "not given here".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// TLS credentials, for NBD and the replication, witness and admin links.
    pub tls: TlsFiles,
    pub tls_mode: Option<TlsMode>,
    /// Export access lists: (volume, rule).
    pub access: Vec<(String, AccessRule)>,
    /// Who may call the admin endpoint (`crate::admin::Admin::access`).
    pub admin_access: Vec<AccessRule>,
    /// Allow listeners on non-loopback addresses without TLS.
    pub insecure: Option<bool>,
    pub store: Option<PathBuf>,
    pub store_bytes: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub default_export: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    /// Volumes exported read-only (they need not be in `volumes`: any volume of the store).
    pub read_only: Vec<String>,
    pub replicate: Vec<ReplVolume>,
    pub replication: ReplNodeOptions,
    /// Write-back for unreplicated volumes (`ServerConfig::write_back`).
    pub write_back: Option<bool>,
    /// Write zeros over a store file when creating it (`CreateOptions::zero_fill`).
    pub zero_fill: Option<bool>,
    /// Create the store if it does not exist (without it, a missing store is an error).
    pub create: Option<bool>,
}

/// Every option decided: what `syncblock serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    pub tls: TlsFiles,
    pub tls_mode: TlsMode,
    pub access: HashMap<String, Vec<AccessRule>>,
    pub admin_access: Vec<AccessRule>,
    pub insecure: bool,
    pub store: PathBuf,
    pub store_bytes: u64,
    pub listen: SocketAddr,
    pub unix: Option<PathBuf>,
    pub default_export: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    pub read_only: Vec<String>,
    pub replicate: Vec<ReplVolume>,
    pub node: String,
    pub witness: Option<SocketAddr>,
    pub witness_node: Option<String>,
    pub repl_timeout_ms: u64,
    pub admin: Option<SocketAddr>,
    pub write_back: bool,
    pub zero_fill: bool,
    pub create: bool,
}

/// The file as written. Unknown keys are errors, not ignored: a misspelt `read_only` would
/// otherwise export a volume writable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    store: Option<PathBuf>,
    store_size: Option<Size>,
    listen: Option<SocketAddr>,
    unix: Option<PathBuf>,
    default_export: Option<String>,
    write_back: Option<bool>,
    zero_fill: Option<bool>,
    create: Option<bool>,
    /// The admin endpoint (also accepted as `replication.admin`, where it was first).
    admin: Option<SocketAddr>,
    /// Who may call it: `IDENTITY` or `IDENTITY:ro` each, as the flag.
    admin_allow: Option<Vec<String>>,
    insecure: Option<bool>,
    tls: Option<FileTls>,
    #[serde(default)]
    volume: Vec<FileVolume>,
    replication: Option<ReplNodeOptions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    mode: Option<TlsMode>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    psk: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVolume {
    name: String,
    size: Size,
    #[serde(default)]
    read_only: bool,
    /// The client identities that may open this volume (all of them, without a list).
    access: Option<Vec<AccessRule>>,
    replicate: Option<FileReplicate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplicate {
    role: ReplRole,
    peer: Option<SocketAddr>,
    peer_node: Option<String>,
    listen: Option<SocketAddr>,
    policy: Option<ReplPolicy>,
    #[serde(default = "yes")]
    auto_failover: bool,
}

fn yes() -> bool {
    true
}

/// A size written as a string with a binary suffix (`"10GiB"`, `"512M"`) or as a number of bytes.
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as \"10GiB\", \"512M\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n).map(Size).map_err(|_| E::custom(format!("invalid size {n}: sizes are not negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s)
                    .map(Size)
                    .ok_or_else(|| E::custom(format!("invalid size {s:?}: use e.g. \"10GiB\" or \"10G\" (powers of 1024), \"10GB\" (powers of 1000) or 4096")))
            }
        }
        d.deserialize_any(V)
    }
}

impl ServeOptions {
    /// Parses a config file's text. Relative paths in it are taken relative to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<ServeOptions, ConfigError> {
        let file: File = toml::from_str(text)?;
        let (tls, tls_mode) = match file.tls {
            Some(t) => (TlsFiles { cert: t.cert, key: t.key, ca: t.ca, psk: t.psk }.relative_to(base), t.mode),
            None => (TlsFiles::default(), None),
        };
        let admin_access = file.admin_allow.iter().flatten().map(|a| admin_allow_flag(a)).collect::<Result<_, _>>()?;
        let mut opts = ServeOptions {
            tls,
            tls_mode,
            access: Vec::new(),
            admin_access,
            insecure: file.insecure,
            store: file.store.map(|p| base.join(p)),
            store_bytes: file.store_size.map(|s| s.0),
            listen: file.listen,
            unix: file.unix.map(|p| base.join(p)),
            default_export: file.default_export,
            volumes: Vec::new(),
            read_only: Vec::new(),
            replicate: Vec::new(),
            replication: {
                let mut r = file.replication.unwrap_or_default();
                r.admin = file.admin.or(r.admin);
                r
            },
            write_back: file.write_back,
            zero_fill: file.zero_fill,
            create: file.create,
        };
        for v in file.volume {
            if opts.volumes.iter().any(|o| o.name == v.name) {
                return Err(ConfigError::DuplicateVolume(v.name));
            }
            if v.read_only {
                opts.read_only.push(v.name.clone());
            }
            for rule in v.access.into_iter().flatten() {
                opts.access.push((v.name.clone(), rule));
            }
            if let Some(r) = v.replicate {
                let rv = ReplVolume {
                    volume: Some(v.name.clone()),
                    role: r.role,
                    peer: r.peer,
                    peer_node: r.peer_node,
                    listen: r.listen,
                    policy: r.policy,
                    auto_failover: r.auto_failover,
                };
                rv.check(&v.name)?;
                opts.replicate.push(rv);
            }
            opts.volumes.push(VolumeSpec { name: v.name, size_bytes: v.size.0 });
        }
        Ok(opts)
    }

    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path) -> Result<ServeOptions, ConfigError> {
        let text = std::fs::read_to_string(path)?;
        ServeOptions::from_toml(&text, path.parent().unwrap_or(Path::new("")))
    }

    /// `self` (the file) with every option given in `flags` replacing it. A `--volume` replaces the
    /// file's volume of the same name; `--read-only` adds to the file's read-only volumes; the
    /// replicated volume the flags describe (`--role` …) replaces the file's settings for it.
    pub fn overridden_by(mut self, flags: ServeOptions) -> ServeOptions {
        for r in flags.replicate {
            match self.replicate.iter_mut().find(|o| o.volume.is_some() && o.volume == r.volume) {
                Some(o) => *o = r,
                None => self.replicate.push(r),
            }
        }
        let (f, n) = (flags.replication, self.replication);
        let replication = ReplNodeOptions {
            node: f.node.or(n.node),
            witness: f.witness.or(n.witness),
            witness_node: f.witness_node.or(n.witness_node),
            timeout_ms: f.timeout_ms.or(n.timeout_ms),
            admin: f.admin.or(n.admin),
        };
        for v in flags.volumes {
            match self.volumes.iter_mut().find(|o| o.name == v.name) {
                Some(o) => *o = v,
                None => self.volumes.push(v),
            }
        }
        for name in flags.read_only {
            if !self.read_only.contains(&name) {
                self.read_only.push(name);
            }
        }
        let mut access = self.access;
        access.extend(flags.access);
        let mut admin_access = self.admin_access;
        admin_access.extend(flags.admin_access);
        ServeOptions {
            tls: flags.tls.or(self.tls),
            tls_mode: flags.tls_mode.or(self.tls_mode),
            access,
            admin_access,
            insecure: flags.insecure.or(self.insecure),
            store: flags.store.or(self.store),
            store_bytes: flags.store_bytes.or(self.store_bytes),
            listen: flags.listen.or(self.listen),
            unix: flags.unix.or(self.unix),
            default_export: flags.default_export.or(self.default_export),
            volumes: self.volumes,
            read_only: self.read_only,
            replicate: self.replicate,
            replication,
            write_back: flags.write_back.or(self.write_back),
            zero_fill: flags.zero_fill.or(self.zero_fill),
            create: flags.create.or(self.create),
        }
    }

    /// Fills every option not given with its default. TLS defaults to `require` once any
    /// credential is given (a server that trusts no one by default), `off` otherwise.
    pub fn resolve(self) -> ServeSettings {
        let tls_mode = self.tls_mode.unwrap_or(if self.tls.is_empty() { TlsMode::Off } else { TlsMode::Require });
        let mut access: HashMap<String, Vec<AccessRule>> = HashMap::new();
        for (volume, rule) in self.access {
            access.entry(volume).or_default().push(rule);
        }
        ServeSettings {
            tls: self.tls,
            tls_mode,
            access,
            admin_access: self.admin_access,
            insecure: self.insecure.unwrap_or(false),
            store: self.store.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
            store_bytes: self.store_bytes.unwrap_or(DEFAULT_STORE_BYTES),
            listen: self.listen.unwrap_or(DEFAULT_LISTEN),
            unix: self.unix,
            default_export: self.default_export,
            volumes: self.volumes,
            read_only: self.read_only,
            replicate: self.replicate,
            node: self.replication.node.unwrap_or_else(|| DEFAULT_NODE.into()),
            witness: self.replication.witness,
            witness_node: self.replication.witness_node,
            repl_timeout_ms: self.replication.timeout_ms.unwrap_or(DEFAULT_REPL_TIMEOUT_MS),
            admin: self.replication.admin,
            write_back: self.write_back.unwrap_or(true),
            zero_fill: self.zero_fill.unwrap_or(false),
            create: self.create.unwrap_or(false),
        }
    }
}

/// Refuses an admin access list that cannot work: without an admin endpoint, or without
/// credentials that make callers prove an identity (a CA or a PSK file).
pub fn check_admin_access(access: &[AccessRule], has_admin: bool, authenticated: bool) -> Result<(), ConfigError> {
    let Some(first) = access.first() else { return Ok(()) };
    if !has_admin {
        return Err(ConfigError::Tls(format!(
            "--admin-allow {:?} is given, but there is no admin endpoint: add --admin ADDR",
            first.identity
        )));
    }
    if !authenticated {
        return Err(ConfigError::Tls(
            "--admin-allow names identities, but admin callers prove none: give --tls-ca (client certificates) \
             or --tls-psk"
                .into(),
        ));
    }
    Ok(())
}

/// Parses `IDENTITY[:ro]` (or `:rw`), the rule part of `--admin-allow` and `--allow`; `None` for
/// another suffix or an empty identity.
fn access_rule(spec: &str) -> Option<AccessRule> {
    let (identity, read_only) = match spec.rsplit_once(':') {
        Some((id, "ro")) => (id, true),
        Some((id, "rw")) => (id, false),
        Some(_) => return None,
        None => (spec, false),
    };
    (!identity.is_empty()).then(|| AccessRule { identity: identity.to_string(), read_only })
}

/// Parses `--admin-allow IDENTITY[:ro]`.
pub fn admin_allow_flag(spec: &str) -> Result<AccessRule, ConfigError> {
    access_rule(spec).ok_or_else(|| ConfigError::BadAdminAllowFlag(spec.to_string()))
}

/// Parses `--allow VOLUME:IDENTITY[:ro]`.
pub fn allow_flag(spec: &str) -> Result<(String, AccessRule), ConfigError> {
    let bad = || ConfigError::BadAllowFlag(spec.to_string());
    let (volume, rest) = spec.split_once(':').filter(|(v, _)| !v.is_empty()).ok_or_else(bad)?;
    Ok((volume.to_string(), access_rule(rest).ok_or_else(bad)?))
}

/// What an open listener of each kind lets a stranger do, for the `--insecure` refusal.
pub const NBD_RISK: &str = "read and overwrite every volume";
pub const REPLICATION_RISK: &str = "pose as this node's peer and write its replicas";
pub const ADMIN_RISK: &str = "promote, demote and verify this node's volumes";
pub const WITNESS_RISK: &str = "grant epochs and solo operation to any node, causing split brain";

/// Refuses a listener that other hosts can reach without TLS, unless `insecure`; with it, says
/// so loudly in the log.
pub fn check_exposed(
    what: &'static str,
    addr: SocketAddr,
    risk: &'static str,
    tls: bool,
    insecure: bool,
) -> Result<(), ConfigError> {
    if tls || addr.ip().is_loopback() {
        return Ok(());
    }
    if !insecure {
        return Err(ConfigError::Exposed { what, addr, risk });
    }
    tracing::warn!("INSECURE: {what} listens on {addr} without TLS (--insecure): anyone who reaches it can {risk}");
    Ok(())
}

impl ServeSettings {
    /// Checks the TLS settings against each other and every listener against `--insecure`.
    pub fn check_security(&self) -> Result<(), ConfigError> {
        let tls = !self.tls.is_empty();
        if self.tls_mode != TlsMode::Off && !tls {
            return Err(ConfigError::Tls(
                "--tls=on and --tls=require need credentials: --tls-cert and --tls-key (and --tls-ca to \
                 require client certificates), or --tls-psk"
                    .into(),
            ));
        }
        if let Some(volume) = self.access.keys().next() {
            if self.tls_mode == TlsMode::Off {
                return Err(ConfigError::Tls(format!(
                    "volume {volume:?} has an access list, but TLS is off: client identities are proven in the \
                     TLS handshake, so an access list needs TLS credentials with --tls-ca or --tls-psk"
                )));
            }
            if !self.tls.authenticates() {
                return Err(ConfigError::Tls(format!(
                    "volume {volume:?} has an access list, but clients prove no identity: give --tls-ca \
                     (client certificates) or --tls-psk"
                )));
            }
        }
        check_exposed("NBD", self.listen, NBD_RISK, self.tls_mode == TlsMode::Require, self.insecure)?;
        // The replication and admin ports take a node's writes and commands: TLS that only
        // encrypts (a certificate without a CA) is not enough off loopback.
        let authenticated = self.tls.authenticates();
        for r in &self.replicate {
            if let Some(addr) = r.listen {
                check_exposed("replication", addr, REPLICATION_RISK, authenticated, self.insecure)?;
            }
        }
        if let Some(addr) = self.admin {
            check_exposed("the admin endpoint", addr, ADMIN_RISK, authenticated, self.insecure)?;
        }
        if let Some(name) = &self.witness_node {
            if self.tls.ca.is_none() {
                return Err(ConfigError::Tls(format!(
                    "--witness-node {name:?} is checked against the witness's certificate: give --tls-ca (and \
                     --tls-cert/--tls-key); a PSK witness proves only that it knows this node's key"
                )));
            }
        }
        check_admin_access(&self.admin_access, self.admin.is_some(), authenticated)
    }

    /// The replicated volumes with the default export's name filled in, checked: each volume
    /// replicated once, each role with the address it needs.
    pub fn replicated_volumes(&self, default_export: Option<&str>) -> Result<Vec<(String, ReplVolume)>, ConfigError> {
        let mut out: Vec<(String, ReplVolume)> = Vec::new();
        for r in &self.replicate {
            let name = match (&r.volume, default_export) {
                (Some(n), _) => n.clone(),
                (None, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err(ConfigError::BadReplication {
                        volume: String::new(),
                        problem: "no volume to replicate: name one with --replicate".into(),
                    })
                }
            };
            if out.iter().any(|(n, _)| *n == name) {
                return Err(ConfigError::DuplicateReplication(name));
            }
            r.check(&name)?;
            if let Some((other, _)) = out.iter().find(|(_, o)| o.listen.is_some() && o.listen == r.listen) {
                return Err(ConfigError::BadReplication {
                    volume: name,
                    problem: format!(
                        "listens on {} like volume {other:?}; each replicated volume needs a replication port of its own",
                        r.listen.expect("checked")
                    ),
                });
            }
            out.push((name, r.clone()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
