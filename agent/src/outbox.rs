//! The outbox folder: the agency's system drops an envelope as `<name>.json` (written elsewhere or under a hidden
//! name, then renamed in, so the agent never reads half a file) and the agent sends it.
//!
//! - On a receipt the file moves to `sent/` with the receipt beside it as `<name>.receipt.json`.
//! - On a permanent refusal (see [`crate::send::is_permanent_failure`]) or an invalid envelope it moves to `failed/`
//!   with `<name>.error.txt` holding the status code and message.
//! - On a transient failure (broker unreachable, deadline exceeded) it stays where it is and is tried again later.
//!
//! A file's idempotency key defaults to the hash of its bytes, so a file sent but not yet moved when the agent stopped
//! is answered with the first receipt when it is sent again.

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
    send::{code_name, describe_status, is_permanent_failure, prepare_envelope, send_envelope},
};

/// Subfolder for files the broker accepted.
pub const SENT_FOLDER: &str = "sent";
/// Subfolder for files the broker refused for good.
pub const FAILED_FOLDER: &str = "failed";

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
    fs::create_dir_all(outbox.join(SENT_FOLDER))?;
    fs::create_dir_all(outbox.join(FAILED_FOLDER))
}

/// The files waiting to be sent, in name order: regular `*.json` files not starting with `.`.
///
/// # Errors
/// The outbox cannot be listed.
pub fn waiting_files(outbox: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(outbox)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") && entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
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
        let file_name = path.file_name().unwrap_or(OsStr::new("")).to_string_lossy().into_owned();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            // The agency's system may have taken the file back; it is no longer ours to send.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let envelope = match prepare_envelope(&bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(file = %file_name, "outbox file is not a valid envelope: moved to failed");
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
                move_to_sent(outbox, &path, &receipt_json)?;
                tracing::info!(
                    file = %file_name,
                    message_id = %receipt.message_id,
                    duplicate = receipt.duplicate,
                    "outbox file sent"
                );
                pass.sent += 1;
            }
            Ok(Err(AgentError::Rpc(status))) if is_permanent_failure(status.code()) => {
                tracing::warn!(file = %file_name, code = code_name(status.code()), "broker refused outbox file: moved to failed");
                move_to_failed(outbox, &path, &format!("{}\n", describe_status(&status)))?;
                pass.failed += 1;
            }
            Ok(Err(error)) => {
                let code = match &error {
                    AgentError::Rpc(status) => code_name(status.code()),
                    _ => "UNKNOWN",
                };
                tracing::warn!(file = %file_name, code, "outbox send failed: will retry");
                pass.retry_later = true;
                break;
            }
            Err(_) => {
                tracing::warn!(file = %file_name, "outbox send timed out: will retry");
                pass.retry_later = true;
                break;
            }
        }
    }
    Ok(pass)
}

/// The stem of a `*.json` file name (`referral` for `referral.json`).
fn stem_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or(OsStr::new("message.json")).to_string_lossy();
    name.strip_suffix(".json").unwrap_or(&name).to_owned()
}

/// A stem for `folder` not used by an earlier file of the same name, so no earlier record is overwritten.
fn free_stem(folder: &Path, stem: &str) -> String {
    let taken = |candidate: &str| folder.join(format!("{candidate}.json")).exists();
    if !taken(stem) {
        return stem.to_owned();
    }
    let mut number = 2u64;
    loop {
        let candidate = format!("{stem}-{number}");
        if !taken(&candidate) {
            return candidate;
        }
        number += 1;
    }
}

/// Writes the companion file (receipt or error) durably, then moves the message beside it. A crash between the two
/// leaves the message in the outbox, to be sent again with the same idempotency key.
fn move_with_companion(
    outbox: &Path,
    path: &Path,
    folder_name: &str,
    suffix: &str,
    companion: &[u8],
) -> io::Result<()> {
    let folder = outbox.join(folder_name);
    fs::create_dir_all(&folder)?;
    let stem = free_stem(&folder, &stem_of(path));
    write_file_durably(&folder, &folder.join(format!("{stem}{suffix}")), companion)?;
    fs::rename(path, folder.join(format!("{stem}.json")))?;
    sync_folder(&folder)?;
    sync_folder(outbox)
}

fn move_to_sent(outbox: &Path, path: &Path, receipt_json: &[u8]) -> io::Result<()> {
    move_with_companion(outbox, path, SENT_FOLDER, ".receipt.json", receipt_json)
}

fn move_to_failed(outbox: &Path, path: &Path, error_text: &str) -> io::Result<()> {
    move_with_companion(outbox, path, FAILED_FOLDER, ".error.txt", error_text.as_bytes())
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
