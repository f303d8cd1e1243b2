//! Where a VM's console goes on the host: the process's stdout and, line by line, the node's
//! log.

use std::io::Write;

use crate::epoch::ConsoleSink;

/// Console output to the process's stdout (flushed at every write) and, line by line, to the
/// node's log (target `guest`, level info).
#[derive(Default)]
pub struct StdoutConsole {
    line: Vec<u8>,
}

impl ConsoleSink for StdoutConsole {
    fn write(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the VM.
        let _ = out.write_all(bytes);
        let _ = out.flush();
        for &b in bytes {
            if b == b'\n' || self.line.len() >= 4096 {
                tracing::info!(target: "guest", "{}", String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
    }
}
