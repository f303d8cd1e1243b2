//! The guest's clock. Time comes only from the VMM: it refreshes the shared page's clock at
//! WAIT, POLL and explicit clock reads, so between exits guest time stands still.

use ftvm_abi::{control, layout, shared};

fn shared_u64(offset: u64) -> u64 {
    // SAFETY: the shared page is mapped readable for the guest for its whole life; the VMM
    // writes it only while the vCPU is stopped at an exit.
    unsafe { core::ptr::read_volatile((layout::SHARED_PAGE_ADDR + offset) as *const u64) }
}

/// Monotonic nanoseconds since boot as of the last clock refresh (no exit).
pub fn now_ns() -> u64 {
    shared_u64(shared::MONO_NS)
}

/// Wall-clock nanoseconds since the Unix epoch as of the last refresh (no exit).
pub fn wall_now_ns() -> u64 {
    shared_u64(shared::WALL_NS)
}

/// Reads the monotonic clock afresh (one exit).
pub fn clock_ns() -> u64 {
    crate::control::read(control::CLOCK_MONO)
}

/// Reads the wall clock afresh (one exit).
pub fn wall_clock_ns() -> u64 {
    crate::control::read(control::CLOCK_WALL)
}

/// Blocks until an event is pending or the monotonic clock reaches `deadline_ns`; returns the
/// refreshed monotonic time.
pub fn wait_until(deadline_ns: u64) -> u64 {
    crate::control::write(control::WAIT, deadline_ns);
    now_ns()
}

/// Blocks until an event is pending or `ns` nanoseconds have passed; returns the time.
pub fn wait_for(ns: u64) -> u64 {
    wait_until(clock_ns().saturating_add(ns))
}

/// Sleeps until the monotonic clock reaches `deadline_ns`, ignoring events.
pub fn sleep_until(deadline_ns: u64) {
    while wait_until(deadline_ns) < deadline_ns {}
}
