//! A TAP device: Ethernet frames to and from the host's network stack. Opened non-blocking;
//! one `read` is one frame.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use crate::devices::virtio::net::FrameSink;
use crate::epoch::Boundary;
use crate::error::VmmError;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Largest frame read from or written to the TAP (Ethernet MTU 1500 + header + VLAN tag).
pub const MAX_FRAME: usize = 1518;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Largest frame a read can return (a TAP never delivers more than 64 KiB at once).
const READ_BUF: usize = 65_536;

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Scratch space for reads, reused so that a read costs no 64 KiB allocation and zeroing
    /// (one per frame, and one more per empty poll, before).
    scratch: Mutex<Box<[u8]>>,
}

impl Tap {
    /// Opens (attaches to) the TAP device `name`, creating it if it does not exist.
    pub fn open(name: &str) -> std::io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("TAP name {name:?} must be 1-15 bytes"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF takes a pointer to an ifreq-sized struct, which `req` is; the fd is
        // an open /dev/net/tun.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("TUNSETIFF {name}: {e}"),
            ));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            scratch: Mutex::new(vec![0u8; READ_BUF].into_boxed_slice()),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file descriptor, for polling.
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Reads one frame if one is waiting.
    pub fn try_read(&self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        match (&self.file).read(&mut buf[..]) {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame; a full queue drops it (as a congested link would).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<bool> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The TAP's descriptor, to poll for a waiting frame.
impl std::os::fd::AsFd for Tap {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Opens the TAP device `name`, to be shared by the NIC's receive side (the input source) and
/// its transmit side (a [`TapSink`], or the Output Rule's hold on a primary).
pub fn open_tap(name: &str) -> Result<Arc<Tap>, VmmError> {
    Tap::open(name).map(Arc::new).map_err(|e| VmmError::Tap {
        name: name.to_string(),
        why: e.to_string(),
    })
}

/// Frames straight to the TAP (an unreplicated VM has no Output Rule to obey).
pub struct TapSink(pub Arc<Tap>);

impl FrameSink for TapSink {
    fn send(&mut self, _b: Boundary, frame: &[u8]) {
        if let Err(e) = self.0.write_frame(frame) {
            tracing::warn!("TAP {}: dropped a frame: {e}", self.0.name());
        }
    }
}
