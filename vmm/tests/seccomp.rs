//! The per-thread seccomp filters are fatal for a forbidden system call, in every thread
//! kind, and say which call it was; allowed calls go through.
//!
//! Each case runs in a child process (this test binary, re-run with one test selected and
//! an environment variable naming the case), because a filter cannot be removed and a
//! forbidden call ends the whole process.

use std::process::Command;

use vmm::seccomp::{self, ThreadKind, EXIT_SECCOMP};

const CASE_ENV: &str = "PMSNAP_SECCOMP_CASE";

fn kind_named(name: &str) -> ThreadKind {
    ThreadKind::ALL
        .into_iter()
        .find(|k| format!("{k:?}") == name)
        .expect("a thread kind")
}

/// The child side: in a thread of its own, install the filter of the kind named by the
/// environment, make an allowed call, then a forbidden one (`ptrace` or `execve`).
#[test]
#[ignore = "the child side of a_forbidden_call_stops_the_process_in_every_thread_kind"]
fn child_case() {
    let case = std::env::var(CASE_ENV).expect("run by the parent test, which sets the case");
    let (kind, call) = case.split_once(':').expect("KIND:CALL");
    let kind = kind_named(kind);
    let call = call.to_string();
    let t = std::thread::spawn(move || {
        seccomp::install(kind).expect("install");
        // Allowed in every kind: a write to stderr.
        eprintln!("child: {kind:?} filter installed, write allowed");
        // Opening a file is refused with EACCES, not fatal (glibc's allocator may try).
        match std::fs::File::open("/proc/sys/vm/overcommit_memory") {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => eprintln!("child: open refused"),
            // Not the File's Debug: it reads /proc/self/fd (readlink), allowed nowhere.
            Ok(_) => eprintln!("child: open gave Ok"),
            Err(e) => eprintln!("child: open gave {e}"),
        }
        // SAFETY: raw system calls with harmless arguments; each is forbidden, so the
        // filter stops the process before the kernel looks at them.
        unsafe {
            match call.as_str() {
                "ptrace" => libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0),
                "execve" => libc::syscall(libc::SYS_execve, 0, 0, 0),
                "socket" => libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0),
                other => panic!("unknown call {other}"),
            };
        }
        eprintln!("child: the forbidden call returned");
    });
    let _ = t.join();
    // Reaching here means the filter did not stop the process.
    std::process::exit(3);
}

fn run_child(kind: ThreadKind, call: &str) -> (Option<i32>, String) {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_case",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_ENV, format!("{kind:?}:{call}"))
        .output()
        .expect("run the child");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_call_stops_the_process_in_every_thread_kind() {
    for kind in ThreadKind::ALL {
        for call in ["ptrace", "execve"] {
            let (code, stderr) = run_child(kind, call);
            assert!(
                stderr.contains("write allowed"),
                "{kind:?}: the allowed write did not happen: {stderr}"
            );
            if kind.opens_files() {
                assert!(
                    stderr.contains("open gave Ok"),
                    "{kind:?}: the export worker must open files: {stderr}"
                );
            } else {
                assert!(
                    stderr.contains("open refused"),
                    "{kind:?}: opening a file was not refused with EACCES: {stderr}"
                );
            }
            assert_eq!(
                code,
                Some(EXIT_SECCOMP),
                "{kind:?} {call}: exit status, stderr: {stderr}"
            );
            let line = format!(
                "the {} thread made the forbidden system call {call}",
                kind.name()
            );
            assert!(stderr.contains(&line), "{kind:?}: no '{line}' in {stderr}");
            assert!(
                !stderr.contains("forbidden call returned"),
                "{kind:?}: {stderr}"
            );
        }
    }
    // Only the API threads may open sockets (the agent client): a vCPU may not.
    let (code, stderr) = run_child(ThreadKind::Vcpu, "socket");
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(stderr.contains("socket"), "{stderr}");
}
