//! Checks the habits of STYLE.md that a machine can check, over every Rust file in the workspace:
//! each file opens with a `//!` doc comment, every `unsafe` block has a `// SAFETY:` comment just
//! above it, and no `dbg!` or `todo!` is left behind. And that ARCHITECTURE.md's table of limits
//! and the code agree: every constant the table names is defined in the file it gives, and every
//! `MAX_*` / `*_MAX` constant of the crates' sources is in the table.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "corpus" && name != "artifacts" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_follows_the_machine_checkable_style() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(files.len() > 10, "found only {} files under {}", files.len(), root.display());
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(root).unwrap().display().to_string();
        if !text.trim_start().starts_with("//!") && !text.trim_start().starts_with("#![") {
            problems.push(format!("{rel}: does not open with a //! doc comment"));
        }
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(concat!("dbg", "!(")) || code.contains(concat!("todo", "!(")) {
                problems.push(format!("{rel}:{}: leftover dbg!/todo!", i + 1));
            }
            let is_unsafe_block = code.contains("unsafe {") && !code.contains("unsafe fn");
            if is_unsafe_block {
                let window = lines[i.saturating_sub(4)..=i].join("\n");
                if !window.contains("SAFETY:") {
                    problems.push(format!("{rel}:{}: unsafe block without a // SAFETY: comment", i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "style problems:\n{}", problems.join("\n"));
}

/// The names a `const` declares in `text` (`const NAME:`), with any visibility.
fn consts(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim_start().split("const ").nth(1)?;
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (rest[name.len()..].starts_with(':')
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .then_some(name)
        })
        .collect()
}

/// The `backticked` words of a table cell.
fn ticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

#[test]
fn the_table_of_limits_and_the_code_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let arch = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let start = arch.find("| limit | value | where | why |").expect("ARCHITECTURE.md has the table of limits");
    let rows: Vec<&str> = arch[start..].lines().skip(2).take_while(|l| l.starts_with('|')).collect();
    assert!(rows.len() > 20, "the table of limits has only {} rows", rows.len());
    let mut sources = Vec::new();
    for krate in ["engine/src", "replicator/src", "nbd-server/src"] {
        rust_files(&root.join(krate), &mut sources);
    }
    let defined: Vec<(PathBuf, Vec<String>)> =
        sources.iter().map(|f| (f.clone(), consts(&std::fs::read_to_string(f).unwrap()))).collect();
    let is_const_name =
        |w: &str| w.len() > 2 && w.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    let mut problems = Vec::new();
    let mut named = Vec::new();
    for row in &rows {
        let cells: Vec<&str> = row.split('|').collect();
        let (limit, place) = (cells[1], cells[3]);
        let files: Vec<&str> = ticked(place).into_iter().filter(|w| w.ends_with(".rs")).collect();
        for name in ticked(limit).into_iter().filter(|w| is_const_name(w)) {
            named.push(name.to_string());
            // A bare file name matches that file in any crate; a path, that file.
            let found = defined.iter().any(|(f, names)| {
                names.iter().any(|n| n == name)
                    && files.iter().any(|want| f.ends_with(want) || f.file_name().is_some_and(|n| n == *want))
            });
            if !found {
                problems
                    .push(format!("ARCHITECTURE.md names `{name}` in {files:?}, where no such constant is defined"));
            }
        }
    }
    for (file, names) in &defined {
        for n in names.iter().filter(|n| n.starts_with("MAX_") || n.ends_with("_MAX")) {
            if !named.contains(n) {
                let rel = file.strip_prefix(root).unwrap().display();
                problems.push(format!("{rel}: limit `{n}` is not in ARCHITECTURE.md's table of limits"));
            }
        }
    }
    assert!(problems.is_empty(), "the table of limits and the code disagree:\n{}", problems.join("\n"));
}
