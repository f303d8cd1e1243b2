//! ftvm-node and ftvm-resync share one advisory lock on a disk image: while a VM runs on it,
//! neither a second node nor a resync may write it.

use std::process::Command;
use std::time::Duration;

use ftvm_tests::netns::sibling_binary;
use ftvm_tests::node::{require_kvm, RunningNode};

#[test]
fn a_running_vm_keeps_other_writers_off_its_disk() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vm.img");
    let node = sibling_binary("ftvm-node", "FTVM_NODE").unwrap();
    let mut vm = RunningNode::start_here(&[
        "run",
        "--solo",
        "--guest",
        "spin",
        "--disk",
        disk.to_str().unwrap(),
        "--disk-size",
        "4M",
    ])
    .unwrap();
    vm.expect_line("spin: spinning", Duration::from_secs(30))
        .unwrap();

    let second = Command::new(&node)
        .args([
            "run",
            "--solo",
            "--guest",
            "selftest",
            "--disk",
            disk.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(65), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert!(second.stdout.is_empty(), "the second VM must not start");

    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let resync = Command::new(sibling_binary("ftvm-resync", "FTVM_RESYNC").unwrap())
        .args(["local", src.to_str().unwrap(), disk.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&resync.stderr);
    assert!(!resync.status.success(), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the disk was not touched"
    );

    vm.signal(libc::SIGTERM);
    vm.wait(Duration::from_secs(5)).unwrap();
    // Once the VM is gone, the resync may proceed.
    let resync = Command::new(sibling_binary("ftvm-resync", "FTVM_RESYNC").unwrap())
        .args(["local", src.to_str().unwrap(), disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        resync.status.success(),
        "{}",
        String::from_utf8_lossy(&resync.stderr)
    );
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&src).unwrap());
}
