//! The one dirty-page tracker of a VM (DESIGN §5): reading KVM's dirty log is destructive, and
//! so is reading the bitmap of pages the VMM wrote, so exactly one place reads them — this
//! tracker — and ORs what it read into a private bitmap per consumer (the memory digest,
//! pre-copy of a join, …). A consumer taking its pages clears only its own bitmap; no consumer
//! can steal another's bits.
//!
//! The tracker is `Sync`: a consumer may take its pages from another thread while the vCPU
//! runs (pre-copy), since `KVM_GET_DIRTY_LOG` works on a running VM.
//!
//! KVM's dirty log is on only while the tracker has a consumer: the first one to subscribe
//! turns it on, the last one to go turns it off. Under PVM a dirty-logged slot costs the guest
//! a write-protect fault for each page it writes after each read of the log, and 4 KiB
//! mappings throughout (measured: a third of the pair's CPU per request at `-P 1`); memory
//! digests hash every page instead (`replay::digest`), so only a join's pre-copy pays it.

use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::VmFd;

use crate::error::VmmError;
use crate::kvm::memory::{GuestMemory, Mmap};

/// Where a new consumer's record of dirty pages starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Pages written from now on (possibly a few written just before: never fewer).
    Now,
    /// Every page of guest memory is reported dirty once, then pages written from now on (the
    /// first round of a pre-copy).
    Everything,
}

/// A set of guest pages: bit `p % 64` of word `p / 64` is page `p`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// No page of a memory of `pages` pages.
    pub fn none(pages: u64) -> Self {
        DirtyPages {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every page of a memory of `pages` pages.
    pub fn all(pages: u64) -> Self {
        let mut d = Self::none(pages);
        for p in 0..pages {
            d.insert(p);
        }
        d
    }

    /// Adds page `p` (ignored beyond the memory's end).
    pub fn insert(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Whether page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The pages in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages;
        self.words.iter().enumerate().flat_map(move |(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let p = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(p)
            })
            .filter(move |&p| p < pages)
        })
    }

    /// Adds every page of `words` (a bitmap in the same layout).
    fn or_words(&mut self, words: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= b;
        }
    }
}

/// The dirty-page tracker of one VM's memory slot.
pub struct DirtyTracker {
    vm: Arc<VmFd>,
    mmap: Mmap,
    size: u64,
    pages: u64,
    consumers: Mutex<Vec<Option<DirtyPages>>>,
}

impl DirtyTracker {
    /// A tracker for `mem`, which must be registered in `vm` as tracked. KVM's dirty log
    /// stays off until the first consumer subscribes.
    pub fn new(vm: Arc<VmFd>, mem: &GuestMemory) -> Result<Arc<Self>, VmmError> {
        if !mem.tracked() {
            return Err(crate::kvm::memory::MemoryError::NotTracked.into());
        }
        Ok(Arc::new(DirtyTracker {
            vm,
            mmap: mem.mmap().clone(),
            size: mem.size(),
            pages: mem.pages(),
            consumers: Mutex::new(Vec::new()),
        }))
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Reads both logs (KVM's: pages the guest wrote; vm-memory's: pages the VMM wrote) and
    /// ORs them into every consumer. With no consumer the logs are left unread.
    fn harvest(&self, consumers: &mut [Option<DirtyPages>]) -> Result<(), VmmError> {
        if consumers.iter().all(Option::is_none) {
            return Ok(());
        }
        let kvm = self
            .vm
            .get_dirty_log(crate::kvm::memory::RAM_SLOT, self.size as usize)
            .map_err(|e| VmmError::Kvm("KVM_GET_DIRTY_LOG", e))?;
        let vmm = crate::kvm::memory::take_vmm_dirty(&self.mmap)?;
        for c in consumers.iter_mut().flatten() {
            c.or_words(&kvm);
            c.or_words(&vmm);
        }
        Ok(())
    }

    /// Adds a consumer whose record starts as `since` says.
    pub fn subscribe(self: &Arc<Self>, since: Since) -> Result<DirtyConsumer, VmmError> {
        let mut cs = self
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cs.iter().all(Option::is_none) {
            // The first consumer: KVM logs from here on (what the guest wrote before is in
            // nobody's record, and a new consumer wants only what comes next or everything).
            self.set_kvm_log(true)?;
        } else {
            // What was written so far belongs to the existing consumers.
            self.harvest(&mut cs)?;
        }
        let start = match since {
            Since::Now => DirtyPages::none(self.pages),
            Since::Everything => DirtyPages::all(self.pages),
        };
        let slot = match cs.iter().position(Option::is_none) {
            Some(i) => {
                cs[i] = Some(start);
                i
            }
            None => {
                cs.push(Some(start));
                cs.len() - 1
            }
        };
        Ok(DirtyConsumer {
            tracker: self.clone(),
            slot,
        })
    }

    /// Turns KVM's dirty log on or off (under the consumers' lock).
    fn set_kvm_log(&self, on: bool) -> Result<(), VmmError> {
        crate::kvm::memory::set_slot(&self.vm, &self.mmap, self.size, on)?;
        tracing::debug!(on, "KVM dirty log");
        Ok(())
    }

    /// Number of consumers subscribed.
    pub fn consumers(&self) -> usize {
        self.consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .count()
    }
}

/// One consumer of a [`DirtyTracker`]; unsubscribes when dropped.
pub struct DirtyConsumer {
    tracker: Arc<DirtyTracker>,
    slot: usize,
}

impl DirtyConsumer {
    /// The pages written since this consumer's last `take` (or since it subscribed), clearing
    /// its record; other consumers keep theirs.
    pub fn take(&self) -> Result<DirtyPages, VmmError> {
        let t = &self.tracker;
        let mut cs = t.consumers.lock().unwrap_or_else(PoisonError::into_inner);
        t.harvest(&mut cs)?;
        let mine = cs[self.slot]
            .as_mut()
            .expect("a live consumer keeps its slot");
        Ok(std::mem::replace(mine, DirtyPages::none(t.pages)))
    }

    /// The pages written since this consumer's last `take`, without clearing its record (a
    /// pre-copy skips a page written again since its round began: the next round sends it).
    pub fn peek(&self) -> Result<DirtyPages, VmmError> {
        let t = &self.tracker;
        let mut cs = t.consumers.lock().unwrap_or_else(PoisonError::into_inner);
        t.harvest(&mut cs)?;
        Ok(cs[self.slot]
            .as_ref()
            .expect("a live consumer keeps its slot")
            .clone())
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }
}

impl Drop for DirtyConsumer {
    fn drop(&mut self) {
        let mut cs = self
            .tracker
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bits harvested for this consumer alone are simply dropped with it.
        cs[self.slot] = None;
        if cs.iter().all(Option::is_none) {
            // The last one: the guest goes back to large pages and no write faults. Should
            // KVM refuse, the log stays on, which costs speed, not correctness.
            if let Err(e) = self.tracker.set_kvm_log(false) {
                tracing::warn!("turning KVM's dirty log off: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets() {
        let mut d = DirtyPages::none(130);
        assert!(d.is_empty());
        for p in [0, 63, 64, 129, 130, 5000] {
            d.insert(p);
        }
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(d.count(), 4);
        assert!(d.contains(129) && !d.contains(130) && !d.contains(1));
        assert_eq!(DirtyPages::all(130).count(), 130);
        assert_eq!(DirtyPages::all(130).iter().last(), Some(129));
    }
}
