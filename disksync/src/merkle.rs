//! A binary Merkle tree over block hashes and its top-down comparison.
//!
//! Level 0 holds the leaves (one per block); node `i` of level `l+1` is
//! `node_hash(level_l[2i], level_l[2i+1])`, or `level_l[2i]` itself when it has no right
//! sibling. Both sides of a comparison have the same geometry, hence the same shape.

use crate::hash::{node_hash, root_hash, Geometry, Hash};

/// A Merkle tree; `levels[0]` are the leaves, the last level has one node (or none for an
/// empty disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// Builds the tree over `leaves`.
    pub fn from_leaves(leaves: Vec<Hash>) -> Self {
        let mut t = Tree {
            levels: vec![leaves],
        };
        t.rebuild();
        t
    }

    /// Recomputes every inner node from the leaves.
    pub fn rebuild(&mut self) {
        self.levels.truncate(1);
        while self.levels.last().unwrap().len() > 1 {
            let below = self.levels.last().unwrap();
            let up: Vec<Hash> = below
                .chunks(2)
                .map(|c| {
                    if c.len() == 2 {
                        node_hash(&c[0], &c[1])
                    } else {
                        c[0]
                    }
                })
                .collect();
            self.levels.push(up);
        }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// True if the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.levels[0].is_empty()
    }

    /// Index of the top level.
    pub fn top_level(&self) -> usize {
        self.levels.len() - 1
    }

    /// The top node (all zeros for an empty tree).
    pub fn top(&self) -> Hash {
        self.levels
            .last()
            .unwrap()
            .first()
            .copied()
            .unwrap_or([0; 32])
    }

    /// The disk's root hash (top node bound to the geometry).
    pub fn root(&self, geo: Geometry) -> Hash {
        root_hash(&self.top(), geo)
    }

    /// Node `index` of `level`, if it exists.
    pub fn node(&self, level: usize, index: u64) -> Option<Hash> {
        self.levels.get(level)?.get(index as usize).copied()
    }

    /// Number of nodes on `level`.
    pub fn level_len(&self, level: usize) -> u64 {
        self.levels.get(level).map_or(0, |l| l.len() as u64)
    }

    /// The leaves.
    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }

    /// Replaces leaf `i` and updates its path to the top.
    pub fn set_leaf(&mut self, i: u64, h: Hash) {
        let mut idx = i as usize;
        self.levels[0][idx] = h;
        for l in 1..self.levels.len() {
            let below = &self.levels[l - 1];
            let left = idx & !1;
            let v = if left + 1 < below.len() {
                node_hash(&below[left], &below[left + 1])
            } else {
                below[left]
            };
            idx /= 2;
            self.levels[l][idx] = v;
        }
    }

    /// Leaves that differ between `self` and `other` (same shape required), found top-down.
    pub fn diff(&self, other: &Tree) -> Vec<u64> {
        assert_eq!(self.len(), other.len(), "trees of different shape");
        let mut w = Walker::new(self);
        while let Some((level, idx)) = w.request() {
            let remote: Vec<Hash> = idx.iter().map(|&i| other.node(level, i).unwrap()).collect();
            w.feed(self, &remote).unwrap();
        }
        w.differing().iter().map(|&(i, _)| i).collect()
    }
}

/// The top-down walk of a comparison against a remote tree of the same shape.
///
/// Ask [`Walker::request`] which remote nodes are needed, fetch their hashes, and give them
/// to [`Walker::feed`]; repeat until `request` returns `None`. Only children of differing
/// nodes are ever asked for, so the walk exchanges O(differences × log n) hashes in
/// `height + 1` rounds.
#[derive(Debug)]
pub struct Walker {
    level: usize,
    pending: Vec<u64>,
    differing: Vec<(u64, Hash)>,
    done: bool,
    exchanged: u64,
}

impl Walker {
    /// Starts at the top of `local`.
    pub fn new(local: &Tree) -> Self {
        let empty = local.is_empty();
        Walker {
            level: local.top_level(),
            pending: if empty { vec![] } else { vec![0] },
            differing: vec![],
            done: empty,
            exchanged: 0,
        }
    }

    /// The level and node indices whose remote hashes are needed next, or `None` when done.
    pub fn request(&self) -> Option<(usize, &[u64])> {
        (!self.done).then_some((self.level, &self.pending[..]))
    }

    /// Gives the remote hashes of the nodes of the last request, in order.
    pub fn feed(&mut self, local: &Tree, remote: &[Hash]) -> Result<(), String> {
        if self.done {
            return Err("walk already finished".into());
        }
        if remote.len() != self.pending.len() {
            return Err(format!(
                "expected {} hashes, got {}",
                self.pending.len(),
                remote.len()
            ));
        }
        self.exchanged += remote.len() as u64;
        let differing = self
            .pending
            .iter()
            .zip(remote)
            .filter(|(&i, r)| local.node(self.level, i).as_ref() != Some(*r));
        if self.level == 0 {
            self.differing = differing.map(|(&i, r)| (i, *r)).collect();
            self.pending.clear();
            self.done = true;
            return Ok(());
        }
        let below = local.level_len(self.level - 1);
        let next: Vec<u64> = differing
            .flat_map(|(&i, _)| [2 * i, 2 * i + 1])
            .filter(|&c| c < below)
            .collect();
        self.level -= 1;
        self.pending = next;
        if self.pending.is_empty() {
            self.done = true;
        }
        Ok(())
    }

    /// After the walk: differing leaves with the remote leaf hash, ascending.
    pub fn differing(&self) -> &[(u64, Hash)] {
        &self.differing
    }

    /// Node hashes received so far.
    pub fn exchanged(&self) -> u64 {
        self.exchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;

    fn leaves(n: u64, salt: u8) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&[i.to_le_bytes().as_slice(), &[salt]].concat()))
            .collect()
    }

    #[test]
    fn diff_finds_exactly_the_changed_leaves() {
        for n in [0u64, 1, 2, 3, 5, 8, 17, 100, 1000] {
            let a = leaves(n, 0);
            let set: Vec<u64> = (0..n).filter(|i| i % 7 == 3 || *i == n - 1).collect();
            let mut b = a.clone();
            for &i in &set {
                b[i as usize] = leaf_hash(b"changed");
            }
            let (ta, tb) = (Tree::from_leaves(a), Tree::from_leaves(b));
            assert_eq!(ta.diff(&tb), set, "n={n}");
            assert_eq!(tb.diff(&ta), set, "n={n}");
            assert!(ta.diff(&ta).is_empty());
        }
    }

    #[test]
    fn walk_exchanges_few_hashes_for_few_differences() {
        let n = 1 << 15;
        let a = leaves(n, 0);
        let mut b = a.clone();
        b[12345] = [7; 32];
        let (ta, tb) = (Tree::from_leaves(a), Tree::from_leaves(b));
        let mut w = Walker::new(&ta);
        while let Some((l, idx)) = w.request() {
            let r: Vec<Hash> = idx.iter().map(|&i| tb.node(l, i).unwrap()).collect();
            w.feed(&ta, &r).unwrap();
        }
        assert_eq!(w.differing(), &[(12345, [7; 32])]);
        assert!(w.exchanged() <= 2 * 16, "exchanged {}", w.exchanged());
    }

    #[test]
    fn set_leaf_equals_rebuild() {
        let mut t = Tree::from_leaves(leaves(37, 1));
        let mut l = t.leaves().to_vec();
        for i in [0u64, 17, 36] {
            t.set_leaf(i, [i as u8; 32]);
            l[i as usize] = [i as u8; 32];
        }
        assert_eq!(t, Tree::from_leaves(l));
    }

    #[test]
    fn root_binds_geometry() {
        let t = Tree::from_leaves(leaves(4, 0));
        let g1 = Geometry::new(4 * 4096, 4096).unwrap();
        let g2 = Geometry::new(4 * 4096 - 1, 4096).unwrap();
        assert_ne!(t.root(g1), t.root(g2));
    }
}
