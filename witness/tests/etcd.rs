//! The etcd store against a real 3-member etcd cluster on loopback: witness processes sharing
//! it, a member killed, quorum lost and regained.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::{add_etcd_store, EtcdCluster};
use common::*;
use ftvm_witness::{ClaimId, ClaimOutcome, WitnessClient, WitnessSet, WitnessTarget};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_witnesses_on_one_cluster_grant_each_generation_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(dir.path(), 3);
    let names: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cfg = certs_init(dir.path(), "race", &refs);
    add_etcd_store(&cfg, &cluster, "/race/");

    // Without --init an empty prefix is refused; with it, the first witness creates it; a
    // second --init is refused; the second witness joins without it.
    let e = try_start(&cfg, "127.0.0.1:0", false)
        .err()
        .expect("must not start");
    assert!(
        e.stderr.contains("holds no ftvm-witness state"),
        "{}",
        e.stderr
    );
    let wa = start(&cfg, "127.0.0.1:0", true);
    let e = try_start(&cfg, "127.0.0.1:0", true)
        .err()
        .expect("a second --init must fail");
    assert!(e.stderr.contains("already holds"), "{}", e.stderr);
    let wb = start(&cfg, "127.0.0.1:0", false);

    // Half the nodes talk to witness A, half to witness B.
    let clients: Vec<Arc<WitnessClient>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = if i % 2 == 0 { wa.addr } else { wb.addr };
            Arc::new(client(dir.path(), n, addr))
        })
        .collect();
    for c in &clients {
        c.ping().await.unwrap();
    }
    let mut generation = 0u64;
    let rounds = 12;
    for round in 0..rounds {
        let mut set = tokio::task::JoinSet::new();
        for (i, c) in clients.iter().enumerate() {
            // A different subset each round, always through both witnesses.
            if (i + round) % 3 == 0 && i % 2 == 1 {
                continue;
            }
            let c = c.clone();
            let id = ClaimId::random();
            let seen = generation;
            set.spawn(async move { (c.clone(), id, c.claim("race", seen, id).await) });
        }
        let mut winners = Vec::new();
        let mut denied = 0;
        while let Some(r) = set.join_next().await {
            let (c, id, out) = r.unwrap();
            match out.unwrap() {
                ClaimOutcome::Granted { generation: g } => winners.push((c, id, g)),
                ClaimOutcome::Denied {
                    generation: g,
                    holder,
                } => {
                    assert_eq!(
                        g,
                        generation + 1,
                        "round {round}: denied with a stale state"
                    );
                    assert!(holder.is_some());
                    denied += 1;
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {} grants", winners.len());
        assert!(denied > 0);
        let (wc, wid, g) = winners.pop().unwrap();
        assert_eq!(g, generation + 1);
        // Both witnesses report the same state, and the winner's retry through the other
        // witness (same claim id) gets the same grant: the claim id is in etcd.
        for c in [&clients[0], &clients[1]] {
            let st = c.status("race").await.unwrap();
            assert_eq!((st.generation, st.holder.as_deref()), (g, Some(wc.node())));
        }
        let other = if wc.addr() == wa.addr {
            wb.addr
        } else {
            wa.addr
        };
        let retry = client(dir.path(), wc.node(), other);
        assert_eq!(
            retry.claim("race", generation, wid).await.unwrap(),
            ClaimOutcome::Granted { generation: g }
        );
        assert_eq!(
            retry
                .claim("race", generation, ClaimId::random())
                .await
                .unwrap(),
            ClaimOutcome::Denied {
                generation: g,
                holder: Some(wc.node().to_string())
            }
        );
        generation = g;
    }
    let granted = wa.metric("ftvm_witness_claims_total{result=\"granted\"}")
        + wb.metric("ftvm_witness_claims_total{result=\"granted\"}");
    assert_eq!(
        granted, rounds as u64,
        "one new grant per round, over both witnesses"
    );

    // A node configured with both witnesses keeps claiming while one of them is down.
    let id = ftvm_tls::Identity::load(dir.path(), "n0").unwrap();
    let targets = [
        WitnessTarget {
            server_name: "witness".into(),
            addr: wa.addr,
        },
        WitnessTarget {
            server_name: "witness".into(),
            addr: wb.addr,
        },
    ];
    let quick = ftvm_witness::ClientOptions {
        attempt_timeout: Duration::from_secs(2),
        ..opts()
    };
    let ws = WitnessSet::new(&targets, &id, quick).unwrap();
    assert_eq!(ws.status("race").await.unwrap().generation, generation);
    wa.kill9();
    let cid = ClaimId::random();
    assert_eq!(
        ws.claim("race", generation, cid).await.unwrap(),
        ClaimOutcome::Granted {
            generation: generation + 1
        }
    );
    assert_eq!(
        ws.claim("race", generation, cid).await.unwrap(),
        ClaimOutcome::Granted {
            generation: generation + 1
        }
    );
    assert_eq!(
        wb.metric("ftvm_witness_pair_generation{pair=\"race\"}"),
        generation + 1
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_loss_quorum_loss_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(dir.path(), 3);
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    add_etcd_store(&cfg, &cluster, "/q/");
    let w = start(&cfg, "127.0.0.1:0", true);
    let a = client(dir.path(), "node-a", w.addr);
    let b = client(dir.path(), "node-b", w.addr);
    assert_eq!(
        a.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );

    // One member killed: a majority remains, claims are still granted, once the two have
    // elected a leader if the dead one was it (on a loaded machine that outlasts the client's
    // retries: wait for it, bounded).
    cluster.kill(0);
    let st = status_once_quorate(&b).await;
    assert_eq!((st.generation, st.holder.as_deref()), (1, Some("node-a")));
    let ib = ClaimId::random();
    assert_eq!(
        b.claim("vm1", 1, ib).await.unwrap(),
        ClaimOutcome::Granted { generation: 2 }
    );
    assert_eq!(
        a.claim("vm1", 1, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Denied {
            generation: 2,
            holder: Some("node-b".into())
        }
    );

    // Two of three killed: no quorum. Once the last member knows it (a claim sent in the
    // moment before may still be committed later: its outcome is unknown, and the witness
    // says so), a claim fails with an error that says "no quorum", and nothing is granted.
    cluster.kill(1);
    cluster.wait_unhealthy(2);
    let few = ftvm_witness::ClientOptions {
        attempts: 3,
        attempt_timeout: Duration::from_secs(3),
        retry_delay: Duration::from_millis(200),
        ..opts()
    };
    let id_a = ftvm_tls::Identity::load(dir.path(), "node-a").unwrap();
    let a_few = WitnessClient::new(w.addr, &id_a, few).unwrap();
    let ia = ClaimId::random();
    let e = a_few.claim("vm1", 2, ia).await.unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(e.to_string().contains("no quorum"), "{e}");
    assert!(e.to_string().contains("nothing was written"), "{e}");
    let e = a_few.status("vm1").await.unwrap_err();
    assert!(e.to_string().contains("no quorum"), "{e}");
    assert!(w.metric("ftvm_witness_store_failures_total") >= 3);

    // Both back: the state is intact (generation 2, node-b), the failed claim was never
    // granted, and its retry (same claim id) is now a normal, first grant.
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_member(0);
    cluster.wait_member(1);
    // A member that reports itself healthy may still be slow to serve for a moment after its
    // restart (CI, a loaded machine): wait (bounded) until the witness reaches a quorum again.
    let st = status_once_quorate(&a).await;
    assert_eq!((st.generation, st.holder.as_deref()), (2, Some("node-b")));
    assert_eq!(
        a.claim("vm1", 2, ia).await.unwrap(),
        ClaimOutcome::Granted { generation: 3 }
    );
    assert_eq!(w.metric("ftvm_witness_claims_total{result=\"granted\"}"), 3);
    // The witness process itself restarted: same state from etcd.
    let addr = w.addr;
    w.kill9();
    let w = start(&cfg, &addr.to_string(), false);
    assert_eq!(
        b.claim("vm1", 1, ib).await.unwrap(),
        ClaimOutcome::Denied {
            generation: 3,
            holder: Some("node-a".into())
        }
    );
    assert_eq!(
        a.claim("vm1", 2, ia).await.unwrap(),
        ClaimOutcome::Granted { generation: 3 }
    );
    assert_eq!(
        w.metric("ftvm_witness_claims_total{result=\"regranted\"}"),
        1
    );
}

/// `client`'s status of `vm1`, retried (for at most 30 s) while the witness cannot reach an
/// etcd quorum: the synchronisation point after members die or come back.
async fn status_once_quorate(client: &WitnessClient) -> ftvm_witness::client::PairStatus {
    let back = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.status("vm1").await {
            Ok(st) => break st,
            Err(e) if std::time::Instant::now() < back && e.is_unreachable() => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("the witness did not reach an etcd quorum: {e}"),
        }
    }
}

/// A witness started while its etcd cluster has no quorum waits for it (logging
/// `store_not_ready`) and serves once the members are back, instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_started_without_quorum_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(dir.path(), 3);
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    add_etcd_store(&cfg, &cluster, "/wait/");
    // The [store] section is the file's last: room for the restarts on a loaded machine.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("startup_timeout_ms = 90000\n");
    std::fs::write(&cfg, text).unwrap();
    start(&cfg, "127.0.0.1:0", true).kill9();

    cluster.kill(0);
    cluster.kill(1);
    cluster.wait_unhealthy(2);
    let logs_before: Vec<_> = witness_logs(dir.path());
    let c = cfg.clone();
    let starting = std::thread::spawn(move || try_start(&c, "127.0.0.1:0", false));
    // Wait until the new witness has said it is waiting for etcd.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = witness_logs(dir.path())
            .into_iter()
            .filter(|p| !logs_before.contains(p))
            .any(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains("store_not_ready")
            });
        if waiting {
            break;
        }
        assert!(!starting.is_finished(), "the witness stopped waiting");
        assert!(
            std::time::Instant::now() < deadline,
            "the witness never logged store_not_ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!starting.is_finished(), "ready without quorum");
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_member(0);
    cluster.wait_member(1);
    let w = starting
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("witness did not start once etcd was back: {e:?}"));
    let a = client(dir.path(), "node-a", w.addr);
    assert_eq!(
        a.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );
}

/// The witness log files in `dir`.
fn witness_logs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("witness-") && n.ends_with(".log"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = certs_init(d, "vm1", &["node-a"]);
    // etcd's server certificate (named localhost, as the endpoints) and the witness's etcd
    // client certificate, from the deployment's CA.
    ftvm_tls::issue(d, &["localhost", "etcd-client"], false).unwrap();
    let tls = common::etcd::EtcdTls {
        ca: d.join("ca.pem"),
        cert: d.join("localhost.pem"),
        key: d.join("localhost.key"),
    };
    let cluster = EtcdCluster::start_with(d, 1, Some(tls));
    let base = std::fs::read_to_string(&cfg).unwrap();
    let store = |client_cert: bool| {
        let mut t = format!(
            "{base}\n[store]\nkind = \"etcd\"\nendpoints = {}\nprefix = \"/tls/\"\ntimeout_ms = 3000\nca = \"ca.pem\"\n",
            cluster.endpoints_toml()
        );
        if client_cert {
            t.push_str("cert = \"etcd-client.pem\"\nkey = \"etcd-client.key\"\n");
        }
        std::fs::write(&cfg, t).unwrap();
    };

    // Without a client certificate etcd refuses the witness, which says so and stops.
    store(false);
    let e = try_start(&cfg, "127.0.0.1:0", true)
        .err()
        .expect("etcd must refuse a client without certificate");
    assert!(e.stderr.contains("etcd"), "{}", e.stderr);
    assert!(e.stderr.contains("store unavailable"), "{}", e.stderr);

    // With it: a working witness over TLS.
    store(true);
    let w = start(&cfg, "127.0.0.1:0", true);
    let a = client(d, "node-a", w.addr);
    assert_eq!(
        a.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );
    assert_eq!(a.status("vm1").await.unwrap().generation, 1);
}
