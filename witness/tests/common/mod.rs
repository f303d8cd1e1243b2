//! Helpers shared by the integration tests: certificate directories made with the real CLI
//! and real `ftvm-witness serve` processes on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ftvm_witness::{ClientOptions, WitnessClient};

pub mod etcd;

pub const BIN: &str = env!("CARGO_BIN_EXE_ftvm-witness");
/// The witness with fault-injection hooks (built only for the tests).
pub const HOOKS_BIN: &str = env!("CARGO_BIN_EXE_ftvm-witness-test-hooks");
/// Arms the hooks binary's crash between a durable grant and its reply.
pub const CRASH_AFTER_WRITE_ENV: &str = "FTVM_WITNESS_TEST_CRASH_AFTER_WRITE";

/// Runs the CLI to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FTVM_LOG", "warn")
        .output()
        .expect("running ftvm-witness")
}

/// `certs init` into `dir` for one pair; returns the config path.
pub fn certs_init(dir: &Path, pair: &str, nodes: &[&str]) -> PathBuf {
    let out = cli(&[
        "certs",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--pair",
        pair,
        "--nodes",
        &nodes.join(","),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(out.status.success(), "certs init failed: {out:?}");
    dir.join("witness.toml")
}

/// A running witness process (killed on drop).
pub struct WitnessProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
}

/// How `start` ended when the process did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub code: Option<i32>,
    pub stderr: String,
}

/// Starts `serve --config CONFIG --listen LISTEN --metrics 127.0.0.1:0 [--init]` and waits for
/// its readiness line on stdout (or its exit).
pub fn try_start(config: &Path, listen: &str, init: bool) -> Result<WitnessProc, StartFailure> {
    try_start_env(config, listen, init, &[])
}

/// [`try_start`] with extra environment variables.
pub fn try_start_env(
    config: &Path,
    listen: &str,
    init: bool,
    env: &[(&str, &str)],
) -> Result<WitnessProc, StartFailure> {
    try_start_bin(BIN, config, listen, init, env)
}

/// [`try_start_env`] of the binary `bin` (e.g. [`HOOKS_BIN`]).
pub fn try_start_bin(
    bin: &str,
    config: &Path,
    listen: &str,
    init: bool,
    env: &[(&str, &str)],
) -> Result<WitnessProc, StartFailure> {
    let log = config.with_file_name(format!(
        "witness-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        listen,
    ])
    .args(["--metrics", "127.0.0.1:0"])
    .env(
        "FTVM_LOG",
        std::env::var("WITNESS_TEST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap());
    if init {
        cmd.arg("--init");
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawning ftvm-witness serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    if !line.starts_with("ftvm-witness ready ") {
        let _ = child.kill();
        let st = child.wait().unwrap();
        return Err(StartFailure {
            code: st.code(),
            stderr: std::fs::read_to_string(&log).unwrap_or_default(),
        });
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    let addr = field("listen=").unwrap().parse().unwrap();
    let metrics = field("metrics=").and_then(|m| m.parse().ok());
    Ok(WitnessProc {
        child,
        addr,
        metrics,
        log,
    })
}

/// Like [`try_start`] but panics on failure.
pub fn start(config: &Path, listen: &str, init: bool) -> WitnessProc {
    match try_start(config, listen, init) {
        Ok(w) => w,
        Err(e) => panic!("witness did not start: {e:?}"),
    }
}

impl WitnessProc {
    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        if let Ok(d) = std::env::var("WITNESS_TEST_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&d);
            let _ = std::fs::copy(&self.log, Path::new(&d).join(self.log.file_name().unwrap()));
        }
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Scrapes the metrics endpoint.
    pub fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics.expect("metrics on")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        out
    }

    /// The status line of a GET of `path` on the metrics listener.
    pub fn http_status(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.metrics.expect("metrics on")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }

    /// One sample of the metrics endpoint, by its full name with labels.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast-failing client options for tests.
pub fn opts() -> ClientOptions {
    ClientOptions {
        attempt_timeout: Duration::from_secs(5),
        attempts: 5,
        retry_delay: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

/// A client for `node` with certificates from `dir`.
pub fn client(dir: &Path, node: &str, addr: SocketAddr) -> WitnessClient {
    let id = ftvm_tls::Identity::load(dir, node).unwrap();
    WitnessClient::new(addr, &id, opts()).unwrap()
}
