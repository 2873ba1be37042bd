//! The layer check: every top-level module of `vmm/src` may use only modules below it
//! in [`LAYERS`], so the crate has no import cycle and the copy-before-write core
//! (`snapshot`) cannot reach the API, persistence, the builder or the CLI. Runs with the
//! normal test command (`cargo test`), so CI fails on an upward import.
//!
//! It reads every `crate::` path in the sources (comments excluded, tests included:
//! a test module is part of its layer too) and names each upward use with its file and
//! line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The top-level modules of `vmm/src`, lowest first. A module may use the modules
/// before it, never one after it. A new module must be placed here (the check fails
/// for a module it does not know).
const LAYERS: &[&str] = &[
    // Shared types and host plumbing, used by every layer above.
    "memory",
    "stop",
    "state",
    "unix_socket",
    "pool_dir",
    "numa",
    "seccomp",
    // x86 boot and CPU tables.
    "arch",
    // Device models (serial, i8042, virtio-mmio, vsock).
    "devices",
    // KVM: the VM, vCPUs, guest RAM in the pool, the dirty log.
    "vstate",
    // Test payload mode, the event loop and the configuration.
    "payload",
    "event_loop",
    "config",
    // The copy-before-write core: store sink, fault handler, protection, dirty tracking.
    "snapshot",
    // State structs, the Persist trait and the blob format.
    "persist",
    // The control API: types, errors, HTTP server and client.
    "api",
    // Owns the engine, vCPUs, live VM state and agent client; serves the API.
    "controller",
    // Wires every device, for boot and restore.
    "device_manager",
    // Builds the VM once, for boot and restore.
    "builder",
    // The command line.
    "cli",
];

/// The crate-root files that are not modules of a layer.
const ROOTS: &[&str] = &["lib", "main"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`snapshot/engine.rs` -> `snapshot`).
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().expect("a path");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The top-level modules a line of code names after `crate::`, as in
/// `crate::a::b`, `crate::{a, b::c}` or `use crate::{a::{x, y}, b}`. A macro
/// (`crate::name!`) names no module.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `$crate::` in a macro is the same crate; a longer identifier ending in
        // `crate` (e.g. `some_crate::`) is not ours.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.extend(first_ident(&item));
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let is_macro = rest[ident.len()..].starts_with('!');
            if !ident.is_empty() && !is_macro {
                out.push(ident);
            }
        }
    }
    out
}

fn first_ident(item: &str) -> Option<String> {
    let ident: String = item
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!ident.is_empty() && ident != "self").then_some(ident)
}

/// Lines of code with comments removed (line comments, doc comments, block comments).
fn code_lines(src: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (n, line) in src.lines().enumerate() {
        let mut code = String::new();
        let mut rest = line;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(i) => {
                        rest = &rest[i + 2..];
                        in_block = false;
                    }
                    None => break,
                }
            } else {
                let lc = rest.find("//");
                let bc = rest.find("/*");
                match (lc, bc) {
                    (Some(l), Some(b)) if b < l => {
                        code.push_str(&rest[..b]);
                        rest = &rest[b + 2..];
                        in_block = true;
                    }
                    (None, Some(b)) => {
                        code.push_str(&rest[..b]);
                        rest = &rest[b + 2..];
                        in_block = true;
                    }
                    (Some(l), _) => {
                        code.push_str(&rest[..l]);
                        break;
                    }
                    (None, None) => {
                        code.push_str(rest);
                        break;
                    }
                }
            }
        }
        out.push((n + 1, code));
    }
    out
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = src_dir();
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files in {src:?}",
        files.len()
    );
    // `#[macro_export]` macros live at the crate root: `use crate::name;` of one names
    // no module.
    let macros: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("macro_rules!"))
                .map(|rest| rest.trim().trim_end_matches('{').trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let module = module_of(rel);
        if ROOTS.contains(&module.as_str()) {
            continue;
        }
        let Some(&own) = rank.get(module.as_str()) else {
            problems.push(format!(
                "{}: module {module:?} is not in LAYERS (tests/layers.rs): place it",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for (line, code) in code_lines(&text) {
            for used in crate_refs(&code) {
                if used == module || macros.contains(&used) {
                    continue;
                }
                match rank.get(used.as_str()) {
                    Some(&r) if r < own => {}
                    Some(_) => problems.push(format!(
                        "{}:{line}: {module} (layer {own}) uses {used} (layer {}), a layer above or beside it",
                        rel.display(),
                        rank[used.as_str()]
                    )),
                    None => problems.push(format!(
                        "{}:{line}: uses crate::{used}, which is not in LAYERS",
                        rel.display()
                    )),
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} upward or unknown uses:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_layer_exists_and_the_parser_sees_what_it_must() {
    let src = src_dir();
    for m in LAYERS {
        assert!(
            src.join(format!("{m}.rs")).exists() || src.join(m).join("mod.rs").exists(),
            "LAYERS names {m}, which vmm/src does not have"
        );
    }
    assert_eq!(crate_refs("use crate::a::b;"), ["a"]);
    assert_eq!(
        crate_refs("use crate::{a::{x, y}, b, self};"),
        ["a", "b"],
        "groups: top-level names only"
    );
    assert_eq!(crate_refs("let x = crate::c::f(crate::d::G);"), ["c", "d"]);
    assert!(crate_refs("crate::guest_warn!(x)").is_empty(), "macros");
    assert!(crate_refs("use pmem_crate::x;").is_empty(), "other crates");
    let lines = code_lines("a // crate::x\n/* crate::y\n crate::z */ crate::w\n");
    let refs: Vec<String> = lines.iter().flat_map(|(_, c)| crate_refs(c)).collect();
    assert_eq!(refs, ["w"], "comments are not uses");
}
