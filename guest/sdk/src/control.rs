//! Raw access to the ftvm control device (MMIO). Every access is a VM exit and an epoch
//! boundary: use them sparingly.

use ftvm_abi::control;

/// Reads a 64-bit control-device register.
#[inline]
pub fn read(offset: u64) -> u64 {
    // SAFETY: the control device's window is identity-mapped MMIO owned by the VMM; a
    // volatile 8-byte read there is an exit the VMM answers.
    unsafe { core::ptr::read_volatile((control::BASE + offset) as *const u64) }
}

/// Writes a 64-bit control-device register.
#[inline]
pub fn write(offset: u64, value: u64) {
    // SAFETY: as in `read`; the write is an exit the VMM handles.
    unsafe { core::ptr::write_volatile((control::BASE + offset) as *mut u64, value) }
}

/// A POLL exit: lets the VMM take new requests and apply pending events without blocking.
/// A busy guest does this at least every few milliseconds.
pub fn poll() {
    write(control::POLL, 1);
}

/// Ends the VM with `status` as its exit status.
pub fn exit(status: u64) -> ! {
    crate::console::flush();
    loop {
        write(control::EXIT, status);
    }
}

/// 8 bytes of entropy from the VMM (recorded and replayed like every other input).
pub fn entropy() -> u64 {
    read(control::ENTROPY)
}

/// Fills `buf` with entropy from the VMM.
pub fn fill_entropy(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let v = entropy().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}
