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
//!
//! [[volume]]
//! name = "db"
//! size = "50GiB"               # created with this size if missing
//!
//! [[volume]]
//! name = "golden"
//! size = "8GiB"
//! read_only = true
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

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
}

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
    pub store: Option<PathBuf>,
    pub store_bytes: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub default_export: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    /// Volumes exported read-only (they need not be in `volumes`: any volume of the store).
    pub read_only: Vec<String>,
}

/// Every option decided: what `syncblock serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    pub store: PathBuf,
    pub store_bytes: u64,
    pub listen: SocketAddr,
    pub unix: Option<PathBuf>,
    pub default_export: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    pub read_only: Vec<String>,
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
    #[serde(default)]
    volume: Vec<FileVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVolume {
    name: String,
    size: Size,
    #[serde(default)]
    read_only: bool,
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
                    .ok_or_else(|| E::custom(format!("invalid size {s:?}: use e.g. \"10GiB\", \"512M\" or 4096")))
            }
        }
        d.deserialize_any(V)
    }
}

impl ServeOptions {
    /// Parses a config file's text. Relative paths in it are taken relative to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<ServeOptions, ConfigError> {
        let file: File = toml::from_str(text)?;
        let mut opts = ServeOptions {
            store: file.store.map(|p| base.join(p)),
            store_bytes: file.store_size.map(|s| s.0),
            listen: file.listen,
            unix: file.unix.map(|p| base.join(p)),
            default_export: file.default_export,
            volumes: Vec::new(),
            read_only: Vec::new(),
        };
        for v in file.volume {
            if opts.volumes.iter().any(|o| o.name == v.name) {
                return Err(ConfigError::DuplicateVolume(v.name));
            }
            if v.read_only {
                opts.read_only.push(v.name.clone());
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
    /// file's volume of the same name; `--read-only` adds to the file's read-only volumes.
    pub fn overridden_by(mut self, flags: ServeOptions) -> ServeOptions {
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
        ServeOptions {
            store: flags.store.or(self.store),
            store_bytes: flags.store_bytes.or(self.store_bytes),
            listen: flags.listen.or(self.listen),
            unix: flags.unix.or(self.unix),
            default_export: flags.default_export.or(self.default_export),
            volumes: self.volumes,
            read_only: self.read_only,
        }
    }

    /// Fills every option not given with its default.
    pub fn resolve(self) -> ServeSettings {
        ServeSettings {
            store: self.store.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
            store_bytes: self.store_bytes.unwrap_or(DEFAULT_STORE_BYTES),
            listen: self.listen.unwrap_or(DEFAULT_LISTEN),
            unix: self.unix,
            default_export: self.default_export,
            volumes: self.volumes,
            read_only: self.read_only,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeOptions, ConfigError> {
        ServeOptions::from_toml(text, Path::new("/etc/syncblock"))
    }

    fn vol(name: &str, size_bytes: u64) -> VolumeSpec {
        VolumeSpec { name: name.into(), size_bytes }
    }

    #[test]
    fn full_file_parses_with_paths_relative_to_the_file() {
        let opts = parse(
            r#"
store = "data/store.img"
store_size = "100GiB"
listen = "0.0.0.0:10810"
unix = "/run/syncblock.sock"
default_export = "db"

[[volume]]
name = "db"
size = "50GiB"

[[volume]]
name = "golden"
size = 1073741824
read_only = true
"#,
        )
        .unwrap();
        assert_eq!(
            opts,
            ServeOptions {
                store: Some("/etc/syncblock/data/store.img".into()),
                store_bytes: Some(100 << 30),
                listen: Some("0.0.0.0:10810".parse().unwrap()),
                unix: Some("/run/syncblock.sock".into()),
                default_export: Some("db".into()),
                volumes: vec![vol("db", 50 << 30), vol("golden", 1 << 30)],
                read_only: vec!["golden".into()],
            }
        );
    }

    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a ```toml block") + 8;
        let len = readme[start..].find("```").unwrap();
        let opts = parse(&readme[start..start + len]).unwrap();
        assert_eq!(opts.volumes, vec![vol("db", 50 << 30), vol("golden", 8 << 30)]);
        assert_eq!(opts.read_only, vec!["golden".to_string()]);
        assert_eq!(opts.store, Some("/etc/syncblock/data/store.img".into()));
    }

    #[test]
    fn empty_file_resolves_to_the_defaults() {
        let s = parse("").unwrap().resolve();
        assert_eq!(s.store, PathBuf::from(DEFAULT_STORE));
        assert_eq!(s.store_bytes, 10 << 30);
        assert_eq!(s.listen.to_string(), "127.0.0.1:10809");
        assert_eq!((s.unix, s.default_export), (None, None));
        assert!(s.volumes.is_empty() && s.read_only.is_empty());
    }

    #[test]
    fn unknown_key_is_rejected_naming_the_key() {
        let err = parse("store = \"s.img\"\nstroe_size = \"1GiB\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `stroe_size`"), "{err}");
        assert!(err.contains("store_size"), "the message lists the valid keys: {err}");
        assert!(err.contains("line 2"), "{err}");
        // Inside a volume too: a misspelt read_only must not silently export read-write.
        let err = parse("[[volume]]\nname = \"a\"\nsize = \"1G\"\nreadonly = true\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `readonly`"), "{err}");
    }

    #[test]
    fn bad_sizes_are_rejected_with_an_example() {
        for (text, shown) in [
            ("store_size = \"12XB\"", "\"12XB\""),
            ("store_size = -1", "-1"),
            ("[[volume]]\nname = \"a\"\nsize = \"ten gigs\"", "\"ten gigs\""),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("invalid size {shown}")), "{text}: {err}");
        }
        let err = parse("store_size = 1.5").unwrap_err().to_string();
        assert!(err.contains("a size such as"), "{err}");
        let err = parse("[[volume]]\nname = \"a\"").unwrap_err().to_string();
        assert!(err.contains("missing field `size`"), "{err}");
    }

    #[test]
    fn bad_address_and_duplicate_volume_are_rejected() {
        assert!(parse("listen = \"localhost\"").is_err());
        let err = parse("[[volume]]\nname = \"a\"\nsize = 4096\n[[volume]]\nname = \"a\"\nsize = 8192\n").unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateVolume(ref n) if n == "a"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            "store = \"s.img\"\nstore_size = \"1GiB\"\nlisten = \"127.0.0.1:1\"\ndefault_export = \"a\"\n\
             [[volume]]\nname = \"a\"\nsize = \"1GiB\"\n[[volume]]\nname = \"b\"\nsize = \"2GiB\"\nread_only = true\n",
        )
        .unwrap();
        let flags = ServeOptions {
            listen: Some("127.0.0.1:2".parse().unwrap()),
            volumes: vec![VolumeSpec::from_flag("a:3GiB").unwrap(), VolumeSpec::from_flag("c:4G").unwrap()],
            read_only: vec!["c".into(), "b".into()],
            ..ServeOptions::default()
        };
        let s = file.overridden_by(flags).resolve();
        assert_eq!(s.store, PathBuf::from("/etc/syncblock/s.img"), "kept from the file");
        assert_eq!(s.store_bytes, 1 << 30);
        assert_eq!(s.listen.port(), 2, "the flag wins");
        assert_eq!(s.default_export.as_deref(), Some("a"));
        assert_eq!(s.volumes, vec![vol("a", 3 << 30), vol("b", 2 << 30), vol("c", 4 << 30)]);
        assert_eq!(s.read_only, vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn volume_flag_needs_name_and_size() {
        assert_eq!(VolumeSpec::from_flag("db:512M").unwrap(), vol("db", 512 << 20));
        for bad in ["db", "db:", "db:lots"] {
            assert!(matches!(VolumeSpec::from_flag(bad), Err(ConfigError::BadVolumeFlag(_))), "{bad}");
        }
    }
}
