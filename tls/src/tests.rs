use super::*;
use std::net::{Ipv4Addr, SocketAddr};

fn lo() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Starts a server that accepts one connection, echoes one bi stream and reports the peer's
/// identity (or the handshake error).
async fn echo_server(
    id: &Identity,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<Option<String>, String>>,
) {
    let ep = server_endpoint(lo(), id, ALPN_LOG, &TransportOptions::default()).unwrap();
    let addr = ep.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let inc = ep.accept().await.ok_or("endpoint closed")?;
        let conn = inc.await.map_err(|e| e.to_string())?;
        let who = peer_identity(&conn);
        let (mut s, mut r) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let data = r.read_to_end(1024).await.map_err(|e| e.to_string())?;
        s.write_all(&data).await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        let _ = conn.closed().await;
        Ok(who)
    });
    (addr, h)
}

async fn echo_client(
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(Vec<u8>, Option<String>), String> {
    let ep = quinn::Endpoint::client(lo()).unwrap();
    let conn = ep
        .connect_with(cfg, addr, server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let who = peer_identity(&conn);
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    s.write_all(b"hello").await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    let got = r.read_to_end(1024).await.map_err(|e| e.to_string())?;
    conn.close(0u32.into(), b"bye");
    ep.wait_idle().await;
    Ok((got, who))
}

#[tokio::test]
async fn mtls_handshake_and_peer_identity() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness", "node-a"]).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let cli = Identity::load(d.path(), "node-a").unwrap();
    assert_eq!(srv.certificate_name().as_deref(), Some("witness"));
    let (addr, h) = echo_server(&srv).await;
    let cfg = client_config(&cli, ALPN_LOG, &TransportOptions::default()).unwrap();
    let (got, who) = echo_client(cfg, addr, "witness").await.unwrap();
    assert_eq!(got, b"hello");
    assert_eq!(who.as_deref(), Some("witness"));
    assert_eq!(h.await.unwrap().unwrap().as_deref(), Some("node-a"));
}

#[tokio::test]
async fn wrong_server_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness", "node-a"]).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let cli = Identity::load(d.path(), "node-a").unwrap();
    let (addr, h) = echo_server(&srv).await;
    let cfg = client_config(&cli, ALPN_LOG, &TransportOptions::default()).unwrap();
    let err = echo_client(cfg, addr, "node-b").await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert!(h.await.unwrap().is_err());
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let good = tempfile::tempdir().unwrap();
    let evil = tempfile::tempdir().unwrap();
    init_dir(good.path(), &["witness", "node-a"]).unwrap();
    init_dir(evil.path(), &["node-a"]).unwrap();
    let srv = Identity::load(good.path(), "witness").unwrap();
    // Trusts the right CA (so the server is accepted) but presents a cert of another CA.
    let mut cli = Identity::load(evil.path(), "node-a").unwrap();
    cli.ca = srv.ca.clone();
    let (addr, h) = echo_server(&srv).await;
    let cfg = client_config(&cli, ALPN_LOG, &TransportOptions::default()).unwrap();
    let res = echo_client(cfg, addr, "witness").await;
    assert!(res.is_err(), "client with foreign cert got {res:?}");
    let srv_res = h.await.unwrap();
    assert!(
        srv_res.is_err(),
        "server accepted foreign cert: {srv_res:?}"
    );
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness"]).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let (addr, h) = echo_server(&srv).await;
    let mut roots = RootCertStore::empty();
    roots.add(srv.ca.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_LOG.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let res = echo_client(cfg, addr, "witness").await;
    assert!(res.is_err(), "client without cert got {res:?}");
    assert!(h.await.unwrap().is_err());
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness", "node-a"]).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let cli = Identity::load(d.path(), "node-a").unwrap();
    let (addr, h) = echo_server(&srv).await;
    let cfg = client_config(&cli, ALPN_RESYNC, &TransportOptions::default()).unwrap();
    assert!(echo_client(cfg, addr, "witness").await.is_err());
    assert!(h.await.unwrap().is_err());
}

#[test]
fn init_refuses_to_overwrite_ca_and_issue_adds_identities() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["a"]).unwrap();
    let ca_before = fs::read(d.path().join(CA_CERT_FILE)).unwrap();
    assert!(matches!(
        init_dir(d.path(), &["b"]),
        Err(TlsError::CaExists(_))
    ));
    assert_eq!(fs::read(d.path().join(CA_CERT_FILE)).unwrap(), ca_before);
    issue(d.path(), &["b"], false).unwrap();
    assert!(matches!(
        issue(d.path(), &["b"], false),
        Err(TlsError::IdentityExists(_))
    ));
    let b = Identity::load(d.path(), "b").unwrap();
    assert_eq!(b.certificate_name().as_deref(), Some("b"));
    init_dir_force(d.path(), &["a"]).unwrap();
    assert_ne!(fs::read(d.path().join(CA_CERT_FILE)).unwrap(), ca_before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let m = fs::metadata(key_path(d.path(), "a")).unwrap().permissions();
        assert_eq!(m.mode() & 0o777, 0o600);
    }
}

#[tokio::test]
async fn identity_issued_later_by_same_ca_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness"]).unwrap();
    issue(d.path(), &["node-c"], false).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let cli = Identity::load(d.path(), "node-c").unwrap();
    let (addr, h) = echo_server(&srv).await;
    let cfg = client_config(&cli, ALPN_LOG, &TransportOptions::default()).unwrap();
    echo_client(cfg, addr, "witness").await.unwrap();
    assert_eq!(h.await.unwrap().unwrap().as_deref(), Some("node-c"));
}

#[test]
fn bad_names_are_refused() {
    for n in ["", "-a", "a b", "a/b", "ca", "a..b", "../x", "a."] {
        assert!(validate_name(n).is_err(), "{n:?} accepted");
    }
    for n in ["a", "node-a", "witness", "host1.example"] {
        validate_name(n).unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        init_dir(d.path(), &["../evil"]),
        Err(TlsError::BadName(_))
    ));
    assert!(!d.path().join(CA_CERT_FILE).exists());
}

#[test]
fn restarted_server_with_same_reset_key_resets_old_connections() {
    let d = tempfile::tempdir().unwrap();
    init_dir(d.path(), &["witness", "node-a"]).unwrap();
    let srv = Identity::load(d.path(), "witness").unwrap();
    let cli = Identity::load(d.path(), "node-a").unwrap();
    let key = [7u8; 32];
    assert!(matches!(
        server_endpoint_with_reset_key(
            lo(),
            &srv,
            ALPN_LOG,
            &TransportOptions::default(),
            &key[..16]
        ),
        Err(TlsError::Transport(_))
    ));
    // The server lives in its own runtime so that dropping the runtime "crashes" it: no
    // CONNECTION_CLOSE is ever sent.
    let serve = |addr: SocketAddr| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let srv = srv.clone();
        let ep = rt.block_on(async {
            server_endpoint_with_reset_key(addr, &srv, ALPN_LOG, &TransportOptions::default(), &key)
                .unwrap()
        });
        let addr = ep.local_addr().unwrap();
        rt.spawn(async move {
            while let Some(inc) = ep.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    while let Ok((mut s, mut r)) = conn.accept_bi().await {
                        let data = r.read_to_end(1024).await.unwrap_or_default();
                        let _ = s.write_all(&data).await;
                        let _ = s.finish();
                    }
                });
            }
        });
        (rt, addr)
    };
    let (rt1, addr) = serve(lo());
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let opts = TransportOptions {
        idle_timeout: Duration::from_secs(30),
        keep_alive: None,
        ..TransportOptions::default()
    };
    let ep = client_rt
        .block_on(async { client_endpoint(lo(), &cli, ALPN_LOG, &opts) })
        .unwrap();
    let conn = client_rt
        .block_on(async { ep.connect(addr, "witness").unwrap().await })
        .unwrap();
    let echo = |conn: quinn::Connection| async move {
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(b"x").await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        r.read_to_end(16).await.map_err(|e| e.to_string())
    };
    assert_eq!(client_rt.block_on(echo(conn.clone())).unwrap(), b"x");
    rt1.shutdown_timeout(Duration::from_secs(5));
    let (_rt2, addr2) = serve(addr);
    assert_eq!(addr2, addr);
    // Only a hang deadline: that the connection ends by a reset, not by its 30 s idle timeout
    // (which would end it as TimedOut), is what the close reason says.
    let res = client_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), echo(conn.clone())).await
    });
    res.expect("the old connection neither reset nor timed out")
        .unwrap_err();
    assert!(
        matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)),
        "{:?}",
        conn.close_reason()
    );
}
