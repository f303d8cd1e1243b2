//! The panic handler: the message goes to the console, then the VM exits with
//! [`ftvm_abi::EXIT_PANIC`].

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::console::flush();
    crate::println!("guest panic: {info}");
    crate::control::exit(ftvm_abi::EXIT_PANIC)
}

/// The prebuilt `core` was compiled with unwinding; with `panic = "abort"` nothing calls this.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::control::exit(ftvm_abi::EXIT_PANIC)
}

/// See [`_Unwind_Resume`]: present only to satisfy the linker.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
