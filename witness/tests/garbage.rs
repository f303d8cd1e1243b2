//! Garbage datagrams and bad requests are refused without disturbing other clients.

mod common;

use std::sync::Arc;

use common::*;
use ftvm_witness::codec::{ErrorCode, Request, Response, MAX_REQUEST, VERSION, VERSION_V1};
use ftvm_witness::{ClaimId, ClaimOutcome};

/// A small deterministic pseudo-random generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn error_code(reply: &[u8]) -> (ErrorCode, String) {
    match Response::decode(reply).expect("the witness answers with a valid response") {
        Response::Error { code, text } => (code, text),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    let w = start(&cfg, "127.0.0.1:0", true);
    let good = Arc::new(client(dir.path(), "node-a", w.addr));
    let bad = client(dir.path(), "node-b", w.addr);
    good.ping().await.unwrap();

    // A legitimate node keeps claiming (as the holder, each claim on the current generation
    // is a new grant) while everything below happens.
    let g2 = good.clone();
    let worker = tokio::spawn(async move {
        let mut generation = 0;
        for _ in 0..60 {
            match g2
                .claim("vm1", generation, ClaimId::random())
                .await
                .unwrap()
            {
                ClaimOutcome::Granted { generation: g } => {
                    assert_eq!(g, generation + 1);
                    generation = g;
                }
                other => panic!("legitimate claim denied: {other:?}"),
            }
        }
        generation
    });

    // 1. Garbage UDP datagrams at the QUIC port, some dressed as QUIC long-header packets.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for i in 0..400 {
        let len = 1 + (rng.next() % 1400) as usize;
        let mut d = rng.bytes(len.max(if i % 4 == 0 { 1200 } else { 1 }));
        if i % 4 == 0 {
            d[0] = 0xc0 | (d[0] & 0x0f); // long header, "Initial"
            d[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
        }
        sock.send_to(&d, w.addr).unwrap();
    }

    // 2. Bad requests on an authenticated connection, each with a precise refusal.
    let claim = Request::Claim {
        pair: "vm1".into(),
        seen: 0,
        claim_id: ClaimId::random(),
    }
    .encode();
    let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
        (vec![], ErrorCode::Malformed, "truncated in header"),
        (
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ErrorCode::Malformed,
            "bad magic",
        ),
        (
            claim[..claim.len() - 1].to_vec(),
            ErrorCode::Malformed,
            "truncated",
        ),
        (claim[..6].to_vec(), ErrorCode::Malformed, "truncated"),
        (
            [&claim[..], &[0u8][..]].concat(),
            ErrorCode::Malformed,
            "unexpected bytes",
        ),
        (
            vec![b'F', b'W', VERSION, 99],
            ErrorCode::UnknownType,
            "unknown message type 99",
        ),
        (
            vec![b'F', b'W', VERSION + 1, 1],
            ErrorCode::UnsupportedVersion,
            "version",
        ),
        (
            [&[b'F', b'W', VERSION, 1][..], &[0u8; MAX_REQUEST][..]].concat(),
            ErrorCode::TooLarge,
            "exceeds",
        ),
        (vec![0x55; 100_000], ErrorCode::TooLarge, "exceeds"),
        (
            [&claim[..4], &[3u8, b'a', b'/', b'b'][..], &[0u8; 8][..]].concat(),
            ErrorCode::Malformed,
            "invalid pair",
        ),
    ];
    for (i, (req, code, text)) in cases.iter().enumerate() {
        let reply = bad.raw_request(req).await.unwrap();
        let (c, t) = error_code(&reply);
        assert_eq!(c, *code, "case {i}: {t}");
        assert!(t.contains(text), "case {i}: {t:?} lacks {text:?}");
    }
    // A claim as a version 1 client (before claim ids) sends it: refused in version 1, with
    // words that say why, so that the old client reports a clear refusal.
    let mut v1 = vec![b'F', b'W', VERSION_V1, 1, 3];
    v1.extend_from_slice(b"vm1");
    v1.extend_from_slice(&0u64.to_be_bytes());
    let reply = bad.raw_request(&v1).await.unwrap();
    assert_eq!(
        reply[2], VERSION_V1,
        "a version 1 request is answered in version 1"
    );
    let (c, t) = error_code(&reply);
    assert_eq!(c, ErrorCode::UnsupportedVersion, "{t}");
    assert!(t.contains("without claim ids"), "{t}");
    for _ in 0..200 {
        let len = (rng.next() % MAX_REQUEST as u64) as usize;
        let reply = bad.raw_request(&rng.bytes(len)).await.unwrap();
        let (c, _) = error_code(&reply);
        assert_ne!(c, ErrorCode::NotAuthorized);
    }

    // 3. A stream reset halfway through a request gets no answer and breaks nothing.
    {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let id = ftvm_tls::Identity::load(dir.path(), "node-b").unwrap();
        let cfg =
            ftvm_tls::client_config(&id, ftvm_tls::ALPN_WITNESS, &Default::default()).unwrap();
        let conn = ep
            .connect_with(cfg, w.addr, "witness")
            .unwrap()
            .await
            .unwrap();
        let (mut s, _r) = conn.open_bi().await.unwrap();
        s.write_all(&claim[..5]).await.unwrap();
        s.reset(7u32.into()).unwrap();
        // A request that is never finished is answered with a timeout refusal.
        let (mut s2, mut r2) = conn.open_bi().await.unwrap();
        s2.write_all(&claim[..5]).await.unwrap();
        let reply = r2.read_to_end(1024).await.unwrap();
        assert_eq!(error_code(&reply).0, ErrorCode::Timeout);
        conn.close(0u32.into(), b"done");
    }

    let final_generation = worker.await.unwrap();
    assert_eq!(final_generation, 60);
    // The bad client can still do proper work afterwards.
    assert_eq!(
        bad.claim("vm1", 0, ClaimId::random()).await.unwrap(),
        ClaimOutcome::Denied {
            generation: 60,
            holder: Some("node-a".into())
        }
    );
    let mut child = w;
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the witness died"
    );
    assert_eq!(
        child.metric("ftvm_witness_refusals_total{reason=\"oversized\"}"),
        2
    );
    assert_eq!(
        child.metric("ftvm_witness_refusals_total{reason=\"bad_request\"}"),
        211
    );
    assert_eq!(
        child.metric("ftvm_witness_refusals_total{reason=\"timeout\"}"),
        1
    );
    assert_eq!(
        child.metric("ftvm_witness_claims_total{result=\"granted\"}"),
        60
    );
    child.child.kill().unwrap();
}
