//! A guest that feeds every virtio device (net, blk, rng) malformed descriptor chains must not
//! harm the VMM: each bad request fails, valid ones still work, and the VM exits normally.

use std::time::Duration;

use ftvm_tests::netns::{self, Lab};
use ftvm_tests::node::RunningNode;

#[test]
fn malformed_descriptor_chains_do_not_harm_the_vmm() {
    if let Err(e) = netns::preflight() {
        panic!("\n!!!!!!!!!!\n{e:#}\n!!!!!!!!!!\n");
    }
    let mut lab = Lab::new().unwrap();
    let node = lab.add_node("node").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let args: Vec<String> = [
        "run",
        "--solo",
        "--guest",
        "badvirtio",
        "--rng",
        "--disk",
        disk.to_str().unwrap(),
        "--disk-size",
        "1M",
        "--tap",
        node.tap.as_deref().unwrap(),
        "--mac",
        node.guest_mac.as_deref().unwrap(),
        "--ip",
        &node.guest_cidr().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut n = RunningNode::start(&node.ns, &args).unwrap();
    let line = n
        .expect_line("badvirtio: survived", Duration::from_secs(60))
        .unwrap();
    // Every device type was exercised: net (1), blk (2), rng (4).
    for dev in [1, 2, 4] {
        n.expect_line(&format!("badvirtio: device {dev}: "), Duration::ZERO)
            .unwrap();
    }
    let (status, err) = n.wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}\n{err}");
    let count: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(count >= 20, "{line}");
    assert!(
        err.contains("malformed request"),
        "the VMM logs bad requests: {err}"
    );
    assert!(
        err.lines().count() < 60,
        "bad requests are rate-limited in the log:\n{err}"
    );
}
