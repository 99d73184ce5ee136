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
//! 5. `backup-complete`: every file above, one a line (length, SHA-256, name), written last. A restore requires
//!    it and checks every file against it, so a backup cut short (a full disk, a killed process, a stream cut at an
//!    entry boundary, which tar cannot tell from its end) is refused rather than restored as a directory missing
//!    its journal or its keys. A backup that fails is never left looking whole: the file is written under
//!    `<out>.partial` and renamed into place only once complete, and a stream that fails stops without tar's end.
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
    #[error("the backup is incomplete or damaged: {0}; nothing usable was restored (remove what was unpacked)")]
    Incomplete(String),
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

/// The last entry of every backup: each file's name, length and SHA-256 (see the module documentation).
const MANIFEST: &str = "backup-complete";

/// Writes a tar file of `data_dir` to `out`: under `<out>.partial` (readable by its owner only), `fsync`ed, then
/// renamed into place, so a backup that fails never leaves a file that looks whole, nor replaces an earlier one.
pub fn backup(data_dir: &Path, out: &Path) -> Result<BackupReport, BackupError> {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = private_file(&partial)?;
    let written = write_archive(data_dir, file).and_then(|(report, file)| {
        file.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, out).map_err(io(out))?;
        if let Some(parent) = out.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            File::open(parent).and_then(|folder| folder.sync_all()).map_err(io(parent))?;
        }
        Ok(report)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Writes the tar stream of `data_dir` to any writer (standard output, for `--out -`). If the backup fails part way,
/// the stream stops without tar's end-of-archive blocks or the manifest, so no reader takes it for whole.
pub fn backup_to<W: Write>(data_dir: &Path, out: W) -> Result<BackupReport, BackupError> {
    write_archive(data_dir, out).map(|(report, _)| report)
}

/// A file created (or truncated) readable and writable by its owner only.
fn private_file(path: &Path) -> Result<File, BackupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(io(path))
}

/// A writer that refuses every write once the backup has failed, so that tar's builder, finishing the archive when
/// it is dropped, cannot end a failed backup as if it were whole.
struct StopOnFailure<W> {
    inner: W,
    failed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<W: Write> Write for StopOnFailure<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.failed.get() {
            return Err(std::io::Error::other("the backup failed"));
        }
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    digest: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let read = self.inner.read(buf)?;
        self.digest.update(&buf[..read]);
        Ok(read)
    }
}

fn write_archive<W: Write>(data_dir: &Path, out: W) -> Result<(BackupReport, W), BackupError> {
    let failed = std::rc::Rc::new(std::cell::Cell::new(false));
    let mut archive = tar::Builder::new(StopOnFailure { inner: out, failed: failed.clone() });
    match write_entries(data_dir, &mut archive) {
        Ok(report) => {
            let out_path = PathBuf::from("backup output");
            let mut out = archive.into_inner().map_err(io(&out_path))?;
            out.flush().map_err(io(&out_path))?;
            Ok((report, out.inner))
        }
        Err(error) => {
            // Before the builder is dropped, which would otherwise end the archive as if it were whole.
            failed.set(true);
            drop(archive);
            Err(error)
        }
    }
}

fn write_entries<W: Write>(data_dir: &Path, archive: &mut tar::Builder<W>) -> Result<BackupReport, BackupError> {
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
    let mut report = BackupReport::default();
    let mut manifest = String::new();
    let mut copy = |name: String, path: &Path, length: Option<u64>| -> Result<(), BackupError> {
        // Only a file that is not there is left out (the checkpoints of a log never signed); any other failure to
        // read one fails the backup rather than leaving it out of a backup that looks whole.
        let mut source = match File::open(path) {
            Ok(source) => source,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io(path)(error)),
        };
        let length = match length {
            Some(length) => length,
            None => source.metadata().map_err(io(path))?.len(),
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(length);
        header.set_mode(0o600);
        header.set_cksum();
        let mut prefix = Hashing { inner: Read::take(&mut source, length), digest: sha2::Digest::new() };
        archive.append_data(&mut header, &name, &mut prefix).map_err(io(path))?;
        // `append_data` pads a short read with zeros: a file that shrank would be copied wrong.
        if prefix.inner.limit() != 0 {
            return Err(io(path)(std::io::Error::other("the file became shorter while it was copied")));
        }
        // The name last: it may hold spaces (a file in `keys/`).
        manifest.push_str(&format!("{length} {} {name}\n", hex::encode(sha2::Digest::finalize(prefix.digest))));
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
    let mut names: Vec<PathBuf> = match std::fs::read_dir(&keys) {
        Ok(entries) => {
            entries.map(|entry| entry.map(|entry| entry.path())).collect::<Result<_, _>>().map_err(io(&keys))?
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(io(&keys)(error)),
    };
    names.sort();
    for path in names {
        // Followed if a link (a Kubernetes Secret's files are); one that leads nowhere fails the backup.
        if std::fs::metadata(&path).map_err(io(&path))?.is_dir() {
            continue;
        }
        let Some(file_name) = path.file_name().and_then(|name| name.to_str()) else { continue };
        copy(format!("keys/{file_name}"), &path, None)?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    archive.append_data(&mut header, MANIFEST, manifest.as_bytes()).map_err(io(&out_path))?;
    Ok(report)
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

/// Written first by a restore and removed last: a broker refuses to start on a directory that holds it.
pub const RESTORING_MARK: &str = "restore-unfinished";

/// Unpacks a backup into `data_dir`, which must be empty or absent, holding its `broker.lock` meanwhile (a broker
/// cannot start on it half restored). Every file is checked against the backup's manifest (`backup-complete`);
/// a backup without one, or with a file missing or different, is refused. Files are made readable by the owner
/// only. Until the restore ends, the directory holds [`RESTORING_MARK`], and a broker refuses to start on it. The
/// index is rebuilt when the broker starts.
pub fn restore(backup_file: &Path, data_dir: &Path) -> Result<BackupReport, BackupError> {
    // The backup is opened before anything is made, so a mistyped path leaves nothing behind.
    let file = File::open(backup_file).map_err(io(backup_file))?;
    if data_dir.exists() {
        if std::fs::read_dir(data_dir).map_err(io(data_dir))?.next().is_some() {
            return Err(BackupError::NotEmpty(data_dir.to_owned()));
        }
    } else {
        // An empty folder that is there (a mounted volume, say) keeps its owner and mode.
        private_folder(data_dir)?;
    }
    let _lock = crate::store::lock_data_dir(data_dir)?;
    let mark = data_dir.join(RESTORING_MARK);
    private_file(&mark)?.sync_all().map_err(io(&mark))?;
    for folder in ["audit", "keys", journal::DIR] {
        private_folder(&data_dir.join(folder))?;
    }
    let mut archive = tar::Archive::new(file);
    let mut report = BackupReport::default();
    let mut restored: std::collections::BTreeMap<String, (u64, String)> = std::collections::BTreeMap::new();
    let mut manifest = None;
    for entry in archive.entries().map_err(io(backup_file))? {
        let mut entry = entry.map_err(io(backup_file))?;
        let name = entry.path().map_err(io(backup_file))?.to_string_lossy().into_owned();
        if manifest.is_some() {
            return Err(BackupError::Incomplete(format!("`{name}` follows the manifest")));
        }
        if name == MANIFEST {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(io(backup_file))?;
            manifest = Some(text);
            continue;
        }
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
        let mut out = private_file(&target)?;
        let mut hashing = Hashing { inner: &mut entry, digest: sha2::Digest::new() };
        let length = std::io::copy(&mut hashing, &mut out).map_err(io(&target))?;
        out.sync_all().map_err(io(&target))?;
        restored.insert(name.clone(), (length, hex::encode(sha2::Digest::finalize(hashing.digest))));
        report.files.push((name, length));
    }
    let manifest = manifest.ok_or_else(|| {
        BackupError::Incomplete(
            "it has no `backup-complete` manifest (it was cut short, or made by an older broker)".into(),
        )
    })?;
    let mut listed = 0;
    for line in manifest.lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(length), Some(digest), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(BackupError::Incomplete(format!("a manifest line does not parse: `{line}`")));
        };
        match restored.get(name) {
            Some((got, hash)) if got.to_string() == length && hash == digest => listed += 1,
            Some(_) => return Err(BackupError::Incomplete(format!("`{name}` differs from the manifest"))),
            None => return Err(BackupError::Incomplete(format!("`{name}` is missing"))),
        }
    }
    if listed != restored.len() {
        return Err(BackupError::Incomplete("it holds files the manifest does not list".into()));
    }
    let parent = data_dir.parent().filter(|parent| !parent.as_os_str().is_empty()).map(Path::to_path_buf);
    let folders = ["audit", "keys", journal::DIR, ""].map(|dir| data_dir.join(dir));
    for dir in folders.iter().chain(parent.iter()) {
        File::open(dir).and_then(|folder| folder.sync_all()).map_err(io(dir))?;
    }
    std::fs::remove_file(&mark).map_err(io(&mark))?;
    File::open(data_dir).and_then(|folder| folder.sync_all()).map_err(io(data_dir))?;
    Ok(report)
}

/// Makes a folder (and its parents) and leaves it readable by its owner only.
fn private_folder(path: &Path) -> Result<(), BackupError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
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

    /// A data directory with a journal segment, an audit log and keys, as a broker leaves it.
    fn data_dir() -> tempfile::TempDir {
        let source = tempfile::tempdir().unwrap();
        for folder in ["audit", "keys", "journal"] {
            std::fs::create_dir_all(source.path().join(folder)).unwrap();
        }
        std::fs::write(
            source.path().join("journal").join(journal::segment_name(0)),
            crate::test_support::framed(&[b"first"]),
        )
        .unwrap();
        std::fs::write(source.path().join("audit/entries.log"), b"entries").unwrap();
        std::fs::write(source.path().join("keys/pseudonym-v1.key"), b"key").unwrap();
        std::fs::write(source.path().join("keys/checkpoint.ed25519"), b"signing key").unwrap();
        crate::store::format::check_and_mark(source.path()).unwrap();
        source
    }

    /// A backup cut short (here: the entries after the journal, keys and manifest lost, ending as a whole tar file
    /// would), or with a file changed, is refused on restore, and the directory is marked so that no broker starts
    /// on it; a whole one restores with every file readable by its owner only.
    #[test]
    fn a_backup_cut_short_or_changed_is_refused_and_a_whole_one_restored_privately() {
        let source = data_dir();
        let out = source.path().join("backup.tar");
        backup(source.path(), &out).unwrap();
        let whole = std::fs::read(&out).unwrap();

        let mut archive = tar::Archive::new(whole.as_slice());
        let mut cut = tar::Builder::new(Vec::new());
        for entry in archive.entries().unwrap().take(2) {
            let mut entry = entry.unwrap();
            let mut header = entry.header().clone();
            let path = entry.path().unwrap().into_owned();
            cut.append_data(&mut header, path, &mut entry).unwrap();
        }
        let cut_short = source.path().join("cut.tar");
        std::fs::write(&cut_short, cut.into_inner().unwrap()).unwrap();
        let target = tempfile::tempdir().unwrap();
        let restored = target.path().join("data");
        let refused = restore(&cut_short, &restored).unwrap_err();
        assert!(matches!(refused, BackupError::Incomplete(_)), "{refused}");
        let start = crate::store::format::check_and_mark(&restored).unwrap_err();
        assert!(matches!(start, StoreError::UnfinishedRestore(_)), "no broker starts on it: {start}");

        let at = (0..whole.len()).step_by(512).find(|at| whole[*at..].starts_with(b"entries")).unwrap();
        let mut changed = whole.clone();
        changed[at] = b'E';
        let changed_path = source.path().join("changed.tar");
        std::fs::write(&changed_path, changed).unwrap();
        let refused = restore(&changed_path, &target.path().join("other")).unwrap_err();
        assert!(refused.to_string().contains("audit/entries.log` differs"), "{refused}");

        let good = target.path().join("good");
        restore(&out, &good).unwrap();
        crate::store::format::check_and_mark(&good).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for file in ["keys/pseudonym-v1.key", "audit/entries.log", "format"] {
            let mode = std::fs::metadata(good.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        assert_eq!(std::fs::metadata(&good).unwrap().permissions().mode() & 0o777, 0o700);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the backup itself");
    }

    /// A backup that fails leaves neither a file that looks whole nor a partial one, and an earlier backup under the
    /// same name stays as it was; streamed, it stops without tar's end, so it does not restore.
    #[test]
    fn a_failed_backup_leaves_no_file_that_looks_whole() {
        let source = data_dir();
        let out = source.path().join("nightly.tar");
        backup(source.path(), &out).unwrap();
        let earlier = std::fs::read(&out).unwrap();
        // A key the backup cannot read (as another user's file would be): the backup fails, not leaves it out.
        let unreadable = source.path().join("keys/pseudonym-v1.key");
        std::fs::remove_file(&unreadable).unwrap();
        std::os::unix::fs::symlink(source.path().join("nowhere"), &unreadable).unwrap();
        assert!(backup(source.path(), &out).is_err());
        assert_eq!(std::fs::read(&out).unwrap(), earlier, "the earlier backup is untouched");
        assert!(!source.path().join("nightly.tar.partial").exists());

        let mut streamed = Vec::new();
        assert!(backup_to(source.path(), &mut streamed).is_err());
        assert!(!streamed.is_empty(), "entries before the failure were written");
        assert!(!streamed.ends_with(&[0u8; 1024]), "but not tar's end-of-archive blocks");
        let stream = source.path().join("streamed.tar");
        std::fs::write(&stream, &streamed).unwrap();
        let target = tempfile::tempdir().unwrap();
        assert!(restore(&stream, &target.path().join("data")).is_err());
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
