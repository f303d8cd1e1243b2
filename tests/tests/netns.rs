//! Tests of the network-namespace harness: reachability across the fabric, cutting and
//! restoring links, TAP devices, and that nothing is left behind.
//!
//! These need root and iproute2. Without them they fail loudly (never skip): CI has both.

use std::net::Ipv4Addr;
use std::time::Duration;

use ftvm_tests::netns::{self, Lab};

/// Builds a lab or fails the test with a loud explanation.
fn lab() -> Lab {
    if let Err(e) = netns::preflight() {
        eprintln!("\n\n!!!!!!!!!!\n{e:#}\n!!!!!!!!!!\n");
        panic!("{e:#}");
    }
    // The harness finds the probe next to this executable, where cargo builds it.
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap();
    assert_eq!(
        canon(&netns::probe_binary().unwrap()),
        canon(std::path::Path::new(env!("CARGO_BIN_EXE_ftvm-nsprobe")))
    );
    Lab::new().expect("building the lab")
}

/// Asserts that no namespace or root-namespace interface with `id` exists.
fn assert_gone(id: &str) {
    let ns: Vec<_> = netns::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(id))
        .collect();
    let links: Vec<_> = netns::list_links(None)
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(id))
        .collect();
    assert!(
        ns.is_empty() && links.is_empty(),
        "left behind: {ns:?} {links:?}"
    );
}

const T: Duration = Duration::from_millis(300);

#[test]
fn ping_across_the_bridge_cut_and_restore() {
    let mut lab = lab();
    let id = lab.id().to_string();
    let client = lab.add_host("client").unwrap();
    let a = lab.add_node("a").unwrap();
    let witness = lab.add_host("witness").unwrap();
    assert_eq!(lab.namespaces().len(), 4);
    for n in lab.namespaces() {
        assert!(n.starts_with(&id));
    }

    assert!(client.ns.ping(a.ip, 10, T).unwrap(), "client -> node a");
    assert!(
        witness.ns.ping(client.ip, 10, T).unwrap(),
        "witness -> client"
    );
    assert!(a.ns.ping(witness.ip, 10, T).unwrap(), "node a -> witness");

    lab.cut(&a).unwrap();
    assert!(
        !client.ns.ping(a.ip, 2, T).unwrap(),
        "client reached a cut node"
    );
    assert!(
        !a.ns.ping(witness.ip, 2, T).unwrap(),
        "a cut node reached the witness"
    );
    assert!(
        client.ns.ping(witness.ip, 5, T).unwrap(),
        "the rest still talk"
    );

    lab.restore(&a).unwrap();
    assert!(client.ns.ping(a.ip, 10, T).unwrap(), "restored");

    // An address outside the lab is unreachable: nothing routes out of it.
    assert!(!client
        .ns
        .ping(Ipv4Addr::new(10, 203, 0, 250), 1, T)
        .unwrap());

    lab.cleanup().unwrap();
    drop(lab);
    assert_gone(&id);
}

#[test]
fn tcp_between_namespaces_and_spawned_processes_are_killed() {
    let mut lab = lab();
    let client = lab.add_host("client").unwrap();
    let b = lab.add_node("b").unwrap();
    let mut server = b.ns.spawn_echo(b.ip, 7007).unwrap();
    let up = netns::Netns::wait_until(Duration::from_secs(5), || client.ns.tcp_echo(b.ip, 7007, T))
        .unwrap();
    assert!(up, "TCP echo from client to node b");
    assert!(client.ns.tcp_open(b.ip, 7007, T).unwrap());
    assert!(
        !client.ns.tcp_open(b.ip, 7008, T).unwrap(),
        "nothing listens there"
    );
    assert!(server.is_running());
    lab.cut(&b).unwrap();
    assert!(!client.ns.tcp_echo(b.ip, 7007, T).unwrap());
    lab.restore(&b).unwrap();
    assert!(
        netns::Netns::wait_until(Duration::from_secs(5), || client.ns.tcp_echo(b.ip, 7007, T))
            .unwrap()
    );
    let pid = server.pid();
    drop(server);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn node_has_a_tap_on_its_bridge_and_no_ipv6() {
    let mut lab = lab();
    let a = lab.add_node("a").unwrap();
    let tap = a.tap.clone().unwrap();
    let bridge = a.bridge.clone().unwrap();
    assert!(tap.len() <= 15 && bridge.len() <= 15 && a.uplink.len() <= 15);
    let show = a.ns.run(&["ip", "-d", "link", "show", &tap]).unwrap();
    assert!(
        show.contains("tun") && show.contains(&format!("master {bridge}")),
        "{show}"
    );
    assert_eq!(a.guest_ip, Some(Ipv4Addr::new(10, 203, 0, 100)));
    assert_eq!(a.guest_cidr().as_deref(), Some("10.203.0.100/24"));
    assert_eq!(a.cidr(), "10.203.0.10/24");
    for i in [&tap, &bridge, &a.uplink] {
        let v =
            a.ns.run(&["cat", &format!("/proc/sys/net/ipv6/conf/{i}/disable_ipv6")])
                .unwrap();
        assert_eq!(v.trim(), "1", "IPv6 on {i}");
    }
    let fab = lab
        .fabric()
        .run(&[
            "cat",
            &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", a.fabric_port),
        ])
        .unwrap();
    assert_eq!(fab.trim(), "1");
    // No IPv6 address anywhere in the node's namespace.
    let addrs = a.ns.run(&["ip", "-6", "addr", "show"]).unwrap();
    assert!(addrs.trim().is_empty(), "{addrs}");
    // Nothing of the lab is in the root namespace.
    let root = netns::list_links(None).unwrap();
    assert!(!root.iter().any(|l| l.starts_with(lab.id())), "{root:?}");
}

#[test]
fn cleanup_happens_on_panic() {
    let id = std::panic::catch_unwind(|| {
        let mut lab = lab();
        lab.add_node("a").unwrap();
        lab.add_host("client").unwrap();
        let id = lab.id().to_string();
        // Smuggle the id out through the panic payload.
        std::panic::panic_any(id);
    })
    .expect_err("the closure panics")
    .downcast::<String>()
    .expect("the payload is the lab id");
    assert_gone(&id);
}

#[test]
fn sweeper_removes_leftovers_of_dead_processes() {
    // Needs root like the rest; run it through the same check.
    drop(lab());
    // A pid that is not running now.
    let dead = (1000..4_000_000u32)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let mut digits = String::new();
    let mut v = dead;
    for _ in 0..5 {
        digits.insert(0, std::char::from_digit(v % 36, 36).unwrap());
        v /= 36;
    }
    let stale_ns = format!("{}{digits}zz-fabric", netns::NAME_PREFIX);
    let stale_link = format!("{}{digits}zzb", netns::NAME_PREFIX);
    netns::ip(&["netns", "add", &stale_ns]).unwrap();
    netns::ip(&["link", "add", &stale_link, "type", "bridge"]).unwrap();
    let removed = netns::sweep_stale();
    assert!(
        removed.contains(&stale_ns) && removed.contains(&stale_link),
        "{removed:?}"
    );
    assert_gone(&format!("{}{digits}zz", netns::NAME_PREFIX));
}
