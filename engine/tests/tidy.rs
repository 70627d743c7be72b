//! Checks the habits of STYLE.md that a machine can check, over every Rust file in the workspace:
//! each file opens with a `//!` doc comment, every `unsafe` block has a `// SAFETY:` comment just
//! above it, no `dbg!` or `todo!` is left behind, and a file over 1,000 lines says why in a
//! `//! Size:` line. And that ARCHITECTURE.md's table of limits
//! and the code agree: every constant the table names is defined in the file it gives, every
//! `*_MAX` constant of the crates' sources is in the table, and limits are named one way, qualifier
//! last (`IO_BYTES_MAX`, not `MAX_IO_BYTES`).

use std::path::{Path, PathBuf};

/// Lines a Rust file may have before its opening doc must say why it is one file: past this, a
/// newcomer can no longer hold a file in mind, and a file this long has usually grown two subjects.
const FILE_LINES_MAX: usize = 1000;

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
        let opening_doc: Vec<&str> = lines.iter().take_while(|l| l.starts_with("//!")).copied().collect();
        if lines.len() > FILE_LINES_MAX && !opening_doc.iter().any(|l| l.starts_with("//! Size:")) {
            problems.push(format!(
                "{rel}: {} lines, over {FILE_LINES_MAX}: split it, or say why it is one file in a `//! Size:` line of its opening doc",
                lines.len()
            ));
        }
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
    // One naming convention for limits, qualifier last (`IO_BYTES_MAX`, `SEGMENT_BYTES_MIN`), in
    // every Rust file of the workspace.
    let mut everywhere = Vec::new();
    rust_files(root, &mut everywhere);
    for file in &everywhere {
        for n in consts(&std::fs::read_to_string(file).unwrap()) {
            let qualifier_first = ["MAX_", "MIN_"].iter().any(|q| n.starts_with(q));
            let qualifier_inside = ["_MAX_", "_MIN_"].iter().any(|q| n.contains(q));
            if qualifier_first || qualifier_inside {
                let rel = file.strip_prefix(root).unwrap().display();
                problems.push(format!(
                    "{rel}: limit `{n}` puts its qualifier first or inside; name limits `THING_UNIT_MAX`"
                ));
            }
        }
    }
    for (file, names) in &defined {
        for n in names.iter().filter(|n| n.ends_with("_MAX")) {
            if !named.contains(n) {
                let rel = file.strip_prefix(root).unwrap().display();
                problems.push(format!("{rel}: limit `{n}` is not in ARCHITECTURE.md's table of limits"));
            }
        }
    }
    assert!(problems.is_empty(), "the table of limits and the code disagree:\n{}", problems.join("\n"));
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn the_docs_links_and_the_paths_they_name_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut docs = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    let mut problems = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let rel = doc.strip_prefix(root).unwrap().display().to_string();
        let dir = doc.parent().unwrap();
        // Markdown links to files of the repository and to headings.
        for link in text.split("](").skip(1).filter_map(|r| r.split(')').next()) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
            let target = if file.is_empty() { doc.clone() } else { dir.join(file) };
            if !target.exists() {
                problems.push(format!("{rel}: link to {link}: no such file"));
                continue;
            }
            if !anchor.is_empty() && target.extension().is_some_and(|x| x == "md") {
                let there = std::fs::read_to_string(&target).unwrap();
                if !anchors(&there).iter().any(|a| a == anchor) {
                    problems.push(format!("{rel}: link to {link}: no such heading"));
                }
            }
        }
        // Paths of the repository named in backticks (`docs/x.md`, `nbd-server/src/y.rs`).
        let tops = ["docs/", "benches/", "engine/", "replicator/", "nbd-server/", "dist/", "fuzz/", ".ci/"];
        let mut in_code = false;
        let prose = text.lines().filter(|l| {
            if l.starts_with("```") {
                in_code = !in_code;
                return false;
            }
            !in_code
        });
        for word in prose.flat_map(ticked) {
            let path = word.split_whitespace().next().unwrap_or("");
            if !tops.iter().any(|t| path.starts_with(t)) || path.contains(['*', '<', '…', '{']) {
                continue;
            }
            let path = path.trim_end_matches([',', '.', ':', ')']);
            if !root.join(path).exists() {
                problems.push(format!("{rel}: names `{path}`, which does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "stale references in the docs:\n{}", problems.join("\n"));
}
