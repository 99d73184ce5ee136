//! Durable writes into the inbox folder: a delivery becomes `<delivery_id>.json` only once its bytes and its name are
//! both on disk, so the agent can acknowledge it safely.
//!
//! The sequence is: write a temporary file in the same folder, fsync it, rename it to its final name, fsync the
//! folder. A reader of the inbox therefore never sees a half-written file (it ignores names starting with `.`), and
//! after the rename's folder fsync the file survives a power cut. Because a delivery id is stable across
//! redeliveries, a final file that already exists means this copy was written before (the agent stopped before it
//! acknowledged): it is not written again.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use proto::pb;

use crate::json::{DELIVERY_MESSAGE, message_to_json};

/// What [`write_delivery_durably`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The delivery was written and is durable.
    Written,
    /// A file for this delivery id was already there (a redelivery): nothing was written.
    AlreadyPresent,
}

/// Prefix of temporary files: hidden, so that the agency's system never picks one up.
const TEMPORARY_PREFIX: &str = ".tmp-";

/// Longest delivery id accepted as a file name (a UUIDv7 plus an agency id is far shorter).
const MAX_DELIVERY_ID_LENGTH: usize = 200;

/// Distinguishes temporary files of concurrent writes within one process.
static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether `delivery_id` can be used as a file name as it is: ASCII letters, digits, `.`, `-` and `_`, not starting
/// with `.`. The broker's ids (`<uuid>.<agency>`) always are; anything else is refused rather than escaped, so that a
/// bad id can never name a file outside the inbox.
pub fn is_safe_delivery_id(delivery_id: &str) -> bool {
    !delivery_id.is_empty()
        && delivery_id.len() <= MAX_DELIVERY_ID_LENGTH
        && !delivery_id.starts_with('.')
        && delivery_id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '.' | '-' | '_'))
}

/// The final path of a delivery in the inbox.
pub fn delivery_path(inbox: &Path, delivery_id: &str) -> PathBuf {
    inbox.join(format!("{delivery_id}.json"))
}

/// Writes `delivery` as proto3 JSON into `inbox/<delivery_id>.json` durably, unless that file already exists.
///
/// # Errors
/// Fails when the delivery id is not a safe file name (`InvalidInput`), or any write, fsync or rename fails (for
/// example a full disk or a read-only folder). No temporary file is left behind on failure.
pub fn write_delivery_durably(inbox: &Path, delivery: &pb::Delivery) -> io::Result<WriteOutcome> {
    if !is_safe_delivery_id(&delivery.delivery_id) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the delivery id is not a safe file name"));
    }
    let final_path = delivery_path(inbox, &delivery.delivery_id);
    if let Ok(metadata) = fs::symlink_metadata(&final_path) {
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something other than a file already has the delivery's name in the inbox",
            ));
        }
        // The earlier write may have been renamed but not yet made durable when the agent stopped: finish that
        // before the caller acknowledges.
        File::open(&final_path)?.sync_all()?;
        sync_folder(inbox)?;
        return Ok(WriteOutcome::AlreadyPresent);
    }
    let bytes = message_to_json(DELIVERY_MESSAGE, delivery)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
    write_file_durably(inbox, &final_path, &bytes)?;
    Ok(WriteOutcome::Written)
}

/// Writes `bytes` to `final_path` (inside `folder`) through a temporary file, fsyncs, renames and fsyncs the folder.
/// An existing file at `final_path` is replaced.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_file_durably(folder: &Path, final_path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temporary_path = temporary_path(folder);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&temporary_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temporary_path, final_path)?;
        sync_folder(folder)
    })();
    if result.is_err() {
        // The temporary file may or may not exist depending on where the write failed; either way it must go.
        let _ = fs::remove_file(&temporary_path);
    }
    result
}

/// Checks that a file can be written and made durable in `folder` (a temporary file, written, fsynced and removed):
/// whether the inbox can take deliveries again after a write failed.
///
/// # Errors
/// Any I/O error of that write.
pub fn probe_writable(folder: &Path) -> io::Result<()> {
    let temporary_path = temporary_path(folder);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&temporary_path)?;
        file.write_all(b"probe")?;
        file.sync_all()
    })();
    let _ = fs::remove_file(&temporary_path);
    result
}

/// A new temporary file name in `folder`, unique within this process.
fn temporary_path(folder: &Path) -> PathBuf {
    folder.join(format!(
        "{TEMPORARY_PREFIX}{}-{}",
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Makes the folder's entries (a rename, a new file) durable.
pub fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

/// Removes temporary files a previous run left behind when it was killed mid-write. Returns how many it removed.
///
/// # Errors
/// Fails when the folder cannot be listed.
pub fn remove_stale_temporary_files(folder: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(folder)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMPORARY_PREFIX) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_delivery(delivery_id: &str) -> pb::Delivery {
        pb::Delivery {
            delivery_id: delivery_id.to_owned(),
            message_id: "0190f0aa-0000-7000-8000-000000000001".to_owned(),
            attempt: 1,
            sender_agency: "beds-police".to_owned(),
            envelope: Some(pb::Envelope {
                purpose: "operation-encompass".to_owned(),
                recipients: vec!["luton-oakwood-primary".to_owned()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn folder_names(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_once_then_reports_already_present() {
        let inbox = tempfile::tempdir().unwrap();
        let id = "0190f0aa-0000-7000-8000-000000000001.luton-oakwood-primary";
        let delivery = sample_delivery(id);
        assert_eq!(write_delivery_durably(inbox.path(), &delivery).unwrap(), WriteOutcome::Written);
        let path = delivery_path(inbox.path(), id);
        let first = fs::read(&path).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(value["delivery_id"], id);
        assert_eq!(value["envelope"]["purpose"], "operation-encompass");

        // A redelivery with a higher attempt number leaves the first file untouched.
        let mut redelivery = delivery.clone();
        redelivery.attempt = 2;
        assert_eq!(write_delivery_durably(inbox.path(), &redelivery).unwrap(), WriteOutcome::AlreadyPresent);
        assert_eq!(fs::read(&path).unwrap(), first);
        assert_eq!(folder_names(inbox.path()), vec![format!("{id}.json")]);
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let inbox = tempfile::tempdir().unwrap();
        fs::write(inbox.path().join(".tmp-1-1"), b"half").unwrap();
        fs::write(inbox.path().join("kept.json"), b"{}").unwrap();
        assert_eq!(remove_stale_temporary_files(inbox.path()).unwrap(), 1);
        assert_eq!(folder_names(inbox.path()), vec!["kept.json".to_owned()]);
    }

    #[test]
    fn unsafe_delivery_ids_are_refused() {
        let inbox = tempfile::tempdir().unwrap();
        for id in ["", "../escape", "a/b", ".hidden", "name with space"] {
            let error = write_delivery_durably(inbox.path(), &sample_delivery(id)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{id}");
        }
        assert!(folder_names(inbox.path()).is_empty());
    }

    #[test]
    fn write_into_a_missing_folder_fails() {
        let parent = tempfile::tempdir().unwrap();
        let missing = parent.path().join("absent");
        assert!(write_delivery_durably(&missing, &sample_delivery("m.a")).is_err());
    }

    /// Makes `folder` unwritable and returns whether that worked (checked by trying to write into it). Plain
    /// permissions do not stop root, so as root the folder is also made immutable with `chattr +i`.
    #[cfg(unix)]
    fn make_unwritable(folder: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(folder, fs::Permissions::from_mode(0o555)).unwrap();
        let probe = folder.join("probe");
        if fs::write(&probe, b"x").is_err() {
            return true;
        }
        fs::remove_file(&probe).unwrap();
        let immutable = std::process::Command::new("chattr").arg("+i").arg(folder).status();
        immutable.is_ok_and(|status| status.success()) && fs::write(&probe, b"x").is_err()
    }

    #[cfg(unix)]
    fn make_writable(folder: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr").arg("-i").arg(folder).status();
        fs::set_permissions(folder, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn write_into_a_read_only_folder_fails_and_leaves_nothing() {
        let inbox = tempfile::tempdir().unwrap();
        let unwritable = make_unwritable(inbox.path());
        let result = write_delivery_durably(inbox.path(), &sample_delivery("m.luton-csc"));
        make_writable(inbox.path());
        assert!(unwritable, "the test could not make its folder read-only");
        let error = result.unwrap_err();
        assert!(matches!(error.kind(), io::ErrorKind::PermissionDenied) || error.raw_os_error() == Some(1), "{error}");
        assert!(folder_names(inbox.path()).is_empty());
    }

    #[test]
    fn a_folder_entry_that_is_not_a_file_is_an_error() {
        let inbox = tempfile::tempdir().unwrap();
        fs::create_dir(inbox.path().join("m.luton-csc.json")).unwrap();
        let error = write_delivery_durably(inbox.path(), &sample_delivery("m.luton-csc")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
    }
}
