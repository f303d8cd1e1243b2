//! What a newcomer meets on `ftvm-node`'s command line.

mod common;

#[test]
fn digest_every_without_record_is_refused() {
    let o = common::run(&[
        "run",
        "--solo",
        "--guest",
        "selftest",
        "--digest-every",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--record"), "{err}");
    assert!(o.stdout.is_empty(), "the guest must not start");
}

#[test]
fn guests_says_which_are_test_guests_and_run_help_is_true_about_the_config_file() {
    let o = common::run(&["guests"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap();
        assert!(
            line.len() > name.len() + 5,
            "{name} has no description: {out}"
        );
        if name != "kv" {
            assert!(line.contains("test guest"), "{line}");
        }
    }
    let o = common::run(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(!help.contains("Every option can also come from"), "{help}");
    assert!(help.contains("command-line only"), "{help}");
}

#[test]
fn a_disk_in_a_missing_directory_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let disk = missing.join("d.img");
    let o = common::run(&[
        "run",
        "--solo",
        "--guest",
        "selftest",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(65), "{err}");
    assert!(
        err.contains(&format!(
            "the directory {} does not exist",
            missing.display()
        )),
        "{err}"
    );
}
