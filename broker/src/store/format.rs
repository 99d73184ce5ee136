//! The data directory's format mark: a one-line file, `format`, naming the storage format the directory holds, so a
//! broker refuses, with a clear error, a directory written by a newer broker instead of misreading it.
//!
//! Marks began with format 1 (the layout since the sixth session: records and copies kept in the journal, copies
//! attached to their queue entries). A directory without a mark was written by an earlier broker; this broker reads
//! every earlier layout, so it opens such a directory and marks it. A broker that changes what it writes in a way
//! older brokers cannot read raises [`DATA_FORMAT`]; a broker always marks a directory with its own format before it
//! writes anything else there, because from then on it writes that format.

use std::{io, path::Path};

use super::{StoreError, log::LogError};

/// The storage format this broker writes, and the newest it reads. 2: `i/` values carry a digest of the message's
/// content after its id (an older broker would read the whole value as the id), and a restore marks its folder
/// `restore-unfinished` until it is done (an older broker would not look for the mark).
pub const DATA_FORMAT: u32 = 2;
/// The mark's file name, in the data directory.
pub const FORMAT_FILE: &str = "format";
const PREFIX: &str = "safeguarding-broker data format ";

/// What the data directory's mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// No mark: a new directory, or one written before marks began.
    None,
    Format(u32),
}

/// Reads the mark of `data_dir` (without checking it).
pub fn read_mark(data_dir: &Path) -> Result<Mark, StoreError> {
    let path = data_dir.join(FORMAT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.strip_prefix(PREFIX))
            .and_then(|rest| rest.trim().parse::<u32>().ok())
            .map(Mark::Format)
            .ok_or(StoreError::UnreadableFormat(path)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Mark::None),
        Err(source) => Err(StoreError::Log(LogError::Io { path, source })),
    }
}

/// Checks that this broker reads the format of `data_dir`, and marks the directory with [`DATA_FORMAT`] (durably)
/// unless it already says so. Called before anything else in the directory is read or written, but for
/// `broker.lock`, which the broker takes first.
pub fn check_and_mark(data_dir: &Path) -> Result<(), StoreError> {
    if data_dir.join(crate::backup::RESTORING_MARK).exists() {
        return Err(StoreError::UnfinishedRestore(data_dir.to_owned()));
    }
    match read_mark(data_dir)? {
        Mark::Format(found) if found == DATA_FORMAT => Ok(()),
        Mark::Format(found) if found > DATA_FORMAT => {
            Err(StoreError::NewerFormat { path: data_dir.to_owned(), found, supported: DATA_FORMAT })
        }
        Mark::Format(_) | Mark::None => write_mark(data_dir, DATA_FORMAT),
    }
}

/// Writes the mark durably ([`super::log::replace_durably`]).
fn write_mark(data_dir: &Path, format: u32) -> Result<(), StoreError> {
    std::fs::create_dir_all(data_dir)
        .and_then(|()| super::log::replace_durably(data_dir, FORMAT_FILE, format!("{PREFIX}{format}\n").as_bytes()))
        .map_err(|source| StoreError::Log(LogError::Io { path: data_dir.join(FORMAT_FILE), source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_or_unmarked_directory_is_marked_and_a_marked_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(read_mark(&data).unwrap(), Mark::None);
        check_and_mark(&data).unwrap();
        assert_eq!(read_mark(&data).unwrap(), Mark::Format(DATA_FORMAT));
        assert_eq!(
            std::fs::read_to_string(data.join(FORMAT_FILE)).unwrap(),
            format!("safeguarding-broker data format {DATA_FORMAT}\n")
        );
        assert!(!data.join("format.new").exists());
        check_and_mark(&data).unwrap();
        assert_eq!(read_mark(&data).unwrap(), Mark::Format(DATA_FORMAT));
    }

    #[test]
    fn a_directory_from_a_newer_broker_or_with_an_unreadable_mark_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let newer = format!("safeguarding-broker data format {}\n", DATA_FORMAT + 1);
        std::fs::write(dir.path().join(FORMAT_FILE), &newer).unwrap();
        let error = check_and_mark(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::NewerFormat { found, supported, .. }
                    if found == DATA_FORMAT + 1 && supported == DATA_FORMAT
            ),
            "{error}"
        );
        assert!(error.to_string().contains("newer broker"), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(), newer);

        for unreadable in [&b"format two\n"[..], b"safeguarding-broker data format \xff\n"] {
            std::fs::write(dir.path().join(FORMAT_FILE), unreadable).unwrap();
            let error = check_and_mark(dir.path()).unwrap_err();
            assert!(matches!(error, StoreError::UnreadableFormat(_)), "{error}");
            assert_eq!(std::fs::read(dir.path().join(FORMAT_FILE)).unwrap(), unreadable);
        }
    }
}
