//! `broker backup` and `broker restore`: a consistent copy of a data directory, taken while the broker runs.
//!
//! The append-only files are the source of truth (see [`crate::store`]), so a backup is a tar file of their
//! prefixes plus the broker's keys; the sled index is not copied but rebuilt on restore by replaying the journal
//! from the start. Files are copied in an order that keeps the copy consistent without stopping the broker:
//!
//! 0. `format`: the data format mark (a backup of a directory a newer broker marked is refused),
//! 1. `audit/checkpoints.log`: every checkpoint copied covers only entries already durable (in the journal),
//! 2. the journal's segments (`journal/*.seg`, and `journal.log` from older brokers), in order: state, each change
//!    carrying its audit entries,
//! 3. `audit/entries.log`: a superset of the entries the copied journal and checkpoints rely on (each group's
//!    entries are written there before its journal record; and replaying the journal on restore puts back any
//!    entry it lacks),
//! 4. `keys/`: the pseudonymisation and checkpoint signing keys.
//!
//! Each audit file is copied up to the length it had when its copy began; a record being written at that moment is
//! copied torn and cut off on restore, exactly as after a crash. Each journal segment is copied up to the end of
//! its whole records (see [`crate::store::journal::whole_records_len`]): segments are written full of zeros ahead
//! of use, so their length says nothing about where their records end.

use std::{
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use crate::store::{
    StoreError,
    format::{self, FORMAT_FILE, Mark},
    journal,
};

/// The checkpoints, copied first (relative to the data directory; skipped if missing).
const CHECKPOINTS_FILE: &str = "audit/checkpoints.log";
/// The audit entries, copied after the journal.
const ENTRIES_FILE: &str = "audit/entries.log";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("`{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{0}` is not a broker data directory (no journal)")]
    NotADataDirectory(PathBuf),
    #[error("`{0}` already holds data: restore into an empty or new folder")]
    NotEmpty(PathBuf),
    #[error(
        "`{path}`: the journal segment's whole records end at journal offset {end}, not where the next segment begins \
         ({next}), so a copy would not restore; no backup was written. See \"Backup and restore\" in deploy/README.md"
    )]
    JournalDamaged { path: PathBuf, end: u64, next: u64 },
    #[error("`{0}` in the backup is not a file this broker writes")]
    UnexpectedEntry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a backup holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BackupReport {
    pub files: Vec<(String, u64)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

/// Writes a tar file of `data_dir` to `out` (fsync'd before returning).
pub fn backup(data_dir: &Path, out: &Path) -> Result<BackupReport, BackupError> {
    let file = File::create(out).map_err(io(out))?;
    let (report, file) = write_archive(data_dir, file)?;
    file.sync_all().map_err(io(out))?;
    Ok(report)
}

/// Writes the tar stream of `data_dir` to any writer (standard output, for `--out -`).
pub fn backup_to<W: Write>(data_dir: &Path, out: W) -> Result<BackupReport, BackupError> {
    write_archive(data_dir, out).map(|(report, _)| report)
}

fn write_archive<W: Write>(data_dir: &Path, out: W) -> Result<(BackupReport, W), BackupError> {
    let journal_dir = data_dir.join(journal::DIR);
    if journal::segment_files(data_dir).map_err(io(&journal_dir))?.is_empty() {
        return Err(BackupError::NotADataDirectory(data_dir.to_owned()));
    }
    // A newer broker's directory may hold files this one does not know to copy.
    if let Mark::Format(found) = format::read_mark(data_dir)?
        && found > format::DATA_FORMAT
    {
        return Err(StoreError::NewerFormat { path: data_dir.to_owned(), found, supported: format::DATA_FORMAT }.into());
    }
    let out_path = PathBuf::from("backup output");
    let mut archive = tar::Builder::new(out);
    let mut report = BackupReport::default();
    let mut copy = |name: String, path: &Path, length: Option<u64>| -> Result<(), BackupError> {
        let Ok(mut source) = File::open(path) else { return Ok(()) };
        let length = match length {
            Some(length) => length,
            None => source.metadata().map_err(io(path))?.len(),
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(length);
        header.set_mode(0o600);
        header.set_cksum();
        let mut prefix = Read::take(&mut source, length);
        archive.append_data(&mut header, &name, &mut prefix).map_err(io(path))?;
        report.files.push((name, length));
        Ok(())
    };
    copy(FORMAT_FILE.to_owned(), &data_dir.join(FORMAT_FILE), None)?;
    copy(CHECKPOINTS_FILE.to_owned(), &data_dir.join(CHECKPOINTS_FILE), None)?;
    // After the checkpoints (see the module documentation). Listed again once if the first look fails: the broker
    // may have been undoing a move to a new segment just then.
    let segments = match journal_to_copy(data_dir) {
        Ok(segments) => segments,
        Err(_) => journal_to_copy(data_dir)?,
    };
    for (path, whole) in &segments {
        let Some(file_name) = path.file_name().and_then(|name| name.to_str()) else { continue };
        let name = if file_name == journal::LEGACY_FILE {
            file_name.to_owned()
        } else {
            format!("{}/{file_name}", journal::DIR)
        };
        copy(name, path, Some(*whole))?;
    }
    copy(ENTRIES_FILE.to_owned(), &data_dir.join(ENTRIES_FILE), None)?;
    let keys = data_dir.join("keys");
    if let Ok(entries) = std::fs::read_dir(&keys) {
        let mut names: Vec<PathBuf> = entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
        names.sort();
        for path in names.into_iter().filter(|path| path.is_file()) {
            let Some(file_name) = path.file_name().and_then(|name| name.to_str()) else { continue };
            let name = format!("keys/{file_name}");
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            archive.append_data(&mut header, &name, bytes.as_slice()).map_err(io(&path))?;
            report.files.push((name, bytes.len() as u64));
        }
    }
    let mut out = archive.into_inner().map_err(io(&out_path))?;
    out.flush().map_err(io(&out_path))?;
    Ok((report, out))
}

/// The journal's segment files and how much of each to copy (its whole records), checking that each ends where the
/// next begins.
fn journal_to_copy(data_dir: &Path) -> Result<Vec<(PathBuf, u64)>, BackupError> {
    let journal_dir = data_dir.join(journal::DIR);
    let segments = journal::segment_files(data_dir).map_err(io(&journal_dir))?;
    let mut copies = Vec::with_capacity(segments.len());
    for (index, (start, path)) in segments.iter().enumerate() {
        let whole = journal::whole_records_len(path).map_err(io(path))?;
        if let Some((next, _)) = segments.get(index + 1)
            && start + whole != *next
        {
            return Err(BackupError::JournalDamaged { path: path.clone(), end: start + whole, next: *next });
        }
        copies.push((path.clone(), whole));
    }
    Ok(copies)
}

/// Unpacks a backup into `data_dir`, which must be empty or absent. The index is rebuilt when the broker starts.
pub fn restore(backup_file: &Path, data_dir: &Path) -> Result<BackupReport, BackupError> {
    if data_dir.exists() && std::fs::read_dir(data_dir).map_err(io(data_dir))?.next().is_some() {
        return Err(BackupError::NotEmpty(data_dir.to_owned()));
    }
    std::fs::create_dir_all(data_dir.join("audit")).map_err(io(data_dir))?;
    std::fs::create_dir_all(data_dir.join("keys")).map_err(io(data_dir))?;
    std::fs::create_dir_all(data_dir.join(journal::DIR)).map_err(io(data_dir))?;
    let file = File::open(backup_file).map_err(io(backup_file))?;
    let mut archive = tar::Archive::new(file);
    let mut report = BackupReport::default();
    for entry in archive.entries().map_err(io(backup_file))? {
        let mut entry = entry.map_err(io(backup_file))?;
        let name = entry.path().map_err(io(backup_file))?.to_string_lossy().into_owned();
        let allowed = [FORMAT_FILE, CHECKPOINTS_FILE, ENTRIES_FILE, journal::LEGACY_FILE].contains(&name.as_str())
            || name
                .strip_prefix(journal::DIR)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|rest| journal::segment_start(rest).is_some())
            || name
                .strip_prefix("keys/")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.contains(".."));
        if !allowed {
            return Err(BackupError::UnexpectedEntry(name));
        }
        let target = data_dir.join(&name);
        let mut out = File::create(&target).map_err(io(&target))?;
        let length = std::io::copy(&mut entry, &mut out).map_err(io(&target))?;
        out.sync_all().map_err(io(&target))?;
        report.files.push((name, length));
    }
    let parent = data_dir.parent().filter(|parent| !parent.as_os_str().is_empty()).map(Path::to_path_buf);
    let folders = ["audit", "keys", journal::DIR, ""].map(|dir| data_dir.join(dir));
    for dir in folders.iter().chain(parent.iter()) {
        File::open(dir).and_then(|folder| folder.sync_all()).map_err(io(dir))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal's segments are copied up to the end of their whole records (not the zeros written ahead of
    /// use, nor a record being written), the audit files and keys whole; the index is not copied.
    #[test]
    fn a_backup_restores_the_same_files_and_refuses_a_non_empty_target() {
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join("audit")).unwrap();
        std::fs::create_dir_all(source.path().join("keys")).unwrap();
        std::fs::create_dir_all(source.path().join("journal")).unwrap();
        let legacy = crate::test_support::framed(&[b"older"]);
        std::fs::write(source.path().join("journal.log"), &legacy).unwrap();
        let records = crate::test_support::framed(&[b"first", b"second"]);
        let mut segment = records.clone();
        segment.extend_from_slice(&[0x55, 0x01, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1]); // a record being written
        segment.resize(4096, 0);
        let segment_name = format!("journal/{}", journal::segment_name(legacy.len() as u64));
        std::fs::write(source.path().join(&segment_name), &segment).unwrap();
        std::fs::write(source.path().join("journal/next.ready"), vec![0u8; 4096]).unwrap();
        std::fs::write(source.path().join("audit/entries.log"), b"entries").unwrap();
        std::fs::write(source.path().join("keys/pseudonym-v1.key"), b"key").unwrap();
        crate::store::format::check_and_mark(source.path()).unwrap();
        std::fs::create_dir_all(source.path().join("index")).unwrap();
        std::fs::write(source.path().join("index/db"), b"not copied").unwrap();
        let out = source.path().join("backup.tar");
        let report = backup(source.path(), &out).unwrap();
        let names: Vec<&str> = report.files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["format", "journal.log", segment_name.as_str(), "audit/entries.log", "keys/pseudonym-v1.key"]
        );
        let target = tempfile::tempdir().unwrap();
        let restored = target.path().join("data");
        restore(&out, &restored).unwrap();
        assert_eq!(std::fs::read(restored.join("journal.log")).unwrap(), legacy);
        assert_eq!(std::fs::read(restored.join(&segment_name)).unwrap(), records);
        assert_eq!(std::fs::read(restored.join("audit/entries.log")).unwrap(), b"entries");
        assert_eq!(std::fs::read(restored.join("keys/pseudonym-v1.key")).unwrap(), b"key");
        let mark = crate::store::format::read_mark(&restored).unwrap();
        assert_eq!(mark, crate::store::format::Mark::Format(crate::store::format::DATA_FORMAT));
        assert!(!restored.join("index").exists());
        assert!(!restored.join("journal/next.ready").exists());
        assert!(matches!(restore(&out, &restored), Err(BackupError::NotEmpty(_))));
        assert!(matches!(backup(target.path(), &out), Err(BackupError::NotADataDirectory(_))));
        // A directory a newer broker marked may hold files this broker would not know to copy.
        std::fs::write(
            source.path().join("format"),
            format!("safeguarding-broker data format {}\n", format::DATA_FORMAT + 1),
        )
        .unwrap();
        assert!(matches!(backup(source.path(), &out), Err(BackupError::Store(StoreError::NewerFormat { .. }))));
    }

    /// A segment whose whole records stop short of the next segment fails the backup: its copy would not open.
    #[test]
    fn a_journal_segment_that_stops_short_of_the_next_fails_the_backup() {
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join("journal")).unwrap();
        let mut first = crate::test_support::framed(&[b"first", b"second"]);
        let next_start = first.len() as u64;
        first[9] ^= 0x01; // the first record's payload, so its whole records end at 0
        std::fs::write(source.path().join("journal").join(journal::segment_name(0)), &first).unwrap();
        std::fs::write(
            source.path().join("journal").join(journal::segment_name(next_start)),
            crate::test_support::framed(&[b"third"]),
        )
        .unwrap();
        let out = source.path().join("backup.tar");
        let error = backup(source.path(), &out).unwrap_err();
        assert!(matches!(error, BackupError::JournalDamaged { end: 0, next, .. } if next == next_start), "{error}");
    }
}
