//! `node.toml`: one member of a pair (DESIGN §9; every key is documented in
//! `docs/operations.md`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::plan::VmOptions;

/// A `name@host:port` address of another service (a peer node, a witness).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// The identity its certificate must carry.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Named {
    /// Parses `name@host:port` (the host may be a name that resolves).
    pub fn parse(what: &str, s: &str) -> Result<Named, String> {
        let (name, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("{what}: {s:?} is not name@address:port"))?;
        ftvm_tls::validate_name(name).map_err(|e| format!("{what}: {e}"))?;
        let addr = parse_addr(what, addr)?;
        Ok(Named {
            name: name.to_string(),
            addr,
        })
    }
}

/// Parses `host:port`, saying so when the port is missing.
pub fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!("{what}: {s:?} has no port (write host:port)"));
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("{what}: cannot resolve {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what}: {s:?} resolves to no address"))
}

fn parse_duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{what}: {s:?}: {e} (e.g. 10ms, 1s)"))
}

/// One or several addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Every key a node.toml may have.
const KEYS: &[&str] = &[
    "pair",
    "node",
    "tls",
    "listen",
    "peer",
    "peers",
    "witness",
    "control",
    "metrics",
    "heartbeat",
    "failure_timeout",
    "max_lag",
    "wait_for_backup",
    "digest_every",
    "io_nice",
    "held_bytes",
    "release_log",
    "state",
    "guest",
    "mem",
    "guest_args",
    "disk",
    "disk_size",
    "tap",
    "mac",
    "ip",
    "gateway",
    "rng",
];

/// The file as written (unknown keys are refused by the flattened [`VmOptions`]).
#[derive(Debug, Deserialize)]
struct File {
    pair: String,
    node: String,
    tls: PathBuf,
    listen: String,
    peer: Option<String>,
    peers: Option<Vec<String>>,
    witness: OneOrMany,
    control: Option<PathBuf>,
    metrics: Option<String>,
    heartbeat: Option<String>,
    failure_timeout: Option<String>,
    max_lag: Option<String>,
    wait_for_backup: Option<bool>,
    digest_every: Option<u64>,
    io_nice: Option<i32>,
    held_bytes: Option<String>,
    release_log: Option<PathBuf>,
    state: Option<PathBuf>,
    #[serde(flatten)]
    vm: VmOptions,
}

/// The default of `digest_every` (a node's, and a solo recording's `--digest-every`): a
/// memory digest every this many boundaries. Each digest hashes all of guest memory on the
/// vCPU thread (~15 ms for 64 MiB); at 10,000 a busy kv guest compares memory every few
/// seconds and spends well under 1% of its time on it (docs/architecture.md, "Measured on
/// these hosts").
pub const DEFAULT_DIGEST_EVERY: u64 = 10_000;

/// A validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The pair's name (as in the witness's config).
    pub pair: String,
    /// This node's name (its certificate `tls/<node>.pem`).
    pub node: String,
    /// The certificate directory.
    pub tls: PathBuf,
    /// Where the logging channel listens.
    pub listen: SocketAddr,
    /// The other members of the pair.
    pub peers: Vec<Named>,
    /// The witness(es), tried in turn.
    pub witnesses: Vec<Named>,
    /// The control socket (`ftvm-node status`).
    pub control: PathBuf,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which a peer is lost.
    pub failure_timeout: Duration,
    /// How far the backup may fall behind before the primary's vCPU is held.
    pub max_lag: Duration,
    /// Whether a new primary waits for its backup before starting the guest.
    pub wait_for_backup: bool,
    /// A memory digest every this many boundaries.
    pub digest_every: u64,
    /// The nice value of the node's I/O thread (`ftvm-io`: the channel, the Output Rule's
    /// releases), below the vCPU's 0 so that an ack or a release is not queued behind the
    /// guest on a busy core; 0 leaves it as the vCPU's.
    pub io_nice: i32,
    /// Most bytes of output held by the Output Rule.
    pub held_bytes: u64,
    /// Where every release of output is appended (time, generation, frames), for checking
    /// from outside that two nodes never release at once (the soak); off by default.
    pub release_log: Option<PathBuf>,
    /// Where the generation is persisted.
    pub state: PathBuf,
    /// The VM.
    pub vm: VmOptions,
}

/// `io_nice`'s default. Measured (benches/ft_pair.rs, one 60% quota per host): the mean hold
/// of a reply under load 0.62 -> 0.27-0.49 ms, the I/O thread preempted 6,000-13,000 ->
/// 2,700-3,700 times per run; the throughput ratios moved within the runs' noise.
pub const DEFAULT_IO_NICE: i32 = -10;

/// The control socket's default path for `pair` and `node`.
pub fn default_control(pair: &str, node: &str) -> PathBuf {
    PathBuf::from(format!("/run/ftvm/{pair}-{node}.sock"))
}

impl NodeConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses and validates the text of a config file.
    pub fn parse(text: &str) -> Result<NodeConfig, String> {
        // serde's `flatten` cannot refuse unknown keys: check them here.
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(k) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!("unknown field `{k}` (known: {})", KEYS.join(", ")));
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        ftvm_tls::validate_name(&f.pair).map_err(|e| format!("pair: {e}"))?;
        ftvm_tls::validate_name(&f.node).map_err(|e| format!("node: {e}"))?;
        let peers = match (&f.peer, &f.peers) {
            (Some(p), None) => vec![Named::parse("peer", p)?],
            (None, Some(ps)) if !ps.is_empty() => ps
                .iter()
                .map(|p| Named::parse("peers", p))
                .collect::<Result<_, _>>()?,
            (None, _) => return Err("peer (or peers) is required".into()),
            (Some(_), Some(_)) => return Err("give peer or peers, not both".into()),
        };
        if peers.iter().any(|p| p.name == f.node) {
            return Err(format!("peer: {:?} is this node itself", f.node));
        }
        let witnesses: Vec<Named> = f
            .witness
            .list()
            .iter()
            .map(|w| Named::parse("witness", w))
            .collect::<Result<_, _>>()?;
        if witnesses.is_empty() {
            return Err("witness: at least one is required".into());
        }
        let heartbeat = parse_duration("heartbeat", f.heartbeat.as_deref().unwrap_or("10ms"))?;
        let failure_timeout = parse_duration(
            "failure_timeout",
            f.failure_timeout.as_deref().unwrap_or("200ms"),
        )?;
        let max_lag = parse_duration("max_lag", f.max_lag.as_deref().unwrap_or("50ms"))?;
        if heartbeat.is_zero() || failure_timeout < heartbeat * 3 {
            return Err(format!(
                "failure_timeout ({failure_timeout:?}) must be at least 3 heartbeats ({heartbeat:?})"
            ));
        }
        let state = match (&f.state, &f.vm.disk) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => disksync::sidecar(d, "ftvm-generation"),
            (None, None) => return Err("state is required when the VM has no disk".into()),
        };
        let io_nice = f.io_nice.unwrap_or(DEFAULT_IO_NICE);
        if !(-20..=19).contains(&io_nice) {
            return Err(format!(
                "io_nice: {io_nice} is not a nice value (-20 to 19)"
            ));
        }
        Ok(NodeConfig {
            control: f
                .control
                .clone()
                .unwrap_or_else(|| default_control(&f.pair, &f.node)),
            metrics: f
                .metrics
                .as_deref()
                .map(|m| parse_addr("metrics", m))
                .transpose()?,
            listen: parse_addr("listen", &f.listen)?,
            held_bytes: crate::plan::parse_size(f.held_bytes.as_deref().unwrap_or("16M"))
                .map_err(|e| format!("held_bytes: {e}"))?,
            release_log: f.release_log.clone(),
            pair: f.pair,
            node: f.node,
            tls: f.tls,
            peers,
            witnesses,
            heartbeat,
            failure_timeout,
            max_lag,
            wait_for_backup: f.wait_for_backup.unwrap_or(true),
            digest_every: f.digest_every.unwrap_or(DEFAULT_DIGEST_EVERY),
            io_nice,
            state,
            vm: f.vm,
        })
    }

    /// Every member's name, this node first.
    pub fn members(&self) -> Vec<String> {
        std::iter::once(self.node.clone())
            .chain(self.peers.iter().map(|p| p.name.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
pair = "kv1"
node = "a"
tls = "/etc/ftvm/tls"
listen = "10.0.0.1:7300"
peer = "b@10.0.0.2:7300"
witness = "witness@10.0.0.3:7200"
heartbeat = "10ms"
failure_timeout = "150ms"
max_lag = "20ms"
guest = "kv"
mem = "64M"
disk = "/var/lib/ftvm/kv1.img"
disk_size = "256M"
tap = "tap0"
mac = "52:54:00:12:34:56"
ip = "10.0.0.100/24"
"#;

    #[test]
    fn the_design_example_parses() {
        let c = NodeConfig::parse(GOOD).unwrap();
        assert_eq!(c.pair, "kv1");
        assert_eq!(c.peers[0].name, "b");
        assert_eq!(c.peers[0].addr, "10.0.0.2:7300".parse().unwrap());
        assert_eq!(c.failure_timeout, Duration::from_millis(150));
        assert_eq!(c.control, PathBuf::from("/run/ftvm/kv1-a.sock"));
        assert_eq!(
            c.state,
            PathBuf::from("/var/lib/ftvm/kv1.img.ftvm-generation")
        );
        assert!(c.wait_for_backup);
        assert_eq!(c.io_nice, DEFAULT_IO_NICE);
        assert_eq!(c.members(), vec!["a".to_string(), "b".to_string()]);
        let c = NodeConfig::parse(&GOOD.replace("mem = \"64M\"", "mem = \"64M\"\nio_nice = 0"))
            .unwrap();
        assert_eq!(c.io_nice, 0);
    }

    #[test]
    fn bad_configs_are_refused_with_the_key_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "peer = \"b@10.0.0.2:7300\"",
                "peer = \"b@10.0.0.2\"",
                "no port",
            ),
            (
                "peer = \"b@10.0.0.2:7300\"",
                "peer = \"10.0.0.2:7300\"",
                "name@address",
            ),
            (
                "peer = \"b@10.0.0.2:7300\"",
                "peer = \"a@10.0.0.2:7300\"",
                "itself",
            ),
            ("heartbeat = \"10ms\"", "heartbeat = \"ten\"", "heartbeat"),
            (
                "failure_timeout = \"150ms\"",
                "failure_timeout = \"20ms\"",
                "3 heartbeats",
            ),
            ("mem = \"64M\"", "mem = \"64M\"\nbogus = 1", "unknown field"),
            ("mem = \"64M\"", "mem = \"64M\"\nio_nice = -21", "io_nice"),
            (
                "witness = \"witness@10.0.0.3:7200\"",
                "witness = []",
                "witness",
            ),
        ];
        for (from, to, needle) in cases {
            let text = GOOD.replace(from, to);
            let e = NodeConfig::parse(&text).unwrap_err();
            assert!(e.contains(needle), "{to}: {e}");
        }
    }

    #[test]
    fn several_peers_and_witnesses() {
        let text = GOOD
            .replace(
                "peer = \"b@10.0.0.2:7300\"",
                "peers = [\"b@10.0.0.2:7300\", \"c@10.0.0.4:7300\"]",
            )
            .replace(
                "witness = \"witness@10.0.0.3:7200\"",
                "witness = [\"w1@10.0.0.3:7200\", \"w2@10.0.0.5:7200\"]",
            );
        let c = NodeConfig::parse(&text).unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.witnesses[1].name, "w2");
    }
}
