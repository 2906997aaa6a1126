//! The numbers the crates' layout keeps, checked on the sources: the core's
//! top-level modules import no circle, its root stays a map of at most 16
//! entries, and no shipped file or function outgrows a screen's worth of
//! reading (600 lines of code a file, 80 lines a function, tests aside).
//!
//! Shipped: what the `fanout` binary is built from, but the fakes (test
//! support behind a feature the binary does not enable).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::sources::{production_source, root, rust_files};

const SHIPPED: &[&str] = &["crates/core/src", "crates/aws/src", "crates/fanout/src"];
const MAX_ROOT_ENTRIES: usize = 16;
const MAX_FILE_CODE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 80;

/// The shipped files, without test files and the fakes.
fn shipped_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in SHIPPED {
        rust_files(&root().join(dir), &mut files);
    }
    files.retain(|f| {
        let text = f.to_string_lossy();
        !text.contains("/fakes/") && !f.ends_with("tests.rs")
    });
    files
}

/// The source's lines of code: neither blank nor a comment.
fn code_lines(source: &str) -> usize {
    source
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

/// Each function of `source` longer than `max` lines, as (name, lines).
/// A function ends at the first line after its signature that is its own
/// indentation and `}`, as rustfmt writes it.
fn long_functions(source: &str, max: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = function_name(line) else {
            continue;
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        if let Some(length) = body_length(&lines[start..], indent)
            && length > max
        {
            long.push((name, length));
        }
    }
    long
}

/// The lines from a signature to its closing `}` at `indent`; `None` for a
/// declaration without a body (a trait's), which ends in `;` at `indent`.
fn body_length(from_signature: &[&str], indent: &str) -> Option<usize> {
    let close = format!("{indent}}}");
    for (offset, line) in from_signature.iter().enumerate() {
        if offset > 0 && *line == close {
            return Some(offset + 1);
        }
        let at_indent = line
            .strip_prefix(indent)
            .is_some_and(|rest| rest.starts_with(|c: char| !c.is_whitespace()));
        if at_indent && line.trim_end().ends_with(';') {
            return None;
        }
    }
    None
}

/// The name of the function a line declares, if it declares one.
fn function_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    for qualifier in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(qualifier).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("fn ")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The core's top-level module a file belongs to (`engine` for
/// `src/engine/run.rs`), `None` for the root itself.
fn top_module(core: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(core).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?.trim_end_matches(".rs");
    (name != "lib").then(|| name.to_owned())
}

/// The top-level modules a source names through `crate::…`, comments aside.
fn imports(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in source.lines().filter(|l| !l.trim().starts_with("//")) {
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let group = rest
                .strip_prefix('{')
                .map(|g| g.split('}').next().unwrap_or(g));
            let words = group.unwrap_or(rest);
            let firsts: Vec<&str> = match group {
                Some(_) => words.split(',').collect(),
                None => vec![words],
            };
            for first in firsts {
                let word: String = first
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&word) {
                    named.insert(word);
                }
            }
        }
    }
    named
}

/// A circle in `edges`, as the modules along it, if there is one.
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        at: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(from) = path.iter().position(|m| m == at) {
            let mut found = path[from..].to_vec();
            found.push(at.to_owned());
            return Some(found);
        }
        if done.contains(at) {
            return None;
        }
        path.push(at.to_owned());
        for next in edges.get(at).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(at.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|start| visit(start, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_core_s_top_level_modules_import_no_circle() {
    let core = root().join("crates/core/src");
    let mut files = Vec::new();
    rust_files(&core, &mut files);
    files.retain(|f| !f.ends_with("tests.rs"));
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&core, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = top_module(&core, file) else {
            continue;
        };
        let mut named = imports(&production_source(file), &modules);
        named.remove(&module);
        edges.entry(module).or_default().extend(named);
    }
    // The reading finds the edges it should: the engine uses the store.
    assert!(edges["engine"].contains("store"), "{edges:?}");
    assert_eq!(circle(&edges), None, "{edges:?}");
}

#[test]
fn a_circle_is_found_where_there_is_one() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in pairs {
            edges
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
        }
        edges
    };
    assert_eq!(circle(&edges(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        circle(&edges(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let modules = BTreeSet::from(["engine".to_owned(), "store".to_owned(), "job".to_owned()]);
    let source = "use crate::{engine::Run, store};\n// crate::job in a comment\nuse crate::job;";
    assert_eq!(
        imports(source, &modules),
        BTreeSet::from(["engine".to_owned(), "job".to_owned(), "store".to_owned()])
    );
    assert_eq!(imports("// crate::job", &modules), BTreeSet::new());
}

#[test]
fn the_core_s_root_stays_a_map() {
    let entries = std::fs::read_dir(root().join("crates/core/src"))
        .unwrap()
        .count();
    assert!(
        entries <= MAX_ROOT_ENTRIES,
        "crates/core/src has {entries} entries, at most {MAX_ROOT_ENTRIES}: put the new module in the folder of its concept"
    );
}

#[test]
fn no_shipped_file_outgrows_its_limit() {
    let files = shipped_files();
    assert!(files.len() > 50, "{files:?}");
    let long: Vec<(PathBuf, usize)> = files
        .into_iter()
        .map(|f| {
            let lines = code_lines(&production_source(&f));
            (f, lines)
        })
        .filter(|(_, lines)| *lines > MAX_FILE_CODE_LINES)
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_FILE_CODE_LINES} lines of code: {long:?}"
    );
}

#[test]
fn no_shipped_function_outgrows_a_screen() {
    let mut long = Vec::new();
    for file in shipped_files() {
        for (name, lines) in long_functions(&production_source(&file), MAX_FUNCTION_LINES) {
            long.push(format!("{} {name}: {lines} lines", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_FUNCTION_LINES} lines: {long:#?}"
    );
}

#[test]
fn a_long_function_is_found_and_a_short_one_is_not() {
    let body = "        x();\n".repeat(79);
    let source = format!(
        "fn short() {{\n}}\n\n    fn declared(\n        &self,\n    ) -> u8;\n    pub(crate) async fn long() {{\n{body}    }}\n"
    );
    assert_eq!(long_functions(&source, 80), vec![("long".to_owned(), 81)]);
    assert_eq!(long_functions(&source, 81), vec![]);
    assert_eq!(code_lines("// a\n\nlet x = 1;\n  // b\n"), 1);
}
