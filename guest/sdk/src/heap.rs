//! The guest heap: a linked-list allocator over the range the VMM reports in the boot info.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hands `[start, end)` to the allocator. Called once, before `main`.
pub(crate) fn init(start: u64, end: u64) {
    if end > start {
        // SAFETY: the VMM reserves [heap_start, heap_end) for the heap: it is mapped, unused
        // by the image and the stack, and this is called exactly once.
        unsafe { HEAP.lock().init(start as *mut u8, (end - start) as usize) };
    }
}
