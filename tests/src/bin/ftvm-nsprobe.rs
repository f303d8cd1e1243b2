//! `ftvm-nsprobe`: a tiny reachability probe for the network-namespace tests, run inside a
//! namespace with `ip netns exec`.
//!
//! ```text
//! ftvm-nsprobe ping ADDR [COUNT [TIMEOUT_MS]]   ICMP echo; exit 0 if any reply arrives
//! ftvm-nsprobe listen ADDR:PORT                 TCP echo server (runs until killed)
//! ftvm-nsprobe connect ADDR:PORT [TIMEOUT_MS]   connect, send a line, expect it echoed back
//! ftvm-nsprobe open ADDR:PORT [TIMEOUT_MS]      only check that a TCP connection opens
//! ```
//! Exit status: 0 reachable, 1 not reachable, 2 usage or local error.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("ping") if args.len() >= 2 => ping(&args[1..]),
        Some("listen") if args.len() == 2 => listen(&args[1]),
        Some("connect") if args.len() >= 2 => connect(&args[1..], true),
        Some("open") if args.len() >= 2 => connect(&args[1..], false),
        _ => Err(
            "usage: ftvm-nsprobe ping ADDR [COUNT [TIMEOUT_MS]] | listen ADDR:PORT | \
                  connect ADDR:PORT [TIMEOUT_MS] | open ADDR:PORT [TIMEOUT_MS]"
                .to_string(),
        ),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ftvm-nsprobe: {e}");
            ExitCode::from(2)
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("bad argument {s:?}")),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends up to `count` ICMP echo requests, one per timeout period; true on the first reply.
fn ping(args: &[String]) -> Result<bool, String> {
    let dst: Ipv4Addr = args[0]
        .parse()
        .map_err(|_| format!("bad address {:?}", args[0]))?;
    let count: u16 = arg(args, 1, 3)?;
    let timeout_ms: u64 = arg(args, 2, 1000)?;
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {} (needs root)",
            std::io::Error::last_os_error()
        ));
    }
    let ident = (std::process::id() & 0xffff) as u16;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: `tv` outlives the call and the length matches its type.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut ok = false;
    'outer: for seq in 0..count {
        let mut pkt = [0u8; 16];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..16].copy_from_slice(b"ftvmping");
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: `pkt` and `sa` are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            // e.g. "network unreachable" while a link is down: counts as no reply.
            std::thread::sleep(Duration::from_millis(timeout_ms));
            continue;
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        while Instant::now() < deadline {
            let mut buf = [0u8; 1500];
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let b = &buf[..n as usize];
            let ihl = ((b[0] & 0x0f) as usize) * 4;
            if b.len() < ihl + 8 || b[12..16] != dst.octets() {
                continue;
            }
            let icmp = &b[ihl..];
            if icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
            {
                ok = true;
                break 'outer;
            }
        }
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    Ok(ok)
}

fn listen(addr: &str) -> Result<bool, String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(true)
}

fn connect(args: &[String], echo: bool) -> Result<bool, String> {
    let addr: SocketAddr = args[0]
        .parse()
        .map_err(|_| format!("bad address {:?}", args[0]))?;
    let timeout = Duration::from_millis(arg(args, 1, 2000)?);
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return Ok(false);
    };
    if !echo {
        return Ok(true);
    }
    let _ = s.set_read_timeout(Some(timeout));
    let msg = b"ftvm-nsprobe\n";
    if s.write_all(msg).is_err() {
        return Ok(false);
    }
    let mut got = [0u8; 13];
    Ok(s.read_exact(&mut got).is_ok() && &got == msg)
}
