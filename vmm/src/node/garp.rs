//! The gratuitous ARP a node sends when it becomes primary (at a cold start or when it goes
//! live), and a solo run when it starts, so that switches learn the guest's MAC on its host's
//! port and neighbours refresh their caches.

use std::net::Ipv4Addr;

use crate::devices::tap::Tap;
use crate::spec::NetSpec;

/// Writes two gratuitous ARPs for the guest's address to `tap` (a lost one is logged).
pub fn announce(tap: &Tap, net: &NetSpec) {
    let arp = gratuitous_arp(net.mac, net.ip);
    for _ in 0..2 {
        if let Err(e) = tap.write_frame(&arp) {
            tracing::warn!("gratuitous ARP: {e}");
        }
    }
}

/// An Ethernet broadcast ARP request announcing `ip` at `mac` (sender = target = `ip`).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0); // minimum frame
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[28..32], &[10, 0, 0, 5]);
        assert_eq!(&f[38..42], &[10, 0, 0, 5]);
    }
}
