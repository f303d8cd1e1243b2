//! A real etcd cluster on loopback for the tests: `etcd` processes (Debian's `etcd-server`,
//! installed by scripts/setup), each with its own data directory and ports, killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary (override with `FTVM_TEST_ETCD`).
pub fn etcd_bin() -> String {
    std::env::var("FTVM_TEST_ETCD").unwrap_or_else(|_| "etcd".into())
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain HTTP `/health` (and `/metrics`), also when clients use TLS.
    health: SocketAddr,
    child: Option<Child>,
}

/// Client TLS of the cluster: the members serve `https://localhost:PORT` with `cert`/`key`
/// and require client certificates signed by `ca`.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// CA of the client certificates.
    pub ca: PathBuf,
    /// Server certificate (its name must be `localhost`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<EtcdTls>,
}

/// A loopback port nobody listens on now, never handed out twice by this process. It is
/// released before etcd binds it, so another process may still take it in between: a cluster
/// whose member cannot bind is started again on new ports (see [`EtcdCluster::start_with`]).
fn free_port() -> SocketAddr {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut used = USED.lock().unwrap();
    loop {
        let a = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        if !used.contains(&a.port()) {
            used.push(a.port());
            return a;
        }
    }
}

impl EtcdCluster {
    /// Starts `n` members in `dir` and waits until every one is healthy (has a leader).
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        EtcdCluster::start_with(dir, n, None)
    }

    /// [`EtcdCluster::start`] with TLS for clients.
    pub fn start_with(dir: &Path, n: usize, tls: Option<EtcdTls>) -> EtcdCluster {
        for attempt in 1.. {
            match EtcdCluster::try_start(dir, n, tls.clone()) {
                Ok(c) => return c,
                Err(why) if attempt < 4 && why.contains("address already in use") => {
                    eprintln!(
                        "etcd cluster: a port was taken meanwhile, new ports (attempt {attempt})"
                    );
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!()
    }

    fn try_start(dir: &Path, n: usize, tls: Option<EtcdTls>) -> Result<EtcdCluster, String> {
        for i in 0..n {
            let _ = std::fs::remove_dir_all(dir.join(format!("etcd-m{i}")));
            let _ = std::fs::remove_file(dir.join(format!("etcd-m{i}.log")));
        }
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                health: free_port(),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster {
            dir: dir.to_path_buf(),
            token: format!(
                "ftvm-test-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ),
            members,
            tls,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.try_wait_healthy(i)?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{}.log", m.name)))
            .unwrap();
        let mut cmd = Command::new(etcd_bin());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-{}", m.name)))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://localhost:{}", m.client.port()))
            .arg("--listen-metrics-urls")
            .arg(format!("http://{}", m.health))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Fast elections on loopback, so that losing and regaining quorum is quick.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (Debian's etcd-server; scripts/setup installs it): {e}",
                    etcd_bin()
                )
            });
        m.child = Some(child);
    }

    /// GET `/health` of member `i`: whether it answers `"health":"true"` (it has a leader).
    pub fn healthy(&self, i: usize) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.members[i].health, Duration::from_secs(1))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"health\":\"true\"")
    }

    fn wait_healthy(&mut self, i: usize) {
        if let Err(why) = self.try_wait_healthy(i) {
            panic!("{why}");
        }
    }

    fn try_wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.healthy(i) {
            if let Some(c) = self.members[i].child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "etcd member {i} exited with {st}:\n{}",
                        self.log(i)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd member {i} not healthy in time:\n{}",
                    self.log(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("etcd-{}.log", self.members[i].name)))
            .unwrap_or_default()
    }

    /// The client URLs of every member, as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let v: Vec<String> = self
            .members
            .iter()
            .map(|m| match self.tls {
                Some(_) => format!("\"https://localhost:{}\"", m.client.port()),
                None => format!("\"http://{}\"", m.client),
            })
            .collect();
        format!("[{}]", v.join(", "))
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a killed member `i` on its data directory (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// Waits until member `i` reports itself unhealthy (it noticed that it has no leader).
    pub fn wait_unhealthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.healthy(i) {
            assert!(
                Instant::now() < deadline,
                "etcd member {i} still healthy:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until member `i` is healthy again.
    pub fn wait_member(&mut self, i: usize) {
        self.wait_healthy(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The `[store]` section for the cluster, appended to a witness configuration.
pub fn add_etcd_store(cfg: &Path, cluster: &EtcdCluster, prefix: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(&format!(
        "\n[store]\nkind = \"etcd\"\nendpoints = {}\nprefix = \"{prefix}\"\ntimeout_ms = 1000\n",
        cluster.endpoints_toml()
    ));
    std::fs::write(cfg, text).unwrap();
}
