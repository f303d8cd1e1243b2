//! The allocator: size classes for small blocks in front of a linked-list allocator.
//!
//! A first-fit linked-list allocator walks its list of holes on every allocation, and a busy
//! server (many small, short-lived blocks: frames, requests, replies) fragments that list.
//! So blocks of up to 4 KiB (alignment up to 16) are rounded up to a power of two and kept,
//! once freed, on a free list per size for reuse; only larger or more aligned blocks, and the
//! first use of each small block, go to the linked-list allocator. Small blocks are not given
//! back to it: memory for each size class stays at that class's peak use.
//!
//! There is no lock: the guest has one vCPU, no threads and no interrupts, so nothing can
//! enter the allocator while it runs.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, NonNull};

use linked_list_allocator::Heap;

/// Smallest class (bytes); classes are powers of two from here.
const MIN_CLASS: usize = 16;
/// Number of classes: 16 B … 4 KiB.
const CLASSES: usize = 9;
/// Alignment of every small block.
const SMALL_ALIGN: usize = 16;

struct Inner {
    heap: Heap,
    /// Heads of the free lists; a free block's first word points to the next one.
    free: [*mut u8; CLASSES],
}

/// The guest's global allocator. (This file is also compiled into kvnet's host profiling
/// example, which puts a lock in front of it.)
pub struct GuestHeap(UnsafeCell<Inner>);

// SAFETY: the guest runs on one vCPU with no threads and no interrupts, so the allocator is
// never entered twice at once.
unsafe impl Sync for GuestHeap {}

impl GuestHeap {
    /// An allocator with no memory yet (see [`GuestHeap::init`]).
    pub const fn empty() -> Self {
        GuestHeap(UnsafeCell::new(Inner {
            heap: Heap::empty(),
            free: [ptr::null_mut(); CLASSES],
        }))
    }

    /// Hands `[start, start + size)` to the allocator.
    ///
    /// # Safety
    /// The range is valid memory that nothing else uses, for the rest of the program; called
    /// once, before any allocation.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: per this function's contract.
        unsafe { self.inner().heap.init(start, size) }
    }
}

/// The class of a block of `layout`, if it is small.
fn class(layout: &Layout) -> Option<usize> {
    if layout.align() > SMALL_ALIGN {
        return None;
    }
    let size = layout.size().max(MIN_CLASS).next_power_of_two();
    let c = (size.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize;
    (c < CLASSES).then_some(c)
}

fn class_layout(c: usize) -> Layout {
    // A power of two up to 4 KiB with alignment 16 is always a valid layout.
    Layout::from_size_align(MIN_CLASS << c, SMALL_ALIGN).expect("valid class layout")
}

impl GuestHeap {
    #[allow(clippy::mut_from_ref)]
    fn inner(&self) -> &mut Inner {
        // SAFETY: see `unsafe impl Sync`: one caller at a time, and no reference escapes a
        // call of this module's functions.
        unsafe { &mut *self.0.get() }
    }
}

// SAFETY: small blocks are class-sized, 16-aligned blocks from the inner heap (or reused ones
// of the same class), large ones come straight from it; each is returned to where it came
// from with the layout it was allocated with.
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let h = self.inner();
        match class(&layout) {
            Some(c) => {
                let head = h.free[c];
                if !head.is_null() {
                    // SAFETY: a free block holds the next pointer in its first word, and
                    // every block is at least 16 bytes and 16-aligned.
                    h.free[c] = unsafe { head.cast::<*mut u8>().read() };
                    return head;
                }
                h.heap
                    .allocate_first_fit(class_layout(c))
                    .map_or(ptr::null_mut(), NonNull::as_ptr)
            }
            None => h
                .heap
                .allocate_first_fit(layout)
                .map_or(ptr::null_mut(), NonNull::as_ptr),
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let h = self.inner();
        match class(&layout) {
            Some(c) => {
                // SAFETY: `p` is a block of class `c` (at least 16 bytes, 16-aligned) that
                // the caller no longer uses.
                unsafe { p.cast::<*mut u8>().write(h.free[c]) };
                h.free[c] = p;
            }
            // SAFETY: `p` came from the inner heap with this layout.
            None => unsafe { h.heap.deallocate(NonNull::new_unchecked(p), layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for realloc (valid block, new size non-zero and not
        // overflowing) holds for the layouts built here.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            if class(&layout).is_some() && class(&layout) == class(&new) {
                return p; // the block already has room
            }
            let q = self.alloc(new);
            if !q.is_null() {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}
