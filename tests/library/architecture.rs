//! The layout's rules, checked on the source text: dependencies between the library's files and
//! between its top-level modules point one way (no cycle), nothing in the library imports through
//! the crate root's re-exports, and no command of the binary imports another command.
//!
//! Every `crate::`, `super::` and `self::` path is read (in `use` trees and inline), and so is a
//! `use` of a child module declared with `mod`; test-only items (`#[cfg(test)]`) are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/` of this crate.
fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The code of a Rust file without comments, string and char literals (each replaced by a
/// space, so tokens stay apart).
fn strip(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || (next == Some('#') && !prev_ident(&b, i))) {
            // raw string r"..." or r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&k| b[k] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(k) => {
                    i = k + 1;
                    out.push(' ');
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_alphabetic() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push(b[s..i].iter().collect());
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// Index of the token closing the bracket opened at `open`.
fn closing(t: &[String], open: usize) -> usize {
    let (o, c) = match t[open].as_str() {
        "{" => ("{", "}"),
        "(" => ("(", ")"),
        _ => ("[", "]"),
    };
    let mut depth = 0;
    for (k, tok) in t.iter().enumerate().skip(open) {
        if tok == o {
            depth += 1;
        } else if tok == c {
            depth -= 1;
            if depth == 0 {
                return k;
            }
        }
    }
    t.len() - 1
}

/// Expands a `use` tree starting at `t[i]` into full paths; returns them and the index after.
fn use_tree(t: &[String], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        match t.get(i).map(String::as_str) {
            Some("{") => {
                let end = closing(t, i);
                let mut k = i + 1;
                while k < end {
                    k = use_tree(t, k, path.clone(), out);
                    if t.get(k).map(String::as_str) == Some(",") {
                        k += 1;
                    }
                }
                return end + 1;
            }
            Some("::") => i += 1,
            Some("*") => {
                out.push(path);
                return i + 1;
            }
            Some("as") => {
                out.push(path);
                return i + 2;
            }
            Some(s) if s.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                path.push(s.to_string());
                i += 1;
            }
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

/// A file's module path (`src/model/vit/mod.rs` -> `model::vit`).
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !["mod", "lib", "main"].contains(&stem) {
        parts.push(stem.to_string());
    }
    parts
}

/// The paths (as module-path segments from the crate root) a file refers to, with the file's
/// module path. Test-only items are skipped.
fn references(root: &Path, file: &Path) -> Vec<Vec<String>> {
    let t = tokens(&strip(&std::fs::read_to_string(file).unwrap()));
    let base = module_of(root, file);
    // (module path, brace depth where it ends)
    let mut stack: Vec<(Vec<String>, usize)> = vec![(base.clone(), usize::MAX)];
    let mut children: BTreeSet<String> = BTreeSet::new();
    let mut raw: Vec<(Vec<String>, Vec<String>)> = Vec::new(); // (module, path)
    let mut depth = 0usize;
    let mut i = 0;
    while i < t.len() {
        let tok = t[i].as_str();
        // #[cfg(test)] item: skip it.
        if tok == "#" && t.get(i + 1).map(String::as_str) == Some("[") {
            let end = closing(&t, i + 1);
            let attr: Vec<&str> = t[i + 2..end].iter().map(String::as_str).collect();
            if attr.first() == Some(&"cfg") && attr.contains(&"test") && !attr.contains(&"not") {
                let mut k = end + 1;
                while k < t.len() && t[k] != "{" && t[k] != ";" {
                    k += 1;
                }
                i = if k < t.len() && t[k] == "{" {
                    closing(&t, k) + 1
                } else {
                    k + 1
                };
                continue;
            }
            i = end + 1;
            continue;
        }
        let module = stack.last().unwrap().0.clone();
        match tok {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if stack.last().unwrap().1 == depth {
                    stack.pop();
                }
            }
            "mod" if i + 2 < t.len() => {
                let name = t[i + 1].clone();
                if t[i + 2] == ";" {
                    if stack.len() == 1 {
                        children.insert(name);
                    }
                } else if t[i + 2] == "{" {
                    let mut inner = module.clone();
                    inner.push(name);
                    stack.push((inner, depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            "use" => {
                let mut paths = Vec::new();
                let end = use_tree(&t, i + 1, Vec::new(), &mut paths);
                for p in paths {
                    raw.push((module.clone(), p));
                }
                i = end;
                continue;
            }
            "crate" | "super" | "self" if t.get(i + 1).map(String::as_str) == Some("::") => {
                let mut p = vec![tok.to_string()];
                let mut k = i + 1;
                while t.get(k).map(String::as_str) == Some("::")
                    && t.get(k + 1)
                        .is_some_and(|s| s.chars().all(|c| c.is_alphanumeric() || c == '_'))
                {
                    p.push(t[k + 1].clone());
                    k += 2;
                }
                raw.push((module, p));
                i = k;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut out = Vec::new();
    for (module, p) in raw {
        let Some(first) = p.first() else { continue };
        let mut abs = match first.as_str() {
            "crate" => Vec::new(),
            "self" => module.clone(),
            "super" => {
                let mut m = module.clone();
                let mut k = 0;
                while p.get(k).map(String::as_str) == Some("super") {
                    m.pop();
                    k += 1;
                }
                out.push(m.iter().cloned().chain(p[k..].iter().cloned()).collect());
                continue;
            }
            // A child module declared in this file (`pub use child::Item`).
            name if module == base && children.contains(name) => {
                let mut m = module.clone();
                m.push(name.to_string());
                out.push(m.into_iter().chain(p[1..].iter().cloned()).collect());
                continue;
            }
            _ => continue,
        };
        abs.extend(p[1..].iter().cloned());
        out.push(abs);
    }
    out
}

/// The file that defines the longest module prefix of `path`.
fn resolve(files: &BTreeMap<Vec<String>, PathBuf>, path: &[String]) -> Option<PathBuf> {
    (0..=path.len())
        .rev()
        .find_map(|n| files.get(&path[..n]).cloned())
}

/// Files (by module path) of a crate rooted at `root`, optionally leaving out a folder.
fn crate_files(root: &Path, skip: Option<&Path>) -> BTreeMap<Vec<String>, PathBuf> {
    rust_files(root)
        .into_iter()
        .filter(|f| skip.is_none_or(|s| !f.starts_with(s)))
        .map(|f| (module_of(root, &f), f))
        .collect()
}

/// Edges `file -> file` from the references that resolve inside the crate.
fn edges(
    root: &Path,
    files: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut out: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in files.values() {
        let set = out.entry(file.clone()).or_default();
        for r in references(root, file) {
            if let Some(target) = resolve(files, &r) {
                if &target != file {
                    set.insert(target);
                }
            }
        }
    }
    out
}

/// The cycles of a directed graph, one per strongly connected component of two or more nodes.
fn cycles<T: Ord + Clone>(graph: &BTreeMap<T, BTreeSet<T>>) -> Vec<Vec<T>> {
    // Kosaraju: order by finish time, then components of the reversed graph.
    fn visit<T: Ord + Clone>(
        g: &BTreeMap<T, BTreeSet<T>>,
        n: &T,
        seen: &mut BTreeSet<T>,
        out: &mut Vec<T>,
    ) {
        if !seen.insert(n.clone()) {
            return;
        }
        for m in g.get(n).into_iter().flatten() {
            visit(g, m, seen, out);
        }
        out.push(n.clone());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for n in graph.keys() {
        visit(graph, n, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<T, BTreeSet<T>> = BTreeMap::new();
    for (a, bs) in graph {
        for b in bs {
            rev.entry(b.clone()).or_default().insert(a.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for n in order.iter().rev() {
        let mut comp = Vec::new();
        visit(&rev, n, &mut seen, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

fn shown(p: &Path) -> String {
    p.strip_prefix(src()).unwrap_or(p).display().to_string()
}

#[test]
fn library_files_form_no_import_cycle() {
    let root = src();
    let files = crate_files(&root, Some(&root.join("bin")));
    let graph = edges(&root, &files);
    assert!(graph.len() > 20, "too few files read: {}", graph.len());
    let found: Vec<String> = cycles(&graph)
        .iter()
        .map(|c| c.iter().map(|p| shown(p)).collect::<Vec<_>>().join(" <-> "))
        .collect();
    assert!(
        found.is_empty(),
        "import cycles among files:\n{}",
        found.join("\n")
    );
}

#[test]
fn library_top_level_modules_form_no_import_cycle() {
    let root = src();
    let files = crate_files(&root, Some(&root.join("bin")));
    let top = |p: &Path| module_of(&root, p).first().cloned();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, targets) in edges(&root, &files) {
        let Some(ta) = top(&a) else { continue };
        let set = graph.entry(ta.clone()).or_default();
        for b in targets {
            if let Some(tb) = top(&b).filter(|tb| *tb != ta) {
                set.insert(tb);
            }
        }
    }
    assert!(graph.len() >= 8, "too few modules read: {graph:?}");
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles among top-level modules: {found:?}\n{graph:#?}"
    );
}

#[test]
fn nothing_in_the_library_imports_through_the_crate_root() {
    let root = src();
    let files = crate_files(&root, Some(&root.join("bin")));
    let lib = root.join("lib.rs");
    let mut bad = Vec::new();
    for (from, to) in edges(&root, &files) {
        if from != lib && to.contains(&lib) {
            bad.push(shown(&from));
        }
    }
    assert!(
        bad.is_empty(),
        "these files import re-exports of lib.rs; import from the defining module: {bad:?}"
    );
}

#[test]
fn no_command_imports_another_command() {
    let root = src().join("bin/vitcx");
    let commands = root.join("commands");
    let files = crate_files(&root, None);
    let mut bad = Vec::new();
    let mut checked = 0;
    for (from, to) in edges(&root, &files) {
        if !from.starts_with(&commands) || from.ends_with("mod.rs") {
            continue;
        }
        checked += 1;
        for t in to {
            if t.starts_with(&commands) && !t.ends_with("mod.rs") {
                bad.push(format!("{} -> {}", shown(&from), shown(&t)));
            }
        }
    }
    assert!(
        checked >= 5,
        "command files not found in {}",
        commands.display()
    );
    assert!(bad.is_empty(), "commands import each other: {bad:?}");
}

#[test]
fn the_checker_sees_a_cycle_and_a_command_import() {
    // The rules above would pass vacuously if the reader missed references: feed it a tree with
    // one cycle (a <-> b/c through `use super`), a root import and a command importing another.
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    std::fs::create_dir_all(r.join("b")).unwrap();
    std::fs::create_dir_all(r.join("commands")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(r.join(p), s).unwrap();
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub use a::A;\n#[cfg(test)]\nmod tests { use crate::b::c::C; }\n",
    );
    write("a.rs", "use crate::b::c::{C, D as E};\npub struct A;\n");
    write(
        "b/mod.rs",
        "pub mod c;\npub use c::C; // comment crate::a\n",
    );
    write(
        "b/c.rs",
        "pub struct C; pub struct D;\nfn f() { let _ = \"crate::a\"; let _ = super::super::a::A; }\n",
    );
    write("commands/mod.rs", "pub mod x;\npub mod y;\n");
    write("commands/x.rs", "use super::y::run;\n");
    write("commands/y.rs", "pub fn run() { crate::A; }\n");
    let files = crate_files(r, Some(&r.join("commands")));
    let graph = edges(r, &files);
    let found = cycles(&graph);
    assert_eq!(found.len(), 1, "{graph:#?}");
    assert_eq!(found[0], vec![r.join("a.rs"), r.join("b/c.rs")]);
    // `pub use` of a child counts; the string and the comment do not.
    assert!(graph[&r.join("b/mod.rs")].contains(&r.join("b/c.rs")));
    assert_eq!(graph[&r.join("b/mod.rs")].len(), 1);
    // The test module's import of c is skipped; the root's re-export of a is not.
    assert_eq!(graph[&r.join("lib.rs")], BTreeSet::from([r.join("a.rs")]));
    let all = crate_files(r, None);
    let g = edges(r, &all);
    assert!(g[&r.join("commands/x.rs")].contains(&r.join("commands/y.rs")));
    assert!(g[&r.join("commands/y.rs")].contains(&r.join("lib.rs")));
}
