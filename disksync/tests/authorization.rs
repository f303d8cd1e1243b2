//! Who may resync a disk: by default only another node of the server's own pair, on both
//! sides of the connection. A witness key, a node of another pair (same CA) or a certificate
//! that says nothing about what it is for is refused with a clear error on both sides, and
//! never serves a disk either.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

const BS: u64 = 4096;

/// `pull --node NODE` against `server`, naming the server `server`.
fn pull_as(server: &Server, node: &str, disk: &Path, tls: &Path) -> std::process::Output {
    pull_from(&format!("server@{}", server.addr), node, disk, tls)
}

#[test]
fn only_another_node_of_the_pair_may_pull() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("tls"), &[]);
    ftvm_tls::issue_with(&tls, &["witness"], &ftvm_tls::CertKind::Witness, false).unwrap();
    ftvm_tls::issue_with(&tls, &["vm2-a"], &ftvm_tls::CertKind::node("vm2"), false).unwrap();
    ftvm_tls::issue(&tls, &["plain"], false).unwrap();
    let mut rng = Rng::new(11);
    let (src, dst) = (dir.path().join("a.img"), dir.path().join("b.img"));
    random_image(&src, 1 << 20, &mut rng);
    std::fs::copy(&src, &dst).unwrap();
    diverge(&dst, BS, Divergence::WholeBlocks(5), &mut rng);
    let before = std::fs::read(&dst).unwrap();

    // A witness, another pair's node and an unmarked identity cannot even start a pull: they
    // are refused on the client side before any connection.
    for (who, why) in [
        ("witness", "a witness certificate"),
        ("plain", "marked neither node nor witness"),
    ] {
        let server = Server::start(&src, &tls, &[]);
        let out = pull_as(&server, who, &dst, &tls);
        assert!(!out.status.success(), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot resync disks") && err.contains(why),
            "{err}"
        );
    }

    // A node of another pair of the same CA gets as far as the handshake, where both sides
    // refuse each other (the client may report either refusal, whichever comes first).
    let server = Server::start(&src, &tls, &[]);
    let out = pull_as(&server, "vm2-a", &dst, &tls);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("pair \"vm1\"") && err.contains("pair \"vm2\""),
        "{err}"
    );
    // The server's side on its own: a client that does not check first learns the server's
    // reason from the connection's close, and the server logs it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reason = rt.block_on(async {
        let ep = disksync::net::client_endpoint(&tls, "vm2-a").unwrap();
        let conn = disksync::net::connect(&ep, server.addr, "server")
            .await
            .unwrap();
        conn.closed().await.to_string()
    });
    assert!(
        reason.contains("\"vm2-a\" is not another node of pair \"vm1\"")
            && reason.contains("a node certificate of pair \"vm2\""),
        "{reason}"
    );
    let log = server.stop();
    assert!(log.contains("refused: \"vm2-a\""), "{log}");

    assert_eq!(
        std::fs::read(&dst).unwrap(),
        before,
        "a refused pull changed the disk"
    );

    // The pair's other node may, with no --allow.
    let server = Server::start(&src, &tls, &[]);
    let out = pull_as(&server, "client", &dst, &tls);
    assert!(out.status.success(), "{}", describe(&out));
    assert_identical(&src, &dst);
}

#[test]
fn a_witness_or_unmarked_key_does_not_serve_and_a_node_does_not_pull_from_another_pair() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("tls"), &[]);
    ftvm_tls::issue_with(&tls, &["witness"], &ftvm_tls::CertKind::Witness, false).unwrap();
    ftvm_tls::issue_with(&tls, &["vm2-a"], &ftvm_tls::CertKind::node("vm2"), false).unwrap();
    let mut rng = Rng::new(12);
    let (src, dst) = (dir.path().join("a.img"), dir.path().join("b.img"));
    random_image(&src, 1 << 20, &mut rng);
    std::fs::copy(&src, &dst).unwrap();
    diverge(&dst, BS, Divergence::WholeBlocks(3), &mut rng);
    let before = std::fs::read(&dst).unwrap();

    let out = run(&[
        OsStr::new("serve"),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--node".as_ref(),
        "witness".as_ref(),
        "--disk".as_ref(),
        src.as_os_str(),
        "--tls".as_ref(),
        tls.as_os_str(),
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a witness certificate"), "{err}");

    // A server of pair vm2 (its own certificate) serving to vm1's node: the client refuses it.
    let server = Server::start_as(&src, &tls, "vm2-a", &[]);
    let from = format!("vm2-a@{}", server.addr);
    let out = pull_from(&from, "client", &dst, &tls);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a node certificate of pair \"vm2\""), "{err}");
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        before,
        "a refused pull changed the disk"
    );
}
