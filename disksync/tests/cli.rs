//! What a newcomer sees of `ftvm-resync`: help for every argument, errors that say what is
//! wrong once and plainly.

mod common;

use std::ffi::OsStr;

use common::*;

fn help(args: &[&str]) -> String {
    let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    a.push(OsStr::new("--help"));
    let out = run(&a);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every option and positional argument in `text` has a description on its line.
fn assert_all_described(cmd: &str, text: &str) {
    for line in text.lines() {
        let t = line.trim();
        let is_arg = t.starts_with("--") || (t.starts_with('<') && t.ends_with('>'));
        let bare = is_arg && !t.contains("  ");
        assert!(
            !bare,
            "`ftvm-resync {cmd}`: {t:?} has no help text:\n{text}"
        );
    }
}

#[test]
fn help_names_where_certificates_come_from_and_describes_every_argument() {
    let top = help(&[]);
    for cmd in ["serve", "pull", "verify", "local", "hash"] {
        let text = help(&[cmd]);
        assert!(!text.contains("ftvm-tls"), "{cmd}: {text}");
        assert_all_described(cmd, &text);
    }
    assert!(!top.contains("ftvm-tls"), "{top}");
    assert!(help(&["serve"]).contains("ftvm-witness certs init"));
}

#[test]
fn errors_state_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let out = run(&[OsStr::new("hash"), missing.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_disk_in_a_missing_directory_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.img");
    std::fs::write(&src, vec![7u8; 8192]).unwrap();
    let nodir = dir.path().join("no-such-dir");
    let dst = nodir.join("b.img");
    let out = run(&[OsStr::new("local"), src.as_os_str(), dst.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the directory {} does not exist", nodir.display())),
        "{err}"
    );
}
