//! Batches of guest pages, the unit a pre-copy sends: pages read from a running machine (after
//! taking their dirty bits), all-zero pages sent as a page number alone, and a strict decoder
//! for the receiving side, which writes them into a machine that does not run yet.
//!
//! Encoding (little-endian): `count u32 | count × (page u64 | kind u8 | [4096] if kind is 1)`,
//! kind 0 an all-zero page, 1 the page's bytes; page numbers strictly increasing; at most
//! [`MAX_BATCH_PAGES`] pages.

use ftvm_abi::layout::PAGE_SIZE;

use super::StateError;
use crate::error::VmmError;
use crate::kvm::memory::GuestPages;

/// Most pages in one batch (16 MiB of page data).
pub const MAX_BATCH_PAGES: usize = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// The content of one page in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageData {
    /// All zero bytes.
    Zero,
    /// The page's bytes.
    Bytes(Box<[u8; PAGE]>),
}

/// Pages of guest memory, in increasing page order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatch {
    /// (page number, content).
    pub pages: Vec<(u64, PageData)>,
}

/// The pages of `numbers` that are not all zero in `mem` (as they read now).
pub fn pages_with_data(
    mem: &GuestPages,
    numbers: impl Iterator<Item = u64>,
) -> Result<Vec<u64>, VmmError> {
    let mut buf = [0u8; PAGE];
    let mut out = Vec::new();
    for p in numbers {
        mem.read_page(p, &mut buf)?;
        if buf.iter().any(|&b| b != 0) {
            out.push(p);
        }
    }
    Ok(out)
}

impl PageBatch {
    /// Reads the pages `numbers` yields (increasing, at most [`MAX_BATCH_PAGES`] of them are
    /// taken; the rest are left in the iterator) from `mem`.
    pub fn read(
        mem: &GuestPages,
        numbers: &mut impl Iterator<Item = u64>,
    ) -> Result<PageBatch, VmmError> {
        let mut pages = Vec::new();
        for p in numbers.by_ref() {
            let mut buf = Box::new([0u8; PAGE]);
            mem.read_page(p, &mut buf)?;
            let data = if buf.iter().all(|&b| b == 0) {
                PageData::Zero
            } else {
                PageData::Bytes(buf)
            };
            pages.push((p, data));
            if pages.len() == MAX_BATCH_PAGES {
                break;
            }
        }
        Ok(PageBatch { pages })
    }

    /// Writes every page of the batch into `mem` (a machine whose vCPU is not running).
    pub fn apply(&self, mem: &GuestPages) -> Result<(), VmmError> {
        let zero = [0u8; PAGE];
        for (p, data) in &self.pages {
            match data {
                PageData::Zero => mem.write_page(*p, &zero)?,
                PageData::Bytes(b) => mem.write_page(*p, b)?,
            }
        }
        Ok(())
    }

    /// Encodes the batch.
    pub fn encode(&self) -> Vec<u8> {
        let raw = self
            .pages
            .iter()
            .filter(|(_, d)| matches!(d, PageData::Bytes(_)))
            .count();
        let mut out = Vec::with_capacity(4 + self.pages.len() * 9 + raw * PAGE);
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for (p, data) in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
            match data {
                PageData::Zero => out.push(0),
                PageData::Bytes(b) => {
                    out.push(1);
                    out.extend_from_slice(&b[..]);
                }
            }
        }
        out
    }

    /// Decodes a batch, refusing anything [`encode`](Self::encode) would not produce: a
    /// truncated input, trailing bytes, too many pages, an unknown kind, pages out of order or
    /// repeated, a page beyond `pages` (the receiving memory's size).
    pub fn decode(buf: &[u8], pages: u64) -> Result<PageBatch, StateError> {
        let trunc = |offset: usize, what| StateError::Truncated { offset, what };
        let bad = |offset: usize, what: String| StateError::Malformed { offset, what };
        let count = buf.get(..4).ok_or(trunc(buf.len(), "page count"))?;
        let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
        if count > MAX_BATCH_PAGES {
            return Err(bad(
                0,
                format!("{count} pages in one batch (at most {MAX_BATCH_PAGES})"),
            ));
        }
        let mut at = 4;
        let mut out: Vec<(u64, PageData)> = Vec::with_capacity(count);
        for _ in 0..count {
            let head = buf.get(at..at + 9).ok_or(trunc(at, "page header"))?;
            let p = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if p >= pages {
                return Err(bad(
                    at,
                    format!("page {p} is beyond guest memory ({pages} pages)"),
                ));
            }
            if out.last().is_some_and(|&(q, _)| q >= p) {
                return Err(bad(at, format!("page {p} out of order")));
            }
            let data = match head[8] {
                0 => PageData::Zero,
                1 => {
                    let b = buf
                        .get(at + 9..at + 9 + PAGE)
                        .ok_or(trunc(at + 9, "page data"))?;
                    PageData::Bytes(Box::new(b.try_into().expect("a page")))
                }
                k => return Err(bad(at + 8, format!("unknown page kind {k}"))),
            };
            at += 9 + if matches!(data, PageData::Zero) {
                0
            } else {
                PAGE
            };
            out.push((p, data));
        }
        if at != buf.len() {
            return Err(bad(at, "trailing bytes after the last page".into()));
        }
        Ok(PageBatch { pages: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(spec: &[(u64, u8)]) -> PageBatch {
        PageBatch {
            pages: spec
                .iter()
                .map(|&(p, fill)| {
                    let d = if fill == 0 {
                        PageData::Zero
                    } else {
                        PageData::Bytes(Box::new([fill; PAGE]))
                    };
                    (p, d)
                })
                .collect(),
        }
    }

    #[test]
    fn batches_round_trip_and_zero_pages_cost_nine_bytes() {
        let b = batch(&[(0, 0), (3, 7), (4, 0), (1000, 1)]);
        let e = b.encode();
        assert_eq!(e.len(), 4 + 4 * 9 + 2 * PAGE);
        assert_eq!(PageBatch::decode(&e, 1001).unwrap(), b);
        assert_eq!(
            PageBatch::decode(&PageBatch::default().encode(), 1).unwrap(),
            PageBatch::default()
        );
    }

    #[test]
    fn bad_batches_are_refused_by_name() {
        let e = batch(&[(2, 0), (5, 9)]).encode();
        let msg = |b: &[u8], pages| PageBatch::decode(b, pages).unwrap_err().to_string();
        assert!(msg(&e, 5).contains("page 5 is beyond guest memory"));
        let mut f = e.clone();
        f[4 + 9..4 + 17].copy_from_slice(&2u64.to_le_bytes());
        assert!(msg(&f, 10).contains("page 2 out of order"));
        let mut f = e.clone();
        f[4 + 8] = 3;
        assert!(msg(&f, 10).contains("unknown page kind 3"));
        let mut f = e.clone();
        f.push(0);
        assert!(msg(&f, 10).contains("trailing bytes"));
        let f = 5000u32.to_le_bytes();
        assert!(msg(&f, 10).contains("5000 pages in one batch"));
        for n in 0..e.len() {
            assert!(matches!(
                PageBatch::decode(&e[..n], 10),
                Err(StateError::Truncated { .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let _ = PageBatch::decode(&bytes, 1 << 20);
        }

        #[test]
        fn what_decodes_encodes_back_the_same(
            mut pages in proptest::collection::vec((0u64..5000, 0u8..3), 0..6),
            at in any::<proptest::sample::Index>(),
            junk in any::<u8>(),
        ) {
            pages.sort();
            pages.dedup_by_key(|p| p.0);
            let mut e = batch(&pages).encode();
            let i = at.index(e.len());
            e[i] = junk;
            if let Ok(b) = PageBatch::decode(&e, 5000) {
                prop_assert_eq!(b.encode(), e);
            }
        }
    }
}
