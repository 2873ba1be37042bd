//! Checks of a restored guest's health shared by the restore-fidelity tests: a shorter
//! RCU stall timeout, the kernel-log warnings a bad restore leaves, and the guest's
//! uptime (its kvm-clock) to see whether it jumped.

use std::time::Duration;

use guest_agent::churn::{expected_checksums, Churn};

use crate::Guest;

/// RCU CPU stall timeout the fidelity tests give the guest, in seconds (the kernel's
/// minimum; the default guest's is 21). A restore that makes the guest see the gap as a
/// stall then reports it within a few seconds of resuming.
pub const STALL_TIMEOUT_S: u64 = 3;

/// Kernel-log phrases of RCU stall, lockup, clocksource and timer trouble (matched
/// case-insensitively). Boot messages such as `clocksource: Switched to clocksource
/// kvm-clock` or `TSC deadline timer available` match none of them.
pub const WARNINGS: &[&str] = &[
    "rcu: info",
    "detected stall",
    "detected expedited stall",
    "kthread starved",
    "kthread timer wakeup didn't happen",
    "timer handling issue",
    "soft lockup",
    "hard lockup",
    "timekeeping watchdog",
    "marking clocksource",
    "clocksource watchdog",
    "skew is too large",
    "hrtimer: interrupt took",
    "time went backwards",
    "nmi backtrace",
];

/// Words the guest's `grep` keeps before the host-side check (a superset of
/// [`WARNINGS`], so only a few lines cross the serial console).
const PREFILTER: &str =
    "rcu: info|stall|starved|wakeup|timer handling|lockup|watchdog|clocksource|skew|hrtimer|backwards|nmi";

/// The kernel-log lines (`[  12.345678] ...`) of `log` that carry one of the
/// [`WARNINGS`]. Other lines (echoed commands, which the console may wrap anywhere, or
/// shell prompts) are not looked at.
pub fn warning_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let l = l.trim_start().to_ascii_lowercase();
            l.starts_with('[') && WARNINGS.iter().any(|w| l.contains(w))
        })
        .map(str::to_string)
        .collect()
}

/// The guest kernel log's warning lines ([`warning_lines`] of `dmesg`).
pub fn kernel_warnings(g: &mut Guest, timeout: Duration) -> Vec<String> {
    let (out, rc) = g
        .run(&format!("dmesg | grep -iE '{PREFILTER}'"), timeout)
        .unwrap_or_else(|| {
            panic!(
                "dmesg does not finish within {timeout:?}; console tail:\n{}",
                tail(&g.output(), 2000)
            )
        });
    // grep exits 1 when nothing matched.
    assert!(rc == 0 || rc == 1, "dmesg | grep failed ({rc}): {out}");
    warning_lines(&out)
}

/// Set the guest's RCU CPU stall timeout (the `rcupdate.rcu_cpu_stall_timeout`
/// parameter, writable at run time) and check that it took.
pub fn set_stall_timeout(g: &mut Guest, secs: u64, timeout: Duration) {
    let p = "/sys/module/rcupdate/parameters/rcu_cpu_stall_timeout";
    let (out, rc) = g
        .run(&format!("echo {secs} > {p} && cat {p}"), timeout)
        .expect("setting the RCU stall timeout finishes");
    assert_eq!(rc, 0, "cannot set the RCU stall timeout: {out}");
    assert_eq!(
        last_line(&out),
        secs.to_string(),
        "stall timeout read back: {out}"
    );
}

/// The guest's uptime in seconds (`/proc/uptime`, kvm-clock based).
pub fn uptime(g: &mut Guest, timeout: Duration) -> f64 {
    let (out, rc) = g
        .run("cat /proc/uptime", timeout)
        .expect("cat /proc/uptime finishes");
    assert_eq!(rc, 0, "{out}");
    last_line(&out)
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {out:?}"))
}

/// The last non-empty line a command printed: lines typed before it that the shell
/// echoed late (while it was starting) may come first.
pub fn last_line(out: &str) -> &str {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

/// The last `n` bytes of `s` (on a character boundary), for failure messages.
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The complete `C=<n> S=<checksum>` churn lines in `text`, in order. The text before the
/// first newline may be the tail of a line cut by a snapshot, a rollback or a restore, and
/// the text after the last one is unfinished: neither is a churn line unless it is whole.
pub fn churn_lines(text: &str) -> Vec<(u64, u64)> {
    let Some(end) = text.rfind('\n') else {
        return Vec::new();
    };
    text[..end]
        .split('\n')
        .filter_map(Churn::parse_line)
        .collect()
}

/// Check that every churn line in `text` has the exact checksum of its step; returns
/// how many lines there were, or the first wrong one.
pub fn check_checksums(text: &str) -> Result<usize, String> {
    let lines = churn_lines(text);
    let ns: Vec<u64> = lines.iter().map(|l| l.0).collect();
    let want: std::collections::HashMap<u64, u64> = expected_checksums(&ns).into_iter().collect();
    for (n, got) in &lines {
        let w = want.get(n).copied().unwrap_or_default();
        if *got != w {
            return Err(format!(
                "step {n} printed checksum {got:016x}, the rule gives {w:016x}"
            ));
        }
    }
    Ok(lines.len())
}

/// [`check_checksums`], which must pass; panics naming `what` otherwise.
pub fn assert_checksums(text: &str, what: &str) -> usize {
    check_checksums(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_catch_the_stall_report_and_spare_boot_lines() {
        // The lines of issue 15's stalled restore, and other warnings of the kind.
        let bad = "[   38.590000] rcu: INFO: rcu_sched self-detected stall on CPU\n\
            [   38.590001] rcu: rcu_sched kthread timer wakeup didn't happen for 45983 jiffies! g1234 f0x0 RCU_GP_WAIT_FQS(5) ->state=0x402\n\
            [   38.590002] rcu: \tPossible timer handling issue on cpu=1 timer-softirq=326\n\
            [   40.000000] clocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable because the skew is too large:\n\
            [   50.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]\n";
        assert_eq!(warning_lines(bad).len(), 5, "{:?}", warning_lines(bad));
        let boot = "[    0.004147] clocksource: kvm-clock: mask: 0xffffffffffffffff max_cycles: 0x1cd42e4dffb\n\
            [    6.829383] TSC deadline timer available\n\
            [   17.605512] clocksource: Switched to clocksource kvm-clock\n\
            [   18.876268] clocksource: tsc: mask: 0xffffffffffffffff max_cycles: 0x1e4530a99b6\n\
            [   33.036457] IPI shorthand broadcast: enabled\n";
        assert!(warning_lines(boot).is_empty(), "{:?}", warning_lines(boot));
        // The echoed command (wrapped by the console) is not a kernel-log line.
        let echo =
            "/ # dmesg | grep -iE 'rcu: info|stall|starved|wakeup|timer handling|lockup|watchd\r\n\
            og|clocksource|skew|hrtimer|backwards|nmi'; echo \"rc\"\"3-$?-end\"\n";
        assert!(warning_lines(echo).is_empty(), "{:?}", warning_lines(echo));
        // Every phrase is caught by the guest-side prefilter.
        for w in WARNINGS {
            assert!(
                PREFILTER.split('|').any(|p| w.contains(p)),
                "{w} is dropped by the prefilter"
            );
        }
    }

    #[test]
    fn last_line_skips_late_echoes_and_blank_lines() {
        assert_eq!(
            last_line("shell-42\n/ # echo x\nkvm-clock\n\n"),
            "kvm-clock"
        );
        assert_eq!(last_line(""), "");
    }

    #[test]
    fn tail_keeps_char_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
