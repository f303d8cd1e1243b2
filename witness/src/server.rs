//! The witness service: QUIC with mutual TLS, one request per bidirectional stream.
//!
//! Claims go to one decider thread that owns the state machine and the store. It takes every
//! claim waiting, decides them in order against its working state, writes all new grants in
//! one synced rocksdb batch, publishes the new state and only then sends the replies (group
//! commit). If the store fails, nothing is replied as granted and the decider refuses every
//! later claim until the witness is restarted (the durable state is then the truth).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ftvm_tls::{peer_identity, Identity, TransportOptions, ALPN_WITNESS};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::codec::{
    message_version, DecodeError, ErrorCode, Request, Response, MAX_REQUEST, VERSION, VERSION_V1,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{ClaimDecision, ClaimId, PairState, Refusal, Witness};
use crate::store::{Store, StoreError};

/// QUIC application close code: the certificate identity is not a node of any pair.
pub const CLOSE_NOT_AUTHORIZED: u32 = 0x10;
/// QUIC application close code: the witness is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 0x11;

/// How long a client may take to send one complete request.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificates or TLS configuration.
    #[error(transparent)]
    Tls(#[from] ftvm_tls::TlsError),
    /// A socket could not be bound.
    #[error("{0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The decider thread could not be started.
    #[error("decider thread: {0}")]
    Thread(std::io::Error),
}

struct Job {
    pair: String,
    node: String,
    seen: u64,
    claim_id: ClaimId,
    received: Instant,
    reply: oneshot::Sender<Response>,
}

struct Shared {
    /// Durable (published) state, read by status queries.
    published: RwLock<Witness>,
    metrics: Arc<Metrics>,
    jobs: mpsc::Sender<Job>,
}

/// A running witness.
pub struct Server {
    endpoint: quinn::Endpoint,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Opens the store (creating it with `init`), loads the state and starts serving on
    /// `config.listen` (and the metrics listener if configured). Must run inside a tokio
    /// multi-threaded runtime.
    pub async fn start(config: &Config, init: bool) -> Result<Server, ServeError> {
        let store = Store::open(&config.data_dir, init)?;
        let states = store.load()?;
        let witness = Witness::new(&config.pair_map(), states);
        let metrics = Arc::new(Metrics::default());
        for p in witness.pair_names() {
            let st = witness.state(p).cloned().unwrap_or_default();
            metrics.set_generation(p, st.generation);
            info!(
                event = "loaded",
                pair = p,
                generation = st.generation,
                holder = st.holder.as_deref().unwrap_or("-"),
                "pair state loaded"
            );
        }
        let identity = Identity::load(&config.tls_dir, &config.identity)?;
        let mut topts = TransportOptions::default();
        if let Some(ms) = config.idle_timeout_ms {
            topts.idle_timeout = Duration::from_millis(ms);
        }
        topts.keep_alive = None; // clients keep their connections alive if they want to
        topts.max_concurrent_streams = 256;
        let reset_key = store.reset_key()?;
        let endpoint = ftvm_tls::server_endpoint_with_reset_key(
            config.listen,
            &identity,
            ALPN_WITNESS,
            &topts,
            &reset_key,
        )?;

        let (tx, rx) = mpsc::channel::<Job>(4096);
        let shared = Arc::new(Shared {
            published: RwLock::new(witness.clone()),
            metrics: metrics.clone(),
            jobs: tx,
        });
        let dshared = shared.clone();
        std::thread::Builder::new()
            .name("witness-decider".into())
            .spawn(move || decider(witness, store, rx, dshared))
            .map_err(ServeError::Thread)?;

        let mut tasks = Vec::new();
        let mut metrics_addr = None;
        if let Some(maddr) = config.metrics_listen {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(|e| ServeError::Bind(maddr, e))?;
            metrics_addr = l.local_addr().ok();
            tasks.push(tokio::spawn(crate::metrics::serve_http(l, metrics.clone())));
        }
        let ep = endpoint.clone();
        tasks.push(tokio::spawn(accept_loop(ep, shared)));
        Ok(Server {
            endpoint,
            metrics_addr,
            metrics,
            tasks,
        })
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The bound metrics address, if the metrics listener is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, closes every connection and waits briefly for them to drain.
    pub async fn shutdown(self) {
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"witness shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    shared.metrics.handshake_failures.fetch_add(1, Relaxed);
                    warn!(event = "refused", reason = "handshake", remote = %remote, error = %e, "connection refused");
                    return;
                }
            };
            let Some(node) = peer_identity(&conn) else {
                shared.metrics.handshake_failures.fetch_add(1, Relaxed);
                warn!(event = "refused", reason = "no_identity", remote = %remote, "connection refused");
                conn.close(CLOSE_NOT_AUTHORIZED.into(), b"no certificate identity");
                return;
            };
            let known = shared
                .published
                .read()
                .map(|w| w.knows_node(&node))
                .unwrap_or(false);
            if !known {
                shared
                    .metrics
                    .refused_unknown_identity
                    .fetch_add(1, Relaxed);
                warn!(event = "refused", reason = "unknown_identity", node = %node, remote = %remote, "connection refused: identity is a node of no pair");
                conn.close(
                    CLOSE_NOT_AUTHORIZED.into(),
                    b"certificate identity is not a node of any pair",
                );
                return;
            }
            shared.metrics.connections.fetch_add(1, Relaxed);
            info!(event = "connected", node = %node, remote = %remote);
            let node: Arc<str> = node.into();
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let shared = shared.clone();
                        let node = node.clone();
                        tokio::spawn(async move {
                            handle_stream(send, recv, &node, remote, &shared).await;
                        });
                    }
                    Err(e) => {
                        info!(event = "disconnected", node = %node, remote = %remote, reason = %e);
                        return;
                    }
                }
            }
        });
    }
}

fn error(code: ErrorCode, text: impl Into<String>) -> Response {
    Response::Error {
        code,
        text: text.into(),
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: &str,
    remote: SocketAddr,
    shared: &Shared,
) {
    let m = &shared.metrics;
    // A version 1 request is refused in version 1, which its sender can read.
    let mut reply_version = VERSION;
    let resp = match tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_to_end(MAX_REQUEST)).await
    {
        Err(_) => {
            m.request_timeouts.fetch_add(1, Relaxed);
            warn!(event = "refused", reason = "timeout", node, remote = %remote, "request not received in time");
            error(
                ErrorCode::Timeout,
                "request not received completely in time",
            )
        }
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            m.oversized_requests.fetch_add(1, Relaxed);
            m.bad_requests.fetch_add(1, Relaxed);
            warn!(event = "refused", reason = "too_large", node, remote = %remote, "oversized request");
            let _ = recv.stop(0u32.into());
            error(
                ErrorCode::TooLarge,
                format!("request exceeds the limit of {MAX_REQUEST} bytes"),
            )
        }
        Ok(Err(e)) => {
            // The stream was reset or the connection is gone: nobody to answer.
            info!(event = "stream_lost", node, remote = %remote, error = %e);
            return;
        }
        Ok(Ok(buf)) => match Request::decode(&buf) {
            Err(e) => {
                if message_version(&buf) == Some(VERSION_V1) {
                    reply_version = VERSION_V1;
                }
                m.bad_requests.fetch_add(1, Relaxed);
                warn!(event = "refused", reason = e.code().label(), node, remote = %remote, error = %e, len = buf.len(), "bad request");
                decode_error(&e)
            }
            Ok(req) => answer(req, node, shared).await,
        },
    };
    let _ = send.write_all(&resp.encode_version(reply_version)).await;
    let _ = send.finish();
    // Let the peer read the reply; quinn keeps sending a finished stream's data after drop.
}

fn decode_error(e: &DecodeError) -> Response {
    error(e.code(), e.to_string())
}

fn refusal(r: Refusal, op: &str, pair: &str, node: &str, m: &Metrics) -> Response {
    match r {
        Refusal::UnknownPair => {
            m.refused_unknown_pair.fetch_add(1, Relaxed);
            warn!(
                event = "refused",
                op,
                reason = "unknown_pair",
                pair,
                node,
                "request refused"
            );
            error(
                ErrorCode::UnknownPair,
                format!("pair {pair:?} is not configured on this witness"),
            )
        }
        Refusal::NotAuthorized => {
            m.refused_not_authorized.fetch_add(1, Relaxed);
            warn!(
                event = "refused",
                op,
                reason = "not_authorized",
                pair,
                node,
                "request refused"
            );
            error(
                ErrorCode::NotAuthorized,
                format!("identity {node:?} is not a node of pair {pair:?}"),
            )
        }
    }
}

async fn answer(req: Request, node: &str, shared: &Shared) -> Response {
    let m = &shared.metrics;
    match req {
        Request::Ping => {
            m.pings.fetch_add(1, Relaxed);
            Response::Pong
        }
        Request::Status { pair } => {
            let st = {
                let w = match shared.published.read() {
                    Ok(w) => w,
                    Err(_) => return error(ErrorCode::Unavailable, "witness state poisoned"),
                };
                w.authorize(&pair, node).cloned()
            };
            match st {
                Ok(PairState {
                    generation, holder, ..
                }) => {
                    m.status.fetch_add(1, Relaxed);
                    info!(event = "status", pair = %pair, node, generation, holder = holder.as_deref().unwrap_or("-"));
                    Response::Status { generation, holder }
                }
                Err(r) => refusal(r, "status", &pair, node, m),
            }
        }
        Request::Claim {
            pair,
            seen,
            claim_id,
        } => {
            let (tx, rx) = oneshot::channel();
            let job = Job {
                pair,
                node: node.to_string(),
                seen,
                claim_id,
                received: Instant::now(),
                reply: tx,
            };
            if shared.jobs.send(job).await.is_err() {
                return error(ErrorCode::Unavailable, "decider stopped");
            }
            rx.await
                .unwrap_or_else(|_| error(ErrorCode::Unavailable, "decider stopped"))
        }
    }
}

/// Most claims taken into one synced batch.
const MAX_BATCH: usize = 256;

/// Test hook, compiled only with the `test-hooks` cargo feature (which only this crate's
/// tests enable): when this environment variable is set, the witness kills itself right after
/// its first synced grant and before replying, to prove that a crash there loses only the
/// reply. A build without the feature never reads the variable.
#[cfg(feature = "test-hooks")]
pub const CRASH_AFTER_WRITE_ENV: &str = "FTVM_WITNESS_TEST_CRASH_AFTER_WRITE";

/// Whether the crash-after-write test hook is armed (always false without `test-hooks`).
fn crash_after_write_armed() -> bool {
    #[cfg(feature = "test-hooks")]
    {
        std::env::var_os(CRASH_AFTER_WRITE_ENV).is_some()
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        false
    }
}

/// The crash of the crash-after-write test hook.
#[cfg(feature = "test-hooks")]
fn test_crash() {
    tracing::error!(
        event = "test_crash",
        "crashing after the write, before the reply ({CRASH_AFTER_WRITE_ENV})"
    );
    // SIGKILL, like `kill -9`: no destructor, no core file.
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(not(feature = "test-hooks"))]
fn test_crash() {}

fn decider(mut witness: Witness, store: Store, mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    let m = shared.metrics.clone();
    let crash_after_write = crash_after_write_armed();
    let mut poisoned: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Some(why) = &poisoned {
            for j in jobs {
                m.store_failures.fetch_add(1, Relaxed);
                let _ = j.reply.send(error(ErrorCode::Unavailable, why.clone()));
            }
            continue;
        }
        // Decide in arrival order against the working state.
        let mut writes: BTreeMap<String, PairState> = BTreeMap::new();
        let mut decided = Vec::with_capacity(jobs.len());
        for j in jobs {
            let d = witness.decide_claim(&j.pair, &j.node, j.seen, j.claim_id);
            if let ClaimDecision::Grant { new_state } = &d {
                witness.apply(&j.pair, new_state.clone());
                writes.insert(j.pair.clone(), new_state.clone());
            }
            decided.push((j, d));
        }
        if !writes.is_empty() {
            let batch: Vec<(String, PairState)> = writes.clone().into_iter().collect();
            match store.write_synced(&batch) {
                Ok(()) => {
                    if crash_after_write {
                        test_crash();
                    }
                    m.synced_writes.fetch_add(1, Relaxed);
                    if let Ok(mut p) = shared.published.write() {
                        for (pair, st) in &batch {
                            p.apply(pair, st.clone());
                            m.set_generation(pair, st.generation);
                        }
                    }
                }
                Err(e) => {
                    let why = format!("witness store failed, restart the witness: {e}");
                    tracing::error!(event = "store_failed", error = %e, "store write failed; refusing all claims until restart");
                    poisoned = Some(why.clone());
                    for (j, _) in decided {
                        m.store_failures.fetch_add(1, Relaxed);
                        let _ = j.reply.send(error(ErrorCode::Unavailable, why.clone()));
                    }
                    continue;
                }
            }
        }
        for (j, d) in decided {
            let latency = j.received.elapsed();
            let lat_us = latency.as_micros() as u64;
            let resp = match d {
                ClaimDecision::Grant { new_state } => {
                    m.grants.fetch_add(1, Relaxed);
                    m.observe_claim_latency(latency);
                    info!(event = "claim", decision = "granted", pair = %j.pair, node = %j.node, seen = j.seen, claim_id = %j.claim_id, generation = new_state.generation, latency_us = lat_us);
                    Response::Granted {
                        generation: new_state.generation,
                        holder: j.node.clone(),
                    }
                }
                ClaimDecision::Regrant { state } => {
                    m.regrants.fetch_add(1, Relaxed);
                    m.observe_claim_latency(latency);
                    info!(event = "claim", decision = "regranted", pair = %j.pair, node = %j.node, seen = j.seen, claim_id = %j.claim_id, generation = state.generation, latency_us = lat_us);
                    Response::Granted {
                        generation: state.generation,
                        holder: j.node.clone(),
                    }
                }
                ClaimDecision::Deny { state } => {
                    m.denials.fetch_add(1, Relaxed);
                    m.observe_claim_latency(latency);
                    info!(event = "claim", decision = "denied", pair = %j.pair, node = %j.node, seen = j.seen, claim_id = %j.claim_id, generation = state.generation, holder = state.holder.as_deref().unwrap_or("-"), latency_us = lat_us);
                    Response::Denied {
                        generation: state.generation,
                        holder: state.holder,
                    }
                }
                ClaimDecision::Refuse(r) => refusal(r, "claim", &j.pair, &j.node, &m),
            };
            let _ = j.reply.send(resp);
        }
    }
}
