//! A KVM test on a host without KVM fails under `CI=true` and is a printed skip
//! elsewhere. The host running this may well have KVM: the child test is pointed at a
//! device path that does not exist (`PMSNAP_KVM_DEVICE`), and this test runs it as
//! a child process of its own test binary, once per `CI` value.

use std::process::{Command, Output};

use pmsnap_testenv::{kvm_unavailable, require, KVM_DEVICE_ENV};

const PAST: &str = "child_needs_kvm: ran past the KVM check";

/// Run only as a child of the tests below (hence ignored in a normal run).
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_needs_kvm() {
    require!("child_needs_kvm", kvm_unavailable());
    println!("{PAST}");
}

fn run_child(ci: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("own test binary"));
    cmd.args(["child_needs_kvm", "--exact", "--ignored", "--nocapture"])
        .env(KVM_DEVICE_ENV, "/nonexistent/pmsnap-test-kvm");
    match ci {
        Some(v) => cmd.env("CI", v),
        None => cmd.env_remove("CI"),
    };
    cmd.output().expect("run own test binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn under_ci_true_a_kvm_test_without_kvm_fails_with_the_reason() {
    let o = run_child(Some("true"));
    let t = text(&o);
    assert!(!o.status.success(), "must fail under CI=true: {t}");
    assert!(
        t.contains(
            "child_needs_kvm cannot run: needs KVM, but /nonexistent/pmsnap-test-kvm does not exist"
        ),
        "{t}"
    );
    assert!(!t.contains(PAST), "{t}");
}

#[test]
fn outside_ci_a_kvm_test_without_kvm_says_skipped() {
    for ci in [None, Some("false"), Some("0"), Some("")] {
        let o = run_child(ci);
        let t = text(&o);
        assert!(o.status.success(), "CI={ci:?}: {t}");
        assert!(
            t.contains(
                "SKIPPED child_needs_kvm: needs KVM, but /nonexistent/pmsnap-test-kvm does not exist"
            ),
            "CI={ci:?}: {t}"
        );
        assert!(!t.contains(PAST), "CI={ci:?}: {t}");
    }
}
