//! The keyspace: typed values, expiry deadlines and the deterministic random source.
//!
//! Everything is `BTreeMap`/`BTreeSet`/`VecDeque` based, so iteration order depends only on
//! the data, never on a hash seed: two replicas fed the same commands hold the same bytes.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::cmp::Ordering;

/// A sorted-set score with a total order (NaN is never stored; `-0.0` is stored as `0.0`).
#[derive(Clone, Copy, Debug)]
pub struct Score(pub f64);

impl PartialEq for Score {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A sorted set: members ordered by (score, member), as in Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZSet {
    by_member: BTreeMap<Vec<u8>, Score>,
    by_score: BTreeSet<(Score, Vec<u8>)>,
}

impl ZSet {
    /// Number of members.
    pub fn len(&self) -> usize {
        self.by_member.len()
    }
    /// Whether the set has no members.
    pub fn is_empty(&self) -> bool {
        self.by_member.is_empty()
    }
    /// The score of `member`, if present.
    pub fn score(&self, member: &[u8]) -> Option<f64> {
        self.by_member.get(member).map(|s| s.0)
    }
    /// Sets `member`'s score; returns true if the member is new. `score` must not be NaN.
    pub fn insert(&mut self, member: &[u8], score: f64) -> bool {
        let score = Score(if score == 0.0 { 0.0 } else { score });
        match self.by_member.get_mut(member) {
            Some(old) => {
                if *old != score {
                    self.by_score.remove(&(*old, member.to_vec()));
                    self.by_score.insert((score, member.to_vec()));
                    *old = score;
                }
                false
            }
            None => {
                self.by_member.insert(member.to_vec(), score);
                self.by_score.insert((score, member.to_vec()));
                true
            }
        }
    }
    /// Removes `member`; returns true if it was present.
    pub fn remove(&mut self, member: &[u8]) -> bool {
        match self.by_member.remove(member) {
            Some(s) => {
                self.by_score.remove(&(s, member.to_vec()));
                true
            }
            None => false,
        }
    }
    /// Removes and returns the member with the lowest (`max == false`) or highest score.
    pub fn pop(&mut self, max: bool) -> Option<(Vec<u8>, f64)> {
        let (s, m) = if max {
            self.by_score.pop_last()?
        } else {
            self.by_score.pop_first()?
        };
        self.by_member.remove(&m);
        Some((m, s.0))
    }
    /// Members with scores in rank order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&[u8], f64)> + ExactSizeIterator {
        self.by_score.iter().map(|(s, m)| (m.as_slice(), s.0))
    }
}

/// A value held by a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A string (also used for integers, as in Redis).
    Str(Vec<u8>),
    /// A list.
    List(VecDeque<Vec<u8>>),
    /// A hash of field → value.
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    /// A set.
    Set(BTreeSet<Vec<u8>>),
    /// A sorted set.
    ZSet(ZSet),
}

impl Value {
    /// The name `TYPE` reports for this value.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Hash(_) => "hash",
            Value::Set(_) => "set",
            Value::ZSet(_) => "zset",
        }
    }
    /// Whether this is an empty container (such keys are deleted, as in Redis).
    pub fn is_empty_container(&self) -> bool {
        match self {
            Value::Str(_) => false,
            Value::List(l) => l.is_empty(),
            Value::Hash(h) => h.is_empty(),
            Value::Set(s) => s.is_empty(),
            Value::ZSet(z) => z.is_empty(),
        }
    }
}

/// One key's value and optional expiry deadline (milliseconds on the caller's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// When the key disappears, if ever.
    pub expires_at: Option<u64>,
}

/// The whole data set (one database, number 0) plus the random source used by SPOP.
///
/// Commands are run with [`Store::execute`](crate::commands) (see the `commands` module);
/// this type holds the data and the keyspace primitives the commands are built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    keys: BTreeMap<Vec<u8>, Entry>,
    /// (deadline, key) for every key with an expiry, so expired keys can be removed in
    /// deadline order.
    expiries: BTreeSet<(u64, Vec<u8>)>,
    rng: u64,
    /// Commands executed since start (for INFO).
    pub(crate) commands_processed: u64,
    /// When the store was created, on the caller's clock (for INFO uptime).
    pub(crate) started_ms: u64,
    /// Number of connected clients, as last told by the caller (for INFO).
    pub(crate) connected_clients: u64,
}

impl Store {
    /// An empty store whose random source starts from `seed` (give it entropy from the
    /// VMM; its only use is choosing SPOP's victims, which the log records explicitly).
    pub fn new(seed: u64) -> Self {
        Store {
            keys: BTreeMap::new(),
            expiries: BTreeSet::new(),
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            commands_processed: 0,
            started_ms: 0,
            connected_clients: 0,
        }
    }

    /// Mixes fresh entropy into the random source.
    pub fn reseed(&mut self, entropy: u64) {
        self.rng ^= entropy;
        self.next_random();
    }

    /// Records the caller's clock at start-up, for INFO's uptime.
    pub fn set_started_ms(&mut self, now_ms: u64) {
        self.started_ms = now_ms;
    }

    /// Tells the store how many clients are connected, for INFO.
    pub fn set_connected_clients(&mut self, n: u64) {
        self.connected_clients = n;
    }

    /// Next value of the SplitMix64 sequence.
    pub fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Removes every key whose deadline is at or before `now_ms`. The command engine calls
    /// this before each command, so an expired key is never visible.
    pub fn expire_due(&mut self, now_ms: u64) {
        while let Some((t, _)) = self.expiries.first() {
            if *t > now_ms {
                break;
            }
            if let Some((_, k)) = self.expiries.pop_first() {
                self.keys.remove(&k);
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys with an expiry.
    pub fn expiring(&self) -> usize {
        self.expiries.len()
    }

    /// The entry of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.keys.get(key)
    }

    /// Mutable access to the value of `key`, if present. If the caller empties a
    /// container it must call [`Store::remove_if_empty`].
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Value> {
        self.keys.get_mut(key).map(|e| &mut e.value)
    }

    /// Stores `value` under `key`, keeping (`keep_ttl`) or clearing its expiry.
    pub fn insert(&mut self, key: &[u8], value: Value, keep_ttl: bool) {
        match self.keys.get_mut(key) {
            Some(e) => {
                e.value = value;
                if !keep_ttl {
                    if let Some(t) = e.expires_at.take() {
                        self.expiries.remove(&(t, key.to_vec()));
                    }
                }
            }
            None => {
                self.keys.insert(
                    key.to_vec(),
                    Entry {
                        value,
                        expires_at: None,
                    },
                );
            }
        }
    }

    /// The value of `key`, created with `make` if the key is missing.
    pub fn get_or_insert(&mut self, key: &[u8], make: impl FnOnce() -> Value) -> &mut Value {
        if !self.keys.contains_key(key) {
            self.keys.insert(
                key.to_vec(),
                Entry {
                    value: make(),
                    expires_at: None,
                },
            );
        }
        match self.keys.get_mut(key) {
            Some(e) => &mut e.value,
            None => unreachable!("inserted above"),
        }
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        match self.keys.remove(key) {
            Some(e) => {
                if let Some(t) = e.expires_at {
                    self.expiries.remove(&(t, key.to_vec()));
                }
                true
            }
            None => false,
        }
    }

    /// Removes `key` if it holds an empty container.
    pub fn remove_if_empty(&mut self, key: &[u8]) {
        if self
            .keys
            .get(key)
            .is_some_and(|e| e.value.is_empty_container())
        {
            self.remove(key);
        }
    }

    /// Sets or clears the expiry deadline of an existing key; returns false if the key does
    /// not exist.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>) -> bool {
        let Some(e) = self.keys.get_mut(key) else {
            return false;
        };
        if let Some(old) = e.expires_at.take() {
            self.expiries.remove(&(old, key.to_vec()));
        }
        if let Some(t) = at {
            e.expires_at = Some(t);
            self.expiries.insert((t, key.to_vec()));
        }
        true
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.expiries.clear();
    }

    /// All keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.keys().map(|k| k.as_slice())
    }

    /// All entries in key order (for comparing stores in tests and digests).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.keys.iter().map(|(k, e)| (k.as_slice(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_index() {
        let mut s = Store::new(1);
        s.insert(b"a", Value::Str(b"1".to_vec()), false);
        s.insert(b"b", Value::Str(b"2".to_vec()), false);
        assert!(s.set_expiry(b"a", Some(100)));
        assert!(!s.set_expiry(b"zz", Some(100)));
        s.expire_due(99);
        assert_eq!(s.len(), 2);
        s.insert(b"a", Value::Str(b"3".to_vec()), true);
        s.expire_due(100);
        assert_eq!(s.len(), 1);
        assert_eq!(s.expiring(), 0);
        s.set_expiry(b"b", Some(5));
        s.insert(b"b", Value::Str(b"4".to_vec()), false);
        assert_eq!(s.expiring(), 0);
        s.expire_due(1000);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn zset_order() {
        let mut z = ZSet::default();
        assert!(z.insert(b"b", 2.0));
        assert!(z.insert(b"a", 2.0));
        assert!(z.insert(b"c", -0.0));
        assert!(!z.insert(b"b", 0.5));
        let v: Vec<_> = z.iter().map(|(m, _)| m.to_vec()).collect();
        assert_eq!(v, [b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]);
        assert_eq!(z.pop(false), Some((b"c".to_vec(), 0.0)));
        assert_eq!(z.pop(true), Some((b"a".to_vec(), 2.0)));
        assert!(z.remove(b"b"));
        assert!(z.is_empty());
    }
}
