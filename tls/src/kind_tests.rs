//! Certificate kinds (node of a pair, witness) and names read from the SAN only, over real
//! QUIC handshakes.

use super::*;
use std::net::{Ipv4Addr, SocketAddr};

fn lo() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A deployment: nodes a and b of pair vm1, node c of pair vm2, a witness, and `plain`, an
/// identity issued without a kind.
fn deployment() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let vm1 = CertKind::node("vm1");
    init_dir_with(
        d.path(),
        &[
            ("node-a", vm1.clone()),
            ("node-b", vm1),
            ("witness", CertKind::Witness),
        ],
        false,
    )
    .unwrap();
    issue_with(d.path(), &["node-c"], &CertKind::node("vm2"), false).unwrap();
    issue(d.path(), &["plain"], false).unwrap();
    d
}

/// Connects `client` to a server `server` (by its name) and returns what each side's
/// [`pair_peer`] said about the other.
async fn handshake(
    server: &Identity,
    client: &Identity,
) -> (Result<PeerCert, TlsError>, Result<PeerCert, TlsError>) {
    let ep = server_endpoint(lo(), server, ALPN_LOG, &TransportOptions::default()).unwrap();
    let addr = ep.local_addr().unwrap();
    let srv = server.clone();
    let h = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let r = pair_peer(&conn, &srv);
        conn.close(0u32.into(), b"");
        r
    });
    let cep = client_endpoint(lo(), client, ALPN_LOG, &TransportOptions::default()).unwrap();
    let conn = cep.connect(addr, &server.name).unwrap().await.unwrap();
    let from_client = pair_peer(&conn, client);
    let from_server = h.await.unwrap();
    conn.close(0u32.into(), b"");
    (from_server, from_client)
}

#[test]
fn certificates_say_what_they_are_for() {
    let d = deployment();
    let kind = |n: &str| Identity::load(d.path(), n).unwrap().certificate().unwrap();
    assert_eq!(kind("node-a").kind, Some(CertKind::node("vm1")));
    assert_eq!(kind("node-c").kind, Some(CertKind::node("vm2")));
    assert_eq!(kind("witness").kind, Some(CertKind::Witness));
    assert_eq!(kind("plain").kind, None);
    assert_eq!(kind("node-b").name, "node-b");
    let a = Identity::load(d.path(), "node-a").unwrap();
    assert_eq!(a.node_pair().unwrap(), "vm1");
    let w = Identity::load(d.path(), "witness").unwrap();
    let e = w.node_pair().unwrap_err();
    assert!(e.to_string().contains("a witness certificate"), "{e}");
    assert!(matches!(
        init_dir_with(d.path(), &[("x", CertKind::node("bad pair"))], true),
        Err(TlsError::BadName(_))
    ));
}

#[tokio::test]
async fn two_nodes_of_the_pair_accept_each_other() {
    let d = deployment();
    let a = Identity::load(d.path(), "node-a").unwrap();
    let b = Identity::load(d.path(), "node-b").unwrap();
    let (srv, cli) = handshake(&a, &b).await;
    assert_eq!(srv.unwrap().name, "node-b");
    let cli = cli.unwrap();
    assert_eq!(
        (cli.name.as_str(), cli.kind),
        ("node-a", Some(CertKind::node("vm1")))
    );
}

#[tokio::test]
async fn a_witness_another_pairs_node_or_an_unmarked_certificate_is_no_pair_node() {
    let d = deployment();
    let a = Identity::load(d.path(), "node-a").unwrap();
    for (other, found) in [
        ("witness", "a witness certificate"),
        ("node-c", "a node certificate of pair \"vm2\""),
        ("plain", "marked neither node nor witness"),
    ] {
        let o = Identity::load(d.path(), other).unwrap();
        // As a client of a node: the node refuses it.
        let (srv, _) = handshake(&a, &o).await;
        let e = srv.unwrap_err().to_string();
        assert!(e.contains(found) && e.contains(other), "{other}: {e}");
        assert!(e.contains("another node of pair \"vm1\""), "{e}");
        // As the server a node connects to: the node refuses it too.
        let (_, cli) = handshake(&o, &a).await;
        let e = cli.unwrap_err().to_string();
        assert!(e.contains(found), "{other}: {e}");
    }
    // A node is not its own pair peer.
    let me = a.certificate().unwrap();
    assert!(a.check_pair_peer(&me).is_err());
}

/// A certificate whose common name says one identity and whose DNS SAN says another: rustls
/// verifies the SAN, so the SAN is the identity everywhere.
#[tokio::test]
async fn the_identity_is_the_san_not_the_common_name() {
    let d = deployment();
    let (ca, ca_key) = load_ca_for_signing(d.path()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["node-b".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mallory");
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::Ia5String::try_from(CertKind::node("vm1").uri()).unwrap(),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    fs::write(cert_path(d.path(), "mixed"), cert.pem()).unwrap();
    fs::write(key_path(d.path(), "mixed"), key.serialize_pem()).unwrap();
    let mixed = Identity::load(d.path(), "mixed").unwrap();
    assert_eq!(mixed.certificate_name().as_deref(), Some("node-b"));

    let a = Identity::load(d.path(), "node-a").unwrap();
    let ep = server_endpoint(lo(), &a, ALPN_LOG, &TransportOptions::default()).unwrap();
    let addr = ep.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let who = peer_identity(&conn);
        conn.close(0u32.into(), b"");
        who
    });
    let cep = client_endpoint(lo(), &mixed, ALPN_LOG, &TransportOptions::default()).unwrap();
    let conn = cep.connect(addr, "node-a").unwrap().await.unwrap();
    assert_eq!(h.await.unwrap().as_deref(), Some("node-b"));
    conn.close(0u32.into(), b"");

    // And as a server, it is accepted under its SAN name only (rustls's rule).
    let ep = server_endpoint(lo(), &mixed, ALPN_LOG, &TransportOptions::default()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let _ = inc.await;
        }
    });
    let cep = client_endpoint(lo(), &a, ALPN_LOG, &TransportOptions::default()).unwrap();
    assert!(cep.connect(addr, "mallory").unwrap().await.is_err());
    let conn = cep.connect(addr, "node-b").unwrap().await.unwrap();
    assert_eq!(peer_identity(&conn).as_deref(), Some("node-b"));
}
