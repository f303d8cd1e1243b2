//! What actually left each node's host: a capture, in the lab's fabric namespace, of every
//! frame that arrives from a node host's port with the guest's MAC as its source, stamped by
//! the kernel when it arrived (`SIOCGSTAMPNS`, the real-time clock). A node that is stopped
//! cannot move this clock or these stamps, so they say when a node's output reached the
//! network, where the node's own `release_log` can only say when it read its clock around a
//! write.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// One frame seen on the fabric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireFrame {
    /// When the fabric received it (Unix ns, the kernel's stamp).
    pub unix_ns: u64,
    /// The node whose host sent it.
    pub node: String,
}

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Captured {
    /// The guest's frames, by arrival.
    pub frames: Vec<WireFrame>,
    /// Gratuitous ARPs the nodes sent for the guest (left out of `frames`).
    pub announcements: u64,
    /// Frames the kernel dropped because the capture fell behind (then the capture is not
    /// complete and says so).
    pub dropped: u64,
}

/// A running capture; [`WireCapture::finish`] stops it and returns what it saw.
pub struct WireCapture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Captured>>,
}

const ETH_P_ALL: u16 = 0x0003;
const SIOCGSTAMPNS: libc::c_ulong = 0x8907;

fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd: RawFd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            ETH_P_ALL.to_be() as i32,
        )
    };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        bail!("bind to {ifname}: {}", std::io::Error::last_os_error());
    }
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt with an int option value of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    Ok(fd)
}

fn dropped(fd: &OwnedFd) -> u64 {
    // SAFETY: tpacket_stats is plain data; zeroed is valid; getsockopt writes at most len.
    let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
    // SAFETY: as above.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            &mut st as *mut libc::tpacket_stats as *mut libc::c_void,
            &mut len,
        )
    };
    st.tp_drops as u64
}

/// A gratuitous ARP (a request whose sender and target address are the same): what a node
/// sends when it becomes primary, not the guest's output.
pub fn is_announcement(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[28..32] == f[38..42]
}

/// Reads every frame waiting on `fd`; keeps those from `mac` that arrived from the host.
fn drain(
    fd: &OwnedFd,
    node: &str,
    mac: [u8; 6],
    buf: &mut [u8],
    out: &mut Vec<WireFrame>,
    announcements: &mut u64,
) {
    loop {
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: recvfrom into a buffer of the length given, and a sockaddr_ll.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            return;
        }
        // Frames the bridge sends towards the host are "outgoing" on this port.
        if from.sll_pkttype == libc::PACKET_OUTGOING || n < 12 || buf[6..12] != mac {
            continue;
        }
        if is_announcement(&buf[..n as usize]) {
            *announcements += 1;
            continue;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: SIOCGSTAMPNS writes one timespec: the stamp of the frame just read.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSTAMPNS, &mut ts) };
        let unix_ns = if r == 0 {
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        } else {
            // No stamp: now, which is no earlier than the arrival.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        out.push(WireFrame {
            unix_ns,
            node: node.to_string(),
        });
    }
}

impl WireCapture {
    /// Starts capturing, in `fabric`, on each `(node, fabric port)` the frames whose source
    /// MAC is `mac` (`"52:54:…"`).
    pub fn start(fabric: &Netns, ports: Vec<(String, String)>, mac: &str) -> Result<WireCapture> {
        let mut m = [0u8; 6];
        let parts: Vec<&str> = mac.split(':').collect();
        if parts.len() != 6 {
            bail!("not a MAC address: {mac}");
        }
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16).with_context(|| format!("MAC {mac}"))?;
        }
        let path = format!("/run/netns/{}", fabric.name());
        let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let st = stop.clone();
        let handle = std::thread::spawn(move || -> Result<Captured> {
            // SAFETY: setns on an open netns file descriptor; it changes only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                let e = anyhow::anyhow!("setns: {}", std::io::Error::last_os_error());
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
                return Err(e);
            }
            let socks: Result<Vec<(String, OwnedFd)>> = ports
                .iter()
                .map(|(node, port)| Ok((node.clone(), packet_socket(port)?)))
                .collect();
            let socks = match socks {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 65536];
            let mut out = Captured::default();
            loop {
                let done = st.load(Ordering::Relaxed);
                let mut pfds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|(_, fd)| libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: poll on valid pollfds for at most 20 ms.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as u64, 20) };
                for (node, fd) in &socks {
                    drain(
                        fd,
                        node,
                        m,
                        &mut buf,
                        &mut out.frames,
                        &mut out.announcements,
                    );
                }
                if done {
                    break;
                }
            }
            out.dropped = socks.iter().map(|(_, fd)| dropped(fd)).sum();
            out.frames.sort_by_key(|f| f.unix_ns);
            Ok(out)
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(WireCapture { stop, handle }),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("the capture thread ended before it started"),
        }
    }

    /// Stops the capture (after reading what is already queued) and returns what it saw.
    pub fn finish(self) -> Result<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_is_an_announcement_and_an_ordinary_arp_is_not() {
        // Broadcast, from 02:00:00:00:00:01, ARP request: 10.0.0.5 is at that MAC.
        let mut g = vec![0xff; 6];
        g.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        g.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 5, 0, 0, 0, 0, 0, 0, 10, 0, 0, 5]);
        g.resize(60, 0);
        assert!(is_announcement(&g));
        let mut req = g.clone();
        req[38..42].copy_from_slice(&[10, 0, 0, 1]); // who has 10.0.0.1?
        assert!(!is_announcement(&req));
        let mut ip = g;
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!is_announcement(&ip));
    }
}
