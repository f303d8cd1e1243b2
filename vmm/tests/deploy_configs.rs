//! The example installation under `deploy/` (docs/deploy.md): its configuration files parse
//! with the parsers the binaries use, and they agree with each other — what the pairing
//! handshake compares is equal on both nodes, each node's peer is the other's `listen`, the
//! witness both name is the one `witness.toml` describes and it lists both nodes, the keys
//! the comments call defaults are defaults, and the node's unit never restarts a node that
//! halted for an operator.
//!
//! `NodeConfig::load` (what `ftvm-node run --config` and `status` call) checks the syntax,
//! every name, address and duration; it does not look at the files the config names (guest
//! image, certificates, the disk's directory), which `ftvm-node run` opens at start (exit 65
//! if they are missing). The VM part is therefore also put through `VmOptions::plan` (sizes,
//! MAC, addresses), with the guest image and the disk directory replaced by ones that exist
//! here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_witness::config::{Config as WitnessConfig, StoreConfig};
use vmm::node::config::NodeConfig;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn text(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

fn node(file: &str) -> NodeConfig {
    NodeConfig::load(&deploy(file)).unwrap_or_else(|e| panic!("{e}"))
}

/// The lines of `text` that set `key` (`key = …` at the start of a line).
fn sets(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

#[test]
fn both_node_configs_parse_and_describe_one_pair() {
    let a = node("node-a.toml");
    let b = node("node-b.toml");
    assert_eq!((a.node.as_str(), b.node.as_str()), ("a", "b"));
    assert_eq!(a.pair, "kv1");
    assert_eq!(a.pair, b.pair);
    // Each is the other's one peer, at the address the other listens on.
    for (me, other) in [(&a, &b), (&b, &a)] {
        assert_eq!(me.peers.len(), 1, "{}: {:?}", me.node, me.peers);
        assert_eq!(me.peers[0].name, other.node);
        assert_eq!(me.peers[0].addr, other.listen, "{}'s peer", me.node);
        assert_ne!(me.listen, other.listen);
        assert_eq!(
            me.control,
            PathBuf::from(format!("/run/ftvm/kv1-{}.sock", me.node))
        );
        let m = me.metrics.expect("metrics is set in the examples");
        assert_eq!(
            m.ip(),
            me.listen.ip(),
            "{}: metrics on the host's address",
            me.node
        );
    }
    assert_eq!(a.listen, "10.0.0.1:7300".parse().unwrap());
    assert_eq!(b.listen, "10.0.0.2:7300".parse().unwrap());
    assert_eq!(a.witnesses, b.witnesses);
    // What the handshake compares (docs/operations.md: a mismatch is refused with 68).
    assert_eq!(a.failure_timeout, b.failure_timeout);
    let (va, vb) = (&a.vm, &b.vm);
    assert_eq!(va.guest, vb.guest);
    assert_eq!(va.mem, vb.mem);
    assert_eq!(va.guest_args, vb.guest_args);
    assert_eq!(va.disk_size, vb.disk_size);
    assert_eq!(va.mac, vb.mac);
    assert_eq!(va.ip, vb.ip);
    assert_eq!(va.gateway, vb.gateway);
    assert_eq!(va.rng, vb.rng);
    // And what the operator's guide assumes of them.
    assert_eq!(a.heartbeat, Duration::from_millis(10));
    assert_eq!(a.failure_timeout, Duration::from_millis(200));
    assert!(a.wait_for_backup);
    assert_eq!(a.tls, PathBuf::from("/etc/ftvm/tls"));
}

#[test]
fn every_node_key_is_in_the_examples() {
    // The parser names every key it knows when it refuses an unknown one.
    let e = NodeConfig::parse(&format!("{}\nno_such_key = 1\n", text("node-a.toml"))).unwrap_err();
    let known = e
        .split_once("(known: ")
        .and_then(|(_, k)| k.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the parser's message changed: {e}"));
    let keys: Vec<&str> = known.split(", ").collect();
    assert!(keys.len() > 20, "{keys:?}");
    for file in ["node-a.toml", "node-b.toml"] {
        let t = text(file);
        for k in &keys {
            // `peers` replaces `peer`: it is there, commented out.
            let commented = t.lines().any(|l| {
                l.strip_prefix("# ")
                    .and_then(|l| l.strip_prefix(k))
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            assert!(
                sets(&t, k) || commented,
                "deploy/{file} does not show `{k}`"
            );
        }
    }
}

#[test]
fn the_peers_line_parses_when_uncommented() {
    let t = text("node-a.toml")
        .lines()
        .filter(|l| !(l.starts_with("peer ") || l.starts_with("peer=")))
        .map(|l| {
            l.strip_prefix("# peers")
                .map_or(l.to_string(), |r| format!("peers{r}"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let c = NodeConfig::parse(&t).unwrap();
    let names: Vec<&str> = c.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["b", "c"]);
}

#[test]
fn the_keys_called_defaults_are_defaults() {
    // Leaving out the keys whose comment says "default …" changes nothing.
    let full = node("node-a.toml");
    let defaults = [
        "control",
        "heartbeat",
        "failure_timeout",
        "max_lag",
        "wait_for_backup",
        "digest_every",
        "held_bytes",
        "state",
        "rng",
    ];
    let t = text("node-a.toml");
    let lines: Vec<&str> = t.lines().collect();
    for k in defaults {
        let i = lines
            .iter()
            .position(|l| sets(l, k))
            .unwrap_or_else(|| panic!("no `{k}` line"));
        // The key's comment: after the `#` on its line, and the indented lines after it.
        let comment: String = std::iter::once(lines[i].split_once('#').map_or("", |c| c.1))
            .chain(
                lines[i + 1..]
                    .iter()
                    .take_while(|l| l.starts_with(' ') && l.trim_start().starts_with('#'))
                    .copied(),
            )
            .collect();
        assert!(comment.contains("default"), "`{k}`: {comment}");
    }
    let stripped: String = t
        .lines()
        .filter(|l| !defaults.iter().any(|k| sets(l, k)))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare = NodeConfig::parse(&stripped).unwrap();
    assert_eq!(bare.control, full.control);
    assert_eq!(bare.heartbeat, full.heartbeat);
    assert_eq!(bare.failure_timeout, full.failure_timeout);
    assert_eq!(bare.max_lag, full.max_lag);
    assert_eq!(bare.wait_for_backup, full.wait_for_backup);
    assert_eq!(bare.digest_every, full.digest_every);
    assert_eq!(bare.held_bytes, full.held_bytes);
    assert_eq!(bare.state, full.state);
    assert_eq!(bare.vm.rng, full.vm.rng);
}

#[test]
fn the_vm_part_is_a_valid_vm() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["node-a.toml", "node-b.toml"] {
        let c = node(file);
        assert_eq!(
            c.vm.guest.as_deref(),
            Some("/usr/local/lib/ftvm/kv.elf"),
            "docs/deploy.md installs the guest there"
        );
        let mut vm = c.vm.clone();
        // The bundled kv is the image docs/deploy.md copies to /usr/local/lib/ftvm/kv.elf.
        vm.guest = Some("kv".into());
        vm.disk = Some(dir.path().join("kv1.img"));
        let p = vm.plan().unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        assert_eq!(p.mem_size, 64 << 20);
        assert_eq!(p.tap.as_deref(), Some("tap0"));
        assert_eq!(p.disk.as_ref().unwrap().create_size, 1 << 30);
        let net = p.devices.net.as_ref().expect("a NIC");
        assert_eq!(net.ip, std::net::Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(net.prefix, 24);
        assert_eq!(net.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(net.gateway.is_some());
        assert_eq!(p.args, "maxclients=1024");
    }
}

#[test]
fn the_witness_config_parses_and_is_the_witness_the_nodes_name() {
    let w = WitnessConfig::load(&deploy("witness.toml")).unwrap_or_else(|e| panic!("{e}"));
    let a = node("node-a.toml");
    assert_eq!(a.witnesses.len(), 1);
    assert_eq!(w.identity, a.witnesses[0].name);
    assert_eq!(w.listen, a.witnesses[0].addr);
    assert_eq!(w.listen, "10.0.0.3:7200".parse().unwrap());
    assert_eq!(
        w.pair_map()[&a.pair],
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(w.store, StoreConfig::Rocksdb);
    assert_eq!(w.data_dir, PathBuf::from("/var/lib/ftvm-witness"));
    assert_eq!(w.tls_dir, PathBuf::from("/etc/ftvm/tls"));
}

#[test]
fn the_witness_etcd_section_parses_when_uncommented() {
    let t = text("witness.toml");
    let (head, tail) = t
        .split_once("# [store]")
        .expect("the commented [store] section");
    let section: String = std::iter::once("[store]")
        .chain(tail.lines().skip(1))
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("witness.toml");
    std::fs::write(&p, format!("{head}{section}")).unwrap();
    let w = WitnessConfig::load(&p).unwrap_or_else(|e| panic!("{e}\n{head}{section}"));
    let StoreConfig::Etcd(e) = &w.store else {
        panic!("{:?}", w.store)
    };
    assert_eq!(e.endpoints.len(), 3);
    assert_eq!(
        e.ca.as_deref(),
        Some(dir.path().join("etcd-ca.pem").as_path())
    );
}

#[test]
fn the_units_run_these_files_and_never_restart_a_halted_node() {
    let unit = text("ftvm-node.service");
    let value = |u: &str, key: &str| -> Vec<String> {
        u.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        value(&unit, "ExecStart"),
        ["/usr/local/bin/ftvm-node run --config /etc/ftvm/node.toml"]
    );
    assert_eq!(value(&unit, "Restart"), ["on-failure"]);
    let prevent: Vec<u8> = value(&unit, "RestartPreventExitStatus")
        .iter()
        .flat_map(|v| {
            v.split_whitespace()
                .map(|s| s.parse::<u8>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    // 65 configuration, 66 denied by the witness, 67 divergence, 68 refused pairing.
    for code in [65, 66, 67, 68] {
        assert!(
            prevent.contains(&code),
            "RestartPreventExitStatus lacks {code}: {prevent:?}"
        );
    }
    assert_eq!(value(&unit, "KillSignal"), ["SIGTERM"]);
    assert_eq!(value(&unit, "SuccessExitStatus"), ["143"]);
    let w = text("ftvm-witness.service");
    assert_eq!(
        value(&w, "ExecStart"),
        ["/usr/local/bin/ftvm-witness serve --config /etc/ftvm/witness.toml"]
    );
    // The witness's data directory is the unit's state directory.
    let data = WitnessConfig::load(&deploy("witness.toml"))
        .unwrap()
        .data_dir;
    assert_eq!(
        value(&w, "StateDirectory"),
        [data.strip_prefix("/var/lib").unwrap().display().to_string()]
    );
}
