//! The `kv` guest end to end: a real VM under KVM on a TAP in a network namespace, stock
//! `redis-cli` and `redis-benchmark` in a client namespace, a real image file as its disk.
//!
//! These need root, iproute2, redis-tools and /dev/kvm; without them they fail loudly.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use ftvm_tests::netns::{self, Host, Lab};
use ftvm_tests::node::{in_netns, redis_cli, redis_text, RunningNode};

const BOOT: Duration = Duration::from_secs(60);

fn lab() -> (Lab, Host, Host) {
    if let Err(e) = netns::preflight() {
        panic!("\n!!!!!!!!!!\n{e:#}\n!!!!!!!!!!\n");
    }
    let mut lab = Lab::new().expect("lab");
    let node = lab.add_node("node").expect("node");
    let client = lab.add_host("client").expect("client");
    (lab, node, client)
}

fn start(node: &Host, disk: &std::path::Path, extra: &[&str]) -> RunningNode {
    let mut n = RunningNode::kv(node, disk, extra).expect("start ftvm-node");
    n.expect_line("kv: listening on", BOOT).expect("kv boots");
    n
}

fn gip(node: &Host) -> Ipv4Addr {
    node.guest_ip.unwrap()
}

#[test]
fn redis_cli_set_get_round_trips() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let _n = start(&node, &dir.path().join("disk.img"), &[]);
    let ip = gip(&node);
    assert_eq!(redis_text(&client.ns, ip, &["PING"]).unwrap(), "PONG");
    assert_eq!(
        redis_text(&client.ns, ip, &["SET", "greeting", "hello world"]).unwrap(),
        "OK"
    );
    assert_eq!(
        redis_text(&client.ns, ip, &["GET", "greeting"]).unwrap(),
        "hello world"
    );
    assert_eq!(redis_text(&client.ns, ip, &["INCR", "n"]).unwrap(), "1");
    assert_eq!(redis_text(&client.ns, ip, &["INCR", "n"]).unwrap(), "2");
    assert_eq!(
        redis_text(&client.ns, ip, &["EXISTS", "greeting", "nope"]).unwrap(),
        "1"
    );
    assert_eq!(redis_text(&client.ns, ip, &["DBSIZE"]).unwrap(), "2");
    assert!(redis_text(&client.ns, ip, &["GET", "missing"])
        .unwrap()
        .is_empty());
    let err = redis_text(&client.ns, ip, &["NOSUCHCOMMAND", "x"]).unwrap();
    assert!(err.contains("ERR unknown command"), "{err}");
}

fn benchmark(client: &Host, ip: Ipv4Addr, extra: &[&str]) -> String {
    let mut cmd = client.ns.command("redis-benchmark");
    cmd.args(["-h", &ip.to_string(), "-q", "-n", "2000"])
        .args(extra);
    let o = cmd
        .output()
        .expect("redis-benchmark (scripts/setup installs redis-tools)");
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "redis-benchmark {extra:?} failed: {err}\n{out}"
    );
    assert!(
        !out.to_lowercase().contains("error") && !err.to_lowercase().contains("error"),
        "{out}{err}"
    );
    out
}

#[test]
fn redis_benchmark_default_suite_has_no_errors() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let _n = start(&node, &dir.path().join("disk.img"), &[]);
    for extra in [&[][..], &["-P", "16"][..]] {
        let out = benchmark(&client, gip(&node), extra);
        let done: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("requests per second"))
            .collect();
        for t in [
            "PING_INLINE",
            "PING_MBULK",
            "SET",
            "GET",
            "INCR",
            "LPUSH",
            "RPUSH",
            "LPOP",
            "RPOP",
            "SADD",
            "HSET",
            "SPOP",
            "ZADD",
            "ZPOPMIN",
            "LRANGE_100",
            "LRANGE_300",
            "LRANGE_500",
            "LRANGE_600",
            "MSET",
        ] {
            assert!(
                done.iter()
                    .any(|l| l.trim_start().starts_with(&format!("{t}:"))
                        || l.trim_start().starts_with(&format!("{t} "))),
                "{t} missing from the {extra:?} run:\n{out}"
            );
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let n = start(&node, &disk, &[]);
    let ip = gip(&node);
    // 300 writes in one pipelined session, every reply checked: each OK is an acknowledgement.
    let mut cmd = client.ns.command("redis-cli");
    cmd.args(["-h", &ip.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        let stdin = child.stdin.as_mut().unwrap();
        for i in 0..300 {
            writeln!(stdin, "SET key:{i} value-{i}").unwrap();
        }
        writeln!(stdin, "RPUSH list a b c").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().filter(|l| *l == "OK").count(), 300, "{text}");
    n.kill9();

    let n = start(&node, &disk, &[]);
    let rec = n
        .console
        .iter()
        .find(|l| l.contains("replayed"))
        .cloned()
        .unwrap_or_default();
    assert!(rec.contains("clean end of log"), "{:?}", n.console);
    for i in [0, 1, 150, 298, 299] {
        assert_eq!(
            redis_text(&client.ns, ip, &["GET", &format!("key:{i}")]).unwrap(),
            format!("value-{i}")
        );
    }
    assert_eq!(redis_text(&client.ns, ip, &["DBSIZE"]).unwrap(), "301");
    assert_eq!(
        redis_text(&client.ns, ip, &["LRANGE", "list", "0", "-1"]).unwrap(),
        "a\nb\nc"
    );
}

#[test]
fn a_corrupt_tail_is_cut_off_and_reported() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let n = start(&node, &disk, &[]);
    let ip = gip(&node);
    for i in 0..20 {
        assert_eq!(
            redis_text(&client.ns, ip, &["SET", &format!("k{i}"), &format!("v{i}")]).unwrap(),
            "OK"
        );
    }
    n.kill9();
    // Learn where the log ends, then damage the last record.
    let n = start(&node, &disk, &[]);
    let line = n
        .console
        .iter()
        .find(|l| l.contains("log ends at byte"))
        .cloned()
        .expect("recovery line");
    let end: u64 = line
        .split("log ends at byte ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    n.kill9();
    let mut img = std::fs::read(&disk).unwrap();
    img[end as usize - 2] ^= 0x55;
    std::fs::write(&disk, img).unwrap();
    let n = start(&node, &disk, &[]);
    let line = n
        .console
        .iter()
        .find(|l| l.contains("log ends at byte"))
        .cloned()
        .unwrap();
    assert!(
        !line.contains("clean end of log"),
        "the damage must be reported: {line}"
    );
    assert_eq!(redis_text(&client.ns, ip, &["GET", "k18"]).unwrap(), "v18");
    assert!(
        redis_text(&client.ns, ip, &["GET", "k19"])
            .unwrap()
            .is_empty(),
        "the damaged last write is gone"
    );
    assert_eq!(redis_text(&client.ns, ip, &["DBSIZE"]).unwrap(), "19");
    drop(n);
}

/// Sends `bytes` on a fresh connection from `ns`; returns what came back before the server
/// closed the connection (or the read timed out).
fn raw_exchange(ns: &netns::Netns, addr: SocketAddr, bytes: Vec<u8>) -> (Vec<u8>, bool) {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        (got, closed)
    })
    .unwrap()
}

#[test]
fn garbage_and_oversized_requests_close_only_that_connection() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let _n = start(
        &node,
        &dir.path().join("disk.img"),
        &["--guest-args", "max-request=8192"],
    );
    let ip = gip(&node);
    let addr = SocketAddr::from((ip, 6379));
    // A client that stays connected throughout.
    let steady = in_netns(&client.ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect")
    })
    .unwrap();
    let mut steady = steady;
    steady
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ping = |s: &mut TcpStream| {
        s.write_all(b"PING\r\n").unwrap();
        let mut b = [0u8; 7];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"+PONG\r\n");
    };
    ping(&mut steady);

    let mut garbage = b"*2\r\n$3\r\nGET\r\n$-7\r\n".to_vec();
    garbage.extend((0..2000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    let (reply, closed) = raw_exchange(&client.ns, addr, garbage);
    assert!(closed, "a malformed request closes the connection");
    assert!(
        String::from_utf8_lossy(&reply).contains("-ERR Protocol error"),
        "{reply:?}"
    );
    ping(&mut steady);

    let mut big = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 100_000));
    big.extend_from_slice(b"\r\n");
    let (reply, closed) = raw_exchange(&client.ns, addr, big);
    assert!(closed, "an oversized request closes the connection");
    assert!(
        String::from_utf8_lossy(&reply).starts_with("-ERR"),
        "{reply:?}"
    );
    ping(&mut steady);
    assert!(redis_text(&client.ns, ip, &["GET", "big"])
        .unwrap()
        .is_empty());
    let o = redis_cli(&client.ns, ip, &["SET", "small", "fits"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");
}

#[test]
fn kv_records_and_replays_identically() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    // Boot once to format the disk, then keep a copy of it as the replay's starting point.
    let n = start(&node, &disk, &[]);
    assert_eq!(
        redis_text(&client.ns, gip(&node), &["SET", "before", "1"]).unwrap(),
        "OK"
    );
    n.kill9();
    let copy = dir.path().join("disk-copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let log = dir.path().join("kv.ftlog");
    let n = start(
        &node,
        &disk,
        &["--record", log.to_str().unwrap(), "--digest-every", "200"],
    );
    let ip = gip(&node);
    for i in 0..30 {
        assert_eq!(
            redis_text(&client.ns, ip, &["SET", &format!("r{i}"), &format!("{i}")]).unwrap(),
            "OK"
        );
    }
    benchmark(&client, ip, &["-t", "set,get,lpush", "-c", "10"]);
    assert_eq!(redis_text(&client.ns, ip, &["GET", "before"]).unwrap(), "1");
    n.signal(libc::SIGTERM);
    let recorded = n.console.clone();
    let (status, err) = n.wait(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    let rec_bounds = err
        .lines()
        .find(|l| l.starts_with("record:"))
        .unwrap_or_else(|| panic!("{err}"))
        .to_string();

    let o = std::process::Command::new(ftvm_tests::node::node_binary().unwrap())
        .args([
            "replay",
            "--guest",
            "kv",
            "--log",
            log.to_str().unwrap(),
            "--disk",
            copy.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the replay ends where the recording was stopped, a match: {err}"
    );
    let summary = err
        .lines()
        .find(|l| l.starts_with("replay: identical"))
        .unwrap_or_else(|| panic!("{err}"));
    let bounds = |s: &str| {
        s.split_whitespace()
            .find(|w| w.starts_with("boundaries="))
            .unwrap()
            .to_string()
    };
    assert_eq!(bounds(summary), bounds(&rec_bounds));
    let out = String::from_utf8_lossy(&o.stdout);
    let replayed: Vec<&str> = out.lines().collect();
    assert_eq!(
        replayed,
        recorded.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // Both disks went through the same writes.
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&copy).unwrap());
}

/// Raises the soft open-file limit to the hard one (1,000+ sockets in one process).
fn raise_fd_limit(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = r.rlim_max.max(want);
            r.rlim_max = r.rlim_cur;
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &r),
                0,
                "setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn connected_clients(ns: &netns::Netns, ip: Ipv4Addr) -> u64 {
    let info = redis_text(ns, ip, &["INFO", "clients"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{info}"))
}

/// 1,000 idle clients do not lock a new one out; one past `maxclients` gets Redis's error and
/// is closed; then `redis-benchmark -c 1000` runs without an error.
#[test]
fn a_thousand_idle_clients_then_one_past_the_limit() {
    raise_fd_limit(4096);
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let _n = start(
        &node,
        &dir.path().join("disk.img"),
        &["--guest-args", "maxclients=1001"],
    );
    let ip = gip(&node);
    let addr = SocketAddr::from((ip, 6379));
    let (idle, fresh, refused) = in_netns(&client.ns, move || {
        let connect = || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        };
        let mut idle: Vec<TcpStream> = (0..1000).map(|_| connect()).collect();
        // Every idle one is a client being served (not a connection parked somewhere).
        for i in [0, 499, 999] {
            idle[i].write_all(b"PING\r\n").unwrap();
            let mut b = [0u8; 7];
            idle[i].read_exact(&mut b).unwrap();
            assert_eq!(&b, b"+PONG\r\n", "idle client {i}");
        }
        // The 1001st is served...
        let mut fresh = connect();
        fresh.write_all(b"PING\r\nINFO clients\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("blocked_clients") {
            let n = fresh.read(&mut buf).expect("reply");
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        // ...the 1002nd is told why and closed.
        let mut past = connect();
        let _ = past.write_all(b"PING\r\n");
        let mut refused = Vec::new();
        loop {
            match past.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => refused.extend_from_slice(&buf[..n]),
                Err(e) => panic!("the refused client was not closed: {e}"),
            }
        }
        drop(idle);
        (String::from_utf8_lossy(&got).into_owned(), fresh, refused)
    })
    .unwrap();
    assert!(idle.starts_with("+PONG\r\n"), "{idle}");
    assert!(idle.contains("connected_clients:1001\r\n"), "{idle}");
    assert_eq!(refused, b"-ERR max number of clients reached\r\n");
    drop(fresh);
    // Wait (with a deadline) until the server has seen the thousand close.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while connected_clients(&client.ns, ip) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "closed clients never left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = benchmark(
        &client,
        ip,
        &["-c", "1000", "-n", "20000", "-t", "ping,set,get"],
    );
    for t in ["PING_INLINE", "SET", "GET"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(&format!("{t}:"))),
            "{t} missing:\n{out}"
        );
    }
}

/// `timeout=SECONDS` closes idle clients (Redis's `timeout`); a client that keeps talking
/// stays.
#[test]
fn idle_clients_are_closed_after_the_timeout() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let _n = start(
        &node,
        &dir.path().join("disk.img"),
        &["--guest-args", "timeout=1"],
    );
    let addr = SocketAddr::from((gip(&node), 6379));
    let (quiet_closed, busy_ok) = in_netns(&client.ns, move || {
        // Before the connect: the server cannot have accepted it earlier than this.
        let start = std::time::Instant::now();
        let mut quiet = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        let mut busy = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        busy.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        quiet.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        // The busy client talks every 200 ms until the quiet one has been closed.
        let quiet_closed = loop {
            busy.write_all(b"PING\r\n").unwrap();
            let mut r = [0u8; 7];
            busy.read_exact(&mut r).unwrap();
            assert_eq!(&r, b"+PONG\r\n");
            match quiet.read(&mut b) {
                Ok(0) => break true,
                Ok(n) => panic!("unexpected data: {:?}", &b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if start.elapsed() > Duration::from_secs(30) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(1),
            "closed after {elapsed:?}"
        );
        busy.write_all(b"PING\r\n").unwrap();
        let mut r = [0u8; 7];
        busy.read_exact(&mut r).unwrap();
        (quiet_closed, &r == b"+PONG\r\n")
    })
    .unwrap();
    assert!(quiet_closed, "the idle client was never closed");
    assert!(busy_ok);
}

#[test]
fn bad_arguments_are_refused() {
    let (_lab, node, _client) = lab();
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        ("sockets=10", "unknown argument"),
        ("maxclients=0", "bad value"),
        ("maxclients=100000", "more than half"),
    ] {
        let mut n =
            RunningNode::kv(&node, &dir.path().join("disk.img"), &["--guest-args", args]).unwrap();
        n.expect_line(says, BOOT)
            .unwrap_or_else(|e| panic!("{args}: {e:#}"));
        let (status, _) = n.wait(Duration::from_secs(20)).unwrap();
        assert_eq!(status.code(), Some(2), "{args}");
    }
}

/// `redis-benchmark -P 16 -t set` with `extra`, bounded to 120 s (a dead guest would leave it
/// waiting forever).
fn bounded_sets(client: &Host, ip: Ipv4Addr, extra: &[&str]) -> std::process::Output {
    client
        .ns
        .command("timeout")
        .args([
            "120",
            "redis-benchmark",
            "-h",
            &ip.to_string(),
            "-q",
            "-P",
            "16",
        ])
        .args(["-t", "set"])
        .args(extra)
        .output()
        .expect("redis-benchmark")
}

/// A store that outgrows its disk: writes are refused with an error reply once the log is
/// full, the compaction that cannot fit gives up without taking the guest down (it used to
/// build the whole snapshot in memory, and the failed allocation ended the guest), and
/// reads and the data already acknowledged stay served.
#[test]
fn a_full_disk_refuses_writes_and_the_guest_stays_up() {
    let (_lab, node, client) = lab();
    let dir = tempfile::tempdir().unwrap();
    let mut n = start(&node, &dir.path().join("disk.img"), &[]);
    let ip = gip(&node);
    assert_eq!(
        redis_text(&client.ns, ip, &["SET", "first", "kept"]).unwrap(),
        "OK"
    );
    // 100,000 small keys, 1.5 million SETs: the live data outgrows half a log region (the
    // compaction used to run again at once, at every quiet moment, until an allocation for
    // its snapshot failed and ended the guest).
    let o = bounded_sets(&client, ip, &["-c", "50", "-n", "1500000", "-r", "100000"]);
    assert!(
        n.is_running(),
        "the guest ended:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Then 30,000 distinct 1 KiB values: ~30 MB against a 16 MiB disk (two 8 MiB regions).
    let o = bounded_sets(
        &client,
        ip,
        &["-c", "20", "-n", "30000", "-r", "1000000000", "-d", "1000"],
    );
    // It stops at the first refused write.
    let said =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("ERR disk log is full"),
        "the writes past a full disk were refused: {said}"
    );
    assert!(n.is_running(), "the guest ended:\n{}", n.console.join("\n"));
    let refused = redis_text(&client.ns, ip, &["SET", "late", "x".repeat(1000).as_str()]).unwrap();
    assert!(
        refused.contains("ERR disk log is full"),
        "a write past a full disk gets an error reply: {refused:?}"
    );
    assert_eq!(redis_text(&client.ns, ip, &["PING"]).unwrap(), "PONG");
    assert_eq!(
        redis_text(&client.ns, ip, &["GET", "first"]).unwrap(),
        "kept"
    );
    n.expect_line("kv: cannot compact the log", Duration::from_secs(10))
        .expect("the compaction was tried and gave up");
    assert!(n.is_running(), "the guest ended:\n{}", n.console.join("\n"));
}
