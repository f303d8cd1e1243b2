//! The witness configuration file (TOML).
//!
//! ```toml
//! listen = "0.0.0.0:7400"          # UDP address of the QUIC service
//! data_dir = "data"                 # rocksdb state; relative paths are relative to this file
//! tls_dir = "."                     # certificate directory (ca.pem, witness.pem, witness.key)
//! identity = "witness"              # the witness's certificate name
//! metrics_listen = "127.0.0.1:9400" # optional Prometheus endpoint (HTTP)
//! idle_timeout_ms = 10000           # optional QUIC idle timeout
//!
//! [pairs.vm1]
//! nodes = ["node-a", "node-b"]      # certificate identities allowed to claim for pair vm1
//! ```
//!
//! The store is rocksdb in `data_dir` unless a `[store]` section chooses etcd:
//!
//! ```toml
//! [store]
//! kind = "etcd"                     # or "rocksdb" (the default)
//! endpoints = ["https://10.0.0.5:2379", "https://10.0.0.6:2379", "https://10.0.0.7:2379"]
//! prefix = "/ftvm-witness/"         # keys of this witness group (default)
//! timeout_ms = 2000                 # per etcd request (default)
//! startup_timeout_ms = 30000        # how long a starting witness waits for etcd (default)
//! ca = "etcd-ca.pem"                # TLS to etcd: CA, and client certificate and key (optional)
//! cert = "etcd-client.pem"
//! key = "etcd-client.key"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not valid TOML for this configuration.
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    /// The content is invalid.
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// One pair's section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// Certificate identities allowed to claim for the pair.
    pub nodes: Vec<String>,
}

/// Where the witness keeps its state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreConfig {
    /// rocksdb in `data_dir`, owned by this one witness process.
    #[default]
    Rocksdb,
    /// An etcd cluster, which several witness processes may share.
    Etcd(EtcdConfig),
}

impl StoreConfig {
    /// `rocksdb` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Rocksdb => "rocksdb",
            StoreConfig::Etcd(_) => "etcd",
        }
    }

    fn is_default(&self) -> bool {
        *self == StoreConfig::Rocksdb
    }
}

/// The `[store]` section for etcd.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// The cluster's client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// The prefix of every key this witness group uses (default `/ftvm-witness/`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Time allowed for one etcd request, in milliseconds (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long a starting witness retries an etcd cluster that does not answer yet (no
    /// leader, members restarting), in milliseconds (default 30000); then it exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_ms: Option<u64>,
    /// The CA certificate (PEM) that signed the etcd servers' certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This witness's client certificate (PEM) for etcd, with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/ftvm-witness/".to_string()
}

impl EtcdConfig {
    /// The request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(2000))
    }

    /// How long a starting witness waits for the cluster to answer.
    pub fn startup_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.startup_timeout_ms.unwrap_or(30_000))
    }

    fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("[store] kind = \"etcd\" needs at least one endpoint".into());
        }
        let tls = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .ok_or_else(|| {
                    format!("etcd endpoint {e:?}: expected http://HOST:PORT or https://HOST:PORT")
                })?;
            if !rest.contains(':') {
                return Err(format!("etcd endpoint {e:?}: missing port"));
            }
            if tls != e.starts_with("https://") {
                return Err(format!(
                    "etcd endpoint {e:?}: use https:// endpoints exactly when ca/cert/key are set"
                ));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("[store]: cert and key go together".into());
        }
        if self.prefix.is_empty() {
            return Err("[store]: the etcd prefix must not be empty".into());
        }
        if self.timeout_ms == Some(0) {
            return Err("[store]: timeout_ms must be positive".into());
        }
        Ok(())
    }
}

/// The witness configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the QUIC service listens on.
    pub listen: SocketAddr,
    /// rocksdb data directory (used by the rocksdb store).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Certificate directory.
    pub tls_dir: PathBuf,
    /// The witness's own certificate identity.
    #[serde(default = "default_identity")]
    pub identity: String,
    /// Optional address of the Prometheus metrics HTTP listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// QUIC idle timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// The store (`[store]`; rocksdb in `data_dir` when absent).
    #[serde(default, skip_serializing_if = "StoreConfig::is_default")]
    pub store: StoreConfig,
    /// The pairs this witness arbitrates.
    pub pairs: BTreeMap<String, PairConfig>,
}

fn default_identity() -> String {
    "witness".to_string()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

impl Config {
    /// Reads and validates a configuration file; relative paths in it are made relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
        let mut c: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if c.data_dir.is_relative() {
            c.data_dir = base.join(&c.data_dir);
        }
        if c.tls_dir.is_relative() {
            c.tls_dir = base.join(&c.tls_dir);
        }
        if let StoreConfig::Etcd(e) = &mut c.store {
            for p in [&mut e.ca, &mut e.cert, &mut e.key].into_iter().flatten() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        c.validate()
            .map_err(|e| ConfigError::Invalid(path.to_path_buf(), e))?;
        if let StoreConfig::Etcd(e) = &c.store {
            e.validate()
                .map_err(|e| ConfigError::Invalid(path.to_path_buf(), e))?;
        }
        Ok(c)
    }

    /// Checks names and pairs.
    pub fn validate(&self) -> Result<(), String> {
        if self.pairs.is_empty() {
            return Err("no [pairs.NAME] section: the witness would have nothing to decide".into());
        }
        // Identities, pairs and nodes follow the one rule of the certificates (`ftvm_tls`):
        // a name the CA cannot issue a certificate for must not be configurable either.
        if let Err(e) = ftvm_tls::validate_name(&self.identity) {
            return Err(format!("identity: {e}"));
        }
        for (p, pc) in &self.pairs {
            if let Err(e) = ftvm_tls::validate_name(p) {
                return Err(format!("pair name: {e}"));
            }
            if pc.nodes.is_empty() {
                return Err(format!("pair {p:?} lists no nodes"));
            }
            for n in &pc.nodes {
                if let Err(e) = ftvm_tls::validate_name(n) {
                    return Err(format!("pair {p:?}: node name: {e}"));
                }
                if n == &self.identity {
                    return Err(format!(
                        "pair {p:?}: node {n:?} is the witness's own identity"
                    ));
                }
            }
            let mut s = pc.nodes.clone();
            s.sort();
            s.dedup();
            if s.len() != pc.nodes.len() {
                return Err(format!("pair {p:?} lists a node twice"));
            }
        }
        Ok(())
    }

    /// Pair name → allowed nodes, as the state machine wants it.
    pub fn pair_map(&self) -> BTreeMap<String, Vec<String>> {
        self.pairs
            .iter()
            .map(|(k, v)| (k.clone(), v.nodes.clone()))
            .collect()
    }

    /// Renders the configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_resolves_relative_paths_and_validates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:7400\"\ndata_dir = \"data\"\ntls_dir = \".\"\n[pairs.vm1]\nnodes = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.data_dir, d.path().join("data"));
        assert_eq!(c.identity, "witness");
        assert_eq!(c.pair_map()["vm1"], vec!["a", "b"]);
        let again: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);

        std::fs::write(
            &p,
            "listen = \"127.0.0.1:7400\"\ndata_dir = \"data\"\ntls_dir = \".\"\n[pairs.vm1]\nnodes = [\"a\", \"a\"]\n",
        )
        .unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Invalid(..))));
        // The certificates' rule, not a looser one of the witness's own: no '_'.
        for bad in [
            "[pairs.vm1]\nnodes = [\"node_a\", \"b\"]\n",
            "[pairs.vm_1]\nnodes = [\"a\", \"b\"]\n",
            "identity = \"wit_ness\"\n[pairs.vm1]\nnodes = [\"a\", \"b\"]\n",
        ] {
            std::fs::write(
                &p,
                format!("listen = \"127.0.0.1:7400\"\ndata_dir = \"data\"\ntls_dir = \".\"\n{bad}"),
            )
            .unwrap();
            let e = Config::load(&p).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid(_, m) if m.contains("invalid identity name")),
                "{bad}: {e}"
            );
        }
        std::fs::write(&p, "listen = 3").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse(..))));
    }

    #[test]
    fn store_sections() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.toml");
        let base = "listen = \"127.0.0.1:7400\"\ntls_dir = \".\"\n[pairs.vm1]\nnodes = [\"a\"]\n";
        std::fs::write(&p, base).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.store, StoreConfig::Rocksdb);
        assert_eq!(c.data_dir, d.path().join("data"));
        assert!(!c.to_toml().contains("[store]"));

        let etcd = format!(
            "{base}[store]\nkind = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n"
        );
        std::fs::write(&p, &etcd).unwrap();
        let c = Config::load(&p).unwrap();
        let StoreConfig::Etcd(e) = &c.store else {
            panic!("{c:?}")
        };
        assert_eq!(e.prefix, "/ftvm-witness/");
        assert_eq!(e.ca.as_deref(), Some(d.path().join("ca.pem").as_path()));
        assert_eq!(e.timeout(), std::time::Duration::from_secs(2));
        let again: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);

        for (section, why) in [
            ("kind = \"etcd\"\nendpoints = []\n", "at least one endpoint"),
            ("kind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n", "expected http://"),
            ("kind = \"etcd\"\nendpoints = [\"http://127.0.0.1\"]\n", "missing port"),
            (
                "kind = \"etcd\"\nendpoints = [\"http://127.0.0.1:1\"]\nca = \"x\"\n",
                "https://",
            ),
            (
                "kind = \"etcd\"\nendpoints = [\"https://127.0.0.1:1\"]\nca = \"x\"\ncert = \"y\"\n",
                "cert and key",
            ),
            ("kind = \"etcd\"\nendpoints = [\"http://h:1\"]\nprefix = \"\"\n", "prefix"),
        ] {
            std::fs::write(&p, format!("{base}[store]\n{section}")).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(why), "{section}: {e}");
        }
        for section in [
            "kind = \"zookeeper\"\n",
            "kind = \"etcd\"\nendpoints = [\"http://h:1\"]\nbogus = 1\n",
        ] {
            std::fs::write(&p, format!("{base}[store]\n{section}")).unwrap();
            assert!(
                matches!(Config::load(&p), Err(ConfigError::Parse(..))),
                "{section}"
            );
        }
    }
}
