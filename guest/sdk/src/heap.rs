//! The guest heap over the range the VMM reports in the boot info (the allocator itself is
//! in `heap/classes.rs`).

mod classes;

use classes::GuestHeap;

#[global_allocator]
static HEAP: GuestHeap = GuestHeap::empty();

/// Hands `[start, end)` to the allocator. Called once, before `main`.
pub(crate) fn init(start: u64, end: u64) {
    if end > start {
        // SAFETY: the VMM reserves [heap_start, heap_end) for the heap: it is mapped, unused
        // by the image and the stack, and this is called exactly once, before any allocation.
        unsafe { HEAP.init(start as *mut u8, (end - start) as usize) };
    }
}
