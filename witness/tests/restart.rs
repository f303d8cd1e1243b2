//! kill -9 of the witness between rounds: every decision is preserved, with each store.

mod common;

use common::etcd::{add_etcd_store, EtcdCluster};
use common::*;
use ftvm_witness::{ClaimId, ClaimOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_kill_9_and_restart() {
    decisions_survive(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_kill_9_and_restart_etcd() {
    decisions_survive(true).await;
}

/// A witness configuration for vm1, on rocksdb or on a new etcd cluster (kept alive by the
/// returned handle).
fn setup(dir: &std::path::Path, etcd: bool) -> (std::path::PathBuf, Option<EtcdCluster>) {
    let cfg = certs_init(dir, "vm1", &["node-a", "node-b"]);
    let cluster = etcd.then(|| {
        let c = EtcdCluster::start(dir, 3);
        add_etcd_store(&cfg, &c, "/vm/");
        c
    });
    (cfg, cluster)
}

/// A listen address for a witness that this test restarts on the same port: outside the
/// kernel's ephemeral range (32768–60999), so that no client socket of this busy test process
/// can take the port while the witness is down (seen in CI: "Address already in use").
fn restartable_addr(slot: u16) -> String {
    let base = 21_000 + (std::process::id() % 2_000) as u16 * 4;
    format!("127.0.0.1:{}", base + slot)
}

async fn decisions_survive(etcd: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, cluster) = setup(dir.path(), etcd);
    let mut w = start(&cfg, &restartable_addr(u16::from(etcd)), true);
    let addr = w.addr;
    // The clients outlive every witness process: they reconnect by themselves.
    let a = std::sync::Arc::new(client(dir.path(), "node-a", addr));
    let b = std::sync::Arc::new(client(dir.path(), "node-b", addr));

    let mut history: Vec<(u64, String)> = Vec::new();
    let mut generation = 0;
    for round in 0..10 {
        let (ia, ib) = (ClaimId::random(), ClaimId::random());
        let (ra, rb) = tokio::join!(
            a.claim("vm1", generation, ia),
            b.claim("vm1", generation, ib)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let (winner, winner_id, loser_id) = match (&ra, &rb) {
            (ClaimOutcome::Granted { generation: g }, ClaimOutcome::Denied { .. }) => {
                assert_eq!(*g, generation + 1);
                ("node-a", ia, ib)
            }
            (ClaimOutcome::Denied { .. }, ClaimOutcome::Granted { generation: g }) => {
                assert_eq!(*g, generation + 1);
                ("node-b", ib, ia)
            }
            other => panic!("round {round}: not exactly one grant: {other:?}"),
        };
        generation += 1;
        history.push((generation, winner.to_string()));

        // Crash the witness right after its replies and bring it back on the same port.
        w.kill9();
        assert!(
            try_start(&cfg, &addr.to_string(), true).is_err(),
            "--init must refuse an existing data directory (or etcd prefix)"
        );
        w = start(&cfg, &addr.to_string(), false);
        assert_eq!(w.addr, addr);

        let t0 = std::time::Instant::now();
        let st = a.status("vm1").await.unwrap();
        // The restarted witness resets the old connection (same stateless-reset key), so the
        // client reconnects at once instead of waiting out its 5 s attempt timeout: the only
        // bound that matters is that it did not wait that timeout out (not a speed check).
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the request waited out the attempt timeout ({:?}): no stateless reset",
            t0.elapsed()
        );
        assert_eq!(st.generation, generation, "round {round}: generation lost");
        assert_eq!(
            st.holder.as_deref(),
            Some(winner),
            "round {round}: holder lost"
        );
        // A retried claim (its reply "lost" in the crash) gets the same grant back, and the
        // loser's retry is still denied: the restart changed no decision. The winner's claim
        // id was stored durably: the same node with another claim id (a restarted node
        // process) does not inherit the grant.
        let (wc, lc) = if winner == "node-a" {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert_eq!(
            wc.claim("vm1", generation - 1, winner_id).await.unwrap(),
            ClaimOutcome::Granted { generation }
        );
        assert_eq!(
            lc.claim("vm1", generation - 1, loser_id).await.unwrap(),
            ClaimOutcome::Denied {
                generation,
                holder: Some(winner.to_string())
            }
        );
        assert_eq!(
            wc.claim("vm1", generation - 1, ClaimId::random())
                .await
                .unwrap(),
            ClaimOutcome::Denied {
                generation,
                holder: Some(winner.to_string())
            }
        );
    }
    assert_eq!(history.len(), 10);
    assert_eq!(w.metric("ftvm_witness_pair_generation{pair=\"vm1\"}"), 10);
    w.kill9();
    if cluster.is_some() {
        return;
    }

    // Without --init, a missing data directory is an error, never a fresh start.
    let data = dir.path().join("data");
    std::fs::rename(&data, dir.path().join("moved")).unwrap();
    let e = try_start(&cfg, "127.0.0.1:0", false)
        .err()
        .expect("must not start");
    assert_ne!(e.code, Some(0));
    assert!(e.stderr.contains("does not exist"), "{}", e.stderr);
    assert!(
        !data.exists(),
        "a data directory was created without --init"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_write_and_reply_loses_only_the_reply() {
    crash_between_write_and_reply(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_write_and_reply_loses_only_the_reply_etcd() {
    crash_between_write_and_reply(true).await;
}

async fn crash_between_write_and_reply(etcd: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _cluster) = setup(dir.path(), etcd);
    let env = [(CRASH_AFTER_WRITE_ENV, "1")];
    let mut w = match try_start_bin(
        HOOKS_BIN,
        &cfg,
        &restartable_addr(2 + u16::from(etcd)),
        true,
        &env,
    ) {
        Ok(w) => w,
        Err(e) => panic!("{e:?}"),
    };
    let addr = w.addr;
    let one_try = ftvm_witness::ClientOptions {
        attempts: 1,
        attempt_timeout: std::time::Duration::from_secs(3),
        ..opts()
    };
    let id_a = ftvm_tls::Identity::load(dir.path(), "node-a").unwrap();
    let a1 = ftvm_witness::WitnessClient::new(addr, &id_a, one_try).unwrap();
    // The grant is written, then the witness dies before answering.
    let id = ClaimId::random();
    let e = a1.claim("vm1", 0, id).await.unwrap_err();
    assert!(
        matches!(e, ftvm_witness::WitnessError::Unreachable { .. }),
        "{e}"
    );
    let st = w.child.wait().unwrap();
    assert!(!st.success(), "the witness should have crashed: {st}");
    assert!(w.log_text().contains("test_crash"));

    let w2 = start(&cfg, &addr.to_string(), false);
    let a = client(dir.path(), "node-a", w2.addr);
    let b = client(dir.path(), "node-b", w2.addr);
    // The other node racing for the same generation is denied: the grant survived ...
    assert_eq!(
        b.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Denied {
            generation: 1,
            holder: Some("node-a".into())
        }
    );
    // ... a new claim of the same node (a restarted process: another claim id) is denied ...
    assert_eq!(
        a.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Denied {
            generation: 1,
            holder: Some("node-a".into())
        }
    );
    // ... and the claimant's retry (same claim id) gets exactly that grant.
    assert_eq!(
        a.claim("vm1", 0, id).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );
    assert_eq!(
        w2.metric("ftvm_witness_claims_total{result=\"regranted\"}"),
        1
    );
    assert_eq!(
        w2.metric("ftvm_witness_claims_total{result=\"granted\"}"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_ignores_the_crash_hook() {
    // ftvm-witness itself has no fault hook, whatever the environment says: only the
    // tests' ftvm-witness-test-hooks binary has one.
    let dir = tempfile::tempdir().unwrap();
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    let env = [(CRASH_AFTER_WRITE_ENV, "1")];
    let mut w = match try_start_env(&cfg, "127.0.0.1:0", true, &env) {
        Ok(w) => w,
        Err(e) => panic!("{e:?}"),
    };
    let a = client(dir.path(), "node-a", w.addr);
    for g in 0..3 {
        assert_eq!(
            a.claim("vm1", g, ClaimId::random()).await.unwrap(),
            ClaimOutcome::Granted { generation: g + 1 }
        );
    }
    assert!(w.child.try_wait().unwrap().is_none(), "the witness died");
    assert!(!w.log_text().contains("test_crash"));
    let bin = std::fs::read(BIN).unwrap();
    assert!(
        !bin.windows(CRASH_AFTER_WRITE_ENV.len())
            .any(|x| x == CRASH_AFTER_WRITE_ENV.as_bytes()),
        "{BIN} mentions {CRASH_AFTER_WRITE_ENV}"
    );
}
