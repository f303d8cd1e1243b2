//! `ftvm-node run --solo` under real KVM: the bundled guests, bad images and sizes, hostile
//! and runaway guests, and clean stops on signals.

mod common;

use std::time::Duration;

use common::{run, Running};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn selftest_passes() {
    let o = run(&["run", "--solo", "--guest", "selftest"]);
    assert!(
        o.status.success(),
        "status {:?}\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(out.contains("selftest: allocation ok"), "{out}");
    assert!(out.contains("selftest: floating point ok"), "{out}");
    assert!(out.contains("selftest: clock ok"), "{out}");
    assert!(out.trim_end().ends_with("selftest: ok"), "{out}");
}

#[test]
fn selftest_runs_in_the_smallest_and_a_large_memory() {
    for mem in ["4M", "1G"] {
        let o = run(&["run", "--solo", "--guest", "selftest", "--mem", mem]);
        assert!(
            o.status.success(),
            "--mem {mem}: {:?}\n{}",
            o.status,
            stderr(&o)
        );
    }
}

#[test]
fn crash_is_reported_with_registers() {
    let o = run(&["run", "--solo", "--guest", "crash"]);
    assert_eq!(o.status.code(), Some(70), "{}", stderr(&o));
    assert!(stdout(&o).contains("crash: reading 0xdead00000000"));
    assert!(!stdout(&o).contains("survived"));
    let err = stderr(&o);
    assert!(err.contains("guest crashed: triple fault"), "{err}");
    assert!(err.contains("rip=0x0000000000"), "{err}");
    // The faulting load had the unmapped address in a register.
    assert!(err.contains("0x0000dead00000000"), "{err}");
}

#[test]
fn bad_images_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let selftest = vmm::guests::bundled("selftest").unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"this is not an ELF file at all, just text".repeat(4),
            "bad magic",
        ),
        ("empty", Vec::new(), "too short"),
        ("truncated", selftest[..200].to_vec(), "outside the file"),
        ("script", b"#!/bin/sh\necho hi\n".to_vec(), "too short"),
    ];
    for (name, bytes, why) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = run(&["run", "--solo", "--guest", p.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(65), "{name}: {err}");
        assert!(
            err.contains("invalid guest image") && err.contains(why),
            "{name}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
    }
    for (guest, why) in [
        ("/nonexistent/guest.elf", "cannot read guest image"),
        ("no-such-guest", "no bundled guest named"),
    ] {
        let o = run(&["run", "--solo", "--guest", guest]);
        assert_eq!(o.status.code(), Some(65), "{guest}");
        assert!(stderr(&o).contains(why), "{}", stderr(&o));
    }
}

#[test]
fn an_image_too_large_for_memory_is_refused() {
    // Grow the memory size of selftest's last loadable segment to 512 MiB.
    let mut elf = vmm::guests::bundled("selftest").unwrap().to_vec();
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
    let last_load = (0..phnum)
        .rev()
        .map(|i| phoff + i * 56)
        .find(|&h| u32::from_le_bytes(elf[h..h + 4].try_into().unwrap()) == 1)
        .unwrap();
    elf[last_load + 40..last_load + 48].copy_from_slice(&(512u64 << 20).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.elf");
    std::fs::write(&p, elf).unwrap();
    let o = run(&[
        "run",
        "--solo",
        "--guest",
        p.to_str().unwrap(),
        "--mem",
        "64M",
    ]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not fit"), "{}", stderr(&o));
    // With enough memory the same image boots.
    let o = run(&[
        "run",
        "--solo",
        "--guest",
        p.to_str().unwrap(),
        "--mem",
        "1G",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_memory_sizes_are_refused() {
    for (mem, why) in [
        ("abc", "invalid size"),
        ("12Q", "unknown unit"),
        ("2M", "below the minimum"),
        ("5M", "not a multiple of 2 MiB"),
        ("8G", "above the maximum"),
        ("99999999999999999999", "invalid size"),
    ] {
        let o = run(&["run", "--solo", "--guest", "selftest", "--mem", mem]);
        assert_eq!(o.status.code(), Some(65), "--mem {mem}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "--mem {mem}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "the guest must not start");
    }
}

#[test]
fn a_hostile_guest_cannot_crash_or_wedge_the_vmm() {
    let node = Running::start(&["run", "--solo", "--guest", "hostile"]);
    node.expect_line(
        "hostile: survived; waiting forever",
        Duration::from_secs(60),
    );
    node.signal(libc::SIGTERM);
    // A hang deadline, not a speed claim (a loaded machine may take longer than the usual
    // few milliseconds): a VMM that missed the signal would wait forever.
    let (status, err) = node.wait_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
}

#[test]
fn a_guest_that_never_exits_stops_on_sigint() {
    let node = Running::start(&["run", "--solo", "--guest", "spin"]);
    node.expect_line("spin: spinning", Duration::from_secs(30));
    node.signal(libc::SIGINT);
    // A hang deadline: the guest never exits, so only the signal (kicking the vCPU out of
    // KVM_RUN) can end the run.
    let (status, err) = node.wait_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{err}");
}

#[test]
fn guest_exit_statuses_pass_through() {
    let o = run(&[
        "run",
        "--solo",
        "--guest",
        "exitbench",
        "--guest-args",
        "bogus 10",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).contains("unknown kind"));
    let o = run(&[
        "run",
        "--solo",
        "--guest",
        "exitbench",
        "--guest-args",
        "poll 1000",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("exits=1000"), "{}", stdout(&o));
}

#[test]
fn config_files_work_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("node.toml");
    std::fs::write(
        &good,
        "solo = true\nguest = \"exitbench\"\nmem = \"32M\"\nguest_args = \"poll 10\"\n",
    )
    .unwrap();
    let o = run(&["run", "--config", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("kind=poll exits=10"), "{}", stdout(&o));
    // The command line wins over the file.
    let o = run(&[
        "run",
        "--config",
        good.to_str().unwrap(),
        "--guest-args",
        "clock 7",
    ]);
    assert!(stdout(&o).contains("kind=clock exits=7"), "{}", stdout(&o));

    for (text, why) in [
        ("solo = true\nguest = \"selftest\"\nmemory = \"64M\"\n", "unknown field `memory`"),
        ("solo = true\nguest = [1, 2]\n", "invalid type"),
        ("this is not toml at all", "config"),
        ("solo = true\nguest = \"selftest\"\ntap = \"tap0\"\n", "a NIC needs all of --tap, --mac and --ip"),
        ("solo = true\nguest = \"selftest\"\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.2/24\"\ntap = \"t\"\ngateway = \"nope\"\n", "--gateway"),
        ("solo = true\nguest = \"selftest\"\ndisk_size = \"1M\"\n", "--disk-size needs --disk"),
        // Without `solo = true` a config file describes a pair member, which needs `pair`.
        ("guest = \"selftest\"\n", "missing field `pair`"),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let o = run(&["run", "--config", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(65), "{text:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{text:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty());
    }
    let o = run(&["run", "--solo", "--config", "/nonexistent/node.toml"]);
    assert_eq!(o.status.code(), Some(65));
    assert!(
        stderr(&o).contains("/nonexistent/node.toml"),
        "{}",
        stderr(&o)
    );
}
