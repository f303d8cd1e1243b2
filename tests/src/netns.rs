//! Network-namespace topologies that stand in for hosts in end-to-end tests.
//!
//! A [`Lab`] is one isolated topology, built with `ip` (iproute2; tests run as root):
//!
//! ```text
//!   client ns          node ns (e.g. "a")                           fabric ns
//!  ┌──────────┐       ┌─────────────────────────────────┐         ┌──────────────┐
//!  │ <id>h0   │       │ <id>n1 (bridge, host address)   │         │ <id>b bridge │
//!  │ 10.203.  ├─veth──┤   ├─ <id>h1 (veth uplink)  ─────┼──veth───┤  <id>p0, p1… │
//!  │   0.10   │   │   │   └─ <id>t1 (TAP of the VM)     │    │    └──────────────┘
//!  └──────────┘   │   └─────────────────────────────────┘    │
//!                 └──── fabric side: <id>p0               fabric side: <id>p1
//! ```
//!
//! Each host is a namespace joined to the fabric bridge by a veth pair. A *node* (a host that
//! runs a VM) also gets a bridge of its own holding its uplink and a TAP device: the VMM,
//! started inside the node's namespace with [`Netns::command`], opens the TAP by name, and
//! the guest sits on the same layer-2 segment as every other host. Addresses are in
//! `10.203.0.0/24` and exist only inside the lab's namespaces; nothing is created in, or
//! routed through, the root namespace.
//!
//! Names are unique per lab (`ftn` + the pid in base 36 + a per-process counter, so labs can
//! run side by side, also across processes) and short enough for the 15-byte interface-name
//! limit. Dropping the lab deletes everything it made, also when the test panics; a lab
//! created after a crashed run sweeps away namespaces and links whose name carries the pid
//! of a process that no longer exists ([`sweep_stale`]). IPv6 is disabled in every lab
//! namespace and on every lab interface, so no background traffic wakes a guest.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// First three bytes of every name this module creates.
pub const NAME_PREFIX: &str = "ftn";
/// The network of every lab (each lab is isolated, so labs may share it).
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 0);
/// Prefix length of [`SUBNET`].
pub const PREFIX_LEN: u8 = 24;

const PID_DIGITS: usize = 5;
static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

fn base36(mut v: u64, width: usize) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = vec![b'0'; width];
    for c in s.iter_mut().rev() {
        *c = digits[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8(s).expect("ascii")
}

/// The pid encoded in a name made by this module, if it is one.
fn pid_of_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(NAME_PREFIX)?.get(..PID_DIGITS)?;
    u32::from_str_radix(digits, 36).ok()
}

/// Runs a command and fails with its stderr if it exits non-zero.
fn checked(mut cmd: Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip ARGS…` and fails with its stderr on error.
pub fn ip(args: &[&str]) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(args);
    checked(c)
}

/// Checks that namespaces can be built here: running as root, and `ip` (iproute2) present.
/// The error says loudly what is missing; tests must fail on it, never skip.
pub fn preflight() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        bail!(
            "NETWORK-NAMESPACE TESTS CANNOT RUN: they need root (effective uid is {euid}); \
             CI runs as root — run the tests as root"
        );
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "NETWORK-NAMESPACE TESTS CANNOT RUN: `ip -V` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => bail!(
            "NETWORK-NAMESPACE TESTS CANNOT RUN: iproute2's `ip` is not installed ({e}); \
             install the iproute2 package"
        ),
    }
}

/// All network namespace names (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Interface names in namespace `ns` (None: the root namespace).
pub fn list_links(ns: Option<&str>) -> Result<Vec<String>> {
    let out = match ns {
        Some(ns) => ip(&["-n", ns, "-o", "link", "show"])?,
        None => ip(&["-o", "link", "show"])?,
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect())
}

/// Deletes namespaces and root-namespace links left by earlier runs whose process is gone
/// (their names carry the pid of a process that no longer exists). Best effort: returns
/// what it removed. Labs run it once per process.
pub fn sweep_stale() -> Vec<String> {
    let me = std::process::id();
    let stale = |name: &str| match pid_of_name(name) {
        Some(pid) => pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    };
    let mut removed = Vec::new();
    for ns in list_netns().unwrap_or_default() {
        if stale(&ns) && ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    for link in list_links(None).unwrap_or_default() {
        if stale(&link) && ip(&["link", "del", &link]).is_ok() {
            removed.push(link);
        }
    }
    removed
}

/// A named network namespace of a lab. Cheap to clone; only the [`Lab`] deletes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// The namespace's name (for `ip netns exec` / `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A [`Command`] that runs `program` inside this namespace (`ip netns exec NAME
    /// program`); add arguments, environment and stdio as usual. `ip netns exec` execs the
    /// program, so a spawned child's pid is the program's own.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `args[0]` with `args[1..]` inside the namespace and returns its output,
    /// whatever its exit status.
    pub fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut c = self.command(prog);
        c.args(rest).stdin(Stdio::null());
        c.output().with_context(|| format!("cannot run {c:?}"))
    }

    /// Runs a command inside the namespace and fails (with its stderr) unless it succeeds;
    /// returns its stdout.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut c = self.command(prog);
        c.args(rest);
        let out = checked(c)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running command inside the namespace; it is killed when the returned
    /// guard is dropped.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Spawned> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut c = self.command(prog);
        c.args(rest).stdin(Stdio::null());
        Spawned::start(c)
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// Sends ICMP echo requests from this namespace to `addr` with [`probe_binary`];
    /// true if a reply came back within `attempts` tries of `timeout` each.
    pub fn ping(&self, addr: Ipv4Addr, attempts: u32, timeout: Duration) -> Result<bool> {
        let out = self.output(&[
            probe_binary()?.into_os_string(),
            "ping".into(),
            addr.to_string().into(),
            attempts.to_string().into(),
            timeout.as_millis().to_string().into(),
        ])?;
        probe_result(out)
    }

    /// Opens a TCP connection from this namespace to `addr:port` and checks that a line is
    /// echoed back (the far end runs `ftvm-nsprobe listen`, see [`Netns::spawn_echo`]).
    pub fn tcp_echo(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> Result<bool> {
        let out = self.output(&[
            probe_binary()?.into_os_string(),
            "connect".into(),
            format!("{addr}:{port}").into(),
            timeout.as_millis().to_string().into(),
        ])?;
        probe_result(out)
    }

    /// Checks that a TCP connection from this namespace to `addr:port` opens (e.g. that a
    /// guest's server is listening); sends nothing.
    pub fn tcp_open(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> Result<bool> {
        let out = self.output(&[
            probe_binary()?.into_os_string(),
            "open".into(),
            format!("{addr}:{port}").into(),
            timeout.as_millis().to_string().into(),
        ])?;
        probe_result(out)
    }

    /// Starts a TCP echo server in this namespace on `addr:port`.
    pub fn spawn_echo(&self, addr: Ipv4Addr, port: u16) -> Result<Spawned> {
        self.spawn(&[
            probe_binary()?.into_os_string(),
            "listen".into(),
            format!("{addr}:{port}").into(),
        ])
    }

    /// Polls `probe` every 50 ms until it returns true or `timeout` passes.
    pub fn wait_until(timeout: Duration, mut probe: impl FnMut() -> Result<bool>) -> Result<bool> {
        let end = Instant::now() + timeout;
        loop {
            if probe()? {
                return Ok(true);
            }
            if Instant::now() >= end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn probe_result(out: Output) -> Result<bool> {
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "ftvm-nsprobe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Path of the `ftvm-nsprobe` binary of this crate: `$FTVM_NSPROBE` if set, otherwise next to
/// (or one directory above) the running test executable, where cargo puts it.
pub fn probe_binary() -> Result<PathBuf> {
    sibling_binary("ftvm-nsprobe", "FTVM_NSPROBE")
}

/// Path of a binary cargo built beside the running test executable (in its directory or one
/// above), or `$env_var` if set.
pub fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {} (build the workspace first: cargo build --workspace, or \
         set {env_var})",
        exe.display()
    )
}

/// A child process started by a test; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
}

impl Spawned {
    /// Spawns `cmd` and guards the child.
    pub fn start(mut cmd: Command) -> Result<Spawned> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {cmd:?}"))?;
        Ok(Spawned { child })
    }

    /// Guards an already spawned child.
    pub fn from_child(child: Child) -> Spawned {
        Spawned { child }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself (to read its pipes, send signals, or wait).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One host of a lab: a namespace on the fabric, with an address and, for a node, a TAP.
#[derive(Clone, Debug)]
pub struct Host {
    /// The role given when it was added ("client", "a", "witness", …).
    pub role: String,
    /// Its namespace.
    pub ns: Netns,
    /// Its address (on [`SUBNET`], prefix [`PREFIX_LEN`]).
    pub ip: Ipv4Addr,
    /// The veth end inside the host's namespace (its uplink).
    pub uplink: String,
    /// The veth end inside the fabric namespace, on the fabric bridge ([`Lab::cut`] downs it).
    pub fabric_port: String,
    /// For a node: its bridge (holding the uplink and the TAP, and the host address).
    pub bridge: Option<String>,
    /// For a node: the TAP device its VM uses (inside `ns`, attached to `bridge`).
    pub tap: Option<String>,
    /// For a node: an address for its guest (same subnet, not used by any host).
    pub guest_ip: Option<Ipv4Addr>,
    /// For a node: a locally administered MAC address for its guest.
    pub guest_mac: Option<String>,
}

impl Host {
    /// The host's address with its prefix, e.g. `10.203.0.11/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{PREFIX_LEN}", self.ip)
    }

    /// For a node: its guest's address with the prefix, as `ftvm-node --ip` takes it.
    pub fn guest_cidr(&self) -> Option<String> {
        self.guest_ip.map(|ip| format!("{ip}/{PREFIX_LEN}"))
    }
}

/// An isolated topology: a fabric namespace with a bridge, and hosts attached to it.
/// Everything is removed on drop.
#[derive(Debug)]
pub struct Lab {
    id: String,
    fabric: Netns,
    bridge: String,
    hosts: Vec<Host>,
    namespaces: Vec<String>,
    cleaned: bool,
}

impl Lab {
    /// Builds an empty lab (fabric namespace and bridge). Fails loudly if not root or `ip`
    /// is missing (see [`preflight`]); sweeps leftovers of dead processes once per process.
    pub fn new() -> Result<Lab> {
        preflight()?;
        SWEEP.call_once(|| {
            let removed = sweep_stale();
            if !removed.is_empty() {
                eprintln!("netns: removed leftovers of earlier runs: {removed:?}");
            }
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        if n >= 36 * 36 {
            bail!("too many labs in one process");
        }
        let id = format!(
            "{NAME_PREFIX}{}{}",
            base36(std::process::id() as u64, PID_DIGITS),
            base36(n as u64, 2)
        );
        let mut lab = Lab {
            fabric: Netns {
                name: format!("{id}-fabric"),
            },
            bridge: format!("{id}b"),
            id,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            cleaned: false,
        };
        let fabric = lab.fabric.clone();
        lab.create_netns(&fabric)?;
        fabric.ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        lab.disable_ipv6(&fabric, &[&lab.bridge])?;
        fabric.ip(&["link", "set", &lab.bridge, "up"])?;
        Ok(lab)
    }

    /// The lab's unique name prefix: every namespace and interface name starts with it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The fabric namespace (holding the bridge that joins the hosts).
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// Makes the fabric bridge and every node's bridge forget where each MAC address was
    /// learned (a VM that moved to another host without announcing itself is found again by
    /// flooding).
    pub fn forget_macs(&self) -> Result<()> {
        let mut bridges = vec![(&self.fabric, self.bridge.as_str())];
        for h in &self.hosts {
            if let Some(b) = &h.bridge {
                bridges.push((&h.ns, b.as_str()));
            }
        }
        for (ns, br) in bridges {
            let o = ns
                .command("bridge")
                .args(["fdb", "flush", "dev", br, "nopermanent", "nostatic"])
                .output()
                .context("bridge fdb flush")?;
            if !o.status.success() {
                bail!(
                    "bridge fdb flush dev {br}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// The hosts added so far.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Names of the namespaces this lab created.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn create_netns(&mut self, ns: &Netns) -> Result<()> {
        ip(&["netns", "add", &ns.name])?;
        self.namespaces.push(ns.name.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        // New interfaces inherit "default"; the per-interface switch is set again below.
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            ns.run(&[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
        }
        Ok(())
    }

    fn disable_ipv6(&self, ns: &Netns, ifaces: &[&str]) -> Result<()> {
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            return Ok(());
        }
        let mut args = vec!["sysctl".to_string(), "-qw".to_string()];
        args.extend(
            ifaces
                .iter()
                .map(|i| format!("net.ipv6.conf.{i}.disable_ipv6=1")),
        );
        ns.run(&args)?;
        Ok(())
    }

    /// Adds a plain host (client, witness): a namespace joined to the fabric, with an
    /// address.
    pub fn add_host(&mut self, role: &str) -> Result<Host> {
        self.add(role, false)
    }

    /// Adds a node: a host whose namespace also has a bridge and a TAP device for its VM.
    /// Start the VMM inside `host.ns` with `--tap <host.tap>`, `--ip <host.guest_ip>/24`.
    pub fn add_node(&mut self, role: &str) -> Result<Host> {
        self.add(role, true)
    }

    fn add(&mut self, role: &str, node: bool) -> Result<Host> {
        let k = self.hosts.len();
        if k >= 36 {
            bail!("a lab holds at most 36 hosts");
        }
        let kc = base36(k as u64, 1);
        let role_ok = !role.is_empty()
            && role.len() <= 16
            && role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !role_ok {
            bail!("bad host role {role:?} (1-16 of [A-Za-z0-9-])");
        }
        let ns = Netns {
            name: format!("{}-{kc}-{role}", self.id),
        };
        self.create_netns(&ns)?;
        let uplink = format!("{}h{kc}", self.id);
        let fabric_port = format!("{}p{kc}", self.id);
        ip(&[
            "link",
            "add",
            &uplink,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &fabric_port,
            "netns",
            &self.fabric.name,
        ])?;
        self.disable_ipv6(&self.fabric, &[&fabric_port])?;
        self.fabric
            .ip(&["link", "set", &fabric_port, "master", &self.bridge])?;
        self.fabric.ip(&["link", "set", &fabric_port, "up"])?;
        let host_ip = Ipv4Addr::new(10, 203, 0, 10 + k as u8);
        let cidr = format!("{host_ip}/{PREFIX_LEN}");
        let mut host = Host {
            role: role.to_string(),
            ns: ns.clone(),
            ip: host_ip,
            uplink: uplink.clone(),
            fabric_port,
            bridge: None,
            tap: None,
            guest_ip: None,
            guest_mac: None,
        };
        if node {
            let bridge = format!("{}n{kc}", self.id);
            let tap = format!("{}t{kc}", self.id);
            ns.ip(&["link", "add", &bridge, "type", "bridge"])?;
            ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            self.disable_ipv6(&ns, &[&uplink, &bridge, &tap])?;
            ns.ip(&["link", "set", &uplink, "master", &bridge])?;
            ns.ip(&["link", "set", &tap, "master", &bridge])?;
            ns.ip(&["addr", "add", &cidr, "dev", &bridge])?;
            for i in [&uplink, &tap, &bridge] {
                ns.ip(&["link", "set", i, "up"])?;
            }
            host.guest_ip = Some(Ipv4Addr::new(10, 203, 0, 100 + k as u8));
            host.guest_mac = Some(format!("52:54:00:cb:00:{:02x}", k));
            host.bridge = Some(bridge);
            host.tap = Some(tap);
        } else {
            self.disable_ipv6(&ns, &[&uplink])?;
            ns.ip(&["addr", "add", &cidr, "dev", &uplink])?;
            ns.ip(&["link", "set", &uplink, "up"])?;
        }
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Cuts `host` off the fabric (its fabric-side port goes down), as if its cable were
    /// pulled: traffic between it and every other host stops, in both directions.
    pub fn cut(&self, host: &Host) -> Result<()> {
        self.fabric
            .ip(&["link", "set", &host.fabric_port, "down"])?;
        Ok(())
    }

    /// A dedicated point-to-point link between two hosts (as an FT logging network would be):
    /// a veth pair `<id>c<k>` in each namespace with `10.204.0.1/30` on `x` and `10.204.0.2/30`
    /// on `y`. Returns the two addresses. Cut it with [`Lab::cut_link`].
    pub fn link(&mut self, x: &Host, y: &Host) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let kx = x.ns.name.rsplit('-').nth(1).unwrap_or("x").to_string();
        let ky = y.ns.name.rsplit('-').nth(1).unwrap_or("y").to_string();
        let (ix, iy) = (format!("{}c{kx}", self.id), format!("{}c{ky}", self.id));
        ip(&[
            "link", "add", &ix, "netns", &x.ns.name, "type", "veth", "peer", "name", &iy, "netns",
            &y.ns.name,
        ])?;
        let (ax, ay) = (Ipv4Addr::new(10, 204, 0, 1), Ipv4Addr::new(10, 204, 0, 2));
        for (h, i, a) in [(x, &ix, ax), (y, &iy, ay)] {
            self.disable_ipv6(&h.ns, &[i])?;
            h.ns.ip(&["addr", "add", &format!("{a}/30"), "dev", i])?;
            h.ns.ip(&["link", "set", i, "up"])?;
        }
        Ok((ax, ay))
    }

    /// Takes `host`'s end of the link made by [`Lab::link`] down (`false`: up again).
    pub fn cut_link(&self, host: &Host, down: bool) -> Result<()> {
        let k = host.ns.name.rsplit('-').nth(1).unwrap_or("x");
        let i = format!("{}c{k}", self.id);
        host.ns
            .ip(&["link", "set", &i, if down { "down" } else { "up" }])?;
        Ok(())
    }

    /// Reconnects a host cut by [`Lab::cut`].
    pub fn restore(&self, host: &Host) -> Result<()> {
        self.fabric.ip(&["link", "set", &host.fabric_port, "up"])?;
        Ok(())
    }

    /// Deletes everything the lab made and checks that nothing with its id remains.
    /// Called by `Drop` (which can only print errors); call it directly to see them.
    pub fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let mut errors = Vec::new();
        // Deleting a namespace destroys its interfaces, and the veth peers elsewhere.
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                errors.push(format!("{e:#}"));
            }
        }
        let left: Vec<String> = list_netns()?
            .into_iter()
            .chain(list_links(None)?)
            .filter(|n| n.starts_with(&self.id))
            .collect();
        for name in &left {
            // Root-namespace links can only be left by an interrupted build; delete them.
            let _ = ip(&["link", "del", name]);
        }
        if !errors.is_empty() || !left.is_empty() {
            bail!(
                "netns cleanup of {}: errors {errors:?}, left behind {left:?}",
                self.id
            );
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("netns: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_parse() {
        let pid = 4_194_304u64; // the largest pid Linux allows
        let id = format!(
            "{NAME_PREFIX}{}{}",
            base36(pid, PID_DIGITS),
            base36(1295, 2)
        );
        assert_eq!(id.len(), 10);
        let iface = format!("{id}t{}", base36(35, 1));
        assert!(iface.len() <= 15);
        assert_eq!(pid_of_name(&iface), Some(pid as u32));
        assert_eq!(pid_of_name("eth0"), None);
        assert_eq!(pid_of_name("ftnzz"), None);
    }
}
