//! The witness's Prometheus metrics, kept with the `metrics` crate and served by
//! `metrics-exporter-prometheus` (the exporter `ftvm-node` uses too).
//!
//! Every [`Metrics`] has a recorder of its own instead of the process-wide one, so that
//! several witnesses in one process (tests, benchmarks) keep their counts apart and a
//! process that also runs a node keeps the node's recorder. The counters are handles
//! registered once: updating one is an atomic add, as before.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{Counter, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    BuildError, ExporterFuture, Matcher, PrometheusBuilder, PrometheusRecorder,
};

/// Upper bounds (seconds) of the claim latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

const CLAIMS: &str = "ftvm_witness_claims_total";
const REFUSALS: &str = "ftvm_witness_refusals_total";
const LATENCY: &str = "ftvm_witness_claim_latency_seconds";
const GENERATION: &str = "ftvm_witness_pair_generation";

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The witness's counters.
pub struct Metrics {
    /// New grants.
    pub grants: Counter,
    /// Retried claims answered with the same grant.
    pub regrants: Counter,
    /// Denied claims.
    pub denials: Counter,
    /// Status queries answered.
    pub status: Counter,
    /// Pings answered.
    pub pings: Counter,
    /// Requests refused because the identity is not a node of the pair.
    pub refused_not_authorized: Counter,
    /// Requests for a pair that is not configured.
    pub refused_unknown_pair: Counter,
    /// Connections closed because the certificate identity is in no pair.
    pub refused_unknown_identity: Counter,
    /// Handshakes that failed (bad or missing certificate, wrong ALPN, ...).
    pub handshake_failures: Counter,
    /// Requests that could not be decoded (any reason).
    pub bad_requests: Counter,
    /// Requests larger than the limit.
    pub oversized_requests: Counter,
    /// Requests not received completely in time.
    pub request_timeouts: Counter,
    /// Claims not decided because the store failed.
    pub store_failures: Counter,
    /// Connections accepted.
    pub connections: Counter,
    /// Durable writes to the store (one per batch of grants: a synced rocksdb write or a
    /// committed etcd transaction).
    pub synced_writes: Counter,
    /// Decisions the shared store (etcd) refused because another witness had changed the
    /// pair since this witness read it; they are decided again on the fresh state.
    pub store_conflicts: Counter,
    claim_latency: Histogram,
    recorder: PrometheusRecorder,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LATENCY.into()), &LATENCY_BUCKETS)
        .expect("the latency buckets are not empty")
}

impl Default for Metrics {
    /// Metrics that are kept but not served (render them with [`Metrics::render`]).
    fn default() -> Self {
        Metrics::with_recorder(builder().build_recorder())
    }
}

impl Metrics {
    fn with_recorder(recorder: PrometheusRecorder) -> Metrics {
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        };
        describe(CLAIMS, "Claims decided, by result.");
        describe(REFUSALS, "Requests or connections refused, by reason.");
        describe("ftvm_witness_status_total", "Status queries answered.");
        describe("ftvm_witness_pings_total", "Pings answered.");
        describe(
            "ftvm_witness_store_failures_total",
            "Claims left undecided because the store failed.",
        );
        describe(
            "ftvm_witness_synced_writes_total",
            "Durable store writes (one per batch of grants).",
        );
        describe(
            "ftvm_witness_store_conflicts_total",
            "Batches decided again because another witness changed a pair in the shared store.",
        );
        describe(
            "ftvm_witness_connections_total",
            "QUIC connections accepted.",
        );
        recorder.describe_histogram(
            KeyName::from_const_str(LATENCY),
            None,
            SharedString::const_str("Time from claim received to reply ready."),
        );
        recorder.describe_gauge(
            KeyName::from_const_str(GENERATION),
            None,
            SharedString::const_str("Current generation of each pair."),
        );
        let plain =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &META);
        let labelled = |name: &'static str, label: &'static str, value: &'static str| {
            recorder.register_counter(
                &Key::from_parts(name, vec![Label::from_static_parts(label, value)]),
                &META,
            )
        };
        let claims = |r| labelled(CLAIMS, "result", r);
        let refusals = |r| labelled(REFUSALS, "reason", r);
        Metrics {
            grants: claims("granted"),
            regrants: claims("regranted"),
            denials: claims("denied"),
            status: plain("ftvm_witness_status_total"),
            pings: plain("ftvm_witness_pings_total"),
            refused_not_authorized: refusals("not_authorized"),
            refused_unknown_pair: refusals("unknown_pair"),
            refused_unknown_identity: refusals("unknown_identity"),
            handshake_failures: refusals("handshake"),
            bad_requests: refusals("bad_request"),
            oversized_requests: refusals("oversized"),
            request_timeouts: refusals("timeout"),
            store_failures: plain("ftvm_witness_store_failures_total"),
            connections: plain("ftvm_witness_connections_total"),
            synced_writes: plain("ftvm_witness_synced_writes_total"),
            store_conflicts: plain("ftvm_witness_store_conflicts_total"),
            claim_latency: recorder.register_histogram(&Key::from_static_name(LATENCY), &META),
            recorder,
        }
    }

    /// Metrics served over HTTP at `addr` (`GET` of any path but `/health`, which answers
    /// `OK`). Returns them, the bound address (port 0 picks a free port) and the listener,
    /// which serves while it is polled. Must run inside a tokio runtime.
    pub fn serve(addr: SocketAddr) -> std::io::Result<(Metrics, SocketAddr, ExporterFuture)> {
        // The exporter binds the address itself and does not tell the port it got: for port
        // 0, find a free one first (and try another if it was taken in between).
        for _ in 0..16 {
            let bound = if addr.port() == 0 {
                std::net::TcpListener::bind(addr)?.local_addr()?
            } else {
                addr
            };
            match builder().with_http_listener(bound).build() {
                Ok((recorder, listener)) => {
                    return Ok((Metrics::with_recorder(recorder), bound, listener))
                }
                Err(BuildError::FailedToCreateHTTPListener(_)) if addr.port() == 0 => continue,
                Err(BuildError::FailedToCreateHTTPListener(e)) => {
                    return Err(std::io::Error::other(e))
                }
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port for the metrics listener",
        ))
    }

    /// Records the latency of one claim (from request received to reply ready).
    pub fn observe_claim_latency(&self, d: Duration) {
        self.claim_latency.record(d.as_secs_f64());
    }

    /// Sets the generation gauge of a pair.
    pub fn set_generation(&self, pair: &str, generation: u64) {
        let key = Key::from_parts(GENERATION, vec![Label::new("pair", pair.to_string())]);
        self.recorder
            .register_gauge(&key, &META)
            .set(generation as f64);
    }

    /// Moves the latency samples recorded so far into the histogram (rendering does it
    /// too); a served [`Metrics`] does it every few seconds by itself, others need it called
    /// now and then so that the samples do not pile up.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// Renders all metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}

/// The address a metrics listener is bound to, for printing.
pub fn describe(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .map(str::to_string)
    }

    #[test]
    fn names_values_and_help_are_kept() {
        let m = Metrics::default();
        m.grants.increment(2);
        m.denials.increment(1);
        m.oversized_requests.increment(3);
        m.synced_writes.increment(1);
        m.set_generation("vm1", 10);
        m.set_generation("vm1", 11);
        m.observe_claim_latency(Duration::from_micros(300));
        m.observe_claim_latency(Duration::from_secs(2));
        let t = m.render();
        let s = |n: &str| sample(&t, n).unwrap_or_else(|| panic!("{n} missing in\n{t}"));
        assert_eq!(s("ftvm_witness_claims_total{result=\"granted\"}"), "2");
        assert_eq!(s("ftvm_witness_claims_total{result=\"regranted\"}"), "0");
        assert_eq!(s("ftvm_witness_claims_total{result=\"denied\"}"), "1");
        assert_eq!(s("ftvm_witness_refusals_total{reason=\"oversized\"}"), "3");
        assert_eq!(s("ftvm_witness_refusals_total{reason=\"handshake\"}"), "0");
        assert_eq!(s("ftvm_witness_synced_writes_total"), "1");
        assert_eq!(s("ftvm_witness_store_conflicts_total"), "0");
        assert_eq!(s("ftvm_witness_pair_generation{pair=\"vm1\"}"), "11");
        assert_eq!(
            s("ftvm_witness_claim_latency_seconds_bucket{le=\"0.00025\"}"),
            "0"
        );
        assert_eq!(
            s("ftvm_witness_claim_latency_seconds_bucket{le=\"0.0005\"}"),
            "1"
        );
        assert_eq!(
            s("ftvm_witness_claim_latency_seconds_bucket{le=\"1\"}"),
            "1"
        );
        assert_eq!(
            s("ftvm_witness_claim_latency_seconds_bucket{le=\"+Inf\"}"),
            "2"
        );
        assert_eq!(s("ftvm_witness_claim_latency_seconds_count"), "2");
        assert!(
            t.contains("# TYPE ftvm_witness_claim_latency_seconds histogram"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE ftvm_witness_claims_total counter"),
            "{t}"
        );
        assert!(t.contains("# HELP ftvm_witness_claims_total Claims decided, by result."));
    }

    #[test]
    fn each_witness_counts_on_its_own() {
        let a = Metrics::default();
        let b = Metrics::default();
        a.pings.increment(1);
        assert_eq!(
            sample(&a.render(), "ftvm_witness_pings_total").unwrap(),
            "1"
        );
        assert_eq!(
            sample(&b.render(), "ftvm_witness_pings_total").unwrap(),
            "0"
        );
    }

    #[tokio::test]
    async fn served_over_http_on_a_free_port() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (m, addr, listener) = Metrics::serve("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(addr.port(), 0);
        let task = tokio::spawn(listener);
        m.grants.increment(5);
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let page = get("/metrics").await;
        assert!(page.starts_with("HTTP/1.0 200 OK"), "{page}");
        assert!(
            page.contains("ftvm_witness_claims_total{result=\"granted\"} 5"),
            "{page}"
        );
        assert!(get("/health").await.ends_with("OK"));
        // The same address again is refused, not silently moved.
        assert!(Metrics::serve(addr).is_err());
        task.abort();
    }
}
