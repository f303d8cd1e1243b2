//! Helpers shared by the integration tests: seeded random images, certificates, and
//! running the real `ftvm-resync` binary.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

pub const BIN: &str = env!("CARGO_BIN_EXE_ftvm-resync");

/// splitmix64: a small seeded generator (no dependency, reproducible).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.next().to_le_bytes());
        let mut out = vec![0u8; n];
        blake3::Hasher::new_keyed(&key)
            .finalize_xof()
            .fill(&mut out);
        out
    }
}

/// Writes a random image of `size` bytes.
pub fn random_image(path: &Path, size: u64, rng: &mut Rng) {
    std::fs::write(path, rng.bytes(size as usize)).unwrap();
}

/// Ways the target can differ from the source.
#[derive(Debug, Clone, Copy)]
pub enum Divergence {
    None,
    SingleBytes(usize),
    WholeBlocks(usize),
    FirstAndLast,
    EveryBlock,
    ZeroedBlocks(usize),
}

/// Applies a divergence to the file at `path` (block size `bs`); returns the set of blocks
/// that differ afterwards (computed from bytes, not by the tool).
pub fn diverge(path: &Path, bs: u64, d: Divergence, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    let nblocks = size.div_ceil(bs);
    let write_block = |i: u64, data: &[u8]| {
        let off = i * bs;
        let len = (size - off).min(bs) as usize;
        f.write_all_at(&data[..len], off).unwrap();
    };
    match d {
        Divergence::None => {}
        Divergence::SingleBytes(n) => {
            for _ in 0..n {
                let off = rng.below(size);
                let mut b = [0u8];
                f.read_exact_at(&mut b, off).unwrap();
                f.write_all_at(&[b[0] ^ (1 + rng.below(255) as u8)], off)
                    .unwrap();
            }
        }
        Divergence::WholeBlocks(n) => {
            for _ in 0..n {
                write_block(rng.below(nblocks), &rng.bytes(bs as usize));
            }
        }
        Divergence::FirstAndLast => {
            write_block(0, &rng.bytes(bs as usize));
            write_block(nblocks - 1, &rng.bytes(bs as usize));
        }
        Divergence::EveryBlock => {
            for i in 0..nblocks {
                write_block(i, &rng.bytes(bs as usize));
            }
        }
        Divergence::ZeroedBlocks(n) => {
            for _ in 0..n {
                write_block(rng.below(nblocks), &vec![0u8; bs as usize]);
            }
        }
    }
}

/// Blocks in which two files differ, compared byte by byte (independent of the tool).
pub fn differing_blocks(a: &Path, b: &Path, bs: usize) -> Vec<u64> {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.chunks(bs)
        .zip(b.chunks(bs))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Asserts two files are byte-identical.
pub fn assert_identical(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// A certificate directory with node identities `server` and `client` (and any extra names)
/// of pair `vm1`.
pub fn certs(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut names = vec!["server", "client"];
    names.extend_from_slice(extra);
    let vm1 = ftvm_tls::CertKind::node("vm1");
    let ids: Vec<(&str, ftvm_tls::CertKind)> = names.iter().map(|n| (*n, vm1.clone())).collect();
    ftvm_tls::init_dir_with(dir, &ids, false).unwrap();
    dir.to_owned()
}

/// A running `ftvm-resync serve`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts a server on an ephemeral loopback port and waits (by reading its output, not
    /// by sleeping) until it listens.
    pub fn start(disk: &Path, tls: &Path, extra: &[&str]) -> Server {
        Self::start_as(disk, tls, "server", extra)
    }

    /// [`Server::start`] with identity `node`.
    pub fn start_as(disk: &Path, tls: &Path, node: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--node", node, "--disk"])
            .arg(disk)
            .arg("--tls")
            .arg(tls)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let addr = loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                panic!("server exited before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("ftvm-resync: serving ") {
                let a = rest
                    .split(" on ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap();
                break a.parse().unwrap();
            }
        };
        let stderr = Arc::new(Mutex::new(seen));
        let s2 = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest);
            s2.lock().unwrap().push_str(&rest);
        });
        Server {
            child,
            addr,
            stderr,
            reader: Some(reader),
        }
    }

    /// Stops the server and returns everything it wrote to stderr.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let s = self.stderr.lock().unwrap().clone();
        s
    }

    /// Waits for the server process to exit and returns its status code.
    pub fn wait(mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ftvm-resync` with `args`.
pub fn run(args: &[&std::ffi::OsStr]) -> Output {
    run_env(args, &[])
}

/// Runs `ftvm-resync` with `args` and extra environment variables.
pub fn run_env(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FTVM_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `ftvm-resync pull|verify` against `server`.
pub fn remote(cmd: &str, server: &Server, disk: &Path, tls: &Path, extra: &[&str]) -> Output {
    remote_env(cmd, server, disk, tls, extra, &[])
}

/// [`remote`] with extra environment variables.
pub fn remote_env(
    cmd: &str,
    server: &Server,
    disk: &Path,
    tls: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let from = format!("server@{}", server.addr);
    let mut a = session_args(cmd, &from, "client", disk, tls);
    a.extend(extra.iter().map(OsString::from));
    run_env(&a.iter().map(OsString::as_os_str).collect::<Vec<_>>(), env)
}

/// The arguments of a session: `CMD --from FROM --node NODE --disk DISK --tls TLS`.
pub fn session_args(cmd: &str, from: &str, node: &str, disk: &Path, tls: &Path) -> Vec<OsString> {
    vec![
        cmd.into(),
        "--from".into(),
        from.into(),
        "--node".into(),
        node.into(),
        "--disk".into(),
        disk.into(),
        "--tls".into(),
        tls.into(),
    ]
}

/// `pull` from `from` (`NAME@ADDR`) as node `node`.
pub fn pull_from(from: &str, node: &str, disk: &Path, tls: &Path) -> Output {
    let a = session_args("pull", from, node, disk, tls);
    run(&a.iter().map(OsString::as_os_str).collect::<Vec<_>>())
}

/// The `key=value` pairs of the summary line in `out`'s stdout.
pub fn summary(out: &Output) -> std::collections::HashMap<String, String> {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s
        .lines()
        .find_map(|l| l.strip_prefix("ftvm-resync summary: "))
        .unwrap_or_else(|| panic!("no summary in output:\n{}", describe(out)));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn num(m: &std::collections::HashMap<String, String>, k: &str) -> u64 {
    m[k].parse().unwrap()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
