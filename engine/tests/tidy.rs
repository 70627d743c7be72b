//! Checks the habits of STYLE.md that a machine can check, over every Rust file in the workspace:
//! each file opens with a `//!` doc comment, every `unsafe` block has a `// SAFETY:` comment just
//! above it, and no `dbg!` or `todo!` is left behind.

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
