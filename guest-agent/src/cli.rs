//! The command-line language shared by `pmsnap` (the VMM, its `ctl` and `store`
//! commands) and `pmsnap-agent`, so the same input means the same thing in every tool:
//!
//! - numbers: decimal, or hex with a `0x` prefix ([`parse_number`]);
//! - virtual ranges: `START-END` of such numbers, page aligned ([`parse_range`]);
//! - times: RFC 3339 in text ([`format_time_ms`]), unix milliseconds in JSON;
//! - exit codes ([`exit`]) and errors printed as JSON under `--json` ([`json_error`]).
//!
//! This crate is the bottom layer both binaries depend on (the VMM depends on it for the
//! agent protocol), which is why the shared pieces live here.

use crate::protocol::{VirtRange, PAGE_SIZE};

/// Process exit codes of every pmsnap tool.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// An error (printed with its cause; with `--json` also as JSON on stdout).
    pub const ERROR: i32 = 1;
    /// Bad usage: unknown command or option, bad value (clap's own code).
    pub const USAGE: i32 = 2;
    /// `verify` ran and found damage (checksum mismatch, broken invariant).
    pub const DAMAGE: i32 = 3;

    /// The exit-code table printed at the end of every tool's `--help`.
    pub const HELP: &str = "Exit codes: 0 success; 1 error; 2 usage error (bad command, option or \
value); 3 `store verify` found damage.";
}

/// A number or range on the command line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a decimal number nor `0x` hex.
    #[error("{0:?} is not a number: write it in decimal, or in hex with 0x (e.g. 4096 or 0x1000)")]
    Number(String),
    /// No `-` between start and end.
    #[error("{0:?} is not START-END (e.g. 0x7f0000000000-0x7f0000100000)")]
    RangeForm(String),
    /// A bound is not a multiple of the page size.
    #[error("range {0:?}: START and END must be multiples of 4096 (page aligned)")]
    RangeAlign(String),
    /// END is not above START.
    #[error("range {0:?}: END must be above START")]
    RangeEmpty(String),
}

/// Read a number: decimal (`4096`) or hex with a `0x`/`0X` prefix (`0x1000`). Nothing
/// else: a bare hex string such as `7f00` is refused rather than guessed.
pub fn parse_number(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) if !hex.starts_with(['+', '-']) => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if t.starts_with('+') => None,
        None => t.parse().ok(),
    };
    parsed.ok_or_else(|| ParseError::Number(s.to_string()))
}

/// Read a virtual range `START-END` (each bound as [`parse_number`] reads it): page
/// aligned, END above START.
pub fn parse_range(s: &str) -> Result<VirtRange, ParseError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| ParseError::RangeForm(s.to_string()))?;
    let (start, end) = (parse_number(a)?, parse_number(b)?);
    if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
        return Err(ParseError::RangeAlign(s.to_string()));
    }
    if end <= start {
        return Err(ParseError::RangeEmpty(s.to_string()));
    }
    Ok(VirtRange { start, end })
}

/// A time given in milliseconds since the Unix epoch as RFC 3339 in UTC, to the second
/// (`2023-11-14T22:13:20Z`): the text form of every time pmsnap prints. JSON carries the
/// milliseconds themselves (fields named `*_unix_ms`).
pub fn format_time_ms(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_second(secs) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{unix_ms} ms after the epoch"),
    }
}

/// The JSON printed on stdout for an error under `--json`:
/// `{"error": {"message": ..., "exit_code": ...}}` plus any `extra` fields (for example
/// the API's `status` and `code`).
pub fn json_error(
    message: &str,
    exit_code: i32,
    extra: serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut detail = serde_json::Map::new();
    detail.insert("message".into(), message.into());
    detail.insert("exit_code".into(), exit_code.into());
    detail.extend(extra);
    serde_json::json!({ "error": detail }).to_string()
}

/// Whether a command line asks for JSON output (`--json` before any `--`), so that even
/// a usage error, found before the arguments are parsed, can be answered in JSON.
pub fn wants_json<I, S>(args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_owned())
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Print a clap parse error the way every pmsnap tool does and return its exit code:
/// `--help` and `--version` print to stdout and return 0; a usage error prints clap's
/// message to stderr and, when `json`, also [`json_error`] to stdout, and returns
/// [`exit::USAGE`].
pub fn report_clap_error(e: &clap::Error, json: bool) -> i32 {
    if e.exit_code() == 0 {
        let _ = e.print();
        return exit::OK;
    }
    let _ = e.print();
    if json {
        if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            let msg = "a command is required (see --help)";
            println!("{}", json_error(msg, exit::USAGE, Default::default()));
            return exit::USAGE;
        }
        let msg = e.render().to_string();
        let first = msg
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("usage error")
            .trim_start_matches("error: ")
            .to_string();
        println!("{}", json_error(&first, exit::USAGE, Default::default()));
    }
    exit::USAGE
}

/// A snapshot name argument: positional (`save NAME`), with the older `--name NAME`
/// spelling still accepted (hidden from `--help`). Flatten it into a subcommand.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NameArg {
    /// Snapshot name: 1-64 of A-Z a-z 0-9 . _ -, not starting with '.' (`--name NAME`
    /// is accepted too).
    #[arg(value_name = "NAME", required_unless_present = "name_flag")]
    name: Option<String>,
    /// The older spelling of NAME.
    #[arg(
        long = "name",
        value_name = "NAME",
        hide = true,
        conflicts_with = "name"
    )]
    name_flag: Option<String>,
}

impl From<&str> for NameArg {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl NameArg {
    /// A name given positionally.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            name_flag: None,
        }
    }

    /// The name, however it was given (clap requires one of the two spellings).
    pub fn get(&self) -> &str {
        self.name
            .as_deref()
            .or(self.name_flag.as_deref())
            .unwrap_or_default()
    }
}

/// The `--help` blocks of a document: a line `<!-- help: CMD ARGS -->` followed by a
/// ```` ```text ```` fence holding the output of `CMD ARGS --help`. Returns the document
/// with every block whose command starts with `program` replaced by `help(ARGS)`, and
/// the commands whose block differed (the docs' tests fail on those; with
/// `PMSNAP_UPDATE_DOCS=1` they write the returned text instead). A marker without its
/// fence is an error.
pub fn refresh_help_blocks(
    doc: &str,
    program: &str,
    mut help: impl FnMut(&[&str]) -> String,
) -> Result<(String, Vec<String>, usize), String> {
    const MARK: &str = "<!-- help: ";
    const FENCE: &str = "```text\n";
    let mut out = String::with_capacity(doc.len());
    let (mut stale, mut seen, mut pos) = (Vec::new(), 0, 0);
    while let Some(i) = doc[pos..].find(MARK) {
        let start = pos + i;
        let line_end = start
            + doc[start..]
                .find('\n')
                .ok_or("help marker on the last line")?;
        let cmd = doc[start + MARK.len()..line_end]
            .trim_end()
            .trim_end_matches("-->")
            .trim()
            .to_string();
        let body = line_end + 1;
        if !doc[body..].starts_with(FENCE) {
            return Err(format!(
                "help block {cmd:?}: no ```text fence after the marker"
            ));
        }
        let body = body + FENCE.len();
        let end = if doc[body..].starts_with("```") {
            body
        } else {
            body + doc[body..]
                .find("\n```")
                .ok_or_else(|| format!("help block {cmd:?}: no closing fence"))?
                + 1
        };
        out.push_str(&doc[pos..body]);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        if words.first() == Some(&program) {
            let want = help(&words[1..]);
            if doc[body..end] != want {
                stale.push(cmd.clone());
            }
            out.push_str(&want);
            seen += 1;
        } else {
            out.push_str(&doc[body..end]);
        }
        pos = end;
    }
    out.push_str(&doc[pos..]);
    Ok((out, stale, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_decimal_or_0x_hex() {
        assert_eq!(parse_number("4096"), Ok(4096));
        assert_eq!(parse_number(" 0x1000 "), Ok(0x1000));
        assert_eq!(parse_number("0XfF"), Ok(255));
        assert_eq!(parse_number("0"), Ok(0));
        assert_eq!(parse_number("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "0x",
            "7f00",
            "1000h",
            "-1",
            "+1",
            "0x-1",
            "0x+1",
            "0x1_000",
            "18446744073709551616",
            "0x10000000000000000",
        ] {
            let e = parse_number(bad).expect_err(bad);
            assert!(e.to_string().contains("decimal, or in hex with 0x"), "{e}");
        }
    }

    #[test]
    fn ranges_read_the_same_in_every_tool() {
        let r = |start, end| VirtRange { start, end };
        // The issue's example: decimal, not hex.
        assert_eq!(parse_range("4096-8192"), Ok(r(4096, 8192)));
        assert_eq!(parse_range("0x1000-0x3000"), Ok(r(0x1000, 0x3000)));
        assert_eq!(parse_range("0x1000-8192"), Ok(r(4096, 8192)));
        assert_eq!(
            parse_range("0x7f0000000000-0x7f0000001000"),
            Ok(r(0x7f00_0000_0000, 0x7f00_0000_1000))
        );
        assert_eq!(
            parse_range("1000-2000"),
            Err(ParseError::RangeAlign("1000-2000".into()))
        );
        assert_eq!(
            parse_range("7f0000000000-7f0000001000"),
            Err(ParseError::Number("7f0000000000".into()))
        );
        assert_eq!(
            parse_range("0x1000"),
            Err(ParseError::RangeForm("0x1000".into()))
        );
        assert_eq!(
            parse_range("0x2000-0x1000"),
            Err(ParseError::RangeEmpty("0x2000-0x1000".into()))
        );
        assert_eq!(
            parse_range("0x1000-0x1000"),
            Err(ParseError::RangeEmpty("0x1000-0x1000".into()))
        );
        assert!(parse_range("x-2000").is_err());
        assert!(parse_range("").is_err());
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time_ms(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        // Past jiff's range (year 9999): still a readable answer, no panic.
        assert!(format_time_ms(u64::MAX).contains("ms after the epoch"));
    }

    #[test]
    fn json_errors_and_detection() {
        let mut extra = serde_json::Map::new();
        extra.insert("status".into(), 404.into());
        let s = json_error("no snapshot \"x\"", exit::ERROR, extra);
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["error"]["message"], "no snapshot \"x\"");
        assert_eq!(v["error"]["exit_code"], 1);
        assert_eq!(v["error"]["status"], 404);
        assert!(wants_json(["pmsnap", "ctl", "--json", "ls"]));
        assert!(!wants_json(["pmsnap", "ctl", "ls"]));
        assert!(!wants_json(["pmsnap", "--", "--json"]));
    }

    #[test]
    fn help_blocks_are_found_compared_and_refreshed() {
        let doc = "intro\n<!-- help: tool sub -->\n```text\nold\n```\nmid\n\
                   <!-- help: other -->\n```text\nkeep\n```\n<!-- help: tool -->\n```text\n```\nend\n";
        let help = |a: &[&str]| format!("help of {a:?}\n");
        let (out, stale, seen) = refresh_help_blocks(doc, "tool", help).expect("parse");
        assert_eq!(seen, 2);
        assert_eq!(stale, vec!["tool sub".to_string(), "tool".to_string()]);
        assert!(
            out.contains("```text\nhelp of [\"sub\"]\n```\nmid"),
            "{out}"
        );
        assert!(out.contains("```text\nkeep\n```"), "{out}");
        assert!(out.contains("```text\nhelp of []\n```\nend\n"), "{out}");
        // Refreshed text is up to date.
        let (again, stale, _) = refresh_help_blocks(&out, "tool", help).expect("parse");
        assert!(stale.is_empty());
        assert_eq!(again, out);
        assert!(refresh_help_blocks("<!-- help: tool -->\nno fence\n", "tool", help).is_err());
        assert!(refresh_help_blocks("<!-- help: tool -->\n```text\nx", "tool", help).is_err());
    }

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        name: NameArg,
    }

    #[test]
    fn name_is_positional_or_the_old_flag() {
        use clap::Parser;
        let p = |a: &[&str]| T::try_parse_from(std::iter::once("t").chain(a.iter().copied()));
        assert_eq!(p(&["snap"]).expect("positional").name.get(), "snap");
        assert_eq!(p(&["--name", "old"]).expect("flag").name.get(), "old");
        let e = p(&[]).expect_err("missing");
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(p(&["a", "--name", "b"]).is_err(), "both spellings at once");
        assert_eq!(NameArg::new("x").get(), "x");
    }

    #[test]
    fn clap_errors_map_to_the_documented_codes() {
        let cmd = || {
            clap::Command::new("t")
                .subcommand_required(true)
                .arg_required_else_help(true)
                .subcommand(clap::Command::new("ls"))
        };
        let help = cmd()
            .try_get_matches_from(["t", "--help"])
            .expect_err("help");
        assert_eq!(report_clap_error(&help, true), exit::OK);
        let missing = cmd().try_get_matches_from(["t"]).expect_err("no command");
        assert_eq!(report_clap_error(&missing, true), exit::USAGE);
        let bad = cmd()
            .try_get_matches_from(["t", "nope"])
            .expect_err("bad command");
        assert_eq!(report_clap_error(&bad, false), exit::USAGE);
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let codes = [exit::OK, exit::ERROR, exit::USAGE, exit::DAMAGE];
        for (i, a) in codes.iter().enumerate() {
            assert!(codes[i + 1..].iter().all(|b| a != b));
            assert!(exit::HELP.contains(&a.to_string()));
        }
        // clap's own code for a usage error is the one documented.
        let e = clap::Command::new("t")
            .try_get_matches_from(["t", "--nope"])
            .expect_err("unknown option");
        assert_eq!(e.exit_code(), exit::USAGE);
    }
}
