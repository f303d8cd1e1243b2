//! Console output through the shared page's buffer: bytes are staged in the buffer and one
//! CONSOLE exit prints them, so a line costs one exit.

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};
use ftvm_abi::{control, layout, shared};

/// Bytes staged in the console buffer and not yet printed.
static STAGED: AtomicUsize = AtomicUsize::new(0);

fn buffer() -> *mut u8 {
    (layout::SHARED_PAGE_ADDR + shared::CONSOLE_BUF) as *mut u8
}

/// Prints the staged bytes (one exit) if there are any.
pub fn flush() {
    let n = STAGED.swap(0, Ordering::Relaxed);
    if n > 0 {
        crate::control::write(control::CONSOLE, n as u64);
    }
}

/// Stages `bytes` for printing, flushing whenever the buffer fills or a line ends.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        let pos = STAGED.load(Ordering::Relaxed);
        // SAFETY: pos < CONSOLE_BUF_LEN, so the write stays inside the shared page, which is
        // mapped writable for the guest.
        unsafe { buffer().add(pos).write_volatile(b) };
        STAGED.store(pos + 1, Ordering::Relaxed);
        if pos + 1 == shared::CONSOLE_BUF_LEN as usize || b == b'\n' {
            flush();
        }
    }
}

/// A `fmt::Write` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the VM's console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the VM's console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
