//! Running `ftvm-node` and stock Redis clients inside a lab's namespaces.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{Host, Netns};

/// Path of the built `ftvm-node`: `$FTVM_NODE`, or next to the running test executable.
pub fn node_binary() -> Result<PathBuf> {
    crate::netns::sibling_binary("ftvm-node", "FTVM_NODE")
}

/// Fails loudly when KVM is unusable here: these tests need it, and CI has it. The one check
/// of every test crate that runs guests (the VMM's own tests use it too).
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "\n*** this test needs /dev/kvm (read/write) and cannot run here: {e} ***\n\
             *** run the tests as root on a host with KVM ***\n"
        );
    }
}

/// An `ftvm-node` running in a namespace; its stdout lines (the guest console) arrive on a
/// channel and are kept. Killed when dropped.
pub struct RunningNode {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every console line seen so far.
    pub console: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl RunningNode {
    /// Starts `ftvm-node <args>` inside `ns`.
    pub fn start(ns: &Netns, args: &[String]) -> Result<RunningNode> {
        RunningNode::spawn(ns.command(node_binary()?), args)
    }

    /// Starts `ftvm-node <args>` in the test's own network namespace (no network devices).
    pub fn start_here(args: &[&str]) -> Result<RunningNode> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        RunningNode::spawn(Command::new(node_binary()?), &args)
    }

    /// Starts `ftvm-node <args>` inside `ns` with its log (stderr, `FTVM_LOG=info`) appended
    /// to `log` (read it after a failure; [`RunningNode::wait`] then returns no stderr).
    pub fn start_logged(ns: &Netns, args: &[String], log: &Path) -> Result<RunningNode> {
        let mut cmd = ns.command(node_binary()?);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("log file {}", log.display()))?;
        cmd.env("FTVM_LOG", "info,virtio_queue=off").stderr(f);
        RunningNode::spawn_with(cmd, args, false)
    }

    fn spawn(cmd: Command, args: &[String]) -> Result<RunningNode> {
        RunningNode::spawn_with(cmd, args, true)
    }

    fn spawn_with(mut cmd: Command, args: &[String], pipe_stderr: bool) -> Result<RunningNode> {
        require_kvm();
        cmd.args(args).stdout(Stdio::piped());
        if pipe_stderr {
            cmd.stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().context("spawning ftvm-node")?;
        let out = child.stdout.take().context("stdout")?;
        let mut err: Box<dyn std::io::Read + Send> = match child.stderr.take() {
            Some(e) => Box::new(e),
            None => Box::new(std::io::empty()),
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        Ok(RunningNode {
            child: Some(child),
            lines,
            console: Vec::new(),
            stderr: Some(stderr),
        })
    }

    /// Starts the bundled `kv` guest on `host`'s TAP with the disk `disk`.
    pub fn kv(host: &Host, disk: &Path, extra: &[&str]) -> Result<RunningNode> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--solo".into(),
            "--guest".into(),
            "kv".into(),
            "--disk".into(),
            disk.display().to_string(),
            "--disk-size".into(),
            "16M".into(),
            "--tap".into(),
            host.tap.clone().context("not a node")?,
            "--mac".into(),
            host.guest_mac.clone().context("not a node")?,
            "--ip".into(),
            host.guest_cidr().context("not a node")?,
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        RunningNode::start(&host.ns, &args)
    }

    /// Waits (at most `limit`) for a console line containing `needle`; returns it.
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        if let Some(l) = self.console.iter().find(|l| l.contains(needle)) {
            return Ok(l.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.console.push(l.clone());
                    if l.contains(needle) {
                        return Ok(l);
                    }
                }
                Err(_) => bail!(
                    "no console line containing {needle:?} within {limit:?}; console so far:\n{}",
                    self.console.join("\n")
                ),
            }
        }
    }

    /// The process id (0 once waited for).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` to the node.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for the node to exit (at most `limit`); returns its status and stderr.
    pub fn wait(mut self, limit: Duration) -> Result<(ExitStatus, String)> {
        let mut child = self.child.take().context("already waited")?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("ftvm-node did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for l in self.lines.try_iter() {
            self.console.push(l);
        }
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Ok((status, err))
    }

    /// Kills the node with SIGKILL and reaps it.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs stock `redis-cli -h addr <args>` inside `ns`.
pub fn redis_cli(ns: &Netns, addr: Ipv4Addr, args: &[&str]) -> Result<Output> {
    let mut cmd: Command = ns.command("redis-cli");
    cmd.arg("-h").arg(addr.to_string()).args(args);
    cmd.output()
        .context("running redis-cli (is redis-tools installed? scripts/setup)")
}

/// `redis-cli` output as trimmed text, failing on a non-zero exit.
pub fn redis_text(ns: &Netns, addr: Ipv4Addr, args: &[&str]) -> Result<String> {
    let o = redis_cli(ns, addr, args)?;
    if !o.status.success() {
        bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Runs `f` on a thread inside the network namespace `ns` (for raw sockets from the test).
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{}", ns.name());
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    let h = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open netns file descriptor; it changes only this thread's
        // network namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    });
    h.join()
        .map_err(|_| anyhow::anyhow!("the thread in {path} panicked"))
}
