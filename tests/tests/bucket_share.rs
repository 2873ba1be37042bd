//! Two guests of one image share their content in a bucket (issue 14): two `pmsnap run`s
//! of the test image (each started from the image's ready template, as every run of an
//! image booted before starts) run on independently and each writes data of its own;
//! each takes a VM snapshot and exports it live to a real SeaweedFS
//! (`scripts/objstore.sh`). The second export writes a small part of what the first
//! wrote, and `pmsnap repo ls` shows the content the two snapshots share. (Two cold
//! boots of the image exported to a bucket are measured in docs/perf-s3.md: the second
//! adds 0.063 of the first.)

use std::time::Duration;

use pmsnap_testenv::ObjStore;
use pmsnap_tests::{ctl_json, ready_guest, require_kvm, run_pmsnap, ReadyGuest};

const URL: &str = "s3://pmsnap/two-guests";

/// Write 1 MiB of random data in the guest, snapshot it as `name` and export it live to
/// the bucket; the export's report.
fn write_snapshot_export(g: &mut ReadyGuest, name: &str) -> serde_json::Value {
    let (out, rc) = g
        .guest
        .run(
            &format!("dd if=/dev/urandom of=/tmp/{name} bs=4096 count=256 2>&1 | tail -1"),
            Duration::from_secs(300),
        )
        .expect("dd answers");
    assert_eq!(rc, 0, "dd in guest {name}: {out}");
    ctl_json(&g.api, &["snapshot-vm", name]);
    ctl_json(&g.api, &["export", name, "--to", URL])
}

#[test]
fn two_guests_of_one_image_share_their_content_in_a_bucket() {
    require_kvm!("two_guests_of_one_image_share_their_content_in_a_bucket");
    if pmsnap_testenv::skip_or_fail(
        "two_guests_of_one_image_share_their_content_in_a_bucket",
        ObjStore::unavailable(),
    ) {
        return;
    }
    let os = ObjStore::start();
    // The VMMs export live, so they get the store's environment.
    let env: Vec<(&str, &str)> = os
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut a = ready_guest(&env);
    let mut b = ready_guest(&env);
    let ra = write_snapshot_export(&mut a, "a");
    let rb = write_snapshot_export(&mut b, "b");
    let (wa, wb) = (
        ra["bytes_written"].as_u64().expect("bytes_written"),
        rb["bytes_written"].as_u64().expect("bytes_written"),
    );
    eprintln!("first guest's export: {wa} bytes written; second guest's: {wb} ({ra} / {rb})");
    assert!(
        wa > 4 << 20,
        "the first export stores the guest's content: {ra}"
    );
    // Each guest wrote 1 MiB of its own random data (and ran on for a while): the second
    // export writes that and what else changed, not the image's content again.
    assert!(wb >= 1 << 20, "the second guest's own data is stored: {rb}");
    assert!(
        wb * 10 < wa * 3,
        "the second guest of the image writes at most 30% of the first: {wb} vs {wa}"
    );
    let ls = run_pmsnap(&["repo", "ls", URL, "--json"], &env);
    assert!(ls.status.success(), "repo ls: {}", ls.stderr);
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).expect("repo ls --json");
    let list = v
        .as_array()
        .or_else(|| v["snapshots"].as_array())
        .cloned()
        .expect("a list of snapshots");
    assert_eq!(list.len(), 2, "{v}");
    for snap in &list {
        let shared = snap["shared_bytes"].as_u64().expect("shared_bytes");
        let stored = snap["stored_bytes"].as_u64().expect("stored_bytes");
        assert!(
            shared * 2 > stored,
            "most of each snapshot's content is shared with the other: {snap}"
        );
    }
}
