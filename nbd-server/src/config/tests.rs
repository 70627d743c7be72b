//! The config module's unit tests: parsing, merging, defaults and the security checks.

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
            tls: TlsFiles::default(),
            tls_mode: None,
            access: vec![],
            admin_access: vec![],
            insecure: None,
            store: Some("/etc/syncblock/data/store.img".into()),
            store_bytes: Some(100 << 30),
            listen: Some("0.0.0.0:10810".parse().unwrap()),
            unix: Some("/run/syncblock.sock".into()),
            default_export: Some("db".into()),
            volumes: vec![vol("db", 50 << 30), vol("golden", 1 << 30)],
            read_only: vec!["golden".into()],
            replicate: vec![],
            replication: ReplNodeOptions::default(),
            write_back: None,
            zero_fill: None,
            create: None,
        }
    );
}

#[test]
fn replicated_volumes_parse_and_flags_replace_the_file_settings_of_their_volume() {
    let file = parse(
        r#"
default_export = "db"
[replication]
node = "a"
witness = "10.0.0.3:7100"
admin = "127.0.0.1:7200"

[[volume]]
name = "db"
size = "1GiB"
replicate = { role = "primary", peer = "10.0.0.2:7000" }

[[volume]]
name = "logs"
size = "1GiB"
[volume.replicate]
role = "secondary"
listen = "0.0.0.0:7001"
policy = "degrade"
auto_failover = false
"#,
    )
    .unwrap();
    let db = ReplVolume {
        volume: Some("db".into()),
        role: ReplRole::Primary,
        peer: Some("10.0.0.2:7000".parse().unwrap()),
        peer_node: None,
        listen: None,
        policy: None,
        auto_failover: true,
    };
    let logs = ReplVolume {
        volume: Some("logs".into()),
        role: ReplRole::Secondary,
        peer: None,
        peer_node: None,
        listen: Some("0.0.0.0:7001".parse().unwrap()),
        policy: Some(ReplPolicy::Degrade),
        auto_failover: false,
    };
    assert_eq!(file.replicate, vec![db.clone(), logs.clone()]);
    let s = file.clone().resolve();
    assert_eq!((s.node.as_str(), s.repl_timeout_ms), ("a", DEFAULT_REPL_TIMEOUT_MS));
    assert_eq!(s.witness, Some("10.0.0.3:7100".parse().unwrap()));
    let r = s.replicated_volumes(Some("db")).unwrap();
    assert_eq!(r.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["db", "logs"]);

    // Flags naming `logs` replace its file settings; the other volume keeps its own.
    let flag_logs = ReplVolume { policy: Some(ReplPolicy::Strict), ..logs.clone() };
    let flags = ServeOptions {
        replicate: vec![flag_logs.clone()],
        replication: ReplNodeOptions { timeout_ms: Some(500), ..ReplNodeOptions::default() },
        ..ServeOptions::default()
    };
    let s = file.clone().overridden_by(flags).resolve();
    assert_eq!(s.replicate, vec![db.clone(), flag_logs]);
    assert_eq!((s.node.as_str(), s.repl_timeout_ms), ("a", 500), "the file's node name stays");

    // Flags without --replicate mean the default export: replicating it twice is refused.
    let flags = ServeOptions { replicate: vec![ReplVolume { volume: None, ..db.clone() }], ..ServeOptions::default() };
    let s = file.overridden_by(flags).resolve();
    let err = s.replicated_volumes(Some("db")).unwrap_err();
    assert!(matches!(err, ConfigError::DuplicateReplication(ref n) if n == "db"), "{err}");
}

#[test]
fn two_replicated_volumes_on_one_port_are_refused() {
    let text = "[[volume]]\nname = \"a\"\nsize = \"1G\"\nreplicate = { role = \"secondary\", listen = \"127.0.0.1:7000\" }\n\
                [[volume]]\nname = \"b\"\nsize = \"1G\"\nreplicate = { role = \"secondary\", listen = \"127.0.0.1:7000\" }\n";
    let err = parse(text).unwrap().resolve().replicated_volumes(None).unwrap_err().to_string();
    assert!(err.contains("\"b\"") && err.contains("like volume \"a\"") && err.contains("port of its own"), "{err}");
}

#[test]
fn replication_without_the_address_its_role_needs_is_refused() {
    let err = parse("[[volume]]\nname = \"a\"\nsize = \"1G\"\nreplicate = { role = \"primary\" }\n").unwrap_err();
    assert!(err.to_string().contains("a primary needs the peer's replication address"), "{err}");
    let err = parse(
        "[[volume]]\nname = \"a\"\nsize = \"1G\"\nreplicate = { role = \"secondary\", peer = \"127.0.0.1:1\" }\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("a secondary needs a replication address to listen on"), "{err}");
    let err = parse("[[volume]]\nname = \"a\"\nsize = \"1G\"\nreplicate = { role = \"leader\" }\n").unwrap_err();
    assert!(err.to_string().contains("unknown variant `leader`"), "{err}");
    let err = parse("[replication]\nwitnes = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("unknown field `witnes`"), "{err}");
}

#[test]
fn readme_example_parses() {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```toml\n").expect("README has a ```toml block") + 8;
    let len = readme[start..].find("```").unwrap();
    let opts = parse(&readme[start..start + len]).unwrap();
    assert_eq!(opts.volumes, vec![vol("db", 50 << 30), vol("golden", 8 << 30), vol("logs", 10 << 30)]);
    assert_eq!(opts.read_only, vec!["golden".to_string()]);
    assert_eq!(opts.store, Some("/etc/syncblock/data/store.img".into()));
    assert_eq!(opts.replicate.len(), 1);
    assert_eq!((opts.replicate[0].role, opts.replicate[0].policy), (ReplRole::Primary, None), "the default policy");
    assert_eq!(opts.replication.admin, Some("127.0.0.1:7200".parse().unwrap()));
    assert_eq!(opts.write_back, Some(true));
    assert_eq!(opts.zero_fill, Some(true));
    assert_eq!(opts.replicate[0].peer_node.as_deref(), Some("b"));
    let s = opts.resolve();
    assert_eq!((s.tls_mode, s.access["db"].len()), (TlsMode::Require, 2));
    // The example binds addresses other hosts reach: it must pass the checks at start.
    s.check_security().unwrap();
}

#[test]
fn write_back_defaults_on_and_the_file_or_the_flag_turns_it_off() {
    assert!(parse("").unwrap().resolve().write_back);
    assert!(!parse("write_back = false").unwrap().resolve().write_back);
    let flags = ServeOptions { write_back: Some(false), ..ServeOptions::default() };
    assert!(!parse("write_back = true").unwrap().overridden_by(flags).resolve().write_back);
    assert!(!parse("write_back = false").unwrap().overridden_by(ServeOptions::default()).resolve().write_back);
    assert!(parse("write_back = 1").is_err(), "a boolean, not a number");
}

#[test]
fn replication_doc_example_parses() {
    let doc = include_str!("../../../docs/replication.md");
    let start = doc.find("```toml\n").expect("docs/replication.md has a ```toml block") + 8;
    let len = doc[start..].find("```").unwrap();
    let s = parse(&doc[start..start + len]).unwrap().resolve();
    let r = s.replicated_volumes(None).unwrap();
    assert_eq!(
        r.iter().map(|(n, v)| (n.as_str(), v.role)).collect::<Vec<_>>(),
        [("db", ReplRole::Primary), ("logs", ReplRole::Secondary)]
    );
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

#[test]
fn tls_table_access_lists_and_insecure_parse_and_resolve() {
    let opts = parse(
        r#"
listen = "0.0.0.0:10809"
insecure = false
[tls]
cert = "tls/node-cert.pem"
key = "tls/node-key.pem"
ca = "/etc/ca.pem"

[[volume]]
name = "db"
size = "1GiB"
access = [{ identity = "app1" }, { identity = "backup", read_only = true }]
"#,
    )
    .unwrap();
    assert_eq!(opts.tls.cert.as_deref(), Some(Path::new("/etc/syncblock/tls/node-cert.pem")));
    assert_eq!(opts.tls.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
    let flags = ServeOptions { access: vec![allow_flag("logs:ops:ro").unwrap()], ..ServeOptions::default() };
    let s = opts.overridden_by(flags).resolve();
    assert_eq!(s.tls_mode, TlsMode::Require, "credentials make TLS required by default");
    assert_eq!(
        s.access["db"],
        vec![
            AccessRule { identity: "app1".into(), read_only: false },
            AccessRule { identity: "backup".into(), read_only: true }
        ]
    );
    assert_eq!(s.access["logs"], vec![AccessRule { identity: "ops".into(), read_only: true }]);
    s.check_security().unwrap();
    assert!(parse("[tls]\nmodee = \"on\"").is_err(), "unknown keys in [tls] are refused");
}

#[test]
fn allow_flags_parse_and_bad_ones_are_refused() {
    assert_eq!(allow_flag("db:app1").unwrap(), ("db".into(), AccessRule { identity: "app1".into(), read_only: false }));
    assert_eq!(allow_flag("db:CN x:ro").unwrap().1, AccessRule { identity: "CN x".into(), read_only: true });
    for bad in ["db", ":app1", "db:", "db:app1:rx"] {
        assert!(allow_flag(bad).is_err(), "{bad}");
    }
}

#[test]
fn security_checks_refuse_exposed_plaintext_and_inconsistent_tls() {
    let base = || ServeOptions::default().resolve();
    // Loopback without TLS: as before.
    base().check_security().unwrap();
    // An address other hosts reach, without TLS: refused unless --insecure.
    let exposed = ServeSettings { listen: "0.0.0.0:10809".parse().unwrap(), ..base() };
    let e = exposed.check_security().unwrap_err().to_string();
    assert!(e.contains("--insecure") && e.contains(NBD_RISK), "{e}");
    ServeSettings { insecure: true, ..exposed.clone() }.check_security().unwrap();
    // TLS "on" still serves plaintext: exposed as well.
    let files = TlsFiles { cert: Some("c".into()), key: Some("k".into()), ..TlsFiles::default() };
    let on = ServeSettings { tls: files.clone(), tls_mode: TlsMode::On, ..exposed.clone() };
    assert!(on.check_security().is_err());
    ServeSettings { tls_mode: TlsMode::Require, ..on.clone() }.check_security().unwrap();
    // A mode without credentials, and access lists without client identities.
    let e = ServeSettings { tls_mode: TlsMode::Require, ..base() }.check_security().unwrap_err().to_string();
    assert!(e.contains("need credentials"), "{e}");
    let mut access = HashMap::new();
    access.insert("db".to_string(), vec![AccessRule { identity: "a".into(), read_only: false }]);
    let e = ServeSettings { tls: files.clone(), tls_mode: TlsMode::Require, access: access.clone(), ..base() }
        .check_security()
        .unwrap_err()
        .to_string();
    assert!(e.contains("prove no identity"), "{e}");
    let e = ServeSettings { access, ..base() }.check_security().unwrap_err().to_string();
    assert!(e.contains("TLS is off"), "{e}");
    // The admin endpoint off loopback needs authenticated callers, not only encryption.
    let admin = ServeSettings {
        tls: files.clone(),
        tls_mode: TlsMode::Require,
        admin: Some("10.0.0.1:7950".parse().unwrap()),
        ..base()
    };
    let e = admin.check_security().unwrap_err().to_string();
    assert!(e.contains(ADMIN_RISK), "{e}");
    // An admin access list needs an endpoint and callers that prove identities.
    let ops = vec![admin_allow_flag("ops").unwrap()];
    let e = ServeSettings { admin_access: ops.clone(), ..base() }.check_security().unwrap_err().to_string();
    assert!(e.contains("no admin endpoint"), "{e}");
    let local = ServeSettings { admin: Some("127.0.0.1:7950".parse().unwrap()), admin_access: ops, ..base() };
    let e = local.clone().check_security().unwrap_err().to_string();
    assert!(e.contains("prove none"), "{e}");
    let ca = TlsFiles { ca: Some("ca".into()), ..files };
    ServeSettings { tls: ca.clone(), tls_mode: TlsMode::Require, ..local }.check_security().unwrap();
    // The witness's name is checked in its certificate: that needs a CA.
    let named = ServeSettings { witness_node: Some("witness".into()), ..base() };
    assert!(named.clone().check_security().unwrap_err().to_string().contains("--witness-node"));
    ServeSettings { tls: ca, tls_mode: TlsMode::Require, ..named }.check_security().unwrap();
}

#[test]
fn admin_allow_flags_and_file_entries_parse_and_bad_ones_are_refused() {
    assert_eq!(admin_allow_flag("ops").unwrap(), AccessRule { identity: "ops".into(), read_only: false });
    assert_eq!(admin_allow_flag("CN x:ro").unwrap(), AccessRule { identity: "CN x".into(), read_only: true });
    assert_eq!(admin_allow_flag("a:b:rw").unwrap(), AccessRule { identity: "a:b".into(), read_only: false });
    for bad in ["", ":ro", "ops:admin"] {
        assert!(admin_allow_flag(bad).is_err(), "{bad}");
    }
    let file = parse("admin = \"127.0.0.1:7950\"\nadmin_allow = [\"ops\", \"prometheus:ro\"]\n").unwrap();
    assert_eq!(file.admin_access.len(), 2);
    assert!(file.admin_access[1].read_only);
    assert!(parse("admin_allow = [\"ops:x\"]\n").is_err());
    let flags = ServeOptions { admin_access: vec![admin_allow_flag("alice").unwrap()], ..ServeOptions::default() };
    assert_eq!(file.overridden_by(flags).resolve().admin_access.len(), 3);
}
