//! Prometheus-format metrics and a tiny HTTP/1.0 responder for them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the claim latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The witness's counters. All updates are lock-free except the per-pair generation gauge.
#[derive(Debug, Default)]
pub struct Metrics {
    /// New grants.
    pub grants: AtomicU64,
    /// Retried claims answered with the same grant.
    pub regrants: AtomicU64,
    /// Denied claims.
    pub denials: AtomicU64,
    /// Status queries answered.
    pub status: AtomicU64,
    /// Pings answered.
    pub pings: AtomicU64,
    /// Requests refused because the identity is not a node of the pair.
    pub refused_not_authorized: AtomicU64,
    /// Requests for a pair that is not configured.
    pub refused_unknown_pair: AtomicU64,
    /// Connections closed because the certificate identity is in no pair.
    pub refused_unknown_identity: AtomicU64,
    /// Handshakes that failed (bad or missing certificate, wrong ALPN, ...).
    pub handshake_failures: AtomicU64,
    /// Requests that could not be decoded (any reason).
    pub bad_requests: AtomicU64,
    /// Requests larger than the limit.
    pub oversized_requests: AtomicU64,
    /// Requests not received completely in time.
    pub request_timeouts: AtomicU64,
    /// Claims not decided because the store failed.
    pub store_failures: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Durable writes to the store (one per batch of grants: a synced rocksdb write or a
    /// committed etcd transaction).
    pub synced_writes: AtomicU64,
    /// Decisions the shared store (etcd) refused because another witness had changed the
    /// pair since this witness read it; they are decided again on the fresh state.
    pub store_conflicts: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    generations: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Records the latency of one claim (from request received to reply ready).
    pub fn observe_claim_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Sets the generation gauge of a pair.
    pub fn set_generation(&self, pair: &str, generation: u64) {
        if let Ok(mut g) = self.generations.lock() {
            g.insert(pair.to_string(), generation);
        }
    }

    /// Renders all metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Relaxed));
        };
        let _ = writeln!(
            o,
            "# HELP ftvm_witness_claims_total Claims decided, by result.\n# TYPE ftvm_witness_claims_total counter"
        );
        for (r, v) in [
            ("granted", &self.grants),
            ("regranted", &self.regrants),
            ("denied", &self.denials),
        ] {
            let _ = writeln!(
                o,
                "ftvm_witness_claims_total{{result=\"{r}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP ftvm_witness_refusals_total Requests or connections refused, by reason.\n# TYPE ftvm_witness_refusals_total counter"
        );
        for (r, v) in [
            ("not_authorized", &self.refused_not_authorized),
            ("unknown_pair", &self.refused_unknown_pair),
            ("unknown_identity", &self.refused_unknown_identity),
            ("handshake", &self.handshake_failures),
            ("bad_request", &self.bad_requests),
            ("oversized", &self.oversized_requests),
            ("timeout", &self.request_timeouts),
        ] {
            let _ = writeln!(
                o,
                "ftvm_witness_refusals_total{{reason=\"{r}\"}} {}",
                v.load(Relaxed)
            );
        }
        c(
            &mut o,
            "ftvm_witness_status_total",
            "Status queries answered.",
            &self.status,
        );
        c(
            &mut o,
            "ftvm_witness_pings_total",
            "Pings answered.",
            &self.pings,
        );
        c(
            &mut o,
            "ftvm_witness_store_failures_total",
            "Claims left undecided because the store failed.",
            &self.store_failures,
        );
        c(
            &mut o,
            "ftvm_witness_synced_writes_total",
            "Durable store writes (one per batch of grants).",
            &self.synced_writes,
        );
        c(
            &mut o,
            "ftvm_witness_store_conflicts_total",
            "Batches decided again because another witness changed a pair in the shared store.",
            &self.store_conflicts,
        );
        c(
            &mut o,
            "ftvm_witness_connections_total",
            "QUIC connections accepted.",
            &self.connections,
        );
        let _ = writeln!(
            o,
            "# HELP ftvm_witness_claim_latency_seconds Time from claim received to reply ready.\n# TYPE ftvm_witness_claim_latency_seconds histogram"
        );
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "ftvm_witness_claim_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let n = self.latency_count.load(Relaxed);
        let _ = writeln!(
            o,
            "ftvm_witness_claim_latency_seconds_bucket{{le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            o,
            "ftvm_witness_claim_latency_seconds_sum {}",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(o, "ftvm_witness_claim_latency_seconds_count {n}");
        let _ = writeln!(
            o,
            "# HELP ftvm_witness_pair_generation Current generation of each pair.\n# TYPE ftvm_witness_pair_generation gauge"
        );
        if let Ok(g) = self.generations.lock() {
            for (p, v) in g.iter() {
                let _ = writeln!(o, "ftvm_witness_pair_generation{{pair=\"{p}\"}} {v}");
            }
        }
        o
    }
}

/// Serves `GET /metrics` over HTTP/1.0 on an already bound listener until the task is
/// dropped. Any other path gets 404; a client that sends nothing for 2 s is dropped.
pub async fn serve_http(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n")
                    && !buf.windows(2).any(|w| w == b"\n\n")
                    && buf.len() < 8192
                {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next(), parts.next());
            let (status, body) = match (method, path) {
                (Some("GET"), Some("/metrics")) | (Some("GET"), Some("/")) => {
                    ("200 OK", metrics.render())
                }
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// The address a metrics listener is bound to, for printing.
pub fn describe(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}
