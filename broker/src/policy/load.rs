//! Reading a policy directory: the only part of the policy module that touches the file system.
//!
//! Every `*.yaml` / `*.yml` file under the directory (recursively, in sorted order, skipping hidden entries) is parsed
//! as strict YAML with serde-saphyr: duplicate keys and unknown fields are errors, and each error carries its line
//! and column. Parsing goes on past a broken file so that one run reports every problem.

use std::path::{Path, PathBuf};

use super::compile::{self, SourceFile};
use super::model::PolicyFile;
use super::{Diagnostic, PolicyErrors, PolicySet, Severity};

/// Reads every policy file under `dir` and compiles the set.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let mut diagnostics = Vec::new();
    let mut paths = Vec::new();
    collect_yaml_files(dir, &mut paths, &mut diagnostics);
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((path, text)),
            Err(error) => diagnostics.push(error_at(&path, 0, 0, format!("cannot read the file: {error}"))),
        }
    }
    if files.is_empty() && diagnostics.is_empty() {
        diagnostics.push(error_at(dir, 0, 0, "no policy files (`*.yaml`) in this directory".to_owned()));
    }
    match load_files(&files, dir) {
        Ok(set) if diagnostics.is_empty() => Ok(set),
        Ok(_) => Err(PolicyErrors { diagnostics }),
        Err(mut errors) => {
            diagnostics.append(&mut errors.diagnostics);
            Err(PolicyErrors { diagnostics })
        }
    }
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>, diagnostics: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            diagnostics.push(error_at(dir, 0, 0, format!("cannot read the directory: {error}")));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_yaml_files(&path, out, diagnostics);
        } else if matches!(path.extension().and_then(|ext| ext.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
}

fn error_at(file: &Path, line: u64, column: u64, message: String) -> Diagnostic {
    Diagnostic { file: file.to_path_buf(), line, column, severity: Severity::Error, message }
}

/// Parses one file's text.
pub fn parse_file(path: &Path, text: &str) -> Result<PolicyFile, Diagnostic> {
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
    };
    serde_saphyr::from_str_with_options::<PolicyFile>(text, options).map_err(|error| {
        let (line, column) = error.location().map(|location| (location.line(), location.column())).unwrap_or((0, 0));
        error_at(path, line, column, clean_parse_message(&error.without_snippet().to_string()))
    })
}

/// Keeps the first line of a parser message and drops a trailing position (we print our own) and full stop.
fn clean_parse_message(message: &str) -> String {
    let first_line = message.lines().next().unwrap_or("invalid YAML").trim();
    let without_position = match first_line.rfind(" at line ") {
        Some(index) => &first_line[..index],
        None => first_line,
    };
    let trimmed = without_position.trim_end_matches('.').trim();
    let mut chars = trimmed.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "invalid YAML".to_owned(),
    }
}

/// Parses and compiles files already read.
pub fn load_files(files: &[(PathBuf, String)], base_dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let mut diagnostics = Vec::new();
    let mut sources = Vec::new();
    for (path, text) in files {
        match parse_file(path, text) {
            Ok(file) => sources.push(SourceFile { path: path.clone(), file }),
            Err(diagnostic) => diagnostics.push(diagnostic),
        }
    }
    let result = compile::compile(sources, base_dir);
    match result {
        Ok(set) if diagnostics.is_empty() => Ok(set),
        Ok(set) => {
            diagnostics.extend(set.warnings.iter().cloned());
            Err(finish(diagnostics))
        }
        Err(mut more) => {
            diagnostics.append(&mut more);
            Err(finish(diagnostics))
        }
    }
}

fn finish(mut diagnostics: Vec<Diagnostic>) -> PolicyErrors {
    diagnostics.sort_by(|left, right| {
        (left.severity, &left.file, left.line, left.column, &left.message).cmp(&(
            right.severity,
            &right.file,
            right.line,
            right.column,
            &right.message,
        ))
    });
    diagnostics.dedup();
    PolicyErrors { diagnostics }
}
