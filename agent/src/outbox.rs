//! The outbox folder: the agency's system drops an envelope as `<name>.json` (written elsewhere or under a hidden
//! name, then renamed in, so the agent never reads half a file) and the agent sends it.
//!
//! - On a receipt the file moves to `sent/` with the receipt beside it as `<name>.receipt.json`.
//! - On a permanent refusal (see [`crate::send::is_permanent_failure`]) or an invalid envelope it moves to `failed/`
//!   with `<name>.error.txt` holding the status code and message.
//! - On a transient failure (broker unreachable, deadline exceeded), or when the broker refuses the agent's own
//!   credentials ([`crate::send::is_credentials_refusal`]), it stays claimed (below) and is tried again first later.
//!
//! A file's idempotency key defaults to the hash of its bytes, so a file sent but not yet moved when the agent stopped
//! is answered with the first receipt when it is sent again.
//!
//! Before it reads a file the agent claims it: renames it to `.sending-<name>.json` (hidden from the agency's system,
//! which may drop a new file under the same name meanwhile without replacing the one being sent). A claimed file is
//! what gets filed in `sent/` or `failed/`; one left claimed by a transient failure or a crash is sent first on the
//! next pass.

use std::{
    ffi::OsStr,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    AgentError, BrokerClient,
    inbox::{sync_folder, write_file_durably},
    json::{SEND_RESPONSE_MESSAGE, message_to_json},
    send::{code_name, describe_status, is_credentials_refusal, is_permanent_failure, prepare_envelope, send_envelope},
};

/// Subfolder for files the broker accepted.
pub const SENT_FOLDER: &str = "sent";
/// Subfolder for files the broker refused for good.
pub const FAILED_FOLDER: &str = "failed";

/// The name prefix of a file the agent has claimed for sending.
const CLAIMED_PREFIX: &str = ".sending-";

/// How long one send may take before it counts as a transient failure.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// What one pass over the outbox did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutboxPass {
    /// Files moved to `sent/`.
    pub sent: usize,
    /// Files moved to `failed/`.
    pub failed: usize,
    /// A transient failure stopped the pass: the remaining files wait for the next one.
    pub retry_later: bool,
}

/// Creates the outbox and its `sent/` and `failed/` subfolders.
///
/// # Errors
/// Any error creating the folders.
pub fn prepare_outbox(outbox: &Path) -> io::Result<()> {
    for folder in [SENT_FOLDER, FAILED_FOLDER] {
        let folder = outbox.join(folder);
        fs::create_dir_all(&folder)?;
        // Receipts and error files being written when an earlier run was killed.
        crate::inbox::remove_stale_temporary_files(&folder)?;
    }
    Ok(())
}

/// The files waiting to be sent: first those already claimed (`.sending-*.json`, left by a transient failure or a
/// crash), then regular `*.json` files not starting with `.`, each in name order.
///
/// # Errors
/// The outbox cannot be listed.
pub fn waiting_files(outbox: &Path) -> io::Result<Vec<PathBuf>> {
    let mut claimed = Vec::new();
    let mut files = Vec::new();
    for entry in fs::read_dir(outbox)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".json") || !entry.file_type()?.is_file() {
            continue;
        }
        if name.starts_with(CLAIMED_PREFIX) {
            claimed.push(entry.path());
        } else if !name.starts_with('.') {
            files.push(entry.path());
        }
    }
    claimed.sort();
    files.sort();
    claimed.append(&mut files);
    Ok(claimed)
}

/// Claims a waiting file for sending (see the module documentation); `None` when it is not there any more (the
/// agency's system took it back) or a claimed file of the same name is still waiting to be filed (the new one then
/// waits its turn).
fn claim(outbox: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    let name = path.file_name().unwrap_or(OsStr::new("")).to_string_lossy();
    if name.starts_with(CLAIMED_PREFIX) {
        return Ok(Some(path.to_path_buf()));
    }
    let claimed = outbox.join(format!("{CLAIMED_PREFIX}{name}"));
    if claimed.exists() {
        return Ok(None);
    }
    match fs::rename(path, &claimed) {
        Ok(()) => Ok(Some(claimed)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Sends every waiting file once, in name order, stopping at the first transient failure or when `should_stop`
/// says so.
///
/// # Errors
/// The outbox cannot be listed, or a file cannot be moved after its outcome is known.
pub async fn process_outbox_once(
    client: &mut BrokerClient,
    outbox: &Path,
    should_stop: impl Fn() -> bool,
) -> io::Result<OutboxPass> {
    let mut pass = OutboxPass::default();
    for path in waiting_files(outbox)? {
        if should_stop() {
            break;
        }
        let path = match claim(outbox, &path) {
            Ok(Some(claimed)) => claimed,
            Ok(None) => continue,
            // This file cannot be renamed (a name too long for the prefix, say): the others are not held up by it.
            Err(error) => {
                tracing::warn!(kind = %error.kind(), "an outbox file cannot be claimed for sending: skipped");
                continue;
            }
        };
        let logged_as = log_name(&stem_of(&path));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            // Not one the agent may read (its owner or mode): filed as failed, so it does not hold up the others.
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(file = %logged_as, "outbox file cannot be read (permissions): moved to failed");
                move_to_failed(outbox, &path, &format!("the agent cannot read the file: {error}\n"))?;
                pass.failed += 1;
                continue;
            }
            // Anything else (an I/O error on a network share, say) may pass: tried again later.
            Err(error) => {
                tracing::warn!(file = %logged_as, kind = %error.kind(), "outbox file cannot be read now: will retry");
                pass.retry_later = true;
                break;
            }
        };
        let envelope = match prepare_envelope(&bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(file = %logged_as, "outbox file is not a valid envelope: moved to failed");
                move_to_failed(outbox, &path, &format!("invalid envelope: {error}\n"))?;
                pass.failed += 1;
                continue;
            }
        };
        let outcome = tokio::time::timeout(SEND_TIMEOUT, send_envelope(client, envelope)).await;
        match outcome {
            Ok(Ok(receipt)) => {
                let receipt_json = message_to_json(SEND_RESPONSE_MESSAGE, &receipt)
                    .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
                let sent_before = move_to_sent(outbox, &path, &receipt_json)?;
                if sent_before {
                    tracing::info!(
                        file = %logged_as,
                        message_id = %receipt.message_id,
                        "outbox file sent before the agent stopped, and now filed with its receipt"
                    );
                } else if receipt.duplicate {
                    // The broker had a message under this idempotency key already and answered with its receipt:
                    // right for a file sent again, wrong for a new message that reused a key (it was not sent).
                    tracing::warn!(
                        file = %logged_as,
                        message_id = %receipt.message_id,
                        "outbox file answered as a duplicate of an earlier message with the same idempotency key: \
                         not sent again (if it is a new message, give it a key of its own)"
                    );
                } else {
                    tracing::info!(file = %logged_as, message_id = %receipt.message_id, "outbox file sent");
                }
                pass.sent += 1;
            }
            Ok(Err(AgentError::Rpc(status))) if is_credentials_refusal(&status) => {
                // The agent's own credentials were refused (its token expired or is not yet refreshed, its
                // certificate was revoked), not this message: every file would fail the same way until an operator
                // mends them, so the files wait in the outbox rather than being filed as failed.
                tracing::error!(
                    code = code_name(status.code()),
                    message = status.message(),
                    "the broker refused the agent's token or certificate: outbox files wait until it is mended"
                );
                pass.retry_later = true;
                break;
            }
            Ok(Err(AgentError::Rpc(status))) if is_permanent_failure(status.code()) => {
                tracing::warn!(file = %logged_as, code = code_name(status.code()), "broker refused outbox file: moved to failed");
                move_to_failed(outbox, &path, &format!("{}\n", describe_status(&status)))?;
                pass.failed += 1;
            }
            Ok(Err(error)) => {
                let code = match &error {
                    AgentError::Rpc(status) => code_name(status.code()),
                    _ => "UNKNOWN",
                };
                tracing::warn!(file = %logged_as, code, "outbox send failed: will retry");
                pass.retry_later = true;
                break;
            }
            Err(_) => {
                tracing::warn!(file = %logged_as, "outbox send timed out: will retry");
                pass.retry_later = true;
                break;
            }
        }
    }
    Ok(pass)
}

/// The stem of a `*.json` file name, claimed or not (`referral` for `referral.json` and `.sending-referral.json`).
/// How logs name an outbox file: `file-` and the first 16 hex digits of the SHA-256 of its stem (the name without
/// `.json`), never the name itself, which the case system chooses and may hold a child's name. The same file has the
/// same log name on every pass, and an operator finds it with `printf '%s' <stem> | sha256sum`.
fn log_name(stem: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(stem.as_bytes());
    format!("file-{}", hex::encode(&digest[..8]))
}

fn stem_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or(OsStr::new("message.json")).to_string_lossy();
    let name = name.strip_prefix(CLAIMED_PREFIX).unwrap_or(&name);
    name.strip_suffix(".json").unwrap_or(name).to_owned()
}

/// Where a message goes in `sent/` or `failed/` ([`free_stem`]).
#[derive(Debug, PartialEq, Eq)]
enum Filing {
    /// Under a stem no earlier file, receipt or error uses, so no earlier record is overwritten.
    New(String),
    /// Beside its own companion, left alone by a crash between writing it and moving the message: the same outcome
    /// (a receipt for the same message id, or the same error) with no message beside it.
    Interrupted(String),
}

/// Where to file a message of `stem` whose companion (`suffix`) is `companion`.
fn free_stem(folder: &Path, stem: &str, suffix: &str, companion: &[u8]) -> Filing {
    let taken = |candidate: &str| {
        [".json", ".receipt.json", ".error.txt"]
            .iter()
            .any(|suffix| folder.join(format!("{candidate}{suffix}")).exists())
    };
    let interrupted = |candidate: &str| {
        !folder.join(format!("{candidate}.json")).exists()
            && fs::read(folder.join(format!("{candidate}{suffix}")))
                .is_ok_and(|existing| same_outcome(&existing, companion, suffix))
    };
    let mut candidate = stem.to_owned();
    let mut number = 1u64;
    loop {
        if !taken(&candidate) {
            return Filing::New(candidate);
        }
        if interrupted(&candidate) {
            return Filing::Interrupted(candidate);
        }
        number += 1;
        candidate = format!("{stem}-{number}");
    }
}

/// Whether two companions record the same outcome: receipts for the same message (a file sent again is answered with
/// its first receipt, marked as a duplicate), or the same error text.
fn same_outcome(existing: &[u8], new: &[u8], suffix: &str) -> bool {
    if suffix != RECEIPT_SUFFIX {
        return existing == new;
    }
    let message_id = |bytes: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|receipt| receipt.get("message_id").and_then(serde_json::Value::as_str).map(str::to_owned))
            .filter(|id| !id.is_empty())
    };
    message_id(existing).is_some_and(|id| message_id(new) == Some(id))
}

const RECEIPT_SUFFIX: &str = ".receipt.json";

/// Writes the companion file (receipt or error) durably, then moves the message beside it. A crash between the two
/// leaves the message in the outbox, to be sent again with the same idempotency key; it is then filed beside the
/// companion written the first time (true).
fn move_with_companion(
    outbox: &Path,
    path: &Path,
    folder_name: &str,
    suffix: &str,
    companion: &[u8],
) -> io::Result<bool> {
    let folder = outbox.join(folder_name);
    fs::create_dir_all(&folder)?;
    let (stem, interrupted) = match free_stem(&folder, &stem_of(path), suffix, companion) {
        Filing::New(stem) => (stem, false),
        Filing::Interrupted(stem) => (stem, true),
    };
    if !interrupted {
        write_file_durably(&folder, &folder.join(format!("{stem}{suffix}")), companion)?;
    }
    fs::rename(path, folder.join(format!("{stem}.json")))?;
    sync_folder(&folder)?;
    sync_folder(outbox)?;
    Ok(interrupted)
}

/// Files a sent message with its receipt; true if its receipt was already there (the agent stopped between the two
/// the first time it sent it).
fn move_to_sent(outbox: &Path, path: &Path, receipt_json: &[u8]) -> io::Result<bool> {
    move_with_companion(outbox, path, SENT_FOLDER, RECEIPT_SUFFIX, receipt_json)
}

fn move_to_failed(outbox: &Path, path: &Path, error_text: &str) -> io::Result<()> {
    move_with_companion(outbox, path, FAILED_FOLDER, ".error.txt", error_text.as_bytes()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_json_files_wait() {
        let outbox = tempfile::tempdir().unwrap();
        prepare_outbox(outbox.path()).unwrap();
        fs::write(outbox.path().join("b.json"), b"{}").unwrap();
        fs::write(outbox.path().join("a.json"), b"{}").unwrap();
        fs::write(outbox.path().join(".writing.json"), b"{").unwrap();
        fs::write(outbox.path().join("notes.txt"), b"x").unwrap();
        let names: Vec<String> = waiting_files(outbox.path())
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.json", "b.json"]);
    }

    /// A file being sent is claimed under a hidden name: a new file the agency's system drops under the same name
    /// meanwhile is a file of its own, which waits until the claimed one is filed, and is then sent in turn.
    #[test]
    fn a_claimed_file_is_not_replaced_by_a_new_one_of_the_same_name() {
        let outbox = tempfile::tempdir().unwrap();
        prepare_outbox(outbox.path()).unwrap();
        let path = outbox.path().join("referral.json");
        fs::write(&path, b"{\"version\": 1}").unwrap();
        let claimed = claim(outbox.path(), &path).unwrap().unwrap();
        assert_eq!(claimed.file_name().unwrap(), ".sending-referral.json");
        fs::write(&path, b"{\"version\": 2}").unwrap();
        assert_eq!(fs::read(&claimed).unwrap(), b"{\"version\": 1}", "the claimed file is the one read");
        assert_eq!(claim(outbox.path(), &path).unwrap(), None, "the new one waits its turn");
        assert_eq!(waiting_files(outbox.path()).unwrap(), vec![claimed.clone(), path.clone()], "claimed first");
        move_to_sent(outbox.path(), &claimed, b"{}").unwrap();
        assert_eq!(fs::read(outbox.path().join("sent/referral.json")).unwrap(), b"{\"version\": 1}");
        assert_eq!(waiting_files(outbox.path()).unwrap(), vec![path.clone()], "the new one is still to send");
        assert!(claim(outbox.path(), &path).unwrap().is_some());
    }

    /// A receipt left behind by an earlier file (its message moved away by hand) is not overwritten either.
    #[test]
    fn a_receipt_left_alone_is_not_overwritten() {
        let outbox = tempfile::tempdir().unwrap();
        prepare_outbox(outbox.path()).unwrap();
        fs::write(outbox.path().join("sent/referral.receipt.json"), b"earlier").unwrap();
        let path = outbox.path().join("referral.json");
        fs::write(&path, b"{}").unwrap();
        move_to_sent(outbox.path(), &path, b"later").unwrap();
        assert_eq!(fs::read(outbox.path().join("sent/referral.receipt.json")).unwrap(), b"earlier");
        assert_eq!(fs::read(outbox.path().join("sent/referral-2.receipt.json")).unwrap(), b"later");
    }

    /// The agent stopped between writing a receipt and moving its file: the file, sent again with the same
    /// idempotency key, is answered with the same message id and filed beside that receipt, which is kept as first
    /// written, not under a new name with the first receipt left alone. A receipt for another message, or one whose
    /// file is there, is never taken for it; a failed file's error likewise.
    #[test]
    fn a_file_sent_before_a_crash_is_filed_beside_its_receipt() {
        let outbox = tempfile::tempdir().unwrap();
        prepare_outbox(outbox.path()).unwrap();
        let first = br#"{"message_id": "m-1", "duplicate": false}"#;
        fs::write(outbox.path().join("sent/referral.receipt.json"), first).unwrap();
        let path = outbox.path().join("referral.json");
        fs::write(&path, b"{}").unwrap();
        let again = br#"{"message_id": "m-1", "duplicate": true}"#;
        assert!(move_to_sent(outbox.path(), &path, again).unwrap(), "filed as sent before");
        assert!(outbox.path().join("sent/referral.json").exists());
        assert_eq!(fs::read(outbox.path().join("sent/referral.receipt.json")).unwrap(), first);
        assert!(!outbox.path().join("sent/referral-2.json").exists());

        // Another message of the same name: its own place, the earlier records untouched.
        fs::write(&path, b"{}").unwrap();
        assert!(!move_to_sent(outbox.path(), &path, br#"{"message_id": "m-2"}"#).unwrap());
        assert!(outbox.path().join("sent/referral-2.receipt.json").exists());
        // A receipt whose file the case system took away is not someone else's place either.
        fs::remove_file(outbox.path().join("sent/referral.json")).unwrap();
        fs::write(&path, b"{}").unwrap();
        assert!(!move_to_sent(outbox.path(), &path, br#"{"message_id": "m-3"}"#).unwrap());
        assert!(outbox.path().join("sent/referral-3.json").exists());
        assert_eq!(fs::read(outbox.path().join("sent/referral.receipt.json")).unwrap(), first);

        fs::write(outbox.path().join("failed/broken.error.txt"), b"invalid envelope: x\n").unwrap();
        let broken = outbox.path().join("broken.json");
        fs::write(&broken, b"{").unwrap();
        move_to_failed(outbox.path(), &broken, "invalid envelope: x\n").unwrap();
        assert!(outbox.path().join("failed/broken.json").exists(), "beside its own error");
    }

    #[test]
    fn moved_files_keep_earlier_records() {
        let outbox = tempfile::tempdir().unwrap();
        prepare_outbox(outbox.path()).unwrap();
        for round in 1..=2 {
            let path = outbox.path().join("referral.json");
            fs::write(&path, format!("{{\"round\": {round}}}")).unwrap();
            move_to_failed(outbox.path(), &path, &format!("error {round}")).unwrap();
        }
        let failed = outbox.path().join(FAILED_FOLDER);
        assert_eq!(fs::read_to_string(failed.join("referral.error.txt")).unwrap(), "error 1");
        assert_eq!(fs::read_to_string(failed.join("referral-2.error.txt")).unwrap(), "error 2");
        assert_eq!(fs::read_to_string(failed.join("referral-2.json")).unwrap(), "{\"round\": 2}");
        assert!(waiting_files(outbox.path()).unwrap().is_empty());
    }
}
