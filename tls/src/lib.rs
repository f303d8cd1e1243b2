//! Certificates and the mutual-TLS QUIC configuration shared by every ftvm service
//! (the witness, disk resync and the logging channel between nodes).
//!
//! # Certificate directory
//!
//! One directory holds a deployment's certificates:
//!
//! ```text
//! DIR/ca.pem            the deployment's CA certificate (shared by everyone)
//! DIR/ca.key            the CA's private key (keep it off the nodes if you can)
//! DIR/<name>.pem        the certificate of identity <name>, signed by the CA
//! DIR/<name>.key        its private key (mode 0600)
//! ```
//!
//! An identity name (`witness`, `node-a`, ...) is the certificate's only DNS
//! subject-alternative name (SAN), and also its common name for people reading it; the SAN is
//! what counts, everywhere: rustls checks a server's name against it, and [`peer_identity`]
//! reads it. A client connects with `server_name` = the identity name of the server it expects,
//! so the server's certificate is checked against the CA *and* against the expected name; the
//! server learns the client's name with [`peer_identity`].
//!
//! # What a certificate is for
//!
//! A certificate also says, in a URI SAN the CA signs, what it is for ([`CertKind`]): a node of
//! one FT pair (`urn:ftvm:node:<pair>`) or the witness (`urn:ftvm:witness`).
//! `ftvm-witness certs init --pair P --nodes a,b` issues node certificates of pair P for a and
//! b and a witness certificate for the witness. Services between nodes (disk resync, the
//! logging channel) accept only another node of their own pair ([`pair_peer`]), so a witness
//! key (or a node of another pair) can never act as a node. Certificates issued without a kind
//! ([`init_dir`], [`issue`]) are accepted by no such service.
//!
//! # Mutual TLS
//!
//! [`server_config`] requires every client to present a certificate signed by the CA;
//! [`client_config`] presents the local identity's certificate and trusts only the CA. Only
//! TLS 1.3 with the `ring` provider is used. Each service passes its own ALPN string
//! ([`ALPN_WITNESS`], [`ALPN_RESYNC`], [`ALPN_LOG`]) so that a client of one service can never
//! talk to another by mistake.

#![deny(missing_docs)]

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

/// ALPN protocol of the witness service.
pub const ALPN_WITNESS: &[u8] = b"ftvm-witness/1";
/// ALPN protocol of the disk resync service.
pub const ALPN_RESYNC: &[u8] = b"ftvm-resync/1";
/// ALPN protocol of the primary→backup logging channel.
pub const ALPN_LOG: &[u8] = b"ftvm-log/1";

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors of certificate handling and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// A CA already exists in the directory and overwriting it was not asked for.
    #[error("{0} already exists; refusing to overwrite an existing CA (use the force option to replace it)")]
    CaExists(PathBuf),
    /// An identity certificate already exists and overwriting it was not asked for.
    #[error("{0} already exists; refusing to overwrite it")]
    IdentityExists(PathBuf),
    /// An identity name is not usable (it must be a DNS name such as `node-a`).
    #[error("invalid identity name {0:?}: use letters, digits, '-' and '.', as in a DNS name")]
    BadName(String),
    /// A peer (or this node's own identity) is not a node of the pair: it may not act as one.
    #[error("{name:?} is not {expected}: its certificate is {found}")]
    NotPairNode {
        /// The identity name of the certificate concerned.
        name: String,
        /// What was required (e.g. `another node of pair "vm1"`).
        expected: String,
        /// What the certificate is (e.g. `a witness certificate`).
        found: String,
    },
    /// The peer of a connection presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration is not usable for QUIC.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    /// A transport parameter was out of range.
    #[error("transport configuration: {0}")]
    Transport(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `name` can be an identity: non-empty, at most 63 characters, ASCII letters,
/// digits, `-` and `.`, not starting or ending with `-` or `.`, and a valid DNS name.
pub fn validate_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
        && name != "ca"
        && ServerName::try_from(name).is_ok_and(|n| matches!(n, ServerName::DnsName(_)));
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_string()))
    }
}

/// What a certificate is for, as the CA signed it into a URI subject-alternative name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertKind {
    /// A node of the FT pair `pair` (`urn:ftvm:node:<pair>`): may serve and pull that pair's
    /// disks and carry its log.
    Node {
        /// The pair's name.
        pair: String,
    },
    /// The witness (`urn:ftvm:witness`): answers claims, and is accepted as nothing else.
    Witness,
}

const KIND_NODE_PREFIX: &str = "urn:ftvm:node:";
const KIND_WITNESS: &str = "urn:ftvm:witness";

impl CertKind {
    /// A node of `pair`.
    pub fn node(pair: &str) -> CertKind {
        CertKind::Node {
            pair: pair.to_string(),
        }
    }

    /// The URI SAN that carries this kind.
    pub fn uri(&self) -> String {
        match self {
            CertKind::Node { pair } => format!("{KIND_NODE_PREFIX}{pair}"),
            CertKind::Witness => KIND_WITNESS.to_string(),
        }
    }

    /// The kind a URI SAN carries, if it is one of ftvm's.
    pub fn from_uri(uri: &str) -> Option<CertKind> {
        if uri == KIND_WITNESS {
            return Some(CertKind::Witness);
        }
        let pair = uri.strip_prefix(KIND_NODE_PREFIX)?;
        validate_name(pair).ok()?;
        Some(CertKind::node(pair))
    }

    fn validate(&self) -> Result<(), TlsError> {
        match self {
            CertKind::Node { pair } => validate_name(pair),
            CertKind::Witness => Ok(()),
        }
    }
}

impl std::fmt::Display for CertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertKind::Node { pair } => write!(f, "a node certificate of pair {pair:?}"),
            CertKind::Witness => write!(f, "a witness certificate"),
        }
    }
}

/// What a verified certificate says: the identity name (its DNS SAN) and what it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The identity name: the certificate's DNS subject-alternative name.
    pub name: String,
    /// What the certificate is for; `None` for a certificate issued without a kind (or with
    /// conflicting kinds), which no node-to-node service accepts.
    pub kind: Option<CertKind>,
}

impl PeerCert {
    fn describe_kind(&self) -> String {
        match &self.kind {
            Some(k) => k.to_string(),
            None => "marked neither node nor witness (issued without a kind; reissue it with \
                     `ftvm-witness certs issue --pair P`)"
                .to_string(),
        }
    }

    /// The pair this certificate is a node of, or why it is not a node's.
    pub fn node_pair(&self) -> Result<&str, TlsError> {
        match &self.kind {
            Some(CertKind::Node { pair }) => Ok(pair),
            _ => Err(TlsError::NotPairNode {
                name: self.name.clone(),
                expected: "a node".into(),
                found: self.describe_kind(),
            }),
        }
    }
}

/// Path of identity `name`'s certificate in `dir`.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// Path of identity `name`'s private key in `dir`.
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

fn new_ca() -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ftvm deployment CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn load_ca_for_signing(dir: &Path) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    let cert_file = dir.join(CA_CERT_FILE);
    let key_file = dir.join(CA_KEY_FILE);
    let cert_pem = fs::read_to_string(&cert_file).map_err(io_err(&cert_file))?;
    let key_pem = fs::read_to_string(&key_file).map_err(io_err(&key_file))?;
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
        path: key_file.clone(),
        what: e.to_string(),
    })?;
    let params =
        rcgen::CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| TlsError::Pem {
            path: cert_file.clone(),
            what: e.to_string(),
        })?;
    // Re-creating the issuer certificate from its parameters and key reproduces the subject
    // and key identifier that issued certificates refer to.
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn issue_one(
    dir: &Path,
    name: &str,
    kind: Option<&CertKind>,
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> Result<(), TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    if let Some(kind) = kind {
        let uri = rcgen::Ia5String::try_from(kind.uri())?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca, ca_key)?;
    write_file(&key_path(dir, name), &key.serialize_pem(), true)?;
    write_file(&cert_path(dir, name), &cert.pem(), false)?;
    Ok(())
}

/// Creates `dir` if needed and writes a fresh CA plus one certificate and key per name, with
/// no [`CertKind`] (accepted by no node-to-node service: use [`init_dir_with`] for a
/// deployment).
///
/// Refuses with [`TlsError::CaExists`] if `dir/ca.pem` or `dir/ca.key` already exists: a new CA
/// would silently cut every existing node off. Use [`init_dir_force`] to replace a CA on
/// purpose, or [`issue`] to add identities under the existing CA.
pub fn init_dir(dir: &Path, names: &[&str]) -> Result<(), TlsError> {
    let ids: Vec<(&str, Option<&CertKind>)> = names.iter().map(|n| (*n, None)).collect();
    init_dir_inner(dir, &ids, false)
}

/// Like [`init_dir`] but replaces an existing CA (and any identity of the same names).
/// Every certificate signed by the old CA stops being accepted.
pub fn init_dir_force(dir: &Path, names: &[&str]) -> Result<(), TlsError> {
    let ids: Vec<(&str, Option<&CertKind>)> = names.iter().map(|n| (*n, None)).collect();
    init_dir_inner(dir, &ids, true)
}

/// Creates `dir` if needed and writes a fresh CA plus, for each `(name, kind)`, a certificate
/// saying what it is for. Refuses an existing CA unless `force` (see [`init_dir`]).
///
/// ```no_run
/// use ftvm_tls::CertKind;
/// let vm1 = CertKind::node("vm1");
/// ftvm_tls::init_dir_with(
///     std::path::Path::new("/etc/ftvm/tls"),
///     &[("node-a", vm1.clone()), ("node-b", vm1), ("witness", CertKind::Witness)],
///     false,
/// )?;
/// # Ok::<(), ftvm_tls::TlsError>(())
/// ```
pub fn init_dir_with(dir: &Path, ids: &[(&str, CertKind)], force: bool) -> Result<(), TlsError> {
    let ids: Vec<(&str, Option<&CertKind>)> = ids.iter().map(|(n, k)| (*n, Some(k))).collect();
    init_dir_inner(dir, &ids, force)
}

fn init_dir_inner(
    dir: &Path,
    ids: &[(&str, Option<&CertKind>)],
    force: bool,
) -> Result<(), TlsError> {
    for (n, kind) in ids {
        validate_name(n)?;
        if let Some(k) = kind {
            k.validate()?;
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_file = dir.join(CA_CERT_FILE);
    let key_file = dir.join(CA_KEY_FILE);
    if !force {
        for f in [&cert_file, &key_file] {
            if f.exists() {
                return Err(TlsError::CaExists(f.clone()));
            }
        }
    }
    let (ca, ca_key) = new_ca()?;
    write_file(&key_file, &ca_key.serialize_pem(), true)?;
    write_file(&cert_file, &ca.pem(), false)?;
    for (n, kind) in ids {
        issue_one(dir, n, *kind, &ca, &ca_key)?;
    }
    Ok(())
}

/// Issues certificates with no [`CertKind`] for more identities with the CA already in `dir`
/// (which needs `ca.key`); see [`issue_with`]. An existing identity of the same name is
/// refused unless `overwrite`.
pub fn issue(dir: &Path, names: &[&str], overwrite: bool) -> Result<(), TlsError> {
    let ids: Vec<(&str, Option<&CertKind>)> = names.iter().map(|n| (*n, None)).collect();
    issue_inner(dir, &ids, overwrite)
}

/// Issues a certificate of kind `kind` for each name with the CA already in `dir` (which needs
/// `ca.key`). An existing identity of the same name is refused unless `overwrite`.
pub fn issue_with(
    dir: &Path,
    names: &[&str],
    kind: &CertKind,
    overwrite: bool,
) -> Result<(), TlsError> {
    let ids: Vec<(&str, Option<&CertKind>)> = names.iter().map(|n| (*n, Some(kind))).collect();
    issue_inner(dir, &ids, overwrite)
}

fn issue_inner(
    dir: &Path,
    ids: &[(&str, Option<&CertKind>)],
    overwrite: bool,
) -> Result<(), TlsError> {
    for (n, kind) in ids {
        validate_name(n)?;
        if let Some(k) = kind {
            k.validate()?;
        }
        let p = cert_path(dir, n);
        if !overwrite && p.exists() {
            return Err(TlsError::IdentityExists(p));
        }
    }
    let (ca, ca_key) = load_ca_for_signing(dir)?;
    for (n, kind) in ids {
        issue_one(dir, n, *kind, &ca, &ca_key)?;
    }
    Ok(())
}

/// One identity's credentials: the deployment CA (the only trust anchor) plus this
/// identity's certificate chain and private key.
#[derive(Debug)]
pub struct Identity {
    /// The identity name (certificate CN and DNS SAN).
    pub name: String,
    /// The CA certificate every peer must be signed by.
    pub ca: CertificateDer<'static>,
    /// This identity's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This identity's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn pem_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("bad certificate PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

impl Identity {
    /// Loads identity `name` from a certificate directory: `ca.pem`, `<name>.pem`, `<name>.key`.
    /// `ca.key` is not needed.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        validate_name(name)?;
        let ca_file = dir.join(CA_CERT_FILE);
        let cert_file = cert_path(dir, name);
        let key_file = key_path(dir, name);
        let ca_pem = fs::read(&ca_file).map_err(io_err(&ca_file))?;
        let cert_pem = fs::read(&cert_file).map_err(io_err(&cert_file))?;
        let key_pem = fs::read(&key_file).map_err(io_err(&key_file))?;
        let ca = pem_certs(&ca_file, &ca_pem)?.remove(0);
        let chain = pem_certs(&cert_file, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key_file.clone(),
            what: format!("bad private key PEM: {e}"),
        })?;
        Ok(Identity {
            name: name.to_string(),
            ca,
            chain,
            key,
        })
    }

    /// The identity name found in this identity's own certificate (its DNS SAN).
    pub fn certificate_name(&self) -> Option<String> {
        identity_of_der(&self.chain[0])
    }

    /// What this identity's own certificate says: its name and kind.
    pub fn certificate(&self) -> Option<PeerCert> {
        certificate_of_der(&self.chain[0])
    }

    /// The pair this identity is a node of; an error if its certificate is not a node's (a
    /// witness key must not serve or pull a disk, or carry a log).
    pub fn node_pair(&self) -> Result<String, TlsError> {
        let cert = self.certificate().unwrap_or(PeerCert {
            name: self.name.clone(),
            kind: None,
        });
        cert.node_pair().map(str::to_string)
    }

    /// Checks that `peer` is another node of this identity's pair: this identity must be a
    /// node, the peer a node of the same pair, and not this identity itself.
    pub fn check_pair_peer(&self, peer: &PeerCert) -> Result<(), TlsError> {
        let pair = self.node_pair()?;
        let expected = format!("another node of pair {pair:?}");
        let refuse = |found: String| TlsError::NotPairNode {
            name: peer.name.clone(),
            expected: expected.clone(),
            found,
        };
        match &peer.kind {
            Some(CertKind::Node { pair: p }) if *p == pair => {
                if peer.name == self.name {
                    Err(refuse(format!("this node's own ({})", self.name)))
                } else {
                    Ok(())
                }
            }
            _ => Err(refuse(peer.describe_kind())),
        }
    }
}

/// QUIC transport knobs shared by all services.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// A connection with no traffic for this long is closed (both sides use the minimum of
    /// their values).
    pub idle_timeout: Duration,
    /// Send a keep-alive when idle for this long (`None`: never). Keep it well under
    /// `idle_timeout`.
    pub keep_alive: Option<Duration>,
    /// Streams of each direction a peer may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for TransportOptions {
    /// 10 s idle timeout, keep-alive every 2 s, 64 concurrent streams.
    fn default() -> Self {
        TransportOptions {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Some(Duration::from_secs(2)),
            max_concurrent_streams: 64,
        }
    }
}

impl TransportOptions {
    /// Builds the quinn transport configuration.
    pub fn to_quinn(&self) -> Result<quinn::TransportConfig, TlsError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| TlsError::Transport(format!("idle timeout: {e}")))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(self.keep_alive);
        t.max_concurrent_bidi_streams(self.max_concurrent_streams.into());
        t.max_concurrent_uni_streams(self.max_concurrent_streams.into());
        Ok(t)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &Identity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca.clone())?;
    Ok(Arc::new(roots))
}

/// Server configuration for service `alpn`: presents `id`'s certificate and requires every
/// client to present a certificate signed by the same CA (mutual TLS).
pub fn server_config(
    id: &Identity,
    alpn: &[u8],
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.to_quinn()?));
    cfg.migration(false);
    Ok(cfg)
}

/// Client configuration for service `alpn`: presents `id`'s certificate and accepts only a
/// server whose certificate is signed by the CA and names the `server_name` given to
/// `Endpoint::connect` (use the server's identity name, e.g. `witness`).
pub fn client_config(
    id: &Identity,
    alpn: &[u8],
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.to_quinn()?));
    Ok(cfg)
}

/// A server endpoint bound to `addr` with [`server_config`]. Must be called inside a tokio
/// runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    id: &Identity,
    alpn: &[u8],
    opts: &TransportOptions,
) -> Result<quinn::Endpoint, TlsError> {
    let cfg = server_config(id, alpn, opts)?;
    quinn::Endpoint::server(cfg, addr).map_err(io_err(Path::new("<server socket>")))
}

/// Like [`server_endpoint`], but with a fixed stateless-reset key (at least 32 secret bytes,
/// kept across restarts, e.g. in the service's data directory).
///
/// After a crash and restart on the same address, the server then answers packets of the
/// connections it has forgotten with stateless resets that clients recognise, so they
/// reconnect at once instead of waiting for their idle timeout.
pub fn server_endpoint_with_reset_key(
    addr: SocketAddr,
    id: &Identity,
    alpn: &[u8],
    opts: &TransportOptions,
    reset_key: &[u8],
) -> Result<quinn::Endpoint, TlsError> {
    if reset_key.len() < 32 {
        return Err(TlsError::Transport(
            "stateless reset key must be at least 32 bytes".into(),
        ));
    }
    let cfg = server_config(id, alpn, opts)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(key));
    // Connection IDs must also stay valid across restarts, or the restarted server drops the
    // old connections' packets as invalid instead of resetting them.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&ring::digest::digest(&ring::digest::SHA256, reset_key).as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    ep_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let sock_path = Path::new("<server socket>");
    let socket = std::net::UdpSocket::bind(addr).map_err(io_err(sock_path))?;
    quinn::Endpoint::new(ep_cfg, Some(cfg), socket, Arc::new(quinn::TokioRuntime))
        .map_err(io_err(sock_path))
}

/// A client endpoint bound to `bind` (port 0 for any) whose default configuration is
/// [`client_config`]. Must be called inside a tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    id: &Identity,
    alpn: &[u8],
    opts: &TransportOptions,
) -> Result<quinn::Endpoint, TlsError> {
    let cfg = client_config(id, alpn, opts)?;
    let mut ep = quinn::Endpoint::client(bind).map_err(io_err(Path::new("<client socket>")))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// The identity name of the peer of an established connection, taken from its verified
/// certificate's DNS subject-alternative name (the name rustls verifies; the common name is
/// ignored). `None` if the peer presented no certificate or it has no DNS SAN.
///
/// On a server built with [`server_config`] every accepted connection has a CA-verified
/// client certificate, so this is the authenticated name of the client.
pub fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    peer_certificate(conn).map(|c| c.name)
}

/// What the peer's verified certificate says: its identity name (DNS SAN) and its
/// [`CertKind`]. `None` if the peer presented no certificate or it has no DNS SAN.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<PeerCert> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificate_of_der(certs.first()?)
}

/// The peer of `conn` if it is another node of `local`'s pair (see
/// [`Identity::check_pair_peer`]); otherwise an error that says what the peer is instead.
/// Both ends of a node-to-node service (resync, the logging channel) call this after the
/// handshake and close the connection with the error's text when it fails.
pub fn pair_peer(conn: &quinn::Connection, local: &Identity) -> Result<PeerCert, TlsError> {
    let peer = peer_certificate(conn).ok_or(TlsError::NoPeerCertificate)?;
    local.check_pair_peer(&peer)?;
    Ok(peer)
}

/// The identity name in a DER certificate: its first DNS subject-alternative name.
pub fn identity_of_der(der: &[u8]) -> Option<String> {
    certificate_of_der(der).map(|c| c.name)
}

/// The identity name (first DNS SAN) and kind (the one `urn:ftvm:` URI SAN) of a DER
/// certificate; `None` if it does not parse or has no DNS SAN.
pub fn certificate_of_der(der: &[u8]) -> Option<PeerCert> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let name = names.iter().find_map(|g| match g {
        GeneralName::DNSName(n) => Some(n.to_string()),
        _ => None,
    })?;
    let mut kinds = names.iter().filter_map(|g| match g {
        GeneralName::URI(u) if u.starts_with("urn:ftvm:") => Some(CertKind::from_uri(u)),
        _ => None,
    });
    // Exactly one well-formed kind; none, a malformed one or several mean no kind.
    let kind = match (kinds.next(), kinds.next()) {
        (Some(k), None) => k,
        _ => None,
    };
    Some(PeerCert { name, kind })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod kind_tests;
