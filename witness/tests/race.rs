//! Many nodes racing on the same generation: exactly one grant per round, with each store.

mod common;

use common::etcd::{add_etcd_store, EtcdCluster};
use common::*;
use ftvm_witness::{ClaimId, ClaimOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_get_exactly_one_grant_per_round() {
    racing_clients(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_get_exactly_one_grant_per_round_etcd() {
    racing_clients(true).await;
}

async fn racing_clients(etcd: bool) {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..32).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cfg = certs_init(dir.path(), "race", &refs);
    let _cluster = etcd.then(|| {
        let c = EtcdCluster::start(dir.path(), 3);
        add_etcd_store(&cfg, &c, "/race/");
        c
    });
    let w = start(&cfg, "127.0.0.1:0", true);

    let clients: Vec<_> = names
        .iter()
        .map(|n| std::sync::Arc::new(client(dir.path(), n, w.addr)))
        .collect();
    // Connect everyone first so that the rounds race on the claims, not on handshakes.
    for c in &clients {
        c.ping().await.unwrap();
    }

    let sizes = [
        2usize, 32, 3, 17, 5, 8, 2, 32, 11, 4, 29, 2, 16, 7, 32, 3, 2, 24, 9, 32,
    ];
    let mut generation = 0u64;
    for (round, &k) in sizes.iter().enumerate() {
        // A different subset of racers each round.
        let racers: Vec<_> = (0..k)
            .map(|i| clients[(i * 7 + round * 5) % 32].clone())
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for c in racers {
            let seen = generation;
            let id = ClaimId::random();
            set.spawn(async move { (c.node().to_string(), id, c.claim("race", seen, id).await) });
        }
        let mut winners = Vec::new();
        let mut denied = Vec::new();
        while let Some(r) = set.join_next().await {
            let (node, id, out) = r.unwrap();
            match out.unwrap() {
                ClaimOutcome::Granted { generation: g } => winners.push((node, g, id)),
                ClaimOutcome::Denied {
                    generation: g,
                    holder,
                } => denied.push((node, g, holder)),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: grants {winners:?}");
        let (winner, g, winner_id) = winners.pop().unwrap();
        assert_eq!(g, generation + 1, "round {round}");
        assert_eq!(denied.len(), k - 1);
        for (node, dg, holder) in &denied {
            assert_ne!(node, &winner);
            assert_eq!(*dg, g, "round {round}: {node} denied with a stale state");
            assert_eq!(holder.as_deref(), Some(winner.as_str()));
        }
        // The pair's state is exactly the grant, the winner's retry (same claim id) gets the
        // same grant, and a new claim of the winner (another claim id) is denied.
        let st = clients[0].status("race").await.unwrap();
        assert_eq!(
            (st.generation, st.holder.as_deref()),
            (g, Some(winner.as_str()))
        );
        let wc = clients.iter().find(|c| c.node() == winner).unwrap();
        assert_eq!(
            wc.claim("race", generation, winner_id).await.unwrap(),
            ClaimOutcome::Granted { generation: g }
        );
        assert_eq!(
            wc.claim("race", generation, ClaimId::random())
                .await
                .unwrap(),
            ClaimOutcome::Denied {
                generation: g,
                holder: Some(winner.clone())
            }
        );
        generation = g;
    }

    let rounds = sizes.len() as u64;
    let racers: u64 = sizes.iter().map(|&k| k as u64).sum();
    assert_eq!(
        w.metric("ftvm_witness_claims_total{result=\"granted\"}"),
        rounds
    );
    assert_eq!(
        w.metric("ftvm_witness_claims_total{result=\"regranted\"}"),
        rounds
    );
    assert_eq!(
        w.metric("ftvm_witness_claims_total{result=\"denied\"}"),
        racers - rounds + rounds
    );
    assert_eq!(
        w.metric("ftvm_witness_pair_generation{pair=\"race\"}"),
        rounds
    );
    // The exporter (metrics-exporter-prometheus) answers every path but /health with the
    // metrics, and /health with OK.
    assert_eq!(w.http_status("/health"), "HTTP/1.0 200 OK");
    assert!(w
        .metrics_text()
        .contains("# TYPE ftvm_witness_claim_latency_seconds histogram"));
    // One structured log line per decision.
    let log = w.log_text();
    assert_eq!(log.matches("decision=\"granted\"").count() as u64, rounds);
    assert_eq!(log.matches("decision=\"denied\"").count() as u64, racers);
}
