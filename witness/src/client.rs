//! The client library used by `ftvm-node` (and the CLI) to talk to a witness.
//!
//! One QUIC connection is kept and reused; each request is one bidirectional stream. Every
//! attempt has a timeout; transport failures and timeouts are retried on a fresh connection
//! (a claim may safely be retried: the witness answers a retried, already granted claim with
//! the same grant). Definite answers — granted, denied, refused — are never retried.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ftvm_tls::{Identity, TransportOptions, ALPN_WITNESS};

use crate::codec::{ErrorCode, Request, Response, MAX_RESPONSE};
use crate::server::CLOSE_NOT_AUTHORIZED;

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

    /// `claim(pair, <this node>, seen_generation)`: granted with `seen_generation + 1` only if
    /// `seen_generation` is the pair's current generation (or this node already holds
    /// `seen_generation + 1`: a retried claim gets the same grant); denied otherwise.
    pub async fn claim(
        &self,
        pair: &str,
        seen_generation: u64,
    ) -> Result<ClaimOutcome, WitnessError> {
        check_pair(pair)?;
        let r = self
            .request(&Request::Claim {
                pair: pair.to_string(),
                seen: seen_generation,
            })
            .await?;
        match r {
            Response::Granted { generation, holder } => {
                if holder != self.node || generation != seen_generation.wrapping_add(1) {
                    return Err(WitnessError::Protocol(format!(
                        "grant of generation {generation} to {holder:?} answers a claim by {:?} on {seen_generation}",
                        self.node
                    )));
                }
                Ok(ClaimOutcome::Granted { generation })
            }
            Response::Denied { generation, holder } => {
                Ok(ClaimOutcome::Denied { generation, holder })
            }
            other => Err(unexpected(other)),
        }
    }

    /// The pair's current `(generation, holder)`.
    pub async fn status(&self, pair: &str) -> Result<PairStatus, WitnessError> {
        check_pair(pair)?;
        match self
            .request(&Request::Status {
                pair: pair.to_string(),
            })
            .await?
        {
            Response::Status { generation, holder } => Ok(PairStatus { generation, holder }),
            other => Err(unexpected(other)),
        }
    }

    /// A round trip that touches no state (checks reachability and authentication).
    pub async fn ping(&self) -> Result<(), WitnessError> {
        match self.request(&Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
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
            match tokio::time::timeout(self.opts.attempt_timeout, self.attempt(&bytes)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Retry(why))) => last = why,
                Err(_) => last = format!("no answer within {:?}", self.opts.attempt_timeout),
            }
            // Start the next attempt on a fresh connection.
            if let Some(c) = self.conn.lock().await.take() {
                c.close(0u32.into(), b"retrying");
            }
            tracing::debug!(attempt = i + 1, error = %last, "witness request failed");
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
