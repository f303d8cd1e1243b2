//! The network interface for smoltcp: a virtio-net device driven through `VirtIONetRaw`'s
//! non-blocking calls, with receive buffers kept posted and transmit buffers recycled.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;

use crate::virtio::{GuestHal, Mmio};

/// Descriptors per queue.
pub const QUEUE_SIZE: usize = 256;
const BUF_LEN: usize = 2048;
/// Receive buffers kept posted: the most frames that can wait for one `Interface::poll`.
pub const RX_BUFS: usize = 128;
const TX_BUFS: usize = 128;

/// A virtio-net device for smoltcp.
pub struct GuestNet {
    raw: VirtIONetRaw<GuestHal, Mmio, QUEUE_SIZE>,
    rx: Vec<Box<[u8]>>,
    rx_slot: Vec<Option<usize>>,
    tx: Vec<Box<[u8]>>,
    tx_len: Vec<usize>,
    tx_slot: Vec<Option<usize>>,
    tx_free: Vec<usize>,
    /// Frames received and sent.
    pub counters: [u64; 2],
}

impl GuestNet {
    /// Initializes the device and posts every receive buffer.
    pub fn new(transport: Mmio) -> Result<Self, virtio_drivers::Error> {
        let raw = VirtIONetRaw::new(transport)?;
        let mut n = GuestNet {
            raw,
            rx: (0..RX_BUFS)
                .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                .collect(),
            rx_slot: vec![None; QUEUE_SIZE],
            tx: (0..TX_BUFS)
                .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                .collect(),
            tx_len: vec![0; TX_BUFS],
            tx_slot: vec![None; QUEUE_SIZE],
            tx_free: (0..TX_BUFS).collect(),
            counters: [0; 2],
        };
        for i in 0..RX_BUFS {
            n.post_rx(i)?;
        }
        Ok(n)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn post_rx(&mut self, i: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: buffer `i` is not touched until its token comes back from poll_receive.
        let token = unsafe { self.raw.receive_begin(&mut self.rx[i])? };
        self.rx_slot[usize::from(token)] = Some(i);
        Ok(())
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(i) = self.tx_slot[usize::from(token)].take() else {
                break;
            };
            // SAFETY: the same buffer (and length) that was passed to transmit_begin.
            let _ = unsafe {
                self.raw
                    .transmit_complete(token, &self.tx[i][..self.tx_len[i]])
            };
            self.tx_free.push(i);
        }
    }

    /// True when a received frame is waiting.
    pub fn has_rx(&self) -> bool {
        self.raw.poll_receive().is_some()
    }
}

/// A received frame (copied out, so its buffer is posted again at once).
pub struct GuestRx(Vec<u8>);

impl RxToken for GuestRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room to transmit one frame.
pub struct GuestTx<'a>(&'a mut GuestNet);

impl TxToken for GuestTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let n = self.0;
        let i = n
            .tx_free
            .pop()
            .expect("transmit() checked for a free buffer");
        let hdr = n.raw.fill_buffer_header(&mut n.tx[i]).unwrap_or(12);
        let total = (hdr + len).min(BUF_LEN);
        let r = f(&mut n.tx[i][hdr..total]);
        n.tx_len[i] = total;
        // SAFETY: buffer `i` is not touched again until reclaim_tx gets its token back.
        match unsafe { n.raw.transmit_begin(&n.tx[i][..total]) } {
            Ok(token) => {
                n.tx_slot[usize::from(token)] = Some(i);
                n.counters[1] += 1;
            }
            Err(_) => n.tx_free.push(i),
        }
        r
    }
}

impl Device for GuestNet {
    type RxToken<'a> = GuestRx;
    type TxToken<'a> = GuestTx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(GuestRx, GuestTx<'_>)> {
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            return None;
        }
        let token = self.raw.poll_receive()?;
        let i = self.rx_slot[usize::from(token)].take()?;
        let mut frame = Vec::new();
        // SAFETY: the same buffer that was passed to receive_begin for this token.
        if let Ok((hdr, len)) = unsafe { self.raw.receive_complete(token, &mut self.rx[i]) } {
            frame.extend_from_slice(&self.rx[i][hdr..hdr + len]);
        }
        let _ = self.post_rx(i);
        self.counters[0] += 1;
        Some((GuestRx(frame), GuestTx(self)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<GuestTx<'_>> {
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            None
        } else {
            Some(GuestTx(self))
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c.max_burst_size = Some(RX_BUFS);
        c
    }
}

/// A guest's network stack and its event loop: smoltcp over [`GuestNet`], configured from the
/// boot info. A service's loop calls [`poll`](Stack::poll), does its work on
/// [`sockets`](Stack::sockets), calls `poll` again to send, then [`idle`](Stack::idle): a POLL
/// exit while there is work, otherwise a WAIT until smoltcp's next timer (or a frame).
pub struct Stack {
    /// The device.
    pub dev: GuestNet,
    /// The smoltcp interface.
    pub iface: smoltcp::iface::Interface,
    /// The sockets.
    pub sockets: smoltcp::iface::SocketSet<'static>,
}

/// A smoltcp interface on `dev` with the address, prefix and gateway in `cfg`; `seed` seeds
/// smoltcp (take it from the VMM's entropy).
pub fn interface(
    dev: &mut GuestNet,
    cfg: &ftvm_abi::NetConfig,
    seed: u64,
) -> smoltcp::iface::Interface {
    use smoltcp::iface::{Config, Interface};
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&cfg.mac[..6]);
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = seed;
    let mut iface = Interface::new(config, dev, now());
    let [a, b, c, d] = cfg.ipv4;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(
            Ipv4Address::new(a, b, c, d).into(),
            cfg.prefix_len as u8,
        ));
    });
    if cfg.gateway != [0; 4] {
        let [a, b, c, d] = cfg.gateway;
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    iface
}

/// smoltcp's notion of now, from the VMM's clock as of the last exit.
pub fn now() -> Instant {
    Instant::from_micros((crate::time::now_ns() / 1000) as i64)
}

impl Stack {
    /// Brings up the NIC with the address, prefix and gateway in `cfg`; `seed` seeds smoltcp
    /// (take it from the VMM's entropy).
    pub fn new(
        transport: Mmio,
        cfg: &ftvm_abi::NetConfig,
        seed: u64,
    ) -> Result<Self, virtio_drivers::Error> {
        let mut dev = GuestNet::new(transport)?;
        let iface = interface(&mut dev, cfg, seed);
        Ok(Stack {
            dev,
            iface,
            sockets: smoltcp::iface::SocketSet::new(Vec::new()),
        })
    }

    /// Moves frames between the device and the sockets.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
    }

    /// Ends a loop iteration: POLL if `busy` or a frame is waiting, else WAIT until smoltcp's
    /// next timer, at most `max_idle_ns` (a frame arriving ends the WAIT early).
    pub fn idle(&mut self, busy: bool, max_idle_ns: u64) {
        if busy || self.dev.has_rx() {
            crate::control::poll();
        } else {
            let delay = self
                .iface
                .poll_delay(now(), &self.sockets)
                .map_or(max_idle_ns, |d| (d.total_micros() * 1000).min(max_idle_ns));
            crate::time::wait_until(crate::time::now_ns().saturating_add(delay.max(1)));
        }
    }
}
