//! The node's thread priorities: its I/O thread (`ftvm-io`) runs at `io_nice`, below the
//! vCPU's default, so an ack or a release is never queued behind the guest on a busy core;
//! heavy blocking work that borrows that thread (a join's copy) runs at the default priority,
//! so it does not take the guest's core either.

/// Gives the calling thread nice value `nice` (Linux's nice is per thread); a node without
/// the right to raise its priority (`CAP_SYS_NICE`) runs on at the default, with a warning.
pub fn set_thread_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = set(nice) {
        tracing::warn!("io_nice {nice}: {e} (the I/O thread runs at the vCPU's priority)");
    }
}

/// Runs blocking work `f` on the runtime's thread (`block_in_place`) at the default nice
/// value, then restores the thread's own.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(|| {
        let own = get();
        if own != 0 {
            let _ = set(0);
        }
        let r = f();
        if own != 0 {
            let _ = set(own);
        }
        r
    })
}

fn set(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority(2) with `who` 0, the calling thread; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's nice value (0 where it cannot be read).
fn get() -> i32 {
    // SAFETY: getpriority(2) with `who` 0, the calling thread; -1 is a valid nice value, so
    // errno (cleared first, through libc's thread-local pointer) tells an error apart.
    unsafe {
        *libc::__errno_location() = 0;
        let p = libc::getpriority(libc::PRIO_PROCESS, 0);
        if p == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_work_runs_at_the_default_and_the_thread_gets_its_own_back() {
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("NOT RUN: going back from nice 5 to 0 needs root (CAP_SYS_NICE)");
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(|| set_thread_nice(5))
            .build()
            .unwrap();
        let (inside, after) = rt.block_on(async {
            tokio::spawn(async {
                let inside = blocking(get);
                (inside, get())
            })
            .await
            .unwrap()
        });
        assert_eq!(inside, 0, "the blocking work ran at the default");
        assert_eq!(after, 5, "the thread has its own nice value again");
    }
}
