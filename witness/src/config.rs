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

/// The witness configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the QUIC service listens on.
    pub listen: SocketAddr,
    /// rocksdb data directory.
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
    /// The pairs this witness arbitrates.
    pub pairs: BTreeMap<String, PairConfig>,
}

fn default_identity() -> String {
    "witness".to_string()
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
        c.validate()
            .map_err(|e| ConfigError::Invalid(path.to_path_buf(), e))?;
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
}
