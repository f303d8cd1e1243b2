//! An FT pair in a lab: a witness host, nodes `a` and `b` (each with its TAP on the fabric and
//! a dedicated channel link between them), and a client host; certificates, the witness's
//! and the nodes' config files in a temporary directory; helpers to start, stop, query and
//! kill the processes.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{self, sibling_binary, Host, Lab, Spawned};
use crate::node::RunningNode;

/// The channel port every node listens on.
pub const CHANNEL_PORT: u16 = 7300;
/// The witness's port.
pub const WITNESS_PORT: u16 = 7200;
/// The lab etcd's client port (in the witness's namespace; the peer port is the next one).
pub const ETCD_PORT: u16 = 7379;

/// Witness `w`'s config file name.
fn witness_file(w: usize) -> String {
    if w == 0 {
        "witness.toml".into()
    } else {
        format!("witness-{w}.toml")
    }
}

/// Path of the built `ftvm-witness`.
pub fn witness_binary() -> Result<PathBuf> {
    sibling_binary("ftvm-witness", "FTVM_WITNESS")
}

/// Knobs of a pair lab.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Node names (two, or more for spares).
    pub nodes: Vec<String>,
    /// `heartbeat` in node.toml.
    pub heartbeat: String,
    /// `failure_timeout`.
    pub failure_timeout: String,
    /// `max_lag`.
    pub max_lag: String,
    /// `digest_every`.
    pub digest_every: u64,
    /// The guest's disk size.
    pub disk_size: String,
    /// Extra lines for every node.toml.
    pub extra: String,
    /// The guest (default `kv`).
    pub guest: String,
    /// Guest memory (default 64M).
    pub mem: String,
    /// How many witnesses (default 1, on rocksdb). More share one etcd member (in the
    /// witness's namespace) and every node lists them all.
    pub witnesses: usize,
}

impl PairOptions {
    /// The defaults with the timeouts the `kill -9` failover tests and the failover benchmark
    /// use: heartbeat 5 ms, failure_timeout 60 ms (the product's defaults are 10 ms and
    /// 200 ms; `benches/steady.rs` measures both for spurious failovers under full load).
    pub fn fast_failover() -> Self {
        PairOptions {
            heartbeat: "5ms".into(),
            failure_timeout: "60ms".into(),
            ..PairOptions::default()
        }
    }
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            nodes: vec!["a".into(), "b".into()],
            heartbeat: "10ms".into(),
            failure_timeout: "200ms".into(),
            max_lag: "50ms".into(),
            digest_every: 200,
            disk_size: "16M".into(),
            extra: String::new(),
            guest: "kv".into(),
            mem: "64M".into(),
            witnesses: 1,
        }
    }
}

/// Pair labs of one test process run one at a time: each runs two VMs, a witness and a client
/// load with sub-second failure timeouts, and two of them side by side on a 2-core machine
/// would measure the scheduler, not the pair.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lab and its files.
pub struct PairLab {
    /// The topology (dropped last: it removes the namespaces).
    pub lab: Lab,
    /// The witness host.
    pub witness: Host,
    /// The node hosts, in the order of [`PairOptions::nodes`].
    pub nodes: Vec<Host>,
    /// The client host.
    pub client: Host,
    /// The guest's address (the same VM on every node).
    pub guest_ip: Ipv4Addr,
    /// Each node's channel address, in the order of [`PairOptions::nodes`].
    pub channel: Vec<Ipv4Addr>,
    /// Certificates, configs, disks.
    pub dir: tempfile::TempDir,
    witness_procs: Vec<Option<Spawned>>,
    etcd: Option<Spawned>,
    opts: PairOptions,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl PairLab {
    /// Builds the lab, the certificates and the config files (nothing is started).
    pub fn new(opts: PairOptions) -> Result<PairLab> {
        // A test that panicked while holding the turn poisons it; the next one may still go.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        netns::preflight()?;
        crate::node::require_kvm();
        if opts.nodes.len() < 2 {
            bail!("a pair has at least two members");
        }
        let mut lab = Lab::new()?;
        let witness = lab.add_host("witness")?;
        let mut nodes = Vec::new();
        for n in &opts.nodes {
            nodes.push(lab.add_node(n)?);
        }
        let client = lab.add_host("client")?;
        // Two members talk over a link of their own (which tests can cut); more talk over the
        // fabric, each at its host's address.
        let channel: Vec<Ipv4Addr> = if nodes.len() == 2 {
            let (ca, cb) = lab.link(&nodes[0], &nodes[1])?;
            vec![ca, cb]
        } else {
            nodes.iter().map(|h| h.ip).collect()
        };
        let dir = tempfile::tempdir()?;
        let tls = dir.path().join("tls");
        let out = Command::new(witness_binary()?)
            .args(["certs", "init", "--dir"])
            .arg(&tls)
            .args(["--pair", "kv1", "--nodes", &opts.nodes.join(",")])
            .output()
            .context("ftvm-witness certs init")?;
        if !out.status.success() {
            bail!("certs init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let guest_ip = nodes[0].guest_ip.context("node")?;
        let mac = nodes[0].guest_mac.clone().context("node")?;
        let nw = opts.witnesses.max(1);
        for w in 0..nw {
            let store = if nw > 1 {
                format!(
                    "\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:{ETCD_PORT}\"]\nprefix = \"/ftvm-lab\"\ntimeout_ms = 1000\n"
                )
            } else {
                String::new()
            };
            std::fs::write(
                dir.path().join(witness_file(w)),
                format!(
                    "listen = \"{}:{}\"\ndata_dir = \"{}\"\ntls_dir = \"{}\"\nidentity = \"witness\"\n\n[pairs.kv1]\nnodes = [{}]\n{store}",
                    witness.ip,
                    WITNESS_PORT + w as u16,
                    dir.path().join(format!("witness-data{}", if w == 0 { String::new() } else { w.to_string() })).display(),
                    tls.display(),
                    opts.nodes.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
                ),
            )?;
        }
        let witness_list = (0..nw)
            .map(|w| format!("\"witness@{}:{}\"", witness.ip, WITNESS_PORT + w as u16))
            .collect::<Vec<_>>()
            .join(", ");
        for (i, me) in nodes.iter().enumerate() {
            let my_addr = channel[i];
            let others: Vec<String> = nodes
                .iter()
                .zip(&channel)
                .filter(|(h, _)| h.role != me.role)
                .map(|(h, a)| format!("{}@{a}:{CHANNEL_PORT}", h.role))
                .collect();
            let peers = if others.len() == 1 {
                format!("peer = \"{}\"", others[0])
            } else {
                format!(
                    "peers = [{}]",
                    others
                        .iter()
                        .map(|o| format!("\"{o}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let text = format!(
                r#"pair = "kv1"
node = "{me_name}"
tls = "{tls}"
listen = "{my_addr}:{CHANNEL_PORT}"
{peers}
witness = [{witness_list}]
control = "{dir}/{me_name}.sock"
heartbeat = "{hb}"
failure_timeout = "{ft}"
max_lag = "{lag}"
digest_every = {de}
guest = "{guest}"
mem = "{mem}"
disk = "{dir}/{me_name}.img"
disk_size = "{ds}"
tap = "{tap}"
mac = "{mac}"
ip = "{guest_ip}/24"
{extra}
"#,
                me_name = me.role,
                mem = opts.mem,
                tls = tls.display(),
                dir = dir.path().display(),
                hb = opts.heartbeat,
                ft = opts.failure_timeout,
                lag = opts.max_lag,
                de = opts.digest_every,
                ds = opts.disk_size,
                tap = me.tap.clone().context("node")?,
                extra = opts.extra,
                guest = opts.guest,
            );
            std::fs::write(dir.path().join(format!("{}.toml", me.role)), text)?;
        }
        Ok(PairLab {
            lab,
            witness,
            nodes,
            client,
            guest_ip,
            channel,
            dir,
            witness_procs: (0..opts.witnesses.max(1)).map(|_| None).collect(),
            etcd: None,
            opts,
            _turn: turn,
        })
    }

    /// The options the lab was made with.
    pub fn options(&self) -> &PairOptions {
        &self.opts
    }

    /// A node's host by name.
    pub fn host(&self, name: &str) -> &Host {
        self.nodes
            .iter()
            .find(|h| h.role == name)
            .expect("a node of this lab")
    }

    /// A node's config file.
    pub fn config(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    /// A node's disk image.
    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    /// Starts (or restarts) the witness and waits for it to be ready.
    pub fn start_witness(&mut self) -> Result<()> {
        for w in 0..self.witness_procs.len() {
            if self.witness_procs[w].is_none() {
                self.start_witness_at(w)?;
            }
        }
        Ok(())
    }

    /// Starts witness `w` (of [`PairOptions::witnesses`]; the first start of the first one
    /// initializes its store).
    pub fn start_witness_at(&mut self, w: usize) -> Result<()> {
        let shared = self.witness_procs.len() > 1;
        if shared && self.etcd.is_none() {
            self.start_etcd()?;
        }
        let marker = self.dir.path().join(format!("witness-{w}.started"));
        let init = if shared {
            w == 0 && !self.dir.path().join("witness-0.started").exists()
        } else {
            !self.dir.path().join("witness-data").exists()
        };
        let mut cmd = self.witness.ns.command(witness_binary()?);
        cmd.args(["serve", "--config"])
            .arg(self.dir.path().join(witness_file(w)));
        if init {
            cmd.arg("--init");
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let sp = start_witness_process(cmd, Duration::from_secs(20))
            .with_context(|| format!("witness {w}"))?;
        std::fs::write(marker, b"")?;
        self.witness_procs[w] = Some(sp);
        Ok(())
    }

    /// One etcd member on loopback in the witness's namespace (the witnesses' shared store).
    fn start_etcd(&mut self) -> Result<()> {
        let mut cmd = self.witness.ns.command("etcd");
        cmd.arg("--name")
            .arg("lab")
            .arg("--data-dir")
            .arg(self.dir.path().join("etcd-data"))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{ETCD_PORT}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{ETCD_PORT}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", ETCD_PORT + 1))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", ETCD_PORT + 1))
            .arg("--initial-cluster")
            .arg(format!("lab=http://127.0.0.1:{}", ETCD_PORT + 1))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let sp = Spawned::start(cmd).context("etcd (scripts/setup installs etcd-server)")?;
        // Ready when it accepts a client connection.
        let deadline = Instant::now() + Duration::from_secs(20);
        let ns = self.witness.ns.clone();
        loop {
            let ok = ns
                .command("bash")
                .args([
                    "-c",
                    &format!("exec 3<>/dev/tcp/127.0.0.1/{ETCD_PORT} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q true <&3"),
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.etcd = Some(sp);
        Ok(())
    }

    /// Kills every witness (SIGKILL).
    pub fn kill_witness(&mut self) {
        for w in self.witness_procs.iter_mut() {
            *w = None;
        }
    }

    /// Kills witness `w` (SIGKILL).
    pub fn kill_witness_at(&mut self, w: usize) {
        self.witness_procs[w] = None;
    }

    /// Starts the witness and both nodes, waits until both guests booted and one node is
    /// primary, the other backup; returns (primary name, primary, backup name, backup).
    pub fn start_pair(
        &mut self,
        boot_line: &str,
    ) -> Result<(String, RunningNode, String, RunningNode)> {
        self.start_witness()?;
        let (na, nb) = (self.nodes[0].role.clone(), self.nodes[1].role.clone());
        let mut a = self.start_node(&na, &[])?;
        let mut b = self.start_node(&nb, &[])?;
        a.expect_line(boot_line, Duration::from_secs(60))?;
        b.expect_line(boot_line, Duration::from_secs(60))?;
        let limit = Duration::from_secs(15);
        if self.status(&na)?["role"] == "primary" {
            self.wait_role(&nb, "backup", limit)?;
            Ok((na, a, nb, b))
        } else {
            self.wait_role(&nb, "primary", limit)?;
            self.wait_role(&na, "backup", limit)?;
            Ok((nb, b, na, a))
        }
    }

    /// Starts node `name` (`ftvm-node run --config`, plus `extra` arguments).
    pub fn start_node(&self, name: &str, extra: &[&str]) -> Result<RunningNode> {
        let mut args = vec![
            "run".to_string(),
            "--config".to_string(),
            self.config(name).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        RunningNode::start_logged(&self.host(name).ns, &args, &self.log(name))
    }

    /// Cuts one direction of the channel: nothing `from` sends to `to`'s channel address
    /// arrives (a blackhole route in `from`'s namespace; `to` still reaches `from`).
    /// `false` restores it.
    pub fn cut_one_way(&self, from: &str, to: &str, cut: bool) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|h| h.role == to)
            .context("no such node")?;
        let addr = format!("{}/32", self.channel[i]);
        self.host(from)
            .ns
            .ip(&["route", if cut { "add" } else { "del" }, "blackhole", &addr])?;
        Ok(())
    }

    /// Node `name`'s log file (stderr of every run, appended).
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last `n` lines of every node's log (for failure messages).
    pub fn logs(&self, n: usize) -> String {
        let mut s = String::new();
        for h in &self.nodes {
            let text = std::fs::read_to_string(self.log(&h.role)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!("---- {} (last {n} lines) ----\n", h.role);
            for l in &lines[lines.len().saturating_sub(n)..] {
                s += l;
                s += "\n";
            }
        }
        s
    }

    /// `ftvm-node status --json` of node `name`, parsed (an error if it cannot be reached).
    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        let out = Command::new(crate::node::node_binary()?)
            .args(["status", "--json", "--config"])
            .arg(self.config(name))
            .output()?;
        if !out.status.success() {
            bail!("status {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits (at most `limit`) until node `name` reports `role`; returns its status.
    pub fn wait_role(&self, name: &str, role: &str, limit: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            match self.status(name) {
                Ok(s) if s["role"] == role => return Ok(s),
                Ok(s) => last = Some(s.to_string()),
                Err(e) => last = Some(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{name} did not become {role} within {limit:?}; last status: {last:?}\n{}",
            self.logs(40)
        )
    }

    /// Whether the first two nodes' disk images are byte-identical.
    pub fn disks_equal(&self) -> Result<bool> {
        self.disks_equal_of(&self.nodes[0].role, &self.nodes[1].role)
    }

    /// Whether nodes `x` and `y` have byte-identical disk images.
    pub fn disks_equal_of(&self, x: &str, y: &str) -> Result<bool> {
        Ok(std::fs::read(self.disk(x))? == std::fs::read(self.disk(y))?)
    }

    /// Path of the certificate directory.
    pub fn tls(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The directory of the lab's files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts a witness (`cmd`, with its stdout piped) and waits until it prints that it is
/// ready, for at most `limit`.
pub fn start_witness_process(cmd: Command, limit: Duration) -> Result<Spawned> {
    let mut sp = Spawned::start(cmd)?;
    let out = sp.child().stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("ftvm-witness ready") => return Ok(sp),
            Ok(_) => {}
            Err(_) => bail!("the witness did not become ready within {limit:?}"),
        }
    }
}
