//! Disk resync against rsync (DESIGN §6, issue 6).
//!
//! Two images (2 GiB by default; `FTVM_BENCH_RESYNC_MIB=256` for a quick run) differing in
//! 1% of their 64 KiB blocks are brought in line three ways, each timed from the client's
//! command start to its exit, on the same files (the target is restored between runs):
//!
//! 1. `rsync --inplace --no-whole-file --ignore-times --stats` from an rsync daemon on
//!    127.0.0.1 (TCP);
//! 2. `ftvm-resync pull` from `ftvm-resync serve` on 127.0.0.1 (QUIC + mutual TLS), full
//!    Merkle compare (both sides hash the whole disk);
//! 3. the same with `--fast` (leaf caches + written-block records: only written blocks are
//!    hashed).
//!
//! Bytes on the wire: rsync's `--stats` (bytes sent + received, TCP payload); ftvm-resync's
//! summary (UDP payload sent + received, QUIC headers and handshake included).
//!
//! The `ftvm-resync` binary is built first with `cargo build --release -p disksync` into this
//! benchmark's target directory, or taken from `FTVM_RESYNC_BIN`.
//! Run: `cargo bench -p ftvm-benches --bench resync_vs_rsync`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const BS: u64 = 64 * 1024;
const SEED: u64 = 0x5eed_d15c;

/// splitmix64 stream; block `i`'s contents are a function of (seed, i) so they can be
/// regenerated to restore a target.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut s = seed;
    for c in buf.chunks_mut(8) {
        s = s.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        c.copy_from_slice(&z.to_le_bytes()[..c.len()]);
    }
}

fn block_seed(generation: u64, i: u64) -> u64 {
    SEED ^ generation.wrapping_mul(0x1000_0000_01b3) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn write_base(path: &Path, size: u64) -> Result<()> {
    let mut f = File::create(path)?;
    let per = 128u64; // blocks per write (8 MiB)
    let mut buf = vec![0u8; (per * BS) as usize];
    let n = size.div_ceil(BS);
    let mut i = 0;
    while i < n {
        let k = per.min(n - i);
        for j in 0..k {
            let b = &mut buf[(j * BS) as usize..((j + 1) * BS) as usize];
            fill(block_seed(0, i + j), b);
        }
        let len = ((i + k) * BS).min(size) - i * BS;
        f.write_all(&buf[..len as usize])?;
        i += k;
    }
    f.sync_all()?;
    Ok(())
}

fn write_block(f: &File, size: u64, i: u64, generation: u64) -> Result<()> {
    let mut b = vec![0u8; BS as usize];
    fill(block_seed(generation, i), &mut b);
    let off = i * BS;
    let len = (size - off).min(BS) as usize;
    f.write_all_at(&b[..len], off)?;
    Ok(())
}

fn identical(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = fa.read(&mut x)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

fn resync_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FTVM_RESYNC_BIN") {
        println!("using FTVM_RESYNC_BIN={p}");
        return Ok(PathBuf::from(p));
    }
    // This program is <target>/release/deps/resync_vs_rsync-HASH (or <target>/release/NAME).
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("no parent")?;
    if profile_dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        profile_dir = profile_dir.parent().context("no parent")?;
    }
    let target = profile_dir
        .parent()
        .context("cannot locate the target directory")?
        .to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!(
        "building ftvm-resync: cargo build --release -p disksync --bin ftvm-resync (target {})",
        target.display()
    );
    let st = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "disksync",
            "--bin",
            "ftvm-resync",
        ])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()?;
    if !st.success() {
        bail!("building ftvm-resync failed");
    }
    Ok(target.join("release").join("ftvm-resync"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_rsync_daemon(dir: &Path, src_dir: &Path) -> Result<(Killed, u16)> {
    let port = free_port()?;
    let meta = std::fs::metadata(src_dir)?;
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = {}\ngid = {}\n[src]\npath = {}\nread only = yes\n",
            meta.uid(),
            meta.gid(),
            src_dir.display()
        ),
    )?;
    let child = Command::new("rsync")
        .arg("--daemon")
        .arg("--no-detach")
        .arg(format!("--config={}", conf.display()))
        .arg("--address=127.0.0.1")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .spawn()
        .context("starting rsync --daemon (is rsync installed?)")?;
    let child = Killed(child);
    // Readiness: the daemon accepts TCP connections.
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("rsync daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, port))
}

fn start_serve(bin: &Path, disk: &Path, tls: &Path) -> Result<(Killed, SocketAddr)> {
    use std::io::BufRead;
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node",
            "server",
            "--disk",
        ])
        .arg(disk)
        .arg("--tls")
        .arg(tls)
        .env("FTVM_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()?;
    let mut r = std::io::BufReader::new(child.stderr.take().unwrap());
    let child = Killed(child);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("ftvm-resync serve exited");
        }
        if let Some(rest) = line.trim().strip_prefix("ftvm-resync: serving ") {
            let a = rest
                .split(" on ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            let addr = a.parse()?;
            std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
            return Ok((child, addr));
        }
    }
}

struct Run {
    secs: f64,
    wire: u64,
}

fn pull(bin: &Path, addr: SocketAddr, disk: &Path, tls: &Path, fast: bool) -> Result<Run> {
    let mut cmd = Command::new(bin);
    cmd.arg("pull")
        .arg("--from")
        .arg(format!("server@{addr}"))
        .args(["--node", "client", "--disk"])
        .arg(disk)
        .arg("--tls")
        .arg(tls)
        .env("FTVM_LOG", "warn");
    if fast {
        cmd.arg("--fast");
    }
    let t0 = Instant::now();
    let out = cmd.output()?;
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ftvm-resync pull failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ftvm-resync summary: "))
        .context("no summary")?;
    println!("  ftvm-resync: {line}");
    let wire = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("wire_bytes="))
        .context("no wire_bytes")?
        .parse()?;
    Ok(Run { secs, wire })
}

fn rsync(port: u16, name: &str, dst: &Path) -> Result<Run> {
    let t0 = Instant::now();
    let out = Command::new("rsync")
        // --ignore-times: the images have the same size and may share an mtime second, and
        // rsync's quick check would then skip the file.
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(format!("rsync://127.0.0.1:{port}/src/{name}"))
        .arg(dst)
        .output()?;
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rsync failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |k: &str| -> Result<u64> {
        let l = stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .with_context(|| format!("no {k:?} in rsync --stats"))?;
        Ok(l.split_whitespace()
            .next()
            .unwrap_or("0")
            .replace(',', "")
            .parse()?)
    };
    let wire = field("Total bytes sent:")? + field("Total bytes received:")?;
    Ok(Run { secs, wire })
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn main() -> Result<()> {
    let mib: u64 = std::env::var("FTVM_BENCH_RESYNC_MIB")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("FTVM_BENCH_RESYNC_MIB")?
        .unwrap_or(2048);
    let size = mib << 20;
    let nblocks = size.div_ceil(BS);
    let bin = resync_binary()?;
    if !bin.exists() {
        bail!("{} not found", bin.display());
    }

    let base = std::env::var("FTVM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("ftvm-resync-bench")
        .tempdir_in(&base)?;
    let src_dir = dir.path().join("src");
    std::fs::create_dir(&src_dir)?;
    let src = src_dir.join("disk.img");
    let dst = dir.path().join("target.img");
    let tls = dir.path().join("tls");
    let pair = ftvm_tls::CertKind::node("bench");
    ftvm_tls::init_dir_with(&tls, &[("server", pair.clone()), ("client", pair)], false)?;

    println!(
        "resync_vs_rsync: {mib} MiB images, 64 KiB blocks, 1% of blocks changed ({})",
        dir.path().display()
    );
    write_base(&src, size)?;
    std::fs::copy(&src, &dst)?;
    // Generation 1 begins with identical disks: leaf caches and empty records on both sides.
    for d in [&src, &dst] {
        let st = Command::new(&bin)
            .arg("hash")
            .arg(d)
            .args(["--baseline", "1"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("ftvm-resync hash --baseline failed");
        }
    }
    // The source then writes 1% of its blocks (distinct, spread at random), recording them.
    let k = (nblocks / 100).max(1);
    let mut changed = std::collections::BTreeSet::new();
    let mut s = SEED;
    while (changed.len() as u64) < k {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        changed.insert((s >> 17) % nblocks);
    }
    {
        let rec = disksync::record::WrittenBlocks::open(disksync::record_path(&src))?;
        let f = OpenOptions::new().read(true).write(true).open(&src)?;
        for &i in &changed {
            rec.mark(i * BS, BS);
            write_block(&f, size, i, 1)?;
        }
        rec.flush()?;
        f.sync_all()?;
    }
    let changed_bytes: u64 = changed.iter().map(|&i| (size - i * BS).min(BS)).sum();
    println!(
        "  {} of {} blocks changed: {:.1} MB of changed data",
        k,
        nblocks,
        mb(changed_bytes)
    );
    let restore = || -> Result<()> {
        let f = OpenOptions::new().write(true).open(&dst)?;
        for &i in &changed {
            write_block(&f, size, i, 0)?;
        }
        f.sync_all()?;
        Ok(())
    };

    // 1. rsync from a daemon on loopback.
    let (_daemon, port) = start_rsync_daemon(dir.path(), &src_dir)?;
    let r = rsync(port, "disk.img", &dst)?;
    if !identical(&src, &dst)? {
        bail!("rsync did not make the target identical");
    }
    println!(
        "rsync --inplace --no-whole-file: {:.3} s, {:.2} MB on the wire",
        r.secs,
        mb(r.wire)
    );
    restore()?;

    // 2. ftvm-resync, full Merkle compare.
    let (_serve, addr) = start_serve(&bin, &src, &tls)?;
    let full = pull(&bin, addr, &dst, &tls, false)?;
    if !identical(&src, &dst)? {
        bail!("ftvm-resync did not make the target identical");
    }
    println!(
        "ftvm-resync pull (full compare): {:.3} s, {:.2} MB on the wire",
        full.secs,
        mb(full.wire)
    );
    restore()?;

    // 3. ftvm-resync fast path (a fresh server, so nothing is cached from run 2).
    drop(_serve);
    let (_serve, addr) = start_serve(&bin, &src, &tls)?;
    let fast = pull(&bin, addr, &dst, &tls, true)?;
    if !identical(&src, &dst)? {
        bail!("ftvm-resync --fast did not make the target identical");
    }
    println!(
        "ftvm-resync pull --fast:         {:.3} s, {:.2} MB on the wire",
        fast.secs,
        mb(fast.wire)
    );

    println!("ratios:");
    println!(
        "  wall time   full / rsync   = {:.3}  (goal < 0.5)",
        full.secs / r.secs
    );
    println!("  wall time   fast / rsync   = {:.3}", fast.secs / r.secs);
    println!(
        "  wire bytes  full / changed = {:.3}  (goal <= 1.05)",
        full.wire as f64 / changed_bytes as f64
    );
    println!(
        "  wire bytes  fast / changed = {:.3}",
        fast.wire as f64 / changed_bytes as f64
    );
    println!(
        "  wire bytes  rsync / changed = {:.3}",
        r.wire as f64 / changed_bytes as f64
    );
    println!(
        "  wire bytes  full / rsync   = {:.3}",
        full.wire as f64 / r.wire as f64
    );
    Ok(())
}
