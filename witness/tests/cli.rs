//! The command line: exit codes, outputs, refusals, help.

mod common;

use common::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = cli(args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn claim_and_status_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cfg = certs_init(dir.path(), "vm1", &["node-a", "node-b"]);
    // certs init refuses to overwrite.
    let (code, _, err) = run(&[
        "certs", "init", "--dir", d, "--pair", "vm1", "--nodes", "x,y",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    let w = start(&cfg, "127.0.0.1:0", true);
    let addr = w.addr.to_string();
    let base = |node: &'static str| -> Vec<String> {
        [
            "--witness",
            &addr,
            "--tls",
            d,
            "--node",
            node,
            "--pair",
            "vm1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let call = |sub: &str, node: &'static str, extra: &[&str]| {
        let mut a: Vec<String> = vec![sub.to_string()];
        a.extend(base(node));
        a.extend(extra.iter().map(|s| s.to_string()));
        let r: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&r)
    };

    let (code, out, err) = call("claim", "node-b", &["--seen", "0"]);
    assert_eq!((code, out.trim()), (0, "1"));
    // Without --claim-id a fresh one is used and printed for retries.
    let id = err
        .split_whitespace()
        .skip_while(|w| *w != "--claim-id")
        .nth(1)
        .unwrap_or_else(|| panic!("no claim id printed: {err}"))
        .trim_end_matches(')')
        .to_string();
    assert_eq!(id.len(), 32, "{err}");
    let (code, out, _) = call("claim", "node-a", &["--seen", "0"]);
    assert_eq!((code, out.trim()), (3, "denied generation=1 holder=node-b"));
    let (code, out, _) = call("claim", "node-b", &["--seen", "0", "--claim-id", &id]);
    assert_eq!(
        (code, out.trim()),
        (0, "1"),
        "retry must return the same grant"
    );
    // The same node with another claim id is a new claim: denied.
    let (code, out, _) = call("claim", "node-b", &["--seen", "0"]);
    assert_eq!((code, out.trim()), (3, "denied generation=1 holder=node-b"));
    let (code, _, err) = call("claim", "node-b", &["--seen", "0", "--claim-id", "xyz"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("32 hexadecimal digits"), "{err}");
    // Two witness addresses: the first one answers nothing, the second one decides.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let two = format!("{},witness@{addr}", dead.local_addr().unwrap());
    let (code, out, err) = run(&[
        "status",
        "--witness",
        &two,
        "--tls",
        d,
        "--node",
        "node-a",
        "--pair",
        "vm1",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(
        (code, out.trim()),
        (0, "pair=vm1 generation=1 holder=node-b"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "status",
        "--witness",
        "localhost",
        "--tls",
        d,
        "--node",
        "node-a",
        "--pair",
        "vm1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing port"), "{err}");
    let (code, out, _) = call("claim", "node-a", &["--seen", "1"]);
    assert_eq!((code, out.trim()), (0, "2"));
    let (code, out, _) = call("status", "node-b", &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "pair=vm1 generation=2 holder=node-a")
    );
    // The witness's own identity is not a node of any pair: refused (exit 5).
    let (code, _, err) = call("claim", "witness", &["--seen", "2"]);
    assert_eq!(code, 5, "{err}");
    // Missing certificate: a local error (exit 1).
    let (code, _, err) = call("claim", "node-z", &["--seen", "2"]);
    assert_eq!(code, 1, "{err}");
    drop(w);
    // Nobody listening: unreachable (exit 4).
    let (code, _, err) = call(
        "status",
        "node-a",
        &["--timeout-ms", "200", "--attempts", "2"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn help_explains() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for w in [
        "claim",
        "serve",
        "status",
        "certs",
        "generation",
        "Exit codes",
        "--log-json",
    ] {
        assert!(out.contains(w), "--help lacks {w:?}:\n{out}");
    }
    let (code, out, _) = run(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--init") && out.contains("never silently"),
        "{out}"
    );
    let (code, _, _) = run(&["claim", "--witness", "x"]);
    assert_eq!(code, 2);
}
