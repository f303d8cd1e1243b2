//! QUIC + mutual TLS endpoints for `ftvm-resync` (certificates from `ftvm-tls`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint};

use crate::session::{pull_connection, serve_connection, PullOptions, SourceDisk, TargetDisk};
use crate::stats::{Stats, Summary};
use crate::{Error, Result};
use ftvm_tls::ALPN_RESYNC as ALPN;

/// Transport settings: the shared defaults of `ftvm-tls` plus larger flow-control windows
/// (so one stream fills a fast link) and path-MTU discovery up to the UDP maximum.
pub fn transport() -> Result<quinn::TransportConfig> {
    let opts = ftvm_tls::TransportOptions {
        idle_timeout: Duration::from_secs(10),
        keep_alive: Some(Duration::from_secs(2)),
        max_concurrent_streams: 4,
    };
    let mut t = opts.to_quinn().map_err(tls_err)?;
    // Bounded windows: the source never has more than this in flight, whatever the disk size.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65527);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Connection(format!("TLS setup: {e}"))
}

/// Loads identity `node` from `tls_dir` and checks that its certificate is a node's (of some
/// pair): a witness key, or a certificate issued without a kind, never serves or pulls a disk.
pub fn node_identity(tls_dir: &Path, node: &str) -> Result<ftvm_tls::Identity> {
    let id = ftvm_tls::Identity::load(tls_dir, node).map_err(|e| {
        Error::Connection(format!(
            "loading identity {node:?} from {}: {e}",
            tls_dir.display()
        ))
    })?;
    id.node_pair()
        .map_err(|e| Error::Connection(format!("identity {node:?} cannot resync disks: {e}")))?;
    Ok(id)
}

fn identity(tls_dir: &Path, node: &str) -> Result<ftvm_tls::Identity> {
    node_identity(tls_dir, node)
}

/// Checks the peer of `conn` as resync requires, on either side: another node of `local`'s
/// pair (never a witness, a node of another pair or an unmarked certificate), and on a
/// server, one of `allow` if that is not empty. On failure the connection is closed with the
/// reason (so the other side reports it too) and the reason is returned.
pub fn authorize(
    conn: &Connection,
    local: &ftvm_tls::Identity,
    allow: &[String],
) -> Result<ftvm_tls::PeerCert> {
    let refused = match ftvm_tls::pair_peer(conn, local) {
        Ok(peer) if allow.is_empty() || allow.contains(&peer.name) => return Ok(peer),
        Ok(peer) => format!("identity {:?} is not allowed (not in --allow)", peer.name),
        Err(e) => format!("refused: {e}"),
    };
    conn.close(REFUSED.into(), refused.as_bytes());
    Err(Error::Connection(refused))
}

/// Application close code of a connection refused by [`authorize`].
pub const REFUSED: u32 = 2;

/// A server endpoint for the resync service, identity `node` from `tls_dir`.
pub fn server_endpoint(listen: SocketAddr, tls_dir: &Path, node: &str) -> Result<Endpoint> {
    let id = identity(tls_dir, node)?;
    let mut cfg = ftvm_tls::server_config(&id, ALPN, &Default::default()).map_err(tls_err)?;
    cfg.transport_config(Arc::new(transport()?));
    Endpoint::server(cfg, listen).map_err(|e| Error::io("bind", listen.to_string(), e))
}

/// A client endpoint (IPv4) for the resync service, identity `node` from `tls_dir`.
pub fn client_endpoint(tls_dir: &Path, node: &str) -> Result<Endpoint> {
    client_endpoint_for("0.0.0.0:0".parse().unwrap(), tls_dir, node)
}

/// A client endpoint able to reach `remote` (bound to the unspecified address of its family).
pub fn client_endpoint_for(remote: SocketAddr, tls_dir: &Path, node: &str) -> Result<Endpoint> {
    let id = identity(tls_dir, node)?;
    let mut cfg = ftvm_tls::client_config(&id, ALPN, &Default::default()).map_err(tls_err)?;
    cfg.transport_config(Arc::new(transport()?));
    let bind: SocketAddr = if remote.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let mut ep = Endpoint::client(bind).map_err(|e| Error::io("bind", bind.to_string(), e))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects to the resync server at `addr` whose certificate must name `server_name`.
pub async fn connect(ep: &Endpoint, addr: SocketAddr, server_name: &str) -> Result<Connection> {
    let connecting = ep
        .connect(addr, server_name)
        .map_err(|e| Error::Connection(format!("{addr}: {e}")))?;
    connecting
        .await
        .map_err(|e| Error::Connection(format!("{addr} ({server_name}): {e}")))
}

/// Options of the serving loop.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// If not empty, only these client identities may pull (each must also be another node
    /// of the server's pair; by default every other node of the pair may).
    pub allow: Vec<String>,
    /// Stop after this many sessions (`None`: serve until the endpoint is closed).
    pub max_sessions: Option<u64>,
}

/// Accepts connections on `ep` and serves `src` to each, concurrently, to the other nodes of
/// `local`'s pair only ([`authorize`]). Returns when `max_sessions` sessions have ended, when
/// the endpoint is closed, or with an error when an injected fault fired (the test hook of an
/// interrupted source).
pub async fn serve(
    ep: &Endpoint,
    local: &ftvm_tls::Identity,
    src: Arc<SourceDisk>,
    opts: &ServeOptions,
    stats: Arc<Stats>,
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<()>>();
    let mut started = 0u64;
    let mut ended = 0u64;
    loop {
        if opts.max_sessions.is_some_and(|m| ended >= m) {
            return Ok(());
        }
        let accepting = opts.max_sessions.is_none_or(|m| started < m);
        tokio::select! {
            inc = ep.accept(), if accepting => {
                let Some(inc) = inc else { return Ok(()) };
                let remote = inc.remote_address();
                let conn = match inc.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("refused connection from {remote}: {e}");
                        continue;
                    }
                };
                let peer = match authorize(&conn, local, &opts.allow) {
                    Ok(p) => p.name,
                    Err(e) => {
                        tracing::warn!("connection from {remote}: {e}");
                        continue;
                    }
                };
                started += 1;
                tracing::info!("session from {peer} at {remote}");
                let (src, stats, tx) = (src.clone(), stats.clone(), tx.clone());
                tokio::spawn(async move {
                    let r = serve_connection(&conn, &src, &stats).await;
                    match &r {
                        Ok(rep) => tracing::info!(
                            "session from {peer} ended: {} blocks sent, fast path {}, root verified {}",
                            rep.blocks_sent, rep.fast_path, rep.verified
                        ),
                        Err(e) => tracing::warn!("session from {peer} failed: {e}"),
                    }
                    let _ = tx.send(r.map(|_| ()));
                });
            }
            Some(r) = rx.recv() => {
                ended += 1;
                if let Err(e) = r {
                    if matches!(e, Error::Injected(_)) {
                        ep.close(0u32.into(), b"fault injection");
                        ep.wait_idle().await;
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Pulls (or with `opts.verify_only` verifies) `target` from the server at `addr`.
pub async fn pull(
    tls_dir: &Path,
    node: &str,
    addr: SocketAddr,
    server_name: &str,
    target: &TargetDisk,
    opts: &PullOptions,
    stats: Arc<Stats>,
) -> Result<Summary> {
    let local = node_identity(tls_dir, node)?;
    let ep = client_endpoint_for(addr, tls_dir, node)?;
    let conn = connect(&ep, addr, server_name).await?;
    if let Err(e) = authorize(&conn, &local, &[]) {
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
        return Err(Error::Connection(format!("{addr} ({server_name}): {e}")));
    }
    let r = pull_connection(&conn, target, opts, &stats).await;
    if r.is_err() {
        // Let the close (with its reason) reach the source.
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    }
    r
}
