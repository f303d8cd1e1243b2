//! The client library used by `ftvm-node` (and the CLI) to talk to a witness.
//!
//! One QUIC connection is kept and reused; each request is one bidirectional stream. Every
//! attempt has a timeout; transport failures and timeouts are retried on a fresh connection
//! (a claim may safely be retried with the same claim id: the witness answers a retried,
//! already granted claim with the same grant). Definite answers — granted, denied, refused —
//! are never retried.
//!
//! [`WitnessClient`] talks to one witness; [`WitnessSet`] to several witness processes that
//! serve **one shared store** (an etcd cluster), trying them in turn. Both are `Send + Sync`,
//! every method takes `&self`, and their futures are `Send`: share one in an `Arc` between
//! tasks.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ftvm_tls::{Identity, TransportOptions, ALPN_WITNESS};

use crate::codec::{ErrorCode, Request, Response, MAX_RESPONSE};
use crate::server::CLOSE_NOT_AUTHORIZED;
use crate::state::ClaimId;

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claimant now holds `generation` and may go live with it.
    Granted {
        /// The new generation (fencing token).
        generation: u64,
    },
    /// Someone else holds the pair, or `seen_generation` was stale: the claimant must halt.
    Denied {
        /// The pair's current generation.
        generation: u64,
        /// Its holder.
        holder: Option<String>,
    },
}

/// A pair's state as reported by `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairStatus {
    /// The current generation (0: never claimed).
    pub generation: u64,
    /// Its holder.
    pub holder: Option<String>,
}

/// Errors of the witness client.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// Local certificates or TLS configuration.
    #[error(transparent)]
    Tls(#[from] ftvm_tls::TlsError),
    /// The local socket could not be bound.
    #[error("binding the client socket: {0}")]
    Bind(std::io::Error),
    /// The witness could not be reached in `attempts` attempts; nothing was decided as far as
    /// this client knows.
    #[error("witness {addr} unreachable after {attempts} attempt(s): {last}")]
    Unreachable {
        /// The witness address.
        addr: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// None of the witnesses of a [`WitnessSet`] answered definitively; nothing was decided as
    /// far as this client knows.
    #[error("witness unreachable: none of {witnesses} witness(es) answered in {rounds} round(s): {last}")]
    NoneReachable {
        /// How many witnesses the set has.
        witnesses: usize,
        /// Rounds made over all of them.
        rounds: u32,
        /// The last failure of each witness, `ADDR: why`, separated by `; `.
        last: String,
    },
    /// A witness address could not be understood or resolved.
    #[error("witness address {spec:?}: {why}")]
    BadAddress {
        /// The address as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The witness refused the request (not authorized, unknown pair, malformed, ...).
    #[error("witness refused the request ({}): {text}", code.label())]
    Refused {
        /// The refusal code.
        code: ErrorCode,
        /// The witness's explanation.
        text: String,
    },
    /// The witness answered something this client cannot make sense of.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl WitnessError {
    /// Whether the witness definitely refused (as opposed to not being reachable).
    pub fn is_refusal(&self) -> bool {
        matches!(self, WitnessError::Refused { .. })
    }

    /// Whether no witness could be reached: nothing is known, nothing may be assumed decided
    /// (do not go live; ask again with the same claim id).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            WitnessError::Unreachable { .. } | WitnessError::NoneReachable { .. }
        )
    }
}

/// Client knobs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The witness's certificate identity (the TLS server name).
    pub server_name: String,
    /// Time allowed for one attempt (connecting included).
    pub attempt_timeout: Duration,
    /// Attempts before giving up (at least 1).
    pub attempts: u32,
    /// Delay before the first retry; doubles on each further retry.
    pub retry_delay: Duration,
    /// QUIC transport knobs.
    pub transport: TransportOptions,
}

impl Default for ClientOptions {
    /// Server name `witness`, 2 s per attempt, 3 attempts, 100 ms initial retry delay.
    fn default() -> Self {
        ClientOptions {
            server_name: "witness".into(),
            attempt_timeout: Duration::from_secs(2),
            attempts: 3,
            retry_delay: Duration::from_millis(100),
            transport: TransportOptions::default(),
        }
    }
}

/// A connection to one witness, for one node identity.
pub struct WitnessClient {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    node: String,
    opts: ClientOptions,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

enum Attempt {
    Retry(String),
    Fatal(WitnessError),
}

impl WitnessClient {
    /// A client of the witness at `addr` presenting `identity` (the node). Connects lazily.
    /// Must be called inside a tokio runtime.
    pub fn new(
        addr: SocketAddr,
        identity: &Identity,
        opts: ClientOptions,
    ) -> Result<WitnessClient, WitnessError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let cfg = ftvm_tls::client_config(identity, ALPN_WITNESS, &opts.transport)?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(WitnessError::Bind)?;
        endpoint.set_default_client_config(cfg);
        Ok(WitnessClient {
            endpoint,
            addr,
            node: identity.name.clone(),
            opts,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The node identity this client claims as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The witness's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `claim(pair, <this node>, seen_generation, claim_id)`: granted with
    /// `seen_generation + 1` only if `seen_generation` is the pair's current generation, or if
    /// the witness's record is exactly `(seen_generation + 1, this node, claim_id)` (a retry
    /// of a claim already granted gets the same grant); denied otherwise.
    ///
    /// Use a fresh [`ClaimId::random`] for every new claim and the same one for its retries
    /// (also across processes, if the claim's outcome was not learnt).
    pub async fn claim(
        &self,
        pair: &str,
        seen_generation: u64,
        claim_id: ClaimId,
    ) -> Result<ClaimOutcome, WitnessError> {
        let req = claim_request(pair, seen_generation, claim_id)?;
        claim_reply(&self.node, seen_generation, self.request(&req).await?)
    }

    /// The pair's current `(generation, holder)`.
    pub async fn status(&self, pair: &str) -> Result<PairStatus, WitnessError> {
        status_reply(self.request(&status_request(pair)?).await?)
    }

    /// A round trip that touches no state (checks reachability and authentication).
    pub async fn ping(&self) -> Result<(), WitnessError> {
        pong_reply(self.request(&Request::Ping).await?)
    }

    /// Sends raw bytes as one request and returns the raw reply (for tests and diagnostics).
    pub async fn raw_request(&self, bytes: &[u8]) -> Result<Vec<u8>, WitnessError> {
        let conn = self.connection().await.map_err(|e| match e {
            Attempt::Fatal(e) => e,
            Attempt::Retry(last) => WitnessError::Unreachable {
                addr: self.addr,
                attempts: 1,
                last,
            },
        })?;
        let fut = async {
            let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
            // The witness may stop reading an oversized request early: still read its reply.
            let _ = s.write_all(bytes).await;
            let _ = s.finish();
            r.read_to_end(MAX_RESPONSE).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.opts.attempt_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(last)) => Err(WitnessError::Unreachable {
                addr: self.addr,
                attempts: 1,
                last,
            }),
            Err(_) => Err(WitnessError::Unreachable {
                addr: self.addr,
                attempts: 1,
                last: "timed out".into(),
            }),
        }
    }

    /// Closes the connection (the next request reconnects).
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close(0u32.into(), b"bye");
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, Attempt> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        *g = None;
        let connecting = self
            .endpoint
            .connect(self.addr, &self.opts.server_name)
            .map_err(|e| Attempt::Fatal(WitnessError::Protocol(format!("connect: {e}"))))?;
        let c = connecting.await.map_err(|e| classify(&e))?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn attempt(&self, req: &[u8]) -> Result<Response, Attempt> {
        let conn = self.connection().await?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| classify(&e))?;
        s.write_all(req)
            .await
            .map_err(|e| Attempt::Retry(format!("sending: {e}")))?;
        s.finish()
            .map_err(|e| Attempt::Retry(format!("sending: {e}")))?;
        let buf = r.read_to_end(MAX_RESPONSE).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => classify(&c),
            e => Attempt::Retry(format!("reading reply: {e}")),
        })?;
        let resp = Response::decode(&buf)
            .map_err(|e| Attempt::Fatal(WitnessError::Protocol(format!("bad reply: {e}"))))?;
        match resp {
            Response::Error { code, text } => match code {
                ErrorCode::Unavailable | ErrorCode::Timeout => Err(Attempt::Retry(format!(
                    "witness: {} ({text})",
                    code.label()
                ))),
                _ => Err(Attempt::Fatal(WitnessError::Refused { code, text })),
            },
            r => Ok(r),
        }
    }

    /// One attempt within the attempt timeout; after a failure that may be retried, the
    /// connection is dropped so that the next attempt starts on a fresh one.
    async fn attempt_timed(&self, bytes: &[u8]) -> Result<Response, Attempt> {
        let r = match tokio::time::timeout(self.opts.attempt_timeout, self.attempt(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Retry(format!(
                "no answer within {:?}",
                self.opts.attempt_timeout
            ))),
        };
        if let Err(Attempt::Retry(why)) = &r {
            if let Some(c) = self.conn.lock().await.take() {
                c.close(0u32.into(), b"retrying");
            }
            tracing::debug!(witness = %self.addr, error = %why, "witness request failed");
        }
        r
    }

    async fn request(&self, req: &Request) -> Result<Response, WitnessError> {
        let bytes = req.encode();
        let attempts = self.opts.attempts.max(1);
        let mut delay = self.opts.retry_delay;
        let mut last = String::new();
        for i in 0..attempts {
            if i > 0 {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
            match self.attempt_timed(&bytes).await {
                Ok(r) => return Ok(r),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => last = why,
            }
        }
        Err(WitnessError::Unreachable {
            addr: self.addr,
            attempts,
            last,
        })
    }
}

impl Drop for WitnessClient {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

fn claim_request(pair: &str, seen: u64, claim_id: ClaimId) -> Result<Request, WitnessError> {
    check_pair(pair)?;
    Ok(Request::Claim {
        pair: pair.to_string(),
        seen,
        claim_id,
    })
}

fn claim_reply(node: &str, seen: u64, r: Response) -> Result<ClaimOutcome, WitnessError> {
    match r {
        Response::Granted { generation, holder } => {
            if holder != node || generation != seen.wrapping_add(1) {
                return Err(WitnessError::Protocol(format!(
                    "grant of generation {generation} to {holder:?} answers a claim by {node:?} on {seen}"
                )));
            }
            Ok(ClaimOutcome::Granted { generation })
        }
        Response::Denied { generation, holder } => Ok(ClaimOutcome::Denied { generation, holder }),
        other => Err(unexpected(other)),
    }
}

fn status_request(pair: &str) -> Result<Request, WitnessError> {
    check_pair(pair)?;
    Ok(Request::Status {
        pair: pair.to_string(),
    })
}

fn pong_reply(r: Response) -> Result<(), WitnessError> {
    match r {
        Response::Pong => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn status_reply(r: Response) -> Result<PairStatus, WitnessError> {
    match r {
        Response::Status { generation, holder } => Ok(PairStatus { generation, holder }),
        other => Err(unexpected(other)),
    }
}

fn check_pair(pair: &str) -> Result<(), WitnessError> {
    if crate::codec::valid_name(pair) {
        Ok(())
    } else {
        Err(WitnessError::Refused {
            code: ErrorCode::Malformed,
            text: format!("invalid pair name {pair:?} (not sent)"),
        })
    }
}

fn unexpected(r: Response) -> WitnessError {
    WitnessError::Protocol(format!("unexpected reply {r:?}"))
}

fn classify(e: &quinn::ConnectionError) -> Attempt {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(CLOSE_NOT_AUTHORIZED) =>
        {
            Attempt::Fatal(WitnessError::Refused {
                code: ErrorCode::NotAuthorized,
                text: String::from_utf8_lossy(&c.reason).into_owned(),
            })
        }
        e => Attempt::Retry(e.to_string()),
    }
}

/// One witness of a [`WitnessSet`]: its certificate identity (the TLS server name) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessTarget {
    /// The witness's certificate identity.
    pub server_name: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

impl WitnessTarget {
    /// Splits `[NAME@]HOST:PORT` into the server name (`default_name` without `NAME@`) and
    /// `HOST:PORT`, without resolving anything. `HOST` may be a name, an IPv4 address or a
    /// bracketed IPv6 address (`[::1]:7400`).
    pub fn split(spec: &str, default_name: &str) -> Result<(String, String), WitnessError> {
        let bad = |why: &str| WitnessError::BadAddress {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let (name, hostport) = match spec.split_once('@') {
            Some((n, h)) => (n, h),
            None => (default_name, spec),
        };
        if !crate::codec::valid_name(name) {
            return Err(bad(
                "the witness name (before @) must be 1..=63 characters of [A-Za-z0-9._-]",
            ));
        }
        let port = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !host.ends_with(':') => port,
            _ => {
                return Err(bad(
                    "missing port: expected [NAME@]HOST:PORT, e.g. witness@10.0.0.3:7400",
                ))
            }
        };
        if port.parse::<u16>().is_err() {
            return Err(bad("the port must be a number from 0 to 65535"));
        }
        Ok((name.to_string(), hostport.to_string()))
    }

    /// Parses and resolves `[NAME@]HOST:PORT` (the first address it resolves to).
    pub async fn resolve(spec: &str, default_name: &str) -> Result<WitnessTarget, WitnessError> {
        let (server_name, hostport) = WitnessTarget::split(spec, default_name)?;
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .map_err(|e| WitnessError::BadAddress {
                spec: spec.to_string(),
                why: format!("cannot resolve {hostport}: {e}"),
            })?
            .next()
            .ok_or_else(|| WitnessError::BadAddress {
                spec: spec.to_string(),
                why: format!("{hostport} resolves to no address"),
            })?;
        Ok(WitnessTarget { server_name, addr })
    }
}

/// Several witness processes serving **one shared store** (the same etcd cluster and
/// prefix), tried in turn: a request goes to the witness that answered last, and on a
/// failure that may be retried (unreachable, timed out, store unavailable) to the next one;
/// the first definite answer (granted, denied, status, refused) is returned.
///
/// Each round tries every witness once (one attempt each, [`ClientOptions::attempt_timeout`]);
/// [`ClientOptions::attempts`] rounds are made, with [`ClientOptions::retry_delay`] (doubling)
/// between rounds. A claim is sent with the same claim id to every witness, so a grant made
/// through a witness whose reply was lost is repeated by the next one.
///
/// Never list witnesses with **separate** stores (two rocksdb witnesses): each would grant the
/// same generation on its own, and two nodes could both go live.
pub struct WitnessSet {
    clients: Vec<WitnessClient>,
    preferred: std::sync::atomic::AtomicUsize,
    opts: ClientOptions,
}

impl WitnessSet {
    /// A set of `targets` (at least one), presenting `identity`. `opts.server_name` is ignored:
    /// each target has its own. Connects lazily. Must be called inside a tokio runtime.
    pub fn new(
        targets: &[WitnessTarget],
        identity: &Identity,
        opts: ClientOptions,
    ) -> Result<WitnessSet, WitnessError> {
        if targets.is_empty() {
            return Err(WitnessError::BadAddress {
                spec: String::new(),
                why: "no witness address given".into(),
            });
        }
        let clients = targets
            .iter()
            .map(|t| {
                let o = ClientOptions {
                    server_name: t.server_name.clone(),
                    ..opts.clone()
                };
                WitnessClient::new(t.addr, identity, o)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WitnessSet {
            clients,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            opts,
        })
    }

    /// The node identity this set claims as.
    pub fn node(&self) -> &str {
        self.clients[0].node()
    }

    /// The witnesses' addresses, in the configured order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.clients.iter().map(WitnessClient::addr).collect()
    }

    /// [`WitnessClient::claim`] through the first witness that answers definitively.
    pub async fn claim(
        &self,
        pair: &str,
        seen_generation: u64,
        claim_id: ClaimId,
    ) -> Result<ClaimOutcome, WitnessError> {
        let req = claim_request(pair, seen_generation, claim_id)?;
        claim_reply(self.node(), seen_generation, self.request(&req).await?)
    }

    /// [`WitnessClient::status`] through the first witness that answers definitively.
    pub async fn status(&self, pair: &str) -> Result<PairStatus, WitnessError> {
        status_reply(self.request(&status_request(pair)?).await?)
    }

    /// A ping through the first witness that answers.
    pub async fn ping(&self) -> Result<(), WitnessError> {
        pong_reply(self.request(&Request::Ping).await?)
    }

    async fn request(&self, req: &Request) -> Result<Response, WitnessError> {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = req.encode();
        let n = self.clients.len();
        let rounds = self.opts.attempts.max(1);
        let mut delay = self.opts.retry_delay;
        let mut last: Vec<String> = vec![String::new(); n];
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
            let first = self.preferred.load(Relaxed) % n;
            for k in 0..n {
                let i = (first + k) % n;
                let c = &self.clients[i];
                match c.attempt_timed(&bytes).await {
                    Ok(r) => {
                        self.preferred.store(i, Relaxed);
                        return Ok(r);
                    }
                    Err(Attempt::Fatal(e)) => {
                        self.preferred.store(i, Relaxed);
                        return Err(e);
                    }
                    Err(Attempt::Retry(why)) => {
                        tracing::warn!(witness = %c.addr(), error = %why, "witness did not answer; trying the next");
                        last[i] = format!("{}: {why}", c.addr());
                    }
                }
            }
        }
        Err(WitnessError::NoneReachable {
            witnesses: n,
            rounds,
            last: last.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn clients_are_shareable_between_tasks() {
        assert_send_sync::<WitnessClient>();
        assert_send_sync::<WitnessSet>();
        fn send<F: std::future::Future + Send>(_: F) {}
        // Never polled: this only proves that the futures may move between threads.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            ftvm_tls::init_dir(dir.path(), &["witness", "n"]).unwrap();
            let id = Identity::load(dir.path(), "n").unwrap();
            let t = WitnessTarget {
                server_name: "witness".into(),
                addr: "127.0.0.1:9".parse().unwrap(),
            };
            let s = WitnessSet::new(&[t], &id, ClientOptions::default()).unwrap();
            send(s.claim("p", 0, ClaimId([0; 16])));
            send(s.status("p"));
            let c = WitnessClient::new(
                "127.0.0.1:9".parse().unwrap(),
                &id,
                ClientOptions::default(),
            )
            .unwrap();
            send(c.claim("p", 0, ClaimId([0; 16])));
            assert!(WitnessSet::new(&[], &id, ClientOptions::default()).is_err());
        });
    }

    #[test]
    fn witness_addresses_are_parsed_with_clear_errors() {
        let ok = |s: &str| WitnessTarget::split(s, "witness").unwrap();
        assert_eq!(
            ok("w2@10.0.0.3:7400"),
            ("w2".into(), "10.0.0.3:7400".into())
        );
        assert_eq!(
            ok("host.example:7400"),
            ("witness".into(), "host.example:7400".into())
        );
        assert_eq!(ok("[::1]:7400"), ("witness".into(), "[::1]:7400".into()));
        for (spec, why) in [
            ("localhost", "missing port"),
            ("w@localhost", "missing port"),
            (":7400", "missing port"),
            ("localhost:", "port must be a number"),
            ("localhost:99999", "port must be a number"),
            ("bad/name@h:1", "witness name"),
            ("@h:1", "witness name"),
        ] {
            let e = WitnessTarget::split(spec, "witness")
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{spec}: {e}");
            assert!(e.contains(spec), "{spec}: {e}");
        }
    }
}
