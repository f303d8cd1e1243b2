//! What a VM is made of, as the node's options and config file describe it: memory, the guest
//! program and its arguments, and the guest-visible devices. A one-line description of the
//! devices goes into every log header, so that a replay builds the same machine.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ftvm_abi::NetConfig;

/// The network interface of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl NetSpec {
    /// The configuration handed to the guest at boot.
    pub fn boot_config(&self) -> NetConfig {
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&self.mac);
        NetConfig {
            present: 1,
            prefix_len: u32::from(self.prefix),
            mac,
            ipv4: self.ip.octets(),
            gateway: self.gateway.map_or([0; 4], |g| g.octets()),
        }
    }
}

/// The guest-visible devices (besides the control device, always present).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceSpec {
    /// virtio-net, if any.
    pub net: Option<NetSpec>,
    /// virtio-blk capacity in 512-byte sectors, if there is a disk.
    pub disk_sectors: Option<u64>,
    /// virtio-rng.
    pub rng: bool,
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "invalid MAC address {s:?}: expected six hex bytes like 52:54:00:12:34:56"
        ));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("invalid MAC address {s:?}"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("invalid MAC address {s:?}: multicast bit set"));
    }
    Ok(mac)
}

/// Parses `ADDR/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid address {s:?}: expected ADDR/PREFIX, e.g. 10.0.0.2/24"))?;
    let ip: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("invalid IPv4 address {a:?}"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("invalid prefix length {p:?} (1-32)"))?;
    Ok((ip, prefix))
}

impl DeviceSpec {
    /// Number of virtio devices (they sit at consecutive MMIO slots: net, blk, rng).
    pub fn virtio_count(&self) -> u64 {
        u64::from(self.net.is_some()) + u64::from(self.disk_sectors.is_some()) + u64::from(self.rng)
    }

    /// The one-line description stored in log headers.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = &self.net {
            let m = n
                .mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let gw = n.gateway.map(|g| g.to_string()).unwrap_or_default();
            parts.push(format!("net={m},{}/{},{gw}", n.ip, n.prefix));
        }
        if let Some(s) = self.disk_sectors {
            parts.push(format!("disk={s}"));
        }
        if self.rng {
            parts.push("rng".into());
        }
        parts.join(";")
    }

    /// Parses [`describe`](Self::describe)'s output.
    pub fn parse(desc: &str) -> Result<Self, String> {
        let mut d = DeviceSpec::default();
        for part in desc.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "net" => {
                    let f: Vec<&str> = v.split(',').collect();
                    if f.len() != 3 {
                        return Err(format!("bad net description {v:?}"));
                    }
                    let (ip, prefix) = parse_cidr(f[1])?;
                    let gateway = if f[2].is_empty() {
                        None
                    } else {
                        Some(
                            f[2].parse()
                                .map_err(|_| format!("bad gateway {:?}", f[2]))?,
                        )
                    };
                    d.net = Some(NetSpec {
                        mac: parse_mac(f[0])?,
                        ip,
                        prefix,
                        gateway,
                    });
                }
                "disk" => {
                    d.disk_sectors = Some(v.parse().map_err(|_| format!("bad disk size {v:?}"))?)
                }
                "rng" => d.rng = true,
                _ => return Err(format!("unknown device {k:?} in the machine description")),
            }
        }
        Ok(d)
    }
}

/// Where a node's disk image is and how big to make it if it is missing.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// The raw image file.
    pub path: PathBuf,
    /// Size in bytes to create it with if it does not exist.
    pub create_size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_round_trip() {
        let d = DeviceSpec {
            net: Some(NetSpec {
                mac: [0x52, 0x54, 0, 1, 2, 3],
                ip: "10.203.0.100".parse().unwrap(),
                prefix: 24,
                gateway: None,
            }),
            disk_sectors: Some(131_072),
            rng: true,
        };
        assert_eq!(DeviceSpec::parse(&d.describe()).unwrap(), d);
        assert_eq!(DeviceSpec::parse("").unwrap(), DeviceSpec::default());
        assert!(DeviceSpec::parse("floppy=1").is_err());
    }

    #[test]
    fn addresses() {
        assert!(parse_mac("52:54:00:12:34:56").is_ok());
        assert!(parse_mac("53:54:00:12:34:56").is_err());
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
        assert_eq!(parse_cidr("10.0.0.2/24").unwrap().1, 24);
        assert!(parse_cidr("10.0.0.2").is_err());
        assert!(parse_cidr("10.0.0.2/33").is_err());
        assert!(parse_cidr("10.0.0/24").is_err());
    }
}
