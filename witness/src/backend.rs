//! The state stores behind one trait: the embedded rocksdb store ([`crate::store::Store`]),
//! owned by one witness process, and the etcd store ([`crate::etcd::EtcdStore`]), which several
//! witness processes may share.
//!
//! The decider (see [`crate::server`]) decides with the pure state machine against the states
//! it last read, then calls [`StateStore::commit`] with the versions it read and the new states
//! of its grants. A **shared** store commits only if no pair changed since (etcd: one
//! transaction comparing every pair key's revision); otherwise it returns the current states
//! and the decider decides again. An **exclusive** store (rocksdb: its lock file keeps other
//! processes out) never conflicts, and is asked nothing for denials and status queries.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::StoreConfig;
use crate::state::PairState;
use crate::store::{Store, StoreError};

/// A pair's state and the store's version of it (etcd: the key's modification revision, 0 for
/// a pair never written; rocksdb: always 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versioned {
    /// The state.
    pub state: PairState,
    /// The store's version of it.
    pub version: u64,
}

/// What [`StateStore::commit`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Every expected version held and every write is durable: the new versions of the
    /// written pairs.
    Done(BTreeMap<String, u64>),
    /// A pair changed since it was read (only a shared store): nothing was written; the
    /// current states of the expected pairs.
    Conflict(BTreeMap<String, Versioned>),
}

/// A durable home for the pairs' states.
pub trait StateStore: Send {
    /// `rocksdb` or `etcd`.
    fn kind(&self) -> &'static str;

    /// Where the state lives, for logs and errors.
    fn describe(&self) -> String;

    /// Whether other witness processes may change the state (then every decision is confirmed
    /// by [`StateStore::commit`]).
    fn shared(&self) -> bool;

    /// Most requests decided in one commit.
    fn max_batch(&self) -> usize;

    /// Every stored pair state.
    fn load(&mut self) -> Result<BTreeMap<String, Versioned>, StoreError>;

    /// Atomically: if every `(pair, version)` of `expect` still holds, makes `writes` durable
    /// (before returning) and returns their new versions; otherwise writes nothing and returns
    /// the current states of the `expect` pairs. An exclusive store ignores `expect`.
    ///
    /// A transient error ([`StoreError::is_transient`]) leaves the outcome unknown: the writes
    /// may or may not have been made.
    fn commit(
        &mut self,
        expect: &[(String, u64)],
        writes: &[(String, PairState)],
    ) -> Result<Commit, StoreError>;

    /// The QUIC stateless-reset key (32 bytes, created on first use and kept).
    fn reset_key(&mut self) -> Result<Vec<u8>, StoreError>;
}

impl StateStore for Store {
    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn describe(&self) -> String {
        format!("rocksdb {}", self.path().display())
    }

    fn shared(&self) -> bool {
        false
    }

    fn max_batch(&self) -> usize {
        256
    }

    fn load(&mut self) -> Result<BTreeMap<String, Versioned>, StoreError> {
        Ok(Store::load(self)?
            .into_iter()
            .map(|(p, state)| (p, Versioned { state, version: 0 }))
            .collect())
    }

    fn commit(
        &mut self,
        _expect: &[(String, u64)],
        writes: &[(String, PairState)],
    ) -> Result<Commit, StoreError> {
        if !writes.is_empty() {
            self.write_synced(writes)?;
        }
        Ok(Commit::Done(
            writes.iter().map(|(p, _)| (p.clone(), 0)).collect(),
        ))
    }

    fn reset_key(&mut self) -> Result<Vec<u8>, StoreError> {
        Store::reset_key(self)
    }
}

/// Opens the store `config` chooses (rocksdb in `data_dir`, or etcd), creating it with `init`.
/// Blocking; must not run on a tokio worker thread (the etcd store runs its own runtime).
pub fn open(
    config: &StoreConfig,
    data_dir: &Path,
    init: bool,
) -> Result<Box<dyn StateStore>, StoreError> {
    match config {
        StoreConfig::Rocksdb => Ok(Box::new(Store::open(data_dir, init)?)),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(e) => Ok(Box::new(crate::etcd::EtcdStore::open(e, init)?)),
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => Err(StoreError::EtcdNotBuilt),
    }
}
