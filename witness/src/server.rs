//! The witness service: QUIC with mutual TLS, one request per bidirectional stream.
//!
//! Claims and status queries go to one decider thread that owns the state machine and the
//! store ([`StateStore`]). It takes every request waiting, decides them in order against its
//! working state, commits all new grants at once (rocksdb: one synced batch; etcd: one
//! transaction, which also confirms that no other witness changed the pairs read — if one
//! did, the batch is decided again on the fresh state) and only then sends the replies (group
//! commit).
//!
//! If the rocksdb store fails, nothing is replied as granted and the decider refuses every
//! later claim until the witness is restarted (the durable state is then the truth). If the
//! etcd store is unavailable (no quorum, unreachable), the requests get `unavailable`, the
//! decider reads the state again before its next decision, and the clients retry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_tls::{peer_identity, Identity, TransportOptions, ALPN_WITNESS};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::backend::{Commit, StateStore};
use crate::codec::{
    message_version, DecodeError, ErrorCode, Request, Response, MAX_REQUEST, VERSION, VERSION_V1,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{ClaimDecision, ClaimId, PairState, Refusal, Witness};
use crate::store::StoreError;

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

enum JobKind {
    Claim { seen: u64, claim_id: ClaimId },
    Status,
}

struct Job {
    pair: String,
    node: String,
    kind: JobKind,
    received: Instant,
    reply: oneshot::Sender<Response>,
}

struct Shared {
    /// The configured pairs (their states are the decider's): who may connect.
    roster: Witness,
    metrics: Arc<Metrics>,
    jobs: mpsc::Sender<Job>,
}

/// Opens the store on the decider thread (a blocking call, outside the async runtime).
pub type StoreOpener = Box<dyn FnOnce() -> Result<Box<dyn StateStore>, StoreError> + Send>;

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
        let store = config.store.clone();
        let data_dir = config.data_dir.clone();
        Server::start_with(
            config,
            Box::new(move || crate::backend::open(&store, &data_dir, init)),
        )
        .await
    }

    /// [`Server::start`] with the store `open` returns (the configuration's store is ignored).
    pub async fn start_with(config: &Config, open: StoreOpener) -> Result<Server, ServeError> {
        let pairs = config.pair_map();
        // The metrics listener is bound first (the exporter binds as it is built): a taken
        // port fails the start before the store is opened.
        let (metrics, metrics_listener) = match config.metrics_listen {
            Some(maddr) => {
                let (m, addr, listener) =
                    Metrics::serve(maddr).map_err(|e| ServeError::Bind(maddr, e))?;
                (m, Some((addr, listener)))
            }
            None => (Metrics::default(), None),
        };
        let metrics = Arc::new(metrics);
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let (ready_tx, ready_rx) = oneshot::channel();
        let dmetrics = metrics.clone();
        let dpairs = pairs.clone();
        std::thread::Builder::new()
            .name("witness-decider".into())
            .spawn(move || {
                let opened = open().and_then(|mut store| {
                    let loaded = store.load()?;
                    let key = store.reset_key()?;
                    Ok((store, loaded, key))
                });
                match opened {
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                    Ok((store, loaded, key)) => {
                        let d = Decider::new(store, dpairs, loaded, dmetrics);
                        if ready_tx.send(Ok((key, d.store.describe()))).is_ok() {
                            d.run(rx);
                        }
                    }
                }
            })
            .map_err(ServeError::Thread)?;
        let (reset_key, store_desc) = ready_rx
            .await
            .map_err(|_| StoreError::Unavailable("the decider thread died".into()))??;
        info!(event = "store", store = %store_desc, "state store open");
        let identity = Identity::load(&config.tls_dir, &config.identity)?;
        let mut topts = TransportOptions::default();
        if let Some(ms) = config.idle_timeout_ms {
            topts.idle_timeout = Duration::from_millis(ms);
        }
        topts.keep_alive = None; // clients keep their connections alive if they want to
        topts.max_concurrent_streams = 256;
        let endpoint = ftvm_tls::server_endpoint_with_reset_key(
            config.listen,
            &identity,
            ALPN_WITNESS,
            &topts,
            &reset_key,
        )?;

        let shared = Arc::new(Shared {
            roster: Witness::new(&pairs, BTreeMap::new()),
            metrics: metrics.clone(),
            jobs: tx,
        });

        let mut tasks = Vec::new();
        let mut metrics_addr = None;
        match metrics_listener {
            Some((addr, listener)) => {
                metrics_addr = Some(addr);
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = listener.await {
                        warn!(event = "metrics_failed", error = ?e, "metrics listener stopped");
                    }
                }));
            }
            None => {
                // Served metrics are kept up by the exporter; these ones are not scraped.
                let m = metrics.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        m.upkeep();
                    }
                }));
            }
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
                    shared.metrics.handshake_failures.increment(1);
                    warn!(event = "refused", reason = "handshake", remote = %remote, error = %e, "connection refused");
                    return;
                }
            };
            let Some(node) = peer_identity(&conn) else {
                shared.metrics.handshake_failures.increment(1);
                warn!(event = "refused", reason = "no_identity", remote = %remote, "connection refused");
                conn.close(CLOSE_NOT_AUTHORIZED.into(), b"no certificate identity");
                return;
            };
            let known = shared.roster.knows_node(&node);
            if !known {
                shared.metrics.refused_unknown_identity.increment(1);
                warn!(event = "refused", reason = "unknown_identity", node = %node, remote = %remote, "connection refused: identity is a node of no pair");
                conn.close(
                    CLOSE_NOT_AUTHORIZED.into(),
                    b"certificate identity is not a node of any pair",
                );
                return;
            }
            shared.metrics.connections.increment(1);
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
            m.request_timeouts.increment(1);
            warn!(event = "refused", reason = "timeout", node, remote = %remote, "request not received in time");
            error(
                ErrorCode::Timeout,
                "request not received completely in time",
            )
        }
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            m.oversized_requests.increment(1);
            m.bad_requests.increment(1);
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
                m.bad_requests.increment(1);
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
            m.refused_unknown_pair.increment(1);
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
            m.refused_not_authorized.increment(1);
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
            m.pings.increment(1);
            Response::Pong
        }
        Request::Status { pair } => submit(shared, pair, node, JobKind::Status).await,
        Request::Claim {
            pair,
            seen,
            claim_id,
        } => submit(shared, pair, node, JobKind::Claim { seen, claim_id }).await,
    }
}

async fn submit(shared: &Shared, pair: String, node: &str, kind: JobKind) -> Response {
    let (tx, rx) = oneshot::channel();
    let job = Job {
        pair,
        node: node.to_string(),
        kind,
        received: Instant::now(),
        reply: tx,
    };
    if shared.jobs.send(job).await.is_err() {
        return error(ErrorCode::Unavailable, "decider stopped");
    }
    rx.await
        .unwrap_or_else(|_| error(ErrorCode::Unavailable, "decider stopped"))
}

/// Times a batch is decided again after conflicts before it is answered `unavailable`.
const MAX_CONFLICT_ROUNDS: u32 = 32;

/// What the rule decided for one job.
enum Decided {
    Claim(ClaimDecision),
    Status(Result<PairState, Refusal>),
}

/// The decider: owns the state machine, the versions read from the store, and the store.
struct Decider {
    store: Box<dyn StateStore>,
    pairs: BTreeMap<String, Vec<String>>,
    witness: Witness,
    versions: BTreeMap<String, u64>,
    metrics: Arc<Metrics>,
    /// Why every request is refused (the exclusive store failed: restart the witness).
    poisoned: Option<String>,
    /// The shared store's outcome of a commit is unknown: read the state before deciding.
    reload: bool,
}

impl Decider {
    fn new(
        store: Box<dyn StateStore>,
        pairs: BTreeMap<String, Vec<String>>,
        loaded: BTreeMap<String, crate::backend::Versioned>,
        metrics: Arc<Metrics>,
    ) -> Decider {
        let mut d = Decider {
            store,
            witness: Witness::default(),
            pairs,
            versions: BTreeMap::new(),
            metrics,
            poisoned: None,
            reload: false,
        };
        d.install(loaded);
        for p in d.witness.pair_names() {
            let st = d.witness.state(p).cloned().unwrap_or_default();
            info!(
                event = "loaded",
                pair = p,
                generation = st.generation,
                holder = st.holder.as_deref().unwrap_or("-"),
                "pair state loaded"
            );
        }
        d
    }

    /// Replaces the whole state with what the store holds.
    fn install(&mut self, loaded: BTreeMap<String, crate::backend::Versioned>) {
        self.versions = loaded.iter().map(|(p, v)| (p.clone(), v.version)).collect();
        let states = loaded.into_iter().map(|(p, v)| (p, v.state)).collect();
        self.witness = Witness::new(&self.pairs, states);
        for p in self.witness.pair_names() {
            let g = self.witness.state(p).map(|s| s.generation).unwrap_or(0);
            self.metrics.set_generation(p, g);
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let max_batch = self.store.max_batch().max(1);
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < max_batch {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            if let Some(why) = &self.poisoned {
                for j in jobs {
                    self.metrics.store_failures.increment(1);
                    let _ = j.reply.send(error(ErrorCode::Unavailable, why.clone()));
                }
                continue;
            }
            match self.decide_and_commit(&jobs) {
                Ok((decided, _wrote)) => {
                    for (j, d) in jobs.into_iter().zip(decided) {
                        self.reply(j, d);
                    }
                }
                Err(e) => {
                    let why = if e.is_transient() && self.store.shared() {
                        self.reload = true;
                        tracing::error!(event = "store_unavailable", store = %self.store.describe(), error = %e, "store unavailable; nothing decided, clients will retry");
                        format!("witness {e}")
                    } else {
                        let why = format!("witness store failed, restart the witness: {e}");
                        tracing::error!(event = "store_failed", error = %e, "store write failed; refusing all claims until restart");
                        self.poisoned = Some(why.clone());
                        why
                    };
                    for j in jobs {
                        self.metrics.store_failures.increment(1);
                        let _ = j.reply.send(error(ErrorCode::Unavailable, why.clone()));
                    }
                }
            }
        }
    }

    /// Decides every job in order and makes the outcome durable (and, for a shared store,
    /// confirmed); returns the decisions and whether anything was written.
    fn decide_and_commit(&mut self, jobs: &[Job]) -> Result<(Vec<Decided>, bool), StoreError> {
        if self.reload {
            let loaded = self.store.load()?;
            self.install(loaded);
            self.reload = false;
        }
        let shared = self.store.shared();
        for _ in 0..MAX_CONFLICT_ROUNDS {
            let mut work = self.witness.clone();
            let mut writes: BTreeMap<String, PairState> = BTreeMap::new();
            let mut read: BTreeSet<String> = BTreeSet::new();
            let mut decided = Vec::with_capacity(jobs.len());
            for j in jobs {
                let d = match &j.kind {
                    JobKind::Claim { seen, claim_id } => {
                        let d = work.decide_claim(&j.pair, &j.node, *seen, *claim_id);
                        if let ClaimDecision::Grant { new_state } = &d {
                            work.apply(&j.pair, new_state.clone());
                            writes.insert(j.pair.clone(), new_state.clone());
                        }
                        if !matches!(d, ClaimDecision::Refuse(_)) {
                            read.insert(j.pair.clone());
                        }
                        Decided::Claim(d)
                    }
                    JobKind::Status => {
                        let r = work.authorize(&j.pair, &j.node).cloned();
                        if r.is_ok() {
                            read.insert(j.pair.clone());
                        }
                        Decided::Status(r)
                    }
                };
                decided.push(d);
            }
            let expect: Vec<(String, u64)> = if shared {
                read.iter()
                    .map(|p| (p.clone(), self.versions.get(p).copied().unwrap_or(0)))
                    .collect()
            } else {
                Vec::new()
            };
            let writes: Vec<(String, PairState)> = writes.into_iter().collect();
            if expect.is_empty() && writes.is_empty() {
                return Ok((decided, false));
            }
            match self.store.commit(&expect, &writes)? {
                Commit::Done(new_versions) => {
                    if !writes.is_empty() {
                        self.metrics.synced_writes.increment(1);
                    }
                    for (p, st) in &writes {
                        self.metrics.set_generation(p, st.generation);
                    }
                    self.versions.extend(new_versions);
                    self.witness = work;
                    return Ok((decided, !writes.is_empty()));
                }
                Commit::Conflict(current) => {
                    self.metrics.store_conflicts.increment(1);
                    for (p, v) in current {
                        self.metrics.set_generation(&p, v.state.generation);
                        self.witness.apply(&p, v.state);
                        self.versions.insert(p, v.version);
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "{MAX_CONFLICT_ROUNDS} conflicting writes by other witnesses in a row"
        )))
    }

    fn reply(&self, j: Job, d: Decided) {
        let m = &self.metrics;
        let latency = j.received.elapsed();
        let lat_us = latency.as_micros() as u64;
        let resp = match (d, &j.kind) {
            (
                Decided::Status(Ok(PairState {
                    generation, holder, ..
                })),
                _,
            ) => {
                m.status.increment(1);
                info!(event = "status", pair = %j.pair, node = %j.node, generation, holder = holder.as_deref().unwrap_or("-"));
                Response::Status { generation, holder }
            }
            (Decided::Status(Err(r)), _) => refusal(r, "status", &j.pair, &j.node, m),
            (Decided::Claim(d), JobKind::Claim { seen, claim_id }) => {
                let seen = *seen;
                match d {
                    ClaimDecision::Grant { new_state } => {
                        m.grants.increment(1);
                        m.observe_claim_latency(latency);
                        info!(event = "claim", decision = "granted", pair = %j.pair, node = %j.node, seen, claim_id = %claim_id, generation = new_state.generation, latency_us = lat_us);
                        Response::Granted {
                            generation: new_state.generation,
                            holder: j.node.clone(),
                        }
                    }
                    ClaimDecision::Regrant { state } => {
                        m.regrants.increment(1);
                        m.observe_claim_latency(latency);
                        info!(event = "claim", decision = "regranted", pair = %j.pair, node = %j.node, seen, claim_id = %claim_id, generation = state.generation, latency_us = lat_us);
                        Response::Granted {
                            generation: state.generation,
                            holder: j.node.clone(),
                        }
                    }
                    ClaimDecision::Deny { state } => {
                        m.denials.increment(1);
                        m.observe_claim_latency(latency);
                        info!(event = "claim", decision = "denied", pair = %j.pair, node = %j.node, seen, claim_id = %claim_id, generation = state.generation, holder = state.holder.as_deref().unwrap_or("-"), latency_us = lat_us);
                        Response::Denied {
                            generation: state.generation,
                            holder: state.holder,
                        }
                    }
                    ClaimDecision::Refuse(r) => refusal(r, "claim", &j.pair, &j.node, m),
                }
            }
            (Decided::Claim(_), JobKind::Status) => error(
                ErrorCode::Unavailable,
                "internal: claim decision for a status query",
            ),
        };
        let _ = j.reply.send(resp);
    }
}
