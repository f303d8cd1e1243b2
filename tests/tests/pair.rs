//! The FT pair end to end: a witness, two nodes in their own namespaces with a dedicated
//! channel link, the kv guest, stock redis clients in a client namespace.
//!
//! These need root, iproute2, redis-tools and /dev/kvm; without them they fail loudly.

use std::time::Duration;

use ftvm_tests::node::redis_text;
use ftvm_tests::pair::{PairLab, PairOptions};

const BOOT: Duration = Duration::from_secs(60);

fn pair(opts: PairOptions) -> PairLab {
    match PairLab::new(opts) {
        Ok(l) => l,
        Err(e) => panic!("\n!!!!!!!!!!\ncannot build the pair lab: {e:#}\n!!!!!!!!!!\n"),
    }
}

fn benchmark(lab: &PairLab, extra: &[&str]) -> String {
    let mut cmd = lab.client.ns.command("redis-benchmark");
    cmd.args(["-h", &lab.guest_ip.to_string(), "-q"]).args(extra);
    let o = cmd.output().expect("redis-benchmark (scripts/setup installs redis-tools)");
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "redis-benchmark {extra:?} failed: {err}\n{out}");
    assert!(
        !out.to_lowercase().contains("error") && !err.to_lowercase().contains("error"),
        "{out}{err}"
    );
    out
}

#[test]
fn a_pair_serves_redis_and_the_backup_ends_identical() {
    let mut lab = pair(PairOptions::default());
    lab.start_witness().unwrap();
    let mut a = lab.start_node("a", &[]).unwrap();
    let mut b = lab.start_node("b", &[]).unwrap();
    a.expect_line("kv: listening on", BOOT).unwrap();
    b.expect_line("kv: listening on", BOOT).unwrap();
    let sa = lab.status("a").unwrap();
    let sb = lab.status("b").unwrap();
    let (primary, backup) = if sa["role"] == "primary" { ("a", "b") } else { ("b", "a") };
    let (sp, sbk) = if primary == "a" { (&sa, &sb) } else { (&sb, &sa) };
    assert_eq!(sp["role"], "primary", "{sa} {sb}");
    assert_eq!(sbk["role"], "backup", "{sa} {sb}");
    assert_eq!(sp["generation"], 1);
    assert_eq!(sbk["generation"], 1, "the backup adopted the primary's generation");

    let ip = lab.guest_ip;
    assert_eq!(redis_text(&lab.client.ns, ip, &["SET", "k", "v1"]).unwrap(), "OK");
    assert_eq!(redis_text(&lab.client.ns, ip, &["GET", "k"]).unwrap(), "v1");
    assert_eq!(redis_text(&lab.client.ns, ip, &["INCR", "n"]).unwrap(), "1");
    benchmark(&lab, &["-n", "3000", "-c", "20", "-t", "set,get"]);
    benchmark(&lab, &["-n", "3000", "-c", "20", "-P", "16", "-t", "set,get"]);
    assert_eq!(redis_text(&lab.client.ns, ip, &["INCR", "n"]).unwrap(), "2");

    let st = lab.status(primary).unwrap();
    let (acked, released) = (st["acked"].as_u64().unwrap(), st["released_boundary"].as_u64().unwrap());
    assert!(st["released_frames"].as_u64().unwrap() > 1000, "{st}");
    assert!(released <= acked + 1, "a frame left before the backup had its boundary: {st}");
    let sb = lab.status(backup).unwrap();
    assert!(sb["digests_checked"].as_u64().unwrap() > 0, "the backup compared memory digests: {sb}");

    // Stop the primary: its end record reaches the backup, which stops at the same boundary.
    let (pn, bn) = if primary == "a" { (a, b) } else { (b, a) };
    pn.signal(libc::SIGTERM);
    let (ps, perr) = pn.wait(Duration::from_secs(20)).unwrap();
    let (bs, berr) = bn.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(ps.code(), Some(128 + 15), "primary: {perr}");
    assert_eq!(bs.code(), Some(128 + 15), "backup ended as the primary did: {berr}");
    assert!(lab.disks_equal().unwrap(), "the backup's disk equals the primary's");
}
