//! The etcd store: the pairs' states in an etcd cluster that several witness processes share.
//!
//! Keys, under the configured prefix `P` (default `/ftvm-witness/`): `P` + `format` → `2`
//! (written by `--init`), `P` + `pair/<name>` → the pair's record (the same encoding as the
//! rocksdb store, [`crate::store::encode_state`]), `P` + `reset-key` → the QUIC stateless-reset
//! key the witnesses of the group share.
//!
//! A commit is **one etcd transaction**: it compares the modification revision of every pair
//! key the decisions read with the revision read (0: no key), and only if all are unchanged
//! puts the new records (generation + 1, holder, claim id); otherwise it reads the current
//! records back. etcd replies only after a quorum of members committed it, so a grant is
//! durable before the witness answers. Requests carry etcd's "require leader" flag, so a member
//! without a leader (no quorum) refuses at once instead of waiting.
//!
//! The store keeps one connection per endpoint and sends each request to the member that
//! answered last; if that member is unreachable, has no leader or times out, the same request
//! goes to the next member. Repeating a transaction is safe: if an earlier copy did commit,
//! the repeat's comparison fails and returns the records it wrote, from which the decider
//! decides again (a retried claim is then repeated, not granted twice).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse,
};

use crate::backend::{Commit, StateStore, Versioned};
use crate::config::EtcdConfig;
use crate::state::PairState;
use crate::store::{decode_state, encode_state, StoreError};

const FORMAT: &[u8] = b"2";

/// The pause between a starting witness's attempts to reach etcd.
const STARTUP_RETRY: Duration = Duration::from_millis(250);

/// The etcd-backed store. All calls block on its own single-threaded tokio runtime: use it
/// from a plain thread (the witness's decider), never from a tokio worker.
pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    /// One client per endpoint, in the configured order.
    clients: Vec<Client>,
    /// The member that answered last.
    current: usize,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn read_file(p: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(p).map_err(|e| StoreError::Io(p.to_path_buf(), e))
}

/// Why one member could not serve a request.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The member has no leader: the cluster (as this member sees it) has no quorum.
    NoLeader(String),
    /// No connection could be made: the request was never sent.
    Refused(String),
    /// The connection failed (reset, closed, ...), perhaps after the request was sent.
    Unreachable(String),
    /// No answer or no commit in time (a leader election, a partition, no quorum).
    Slow(String),
    /// Any other refusal.
    Other(String),
}

fn classify(e: etcd_client::Error) -> Failure {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("no leader") {
        Failure::NoLeader(text)
    } else if lower.contains("tcp connect error") || lower.contains("connection refused") {
        Failure::Refused(text)
    } else if lower.contains("timed out")
        || lower.contains("leader changed")
        || lower.contains("deadline")
    {
        Failure::Slow(text)
    } else if lower.contains("transport")
        || lower.contains("connect")
        || lower.contains("unavailable")
        || lower.contains("broken pipe")
    {
        Failure::Unreachable(text)
    } else {
        Failure::Other(text)
    }
}

/// The error for a request that no member served, naming the likely cause and saying whether
/// it may have been applied. Every such failure is transient: the decider reads the state
/// again before its next decision.
fn unavailable(failures: &[(String, Failure)]) -> StoreError {
    let any = |f: fn(&Failure) -> bool| failures.iter().any(|(_, x)| f(x));
    // A member without a leader refuses before proposing anything, and a refused connection
    // carried nothing: only then is it certain that nothing was written.
    let not_applied = failures
        .iter()
        .all(|(_, f)| matches!(f, Failure::NoLeader(_) | Failure::Refused(_)));
    let why = if any(|f| matches!(f, Failure::NoLeader(_))) {
        "the etcd cluster has no quorum (no leader)"
    } else if any(|f| matches!(f, Failure::Slow(_))) {
        "etcd did not commit in time (no quorum, or a leader election)"
    } else if failures
        .iter()
        .all(|(_, f)| matches!(f, Failure::Unreachable(_) | Failure::Refused(_)))
    {
        "no etcd member reachable"
    } else {
        "etcd request failed"
    };
    let detail: Vec<String> = failures
        .iter()
        .map(|(ep, f)| {
            let t = match f {
                Failure::NoLeader(t)
                | Failure::Refused(t)
                | Failure::Unreachable(t)
                | Failure::Slow(t)
                | Failure::Other(t) => t,
            };
            format!("{ep}: {t}")
        })
        .collect();
    let outcome = if not_applied {
        "nothing was written"
    } else {
        "whether it was written is unknown; a retry with the same claim id learns it"
    };
    StoreError::Unavailable(format!("{why}; {outcome} ({})", detail.join("; ")))
}

impl EtcdStore {
    /// Connects to the cluster of `cfg` and checks (or, with `init`, creates) the format key.
    pub fn open(cfg: &EtcdConfig, init: bool) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd(format!("starting the etcd client runtime: {e}")))?;
        let timeout = cfg.timeout();
        let mut opts = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_require_leader(true);
        if cfg.ca.is_some() || cfg.cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read_file(ca)?));
            }
            if let (Some(c), Some(k)) = (&cfg.cert, &cfg.key) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read_file(c)?,
                    read_file(k)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        let endpoints = cfg.endpoints.clone();
        // Connections are made lazily, on the first request to each member.
        let clients = rt
            .block_on(async {
                let mut v = Vec::new();
                for e in &endpoints {
                    v.push(Client::connect([e], Some(opts.clone())).await?);
                }
                Ok::<_, etcd_client::Error>(v)
            })
            .map_err(|e| StoreError::Etcd(format!("connecting to {}: {e}", endpoints.join(","))))?;
        let mut s = EtcdStore {
            rt,
            clients,
            current: 0,
            prefix: cfg.prefix.clone(),
            endpoints,
            timeout,
        };
        s.wait_ready(cfg.startup_timeout())?;
        let fkey = s.key("format");
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                fkey.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(if init {
                vec![TxnOp::put(fkey.clone(), FORMAT, None)]
            } else {
                vec![]
            })
            .or_else(vec![TxnOp::get(fkey, None)]);
        let r = s.txn(txn)?;
        if r.succeeded() {
            if init {
                tracing::info!(event = "initialised", store = %s.describe(), "etcd witness state created");
                return Ok(s);
            }
            return Err(StoreError::EtcdNotInitialized(s.describe()));
        }
        if init {
            return Err(StoreError::EtcdAlreadyInitialized(s.describe()));
        }
        let format = first_get(&r)
            .and_then(|g| g.kvs().first().map(|kv| kv.value().to_vec()))
            .unwrap_or_default();
        if format != FORMAT {
            return Err(StoreError::UnsupportedFormat {
                path: s.describe().into(),
                format: String::from_utf8_lossy(&format).into_owned(),
            });
        }
        Ok(s)
    }

    /// Reads the format key until a member answers or `limit` has passed: a witness that
    /// starts beside a cluster still electing a leader, or one member slow to answer, waits
    /// for it instead of exiting. Only a read is retried, so a retry never writes twice.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), StoreError> {
        let fkey = self.key("format");
        let start = std::time::Instant::now();
        let mut attempt = 1u32;
        loop {
            let k = fkey.clone();
            let r = self.call(move |mut kv| {
                let k = k.clone();
                async move { kv.get(k, None).await }
            });
            match r {
                Ok(_) => return Ok(()),
                Err(StoreError::Unavailable(why)) if start.elapsed() < limit => {
                    tracing::warn!(
                        event = "store_not_ready",
                        attempt,
                        waited_ms = start.elapsed().as_millis() as u64,
                        limit_ms = limit.as_millis() as u64,
                        "etcd not answering yet, retrying: {why}"
                    );
                    attempt += 1;
                    std::thread::sleep(STARTUP_RETRY);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn key(&self, what: &str) -> Vec<u8> {
        format!("{}{what}", self.prefix).into_bytes()
    }

    fn pair_key(&self, pair: &str) -> Vec<u8> {
        self.key(&format!("pair/{pair}"))
    }

    /// Runs `op` on the member that answered last and, while members fail, on the next ones
    /// (each within the timeout; no new member is tried once the timeout has passed).
    fn call<T, F, Fut>(&mut self, op: F) -> Result<T, StoreError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.timeout;
        let n = self.clients.len();
        let start = std::time::Instant::now();
        let mut failures = Vec::new();
        for k in 0..n {
            if k > 0 && start.elapsed() >= timeout {
                break;
            }
            let i = (self.current + k) % n;
            let fut = op(self.clients[i].kv_client());
            // The timer must be made inside the runtime.
            let r = self
                .rt
                .block_on(async move { tokio::time::timeout(timeout, fut).await });
            let f = match r {
                Ok(Ok(v)) => {
                    self.current = i;
                    return Ok(v);
                }
                Ok(Err(e)) => classify(e),
                Err(_) => Failure::Slow(format!("no answer within {timeout:?}")),
            };
            tracing::debug!(endpoint = %self.endpoints[i], failure = ?f, "etcd member failed");
            failures.push((self.endpoints[i].clone(), f));
        }
        Err(unavailable(&failures))
    }

    fn txn(&mut self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(move |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
    }

    fn decode_kvs(
        &self,
        kvs: &[etcd_client::KeyValue],
    ) -> Result<BTreeMap<String, Versioned>, StoreError> {
        let pp = self.key("pair/");
        let mut out = BTreeMap::new();
        for kv in kvs {
            let Some(name) = kv.key().strip_prefix(pp.as_slice()) else {
                continue;
            };
            let pair = String::from_utf8_lossy(name).into_owned();
            let state = decode_state(&pair, kv.value())?;
            out.insert(
                pair,
                Versioned {
                    state,
                    version: kv.mod_revision().max(0) as u64,
                },
            );
        }
        Ok(out)
    }
}

fn first_get(r: &etcd_client::TxnResponse) -> Option<etcd_client::GetResponse> {
    r.op_responses().into_iter().find_map(|o| match o {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    })
}

impl StateStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }

    fn shared(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        // etcd refuses transactions of more than 128 operations by default.
        64
    }

    fn load(&mut self) -> Result<BTreeMap<String, Versioned>, StoreError> {
        let pp = self.key("pair/");
        let r = self.call(move |mut kv| {
            let pp = pp.clone();
            async move { kv.get(pp, Some(GetOptions::new().with_prefix())).await }
        })?;
        self.decode_kvs(r.kvs())
    }

    fn commit(
        &mut self,
        expect: &[(String, u64)],
        writes: &[(String, PairState)],
    ) -> Result<Commit, StoreError> {
        if expect.is_empty() && writes.is_empty() {
            return Ok(Commit::Done(BTreeMap::new()));
        }
        let compares: Vec<Compare> = expect
            .iter()
            .map(|(p, v)| {
                Compare::mod_revision(
                    self.pair_key(p),
                    CompareOp::Equal,
                    (*v).min(i64::MAX as u64) as i64,
                )
            })
            .collect();
        let puts: Vec<TxnOp> = writes
            .iter()
            .map(|(p, st)| TxnOp::put(self.pair_key(p), encode_state(st), None))
            .collect();
        let gets: Vec<TxnOp> = expect
            .iter()
            .map(|(p, _)| TxnOp::get(self.pair_key(p), None))
            .collect();
        let r = self.txn(Txn::new().when(compares).and_then(puts).or_else(gets))?;
        if r.succeeded() {
            let rev = r.header().map(|h| h.revision().max(0) as u64).unwrap_or(0);
            return Ok(Commit::Done(
                writes.iter().map(|(p, _)| (p.clone(), rev)).collect(),
            ));
        }
        let mut current: BTreeMap<String, Versioned> = expect
            .iter()
            .map(|(p, _)| (p.clone(), Versioned::default()))
            .collect();
        for o in r.op_responses() {
            if let TxnOpResponse::Get(g) = o {
                current.extend(self.decode_kvs(g.kvs())?);
            }
        }
        Ok(Commit::Conflict(current))
    }

    fn reset_key(&mut self) -> Result<Vec<u8>, StoreError> {
        let k = self.key("reset-key");
        let mut fresh = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh).map_err(
            |_| StoreError::Corrupt {
                pair: String::new(),
                what: "no system randomness for the reset key",
            },
        )?;
        // Create it if absent; either way read back the one the group uses.
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                k.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(k.clone(), fresh.clone(), None)])
            .or_else(vec![TxnOp::get(k, None)]);
        let r = self.txn(txn)?;
        if r.succeeded() {
            return Ok(fresh);
        }
        match first_get(&r).and_then(|g| g.kvs().first().map(|kv| kv.value().to_vec())) {
            Some(v) if v.len() >= 32 => Ok(v),
            _ => Err(StoreError::Corrupt {
                pair: String::new(),
                what: "the stateless-reset key in etcd is shorter than 32 bytes",
            }),
        }
    }
}
