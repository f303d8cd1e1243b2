//! Durable witness state in rocksdb.
//!
//! Keys: `ftvm-witness/format` → `2` (written by `--init`; a directory of format `1`, made
//! before claim ids, is upgraded to `2` when opened); `pair/<name>` → an encoded
//! [`PairState`] (see [`encode_state`]). Every grant is written with a synced WAL before its
//! reply.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::state::{ClaimId, PairState};

const FORMAT_KEY: &[u8] = b"ftvm-witness/format";
const FORMAT: &[u8] = b"2";
/// The format of directories written before claim ids: read, and upgraded on open.
const FORMAT_V1: &[u8] = b"1";
/// The newest record version this build writes and reads.
pub const RECORD_VERSION: u8 = 2;
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
    /// The data directory was written by a newer witness.
    #[error("data directory {path} has format {format:?}, which this ftvm-witness does not know (it reads 1 and 2): use a newer ftvm-witness")]
    UnsupportedFormat {
        /// The directory.
        path: PathBuf,
        /// Its format marker.
        format: String,
    },
    /// A pair's record was written by a newer witness.
    #[error("the state of pair {pair:?} is a version {version} record, which this ftvm-witness does not know (it reads 1 and {RECORD_VERSION}): use a newer ftvm-witness")]
    UnsupportedRecord {
        /// The pair.
        pair: String,
        /// The record's version byte.
        version: u8,
    },
    /// A stored value could not be decoded.
    #[error("corrupt state for pair {pair:?}: {what}")]
    Corrupt {
        /// The pair whose value is bad.
        pair: String,
        /// What is wrong.
        what: &'static str,
    },
    /// The store could not be reached or did not commit in time (etcd: no quorum, every
    /// member unreachable, a timeout). Nothing is known to be decided; the request may be
    /// retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The etcd prefix holds no witness state and `--init` was not given.
    #[error("etcd {0} holds no ftvm-witness state; run `serve --init` once (one witness of the group) to create it")]
    EtcdNotInitialized(String),
    /// `--init` was given but the etcd prefix already holds witness state.
    #[error("etcd {0} already holds ftvm-witness state; drop --init to use it")]
    EtcdAlreadyInitialized(String),
    /// The etcd store is not part of this build.
    #[error("this ftvm-witness was built without the etcd store (cargo feature `etcd`)")]
    EtcdNotBuilt,
    /// etcd answered something this witness cannot use (a bad configuration, a refused
    /// request, a certificate that cannot be read, ...).
    #[error("etcd: {0}")]
    Etcd(String),
    /// rocksdb failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// A filesystem error.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl StoreError {
    /// Whether the failure is transient: nothing is known to be decided, the store may work
    /// again (etcd unreachable or without quorum). Other failures stop the decider.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
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

/// Encodes a pair state as stored (record version 2): the version byte `2`, the generation
/// as a big-endian `u64`, the holder as a presence byte (0/1) and, when present, a length byte
/// and the name, then the claim id as a presence byte and, when present, its 16 bytes.
///
/// Version 1 records (written before claim ids) have no claim id field; they are still read,
/// with no claim id, so a grant they record is never repeated.
pub fn encode_state(s: &PairState) -> Vec<u8> {
    let mut v = Vec::with_capacity(48);
    v.push(RECORD_VERSION);
    v.extend_from_slice(&s.generation.to_be_bytes());
    match &s.holder {
        None => v.push(0),
        Some(h) => {
            v.push(1);
            v.push(h.len().min(255) as u8);
            v.extend_from_slice(&h.as_bytes()[..h.len().min(255)]);
        }
    }
    match &s.claim_id {
        None => v.push(0),
        Some(c) => {
            v.push(1);
            v.extend_from_slice(&c.0);
        }
    }
    v
}

/// Decodes a stored pair state (record version 1 or 2).
pub fn decode_state(pair: &str, b: &[u8]) -> Result<PairState, StoreError> {
    let corrupt = |what| StoreError::Corrupt {
        pair: pair.to_string(),
        what,
    };
    let version = *b.first().ok_or(corrupt("empty record"))?;
    if version == 0 {
        return Err(corrupt("record version 0"));
    }
    if version > RECORD_VERSION {
        return Err(StoreError::UnsupportedRecord {
            pair: pair.to_string(),
            version,
        });
    }
    if b.len() < 10 {
        return Err(corrupt("record too short"));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&b[1..9]);
    let generation = u64::from_be_bytes(g);
    let (holder, rest) = match b[9] {
        0 => (None, &b[10..]),
        1 if b.len() >= 11 && b.len() >= 11 + b[10] as usize => {
            let end = 11 + b[10] as usize;
            let name = String::from_utf8(b[11..end].to_vec())
                .map_err(|_| corrupt("holder is not UTF-8"))?;
            (Some(name), &b[end..])
        }
        _ => return Err(corrupt("bad holder")),
    };
    let claim_id = match (version, rest) {
        (1, []) => None,
        (2, [0]) => None,
        (2, [1, id @ ..]) if id.len() == ClaimId::LEN => {
            let mut c = [0u8; ClaimId::LEN];
            c.copy_from_slice(id);
            Some(ClaimId(c))
        }
        _ => return Err(corrupt("bad claim id or trailing bytes")),
    };
    if holder.is_none() != claim_id.is_none() && version == 2 {
        return Err(corrupt(
            "a claim id without a holder, or a holder without a claim id",
        ));
    }
    Ok(PairState {
        generation,
        holder,
        claim_id,
    })
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
            Some(v) if v == FORMAT => {}
            Some(v) if v == FORMAT_V1 => {
                // Version 1 records stay readable; new ones are version 2. Mark the directory
                // so that an older witness refuses it instead of misreading new records.
                let mut w = rocksdb::WriteOptions::default();
                w.set_sync(true);
                db.put_opt(FORMAT_KEY, FORMAT, &w)?;
                tracing::info!(event = "upgraded", path = %path.display(), "data directory upgraded from format 1 to 2 (claim ids)");
            }
            Some(v) => {
                return Err(StoreError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    format: String::from_utf8_lossy(&v).into_owned(),
                })
            }
            None => return Err(StoreError::NotInitialized(path.to_path_buf())),
        }
        Ok(Store {
            db,
            path: path.to_path_buf(),
        })
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
            claim_id: h.map(|h| ClaimId([h.len() as u8; 16])),
        }
    }

    /// A record as the witness wrote it before claim ids (record version 1).
    fn v1_record(g: u64, h: Option<&str>) -> Vec<u8> {
        let mut v = vec![1];
        v.extend_from_slice(&g.to_be_bytes());
        match h {
            None => v.push(0),
            Some(h) => {
                v.push(1);
                v.push(h.len() as u8);
                v.extend_from_slice(h.as_bytes());
            }
        }
        v
    }

    #[test]
    fn state_codec_round_trips_and_rejects_garbage() {
        for s in [st(0, None), st(5, Some("node-a")), st(u64::MAX, Some("x"))] {
            assert_eq!(decode_state("p", &encode_state(&s)).unwrap(), s);
        }
        let good = encode_state(&st(5, Some("node-a")));
        assert_eq!(good.len(), 1 + 8 + 1 + 1 + 6 + 1 + 16);
        for n in 0..good.len() {
            assert!(decode_state("p", &good[..n]).is_err());
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(decode_state("p", &extra).is_err());
        // A holder without a claim id is not a version 2 record.
        let half = PairState {
            claim_id: None,
            ..st(5, Some("node-a"))
        };
        assert!(matches!(
            decode_state("p", &encode_state(&half)),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn old_records_are_read_without_claim_id_and_newer_ones_refused() {
        for (g, h) in [(0, None), (7, Some("node-b"))] {
            assert_eq!(
                decode_state("p", &v1_record(g, h)).unwrap(),
                PairState {
                    generation: g,
                    holder: h.map(String::from),
                    claim_id: None
                }
            );
        }
        let mut v3 = encode_state(&st(1, Some("a")));
        v3[0] = 3;
        let e = decode_state("p", &v3).unwrap_err();
        assert!(matches!(
            e,
            StoreError::UnsupportedRecord { version: 3, .. }
        ));
        assert!(e.to_string().contains("use a newer ftvm-witness"), "{e}");
        let mut v1_extra = v1_record(7, Some("node-b"));
        v1_extra.push(0);
        assert!(decode_state("p", &v1_extra).is_err());
    }

    #[test]
    fn a_format_1_directory_is_upgraded_and_its_records_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db");
        {
            // What a witness before claim ids left behind.
            let mut opts = rocksdb::Options::default();
            opts.create_if_missing(true);
            let db = rocksdb::DB::open(&opts, &p).unwrap();
            db.put(FORMAT_KEY, FORMAT_V1).unwrap();
            db.put(b"pair/vm1", v1_record(3, Some("node-a"))).unwrap();
        }
        let s = Store::open(&p, false).unwrap();
        let m = s.load().unwrap();
        assert_eq!(
            m["vm1"],
            PairState {
                generation: 3,
                holder: Some("node-a".into()),
                claim_id: None
            }
        );
        s.write_synced(&[("vm2".into(), st(1, Some("b")))]).unwrap();
        drop(s);
        let s = Store::open(&p, false).unwrap();
        assert_eq!(s.db.get(FORMAT_KEY).unwrap().as_deref(), Some(FORMAT));
        assert_eq!(s.load().unwrap().len(), 2);
        s.db.put(FORMAT_KEY, b"9").unwrap();
        drop(s);
        let e = Store::open(&p, false).unwrap_err();
        assert!(
            matches!(&e, StoreError::UnsupportedFormat { format, .. } if format == "9"),
            "{e}"
        );
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
