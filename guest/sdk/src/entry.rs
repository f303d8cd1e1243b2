//! The entry point: `_start` aligns the stack the VMM set up and calls [`rust_entry`], which
//! sets up the heap and runs the program's `main`.

use ftvm_abi::{BootInfo, NetConfig, BOOT_MAGIC};

/// What a guest program's `main` receives: the VMM's boot information.
pub struct Boot {
    info: &'static BootInfo,
}

impl Boot {
    /// The raw boot information.
    pub fn info(&self) -> &'static BootInfo {
        self.info
    }
    /// The arguments the node passed to the guest (`--guest-args`), as a string.
    pub fn args(&self) -> &'static str {
        let len = (self.info.args_len as usize).min(self.info.args.len());
        core::str::from_utf8(&self.info.args[..len]).unwrap_or("")
    }
    /// The network configuration, if the VM has a NIC.
    pub fn net(&self) -> Option<NetConfig> {
        (self.info.net.present != 0).then_some(self.info.net)
    }
}

core::arch::global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym rust_entry,
);

extern "Rust" {
    fn __ftvm_guest_main(boot: &Boot) -> i32;
}

/// Called by `_start` with the boot-info address in `rdi`.
extern "C" fn rust_entry(info: *const BootInfo) -> ! {
    // SAFETY: the VMM passes the address of a valid, mapped BootInfo that lives for the VM's
    // whole life and that nothing writes after boot.
    let info: &'static BootInfo = unsafe { &*info };
    if info.magic != BOOT_MAGIC {
        crate::control::exit(ftvm_abi::EXIT_PANIC);
    }
    crate::heap::init(info.heap_start, info.heap_end);
    let boot = Boot { info };
    // SAFETY: `entry!` defines this symbol with exactly this signature.
    let status = unsafe { __ftvm_guest_main(&boot) };
    crate::control::exit(status as u32 as u64)
}

/// Declares the guest program's `main(&Boot) -> i32`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn __ftvm_guest_main(boot: &$crate::Boot) -> i32 {
            let main: fn(&$crate::Boot) -> i32 = $main;
            main(boot)
        }
    };
}
