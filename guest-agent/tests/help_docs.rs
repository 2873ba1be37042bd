//! `pmsnap-agent` as a user meets it, without a VMM: usage errors (exit 2), errors as
//! JSON under `--json`, the shared range rule, and docs/agent.md, whose `--help` blocks
//! must be the binary's own output (`PMSNAP_UPDATE_DOCS=1 cargo test -p guest-agent
//! --test help_docs` rewrites them).

use std::path::Path;
use std::process::{Command, Output};

use guest_agent::cli::{exit, refresh_help_blocks};

const AGENT: &str = env!("CARGO_BIN_EXE_pmsnap-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        // Nothing listens here: every request fails fast, like a guest without vsock.
        .env("PMSNAP_TRANSPORT", "unix:/nonexistent/pmsnap-test.sock")
        .output()
        .expect("run pmsnap-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn usage_errors_and_json_errors() {
    // The agent's old rule read bare hex; now it is refused, with the shared message.
    let o = agent(&["save", "x", "--pid", "1", "--range", "7f000-7f100"]);
    assert_eq!(o.status.code(), Some(exit::USAGE));
    assert!(
        text(&o.stderr).contains("decimal, or in hex with 0x"),
        "{}",
        text(&o.stderr)
    );
    let o = agent(&["--json", "ls", "--bogus"]);
    assert_eq!(o.status.code(), Some(exit::USAGE));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON usage error");
    assert_eq!(v["error"]["exit_code"], exit::USAGE);
    // A failing request: one line on stderr, and JSON on stdout with --json.
    for verb in ["list", "ls"] {
        let o = agent(&[verb, "--json"]);
        assert_eq!(o.status.code(), Some(exit::ERROR), "{verb}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON error");
        assert_eq!(v["error"]["exit_code"], exit::ERROR);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(text(&o.stderr).starts_with("pmsnap-agent: error: "));
    }
    let o = agent(&["delete", "x"]);
    assert_eq!(o.status.code(), Some(exit::ERROR));
    assert!(o.stdout.is_empty(), "no JSON without --json");
}

#[test]
fn docs_match_help() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent.md");
    let text_before = std::fs::read_to_string(&doc).expect("read docs/agent.md");
    let help = |args: &[&str]| {
        let o = Command::new(AGENT)
            .args(args)
            .arg("--help")
            .output()
            .expect("run --help");
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        text(&o.stdout)
    };
    let (fresh, stale, seen) =
        refresh_help_blocks(&text_before, "pmsnap-agent", help).expect("help blocks");
    assert!(
        seen >= 2,
        "only {seen} pmsnap-agent help blocks in docs/agent.md"
    );
    if std::env::var_os("PMSNAP_UPDATE_DOCS").is_some() {
        std::fs::write(&doc, fresh).expect("write docs/agent.md");
    } else {
        assert!(
            stale.is_empty(),
            "docs/agent.md: the --help of {stale:?} changed; run PMSNAP_UPDATE_DOCS=1 cargo \
             test -p guest-agent --test help_docs and review the diff"
        );
    }
}
