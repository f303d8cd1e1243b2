//! Identity checks: foreign CA, identity outside the pair, no certificate at all.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::*;
use ftvm_witness::codec::ErrorCode;
use ftvm_witness::{ClaimId, ClaimOutcome, WitnessClient, WitnessError};

fn add_pair(cfg: &std::path::Path, pair: &str, nodes: &[&str]) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    let list: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    text.push_str(&format!(
        "\n[pairs.{pair}]\nnodes = [{}]\n",
        list.join(", ")
    ));
    std::fs::write(cfg, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_identities_do_not_disturb_legitimate_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    // A second pair and an identity of the same CA that belongs to no pair.
    let out = cli(&[
        "certs",
        "issue",
        "--dir",
        dir.path().to_str().unwrap(),
        "--names",
        "node-c,node-d,intruder",
    ]);
    assert!(out.status.success(), "{out:?}");
    add_pair(&cfg, "vm2", &["node-c", "node-d"]);
    let w = start(&cfg, "127.0.0.1:0", true);
    let a = client(dir.path(), "node-a", w.addr);
    a.ping().await.unwrap();

    // 1. A node of another pair claiming for vm1: refused, vm1 untouched.
    let c = client(dir.path(), "node-c", w.addr);
    let e = c.claim("vm1", 0, ClaimId::random()).await.unwrap_err();
    assert!(
        matches!(
            e,
            WitnessError::Refused {
                code: ErrorCode::NotAuthorized,
                ..
            }
        ),
        "{e}"
    );
    let e = c.status("vm1").await.unwrap_err();
    assert!(
        matches!(
            e,
            WitnessError::Refused {
                code: ErrorCode::NotAuthorized,
                ..
            }
        ),
        "{e}"
    );
    // ... while it may claim for its own pair.
    assert_eq!(
        c.claim("vm2", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );

    // 2. A certificate of the right CA whose identity is in no pair: connection refused.
    let i = client(dir.path(), "intruder", w.addr);
    let e = i.claim("vm1", 0, ClaimId::random()).await.unwrap_err();
    assert!(
        matches!(
            e,
            WitnessError::Refused {
                code: ErrorCode::NotAuthorized,
                ..
            }
        ),
        "{e}"
    );

    // 3. A certificate named node-a but signed by another CA (the client trusts the real CA
    //    so that the handshake gets as far as the server's check of the client).
    let evil = tempfile::tempdir().unwrap();
    ftvm_tls::init_dir(evil.path(), &["node-a"]).unwrap();
    let mut forged = ftvm_tls::Identity::load(evil.path(), "node-a").unwrap();
    forged.ca = ftvm_tls::Identity::load(dir.path(), "node-a").unwrap().ca;
    let fc = WitnessClient::new(w.addr, &forged, opts_quick()).unwrap();
    let e = fc.claim("vm1", 0, ClaimId::random()).await.unwrap_err();
    assert!(matches!(e, WitnessError::Unreachable { .. }), "{e}");

    // 4. No client certificate at all.
    let e = no_cert_request(dir.path(), w.addr).await;
    assert!(
        e.is_err(),
        "a client without certificate got an answer: {e:?}"
    );

    // Nothing of the above changed vm1, and node-a still gets its grant.
    assert_eq!(a.status("vm1").await.unwrap().generation, 0);
    assert_eq!(
        a.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Granted { generation: 1 }
    );

    assert_eq!(
        w.metric("ftvm_witness_refusals_total{reason=\"not_authorized\"}"),
        2
    );
    assert_eq!(
        w.metric("ftvm_witness_refusals_total{reason=\"unknown_identity\"}"),
        1
    );
    assert!(w.metric("ftvm_witness_refusals_total{reason=\"handshake\"}") >= 2);
    assert_eq!(w.metric("ftvm_witness_claims_total{result=\"granted\"}"), 2);
    let log = w.log_text();
    assert!(
        log.contains("reason=\"unknown_identity\" node=intruder"),
        "{log}"
    );
    assert!(
        log.contains("reason=\"not_authorized\" pair=\"vm1\" node=\"node-c\""),
        "{log}"
    );
}

fn opts_quick() -> ftvm_witness::ClientOptions {
    ftvm_witness::ClientOptions {
        attempts: 2,
        attempt_timeout: std::time::Duration::from_secs(3),
        ..opts()
    }
}

async fn no_cert_request(dir: &std::path::Path, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let ca = ftvm_tls::Identity::load(dir, "node-a").unwrap().ca;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ftvm_tls::ALPN_WITNESS.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let fut = async {
        let conn = ep
            .connect_with(cfg, addr, "witness")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let req = ftvm_witness::codec::Request::Claim {
            pair: "vm1".into(),
            seen: 0,
            claim_id: ClaimId::random(),
        }
        .encode();
        s.write_all(&req).await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        r.read_to_end(1024).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timeout".to_string())?
}
