//! Durable witness state in rocksdb.
//!
//! Keys: `ftvm-witness/format` → `1` (written once by `--init`); `pair/<name>` → an encoded
//! [`PairState`] (`1` version byte, generation as big-endian `u64`, holder as a presence byte
//! and a length-prefixed name). Every grant is written with a synced WAL before its reply.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::state::PairState;

const FORMAT_KEY: &[u8] = b"ftvm-witness/format";
const FORMAT: &[u8] = b"1";
const PAIR_PREFIX: &[u8] = b"pair/";
const RESET_KEY: &[u8] = b"ftvm-witness/reset-key";

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory does not exist and `--init` was not given.
    #[error("data directory {0} does not exist; run `serve --init` once to create it")]
    Missing(PathBuf),
    /// `--init` was given but the directory already holds witness state.
    #[error("data directory {0} already holds witness state; drop --init to use it")]
    AlreadyInitialized(PathBuf),
    /// `--init` was given for a non-empty directory that is not a witness database.
    #[error("data directory {0} is not empty; --init needs a new or empty directory")]
    NotEmpty(PathBuf),
    /// The directory is not a witness database (never initialised, or another program's).
    #[error("{0} is not an initialised ftvm-witness data directory")]
    NotInitialized(PathBuf),
    /// A stored value could not be decoded.
    #[error("corrupt state for pair {pair:?}: {what}")]
    Corrupt {
        /// The pair whose value is bad.
        pair: String,
        /// What is wrong.
        what: &'static str,
    },
    /// rocksdb failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// A filesystem error.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The rocksdb-backed store.
pub struct Store {
    db: rocksdb::DB,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Encodes a pair state as stored.
pub fn encode_state(s: &PairState) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.push(1);
    v.extend_from_slice(&s.generation.to_be_bytes());
    match &s.holder {
        None => v.push(0),
        Some(h) => {
            v.push(1);
            v.push(h.len().min(255) as u8);
            v.extend_from_slice(&h.as_bytes()[..h.len().min(255)]);
        }
    }
    v
}

/// Decodes a stored pair state.
pub fn decode_state(pair: &str, b: &[u8]) -> Result<PairState, StoreError> {
    let corrupt = |what| StoreError::Corrupt {
        pair: pair.to_string(),
        what,
    };
    if b.len() < 10 || b[0] != 1 {
        return Err(corrupt("bad length or version"));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&b[1..9]);
    let generation = u64::from_be_bytes(g);
    let holder = match b[9] {
        0 if b.len() == 10 => None,
        1 if b.len() >= 11 && b.len() == 11 + b[10] as usize => {
            Some(String::from_utf8(b[11..].to_vec()).map_err(|_| corrupt("holder is not UTF-8"))?)
        }
        _ => return Err(corrupt("bad holder")),
    };
    Ok(PairState { generation, holder })
}

fn dir_is_empty(p: &Path) -> Result<bool, StoreError> {
    let mut rd = std::fs::read_dir(p).map_err(|e| StoreError::Io(p.to_path_buf(), e))?;
    Ok(rd.next().is_none())
}

impl Store {
    /// Opens the store in `path`. With `init`, creates a new store (the directory must not
    /// exist or be empty); without it, the directory must hold an initialised store.
    pub fn open(path: &Path, init: bool) -> Result<Store, StoreError> {
        let exists = path.exists();
        let mut opts = rocksdb::Options::default();
        opts.set_keep_log_file_num(4);
        if init {
            if exists && !dir_is_empty(path)? {
                // Distinguish "already a witness db" from "some other directory".
                if let Ok(s) = Store::open(path, false) {
                    drop(s);
                    return Err(StoreError::AlreadyInitialized(path.to_path_buf()));
                }
                return Err(StoreError::NotEmpty(path.to_path_buf()));
            }
            std::fs::create_dir_all(path).map_err(|e| StoreError::Io(path.to_path_buf(), e))?;
            opts.create_if_missing(true);
            opts.set_error_if_exists(true);
            let db = rocksdb::DB::open(&opts, path)?;
            let mut w = rocksdb::WriteOptions::default();
            w.set_sync(true);
            db.put_opt(FORMAT_KEY, FORMAT, &w)?;
            return Ok(Store {
                db,
                path: path.to_path_buf(),
            });
        }
        if !exists {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        // rocksdb leaves a LOG file behind even when it fails to open: check first that
        // this looks like a database so that an operator's directory is never touched.
        if !path.join("CURRENT").is_file() {
            return Err(StoreError::NotInitialized(path.to_path_buf()));
        }
        opts.create_if_missing(false);
        let db = rocksdb::DB::open(&opts, path)
            .map_err(|_| StoreError::NotInitialized(path.to_path_buf()))?;
        match db.get(FORMAT_KEY)? {
            Some(v) if v == FORMAT => Ok(Store {
                db,
                path: path.to_path_buf(),
            }),
            _ => Err(StoreError::NotInitialized(path.to_path_buf())),
        }
    }

    /// Every stored pair state.
    pub fn load(&self) -> Result<BTreeMap<String, PairState>, StoreError> {
        let mut out = BTreeMap::new();
        let it = self.db.iterator(rocksdb::IteratorMode::From(
            PAIR_PREFIX,
            rocksdb::Direction::Forward,
        ));
        for kv in it {
            let (k, v) = kv?;
            if !k.starts_with(PAIR_PREFIX) {
                break;
            }
            let pair = String::from_utf8_lossy(&k[PAIR_PREFIX.len()..]).into_owned();
            let st = decode_state(&pair, &v)?;
            out.insert(pair, st);
        }
        Ok(out)
    }

    /// Writes new pair states atomically, with the WAL synced to disk before returning.
    pub fn write_synced(&self, states: &[(String, PairState)]) -> Result<(), StoreError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (pair, st) in states {
            let mut k = PAIR_PREFIX.to_vec();
            k.extend_from_slice(pair.as_bytes());
            batch.put(k, encode_state(st));
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.db.write_opt(batch, &w)?;
        Ok(())
    }

    /// The QUIC stateless-reset key of this witness: 32 random bytes created on first use and
    /// kept, so that a restarted witness can reset the connections of its previous life.
    pub fn reset_key(&self) -> Result<Vec<u8>, StoreError> {
        if let Some(k) = self.db.get(RESET_KEY)? {
            if k.len() >= 32 {
                return Ok(k);
            }
        }
        let mut k = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).map_err(|_| {
            StoreError::Corrupt {
                pair: String::new(),
                what: "no system randomness for the reset key",
            }
        })?;
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.db.put_opt(RESET_KEY, &k, &w)?;
        Ok(k)
    }

    /// The directory of the store.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(g: u64, h: Option<&str>) -> PairState {
        PairState {
            generation: g,
            holder: h.map(String::from),
        }
    }

    #[test]
    fn state_codec_round_trips_and_rejects_garbage() {
        for s in [st(0, None), st(5, Some("node-a")), st(u64::MAX, Some("x"))] {
            assert_eq!(decode_state("p", &encode_state(&s)).unwrap(), s);
        }
        let good = encode_state(&st(5, Some("node-a")));
        for n in 0..good.len() {
            assert!(decode_state("p", &good[..n]).is_err());
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(decode_state("p", &extra).is_err());
    }

    #[test]
    fn open_rules_and_persistence() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db");
        assert!(matches!(
            Store::open(&p, false),
            Err(StoreError::Missing(_))
        ));
        {
            let s = Store::open(&p, true).unwrap();
            assert!(s.load().unwrap().is_empty());
            s.write_synced(&[("p".into(), st(1, Some("a")))]).unwrap();
            s.write_synced(&[
                ("p".into(), st(2, Some("b"))),
                ("q".into(), st(1, Some("c"))),
            ])
            .unwrap();
        }
        assert!(matches!(
            Store::open(&p, true),
            Err(StoreError::AlreadyInitialized(_))
        ));
        let s = Store::open(&p, false).unwrap();
        let k = s.reset_key().unwrap();
        assert_eq!(k.len(), 32);
        assert_eq!(s.reset_key().unwrap(), k);
        let m = s.load().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["p"], st(2, Some("b")));
        assert_eq!(m["q"], st(1, Some("c")));

        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("file"), b"x").unwrap();
        assert!(matches!(
            Store::open(&other, true),
            Err(StoreError::NotEmpty(_))
        ));
        assert!(matches!(
            Store::open(&other, false),
            Err(StoreError::NotInitialized(_))
        ));
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(
            Store::open(&empty, false),
            Err(StoreError::NotInitialized(_))
        ));
        Store::open(&empty, true).unwrap();
    }
}
