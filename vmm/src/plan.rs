//! Turning a VM's options (from the command line or a config file, as text) into a validated
//! plan: the guest image, memory size, arguments, devices, disk and TAP. One place, used by
//! solo runs and by pair members.

use std::path::PathBuf;

use crate::guests::GuestImage;
use crate::spec::{parse_cidr, parse_mac, DeviceSpec, DiskOptions, NetSpec};

/// A VM's options as an operator writes them.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOptions {
    /// A bundled guest by name or a path to a guest ELF.
    pub guest: Option<String>,
    /// Memory size (with an optional K/M/G suffix). Default 64M.
    pub mem: Option<String>,
    /// The guest's argument string.
    pub guest_args: Option<String>,
    /// The disk image (created if missing).
    pub disk: Option<PathBuf>,
    /// Size to create the disk with. Default 64M.
    pub disk_size: Option<String>,
    /// The TAP device.
    pub tap: Option<String>,
    /// The NIC's MAC address.
    pub mac: Option<String>,
    /// The guest's IPv4 address and prefix.
    pub ip: Option<String>,
    /// The guest's default gateway.
    pub gateway: Option<String>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
}

/// The validated pieces of a VM.
pub struct Plan {
    /// The guest image.
    pub image: GuestImage,
    /// Memory size in bytes.
    pub mem_size: u64,
    /// The guest's arguments.
    pub args: String,
    /// The devices (`disk_sectors` is filled in once the disk is open).
    pub devices: DeviceSpec,
    /// The disk, if any.
    pub disk: Option<DiskOptions>,
    /// The TAP, if any.
    pub tap: Option<String>,
}

impl VmOptions {
    /// Validates the options. Errors name the option (`--mem: …`).
    pub fn plan(&self) -> Result<Plan, String> {
        let guest = self
            .guest
            .as_deref()
            .ok_or("--guest is required (a bundled name or an ELF path)")?;
        let mem_size =
            parse_size(self.mem.as_deref().unwrap_or("64M")).map_err(|e| format!("--mem: {e}"))?;
        crate::kvm::boot::check_mem_size(mem_size).map_err(|e| format!("--mem: {e}"))?;
        let image = crate::guests::resolve(guest)?;
        let net = match (&self.tap, &self.mac, &self.ip) {
            (None, None, None) => {
                if self.gateway.is_some() {
                    return Err("--gateway needs --tap, --mac and --ip".into());
                }
                None
            }
            (Some(_), Some(mac), Some(ip)) => {
                let (ip, prefix) = parse_cidr(ip).map_err(|e| format!("--ip: {e}"))?;
                let gateway = match &self.gateway {
                    Some(g) => Some(
                        g.parse()
                            .map_err(|_| format!("--gateway: invalid IPv4 address {g:?}"))?,
                    ),
                    None => None,
                };
                Some(NetSpec {
                    mac: parse_mac(mac).map_err(|e| format!("--mac: {e}"))?,
                    ip,
                    prefix,
                    gateway,
                })
            }
            _ => return Err("a NIC needs all of --tap, --mac and --ip".into()),
        };
        let disk = match &self.disk {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        return Err(format!(
                            "--disk: the directory {} does not exist",
                            dir.display()
                        ));
                    }
                }
                Some(DiskOptions {
                    path: path.clone(),
                    create_size: parse_size(self.disk_size.as_deref().unwrap_or("64M"))
                        .map_err(|e| format!("--disk-size: {e}"))?,
                })
            }
            None if self.disk_size.is_some() => return Err("--disk-size needs --disk".into()),
            None => None,
        };
        let args = self.guest_args.clone().unwrap_or_default();
        if args.len() as u64 > crate::replay::codec::MAX_ARGS {
            // The log header carries them, and a log's reader refuses a longer field.
            return Err(format!(
                "--guest-args is {} bytes; at most {} (the log header's limit)",
                args.len(),
                crate::replay::codec::MAX_ARGS
            ));
        }
        Ok(Plan {
            image,
            mem_size,
            args,
            devices: DeviceSpec {
                net,
                disk_sectors: None,
                rng: self.rng,
            },
            disk,
            tap: self.tap.clone(),
        })
    }
}

/// Parses a size: a number of bytes with an optional K/M/G (or KiB/MiB/GiB) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K, M or G suffix")
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use K, M or G)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn guest_args_longer_than_a_log_header_holds_are_refused() {
        let opts = |args: String| super::VmOptions {
            guest: Some("selftest".into()),
            guest_args: Some(args),
            ..Default::default()
        };
        assert!(opts("x".repeat(4096)).plan().is_ok());
        let e = opts("x".repeat(4097)).plan().err().expect("refused");
        assert!(
            e.contains("--guest-args is 4097 bytes; at most 4096"),
            "{e}"
        );
    }
}
