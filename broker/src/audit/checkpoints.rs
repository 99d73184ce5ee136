//! The broker's signed checkpoints: the signing key, the durable file of every checkpoint signed, and the task that
//! signs a new one at least every second while the log grows.
//!
//! - The Ed25519 signing key lives in `keys/checkpoint.ed25519` (hex of the 32-byte seed, mode 0600), created on
//!   first run. Beside it, `keys/checkpoint.vkey` holds the verifier key in the format of Go's
//!   `golang.org/x/mod/sumdb/note` (`<origin>+<key id>+<base64 key>`), which is all an auditor needs.
//! - `audit/checkpoints.log` is an [`AppendLog`] whose records are whole signed notes (C2SP `signed-note` around a
//!   C2SP `tlog-checkpoint` body). Every checkpoint ever signed is kept; sizes never decrease.
//! - [`Checkpointer`] signs the current tree when it has grown since the last checkpoint, appends the note and
//!   fsyncs before anyone sees it. Signing is serialised by a mutex so that the file's order is the signing order.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ed25519_dalek::SigningKey;

use super::{
    AuditError, SharedTree,
    checkpoint::{Checkpoint, CheckpointError, NoteSigner, NoteVerifier, is_valid_key_name},
    merkle::Hash,
};
use crate::store::log::{AppendLog, LogError, read_all};

/// The origin line (and signing key name) of the broker's checkpoints unless configured otherwise.
pub const DEFAULT_ORIGIN: &str = "safeguarding-broker/audit";

/// File name of the signing key under the keys directory.
pub const SIGNING_KEY_FILE: &str = "checkpoint.ed25519";

/// File name of the published verifier key under the keys directory.
pub const VERIFIER_KEY_FILE: &str = "checkpoint.vkey";

/// A rotation's new signing key until the rotation is finished ([`rotate_signing_key`]).
pub const NEXT_SIGNING_KEY_FILE: &str = "checkpoint.ed25519.next";

/// What a finished rotation leaves for the broker to record in the audit log at its next start
/// ([`take_rotation_to_record`]).
pub const ROTATION_TO_RECORD_FILE: &str = "checkpoint-rotation.pending";

/// The start of the extension line of a key handover checkpoint; the next key's verifier key follows.
pub const KEY_ROTATION_EXTENSION: &str = "key-rotation ";

/// File name of the checkpoint log under the audit directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";

/// How often the broker looks for growth to sign.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointsError {
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("could not read or write the key file `{path}`: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("checkpoint {index} in `{path}` is not a valid signed checkpoint: {reason}")]
    Stored { path: PathBuf, index: u64, reason: String },
    #[error("the audit tree is unavailable: {0}")]
    Tree(String),
    #[error(
        "a checkpoint key rotation was interrupted (`{0}` is there): run `broker audit rotate-key` again to finish it \
         before starting the broker"
    )]
    RotationUnfinished(PathBuf),
    #[error("cannot rotate the checkpoint key: {0}")]
    CannotRotate(String),
    #[error(
        "the last key handover in `{path}` passes the audit log to the key `{key}`, but `keys/checkpoint.ed25519` is \
         another key: put that key's private key back (a handover cannot be undone; checkpoints signed with another \
         key would not verify)"
    )]
    HandedOverElsewhere { path: PathBuf, key: String },
    #[error(
        "this audit log's origin is `{existing}` (named in `{path}`), but the configuration names `{configured}`: a \
         log's origin cannot change, as auditors' verifier keys and every checkpoint signed name it. Set \
         `audit.checkpoint_origin` back to `{existing}`, or give the new origin to a new data directory"
    )]
    OriginChanged { path: PathBuf, existing: String, configured: String },
}

impl From<CheckpointsError> for AuditError {
    fn from(error: CheckpointsError) -> Self {
        AuditError::Checkpoints(error.to_string())
    }
}

/// A checkpoint and its signed note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    /// The whole signed note, as stored and served.
    pub note: String,
}

impl SignedCheckpoint {
    pub fn size(&self) -> u64 {
        self.checkpoint.size
    }

    pub fn root(&self) -> Hash {
        self.checkpoint.root
    }
}

pub fn signing_key_path(keys_dir: &Path) -> PathBuf {
    keys_dir.join(SIGNING_KEY_FILE)
}

pub fn verifier_key_path(keys_dir: &Path) -> PathBuf {
    keys_dir.join(VERIFIER_KEY_FILE)
}

pub fn checkpoints_path(audit_dir: &Path) -> PathBuf {
    audit_dir.join(CHECKPOINTS_FILE)
}

/// Loads the checkpoint signing key from `keys_dir`, creating it on first run, and (re)writes the verifier key
/// beside it.
pub fn load_or_create_signer(keys_dir: &Path, origin: &str) -> Result<NoteSigner, CheckpointsError> {
    let signer = load_signer(keys_dir, origin)?;
    publish_verifier_key(keys_dir, &signer)?;
    Ok(signer)
}

/// Loads the checkpoint signing key from `keys_dir` (creating it on first run) as a signer named `origin`, unless the
/// published verifier key names another origin. Writes no verifier key.
fn load_signer(keys_dir: &Path, origin: &str) -> Result<NoteSigner, CheckpointsError> {
    let next = keys_dir.join(NEXT_SIGNING_KEY_FILE);
    if next.exists() {
        return Err(CheckpointsError::RotationUnfinished(next));
    }
    let path = signing_key_path(keys_dir);
    let key_error = |reason: String| CheckpointsError::Key { path: path.clone(), reason };
    let vkey_path = verifier_key_path(keys_dir);
    let published = std::fs::read_to_string(&vkey_path).unwrap_or_default();
    // The published key names the log's origin (see `Checkpointer::open` for the checkpoints themselves).
    if let Ok(verifier) = NoteVerifier::from_verifier_key(published.trim())
        && verifier.name() != origin
    {
        return Err(CheckpointsError::OriginChanged {
            path: vkey_path,
            existing: verifier.name().to_owned(),
            configured: origin.to_owned(),
        });
    }
    let seed: [u8; 32] = match read_seed(&path)? {
        Some(seed) => seed,
        None => {
            let seed: [u8; 32] = rand::random();
            write_private(&path, &hex::encode(seed)).map_err(|error| key_error(error.to_string()))?;
            seed
        }
    };
    Ok(NoteSigner::new(origin, SigningKey::from_bytes(&seed))?)
}

/// The verifier key a key handover checkpoint passes the log on to, if it is one: a checkpoint signed by the key in
/// force and by the next key, whose one extension line is `key-rotation <verifier key>`.
pub fn handover_key(checkpoint: &Checkpoint) -> Option<&str> {
    match checkpoint.extensions.as_slice() {
        [line] => line.strip_prefix(KEY_ROTATION_EXTENSION),
        _ => None,
    }
}

/// Whether a checkpoint has a `key-rotation` line at all (a handover, or a malformed one: [`handover_key`] reads
/// only a checkpoint whose one extension line it is).
pub fn mentions_handover(checkpoint: &Checkpoint) -> bool {
    checkpoint.extensions.iter().any(|line| line.starts_with(KEY_ROTATION_EXTENSION))
}

/// What [`rotate_signing_key`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The retired key's verifier key.
    pub previous: String,
    /// The new key's verifier key.
    pub next: String,
    /// The size of the handover checkpoint; `None` when nothing had been signed yet (no handover is needed).
    pub handover_size: Option<u64>,
}

/// Replaces the checkpoint signing key of the (stopped) broker whose data directory is `data_dir`, keeping the chain
/// of trust: the latest checkpoint is signed again, with an extension line naming the new key's verifier key, by the
/// retired key and by the new one (a handover), so an auditor who trusts the retired key learns the new one from a
/// note the retired key signed. Then the new key replaces the old one's file (the retired private key is gone from
/// the data directory), the verifier key is published, and the rotation is left for the broker to record in the
/// audit log at its next start.
///
/// Each step can be interrupted and the command run again: the new key is kept under [`NEXT_SIGNING_KEY_FILE`] until
/// the end (written atomically and durably before any handover names it; the broker refuses to start while it is
/// there), a handover already stored is not signed twice, and a rotation that ended before publishing its key is
/// finished by publishing it. A second rotation is refused until the broker has recorded the first.
/// The caller holds the data directory's lock.
pub fn rotate_signing_key(data_dir: &Path) -> Result<Rotation, CheckpointsError> {
    let keys = data_dir.join("keys");
    let cannot = |reason: String| CheckpointsError::CannotRotate(reason);
    let published = read_verifier_key(&keys)
        .map_err(|_| cannot("no published checkpoint key: start the broker once first".into()))?;
    let origin = NoteVerifier::from_verifier_key(&published)?.name().to_owned();
    let current_path = signing_key_path(&keys);
    let current = read_seed(&current_path)?
        .ok_or_else(|| cannot(format!("`{}` is missing: there is no key to retire", current_path.display())))?;
    let current = NoteSigner::new(&origin, SigningKey::from_bytes(&current))?;

    let audit_dir = data_dir.join("audit");
    let notes = read_notes(&audit_dir)?;
    let latest_index = notes.len().saturating_sub(1) as u64;
    let stored = |reason: String| CheckpointsError::Stored {
        path: checkpoints_path(&audit_dir),
        index: latest_index,
        reason: format!("the latest checkpoint: {reason}"),
    };
    let latest = match notes.last() {
        Some(note) => Some((note, parse_note(note).map_err(|error| stored(error.to_string()))?)),
        None => None,
    };
    let handed_to = latest.as_ref().and_then(|(_, checkpoint)| handover_key(checkpoint)).map(str::to_owned);
    let next_path = keys.join(NEXT_SIGNING_KEY_FILE);
    let pending = read_seed(&next_path)?;
    let record = keys.join(ROTATION_TO_RECORD_FILE);

    if current.verifier_key() != published {
        // Interrupted after the new key took the old one's place, before it was published.
        if pending.is_none() && handed_to.as_deref() == Some(current.verifier_key().as_str()) {
            publish_verifier_key(&keys, &current)?;
            let handover_size = latest.map(|(_, checkpoint)| checkpoint.size);
            return Ok(Rotation { previous: published, next: current.verifier_key(), handover_size });
        }
        return Err(cannot(format!(
            "`{}` is not the key of the published verifier key `{published}`",
            current_path.display()
        )));
    }
    if pending.is_none() && record.exists() {
        return Err(cannot(format!(
            "the previous rotation is not yet recorded in the audit log (`{}` is there): start the broker once, then \
             rotate again",
            record.display()
        )));
    }
    let next = match pending {
        Some(seed) => seed,
        None => {
            let seed: [u8; 32] = rand::random();
            crate::store::log::replace_privately(&keys, NEXT_SIGNING_KEY_FILE, hex::encode(seed).as_bytes())
                .map_err(|error| CheckpointsError::Key { path: next_path.clone(), reason: error.to_string() })?;
            seed
        }
    };
    let next = NoteSigner::new(&origin, SigningKey::from_bytes(&next))?;
    if let Some(handed) = &handed_to
        && *handed != next.verifier_key()
        && *handed != current.verifier_key()
    {
        return Err(cannot(format!(
            "the latest checkpoint hands the log over to the key `{handed}`, which is neither the key in force nor \
             this rotation's (`{}`); a handover cannot be undone: put that key's private key back",
            next_path.display()
        )));
    }

    let handover_size = match latest {
        None => None,
        Some((note, checkpoint)) => {
            open_note(&NoteVerifier::from_verifier_key(&published)?, note)
                .map_err(|error| stored(error.to_string()))?;
            if handed_to.as_deref() != Some(next.verifier_key().as_str()) {
                let handover = Checkpoint {
                    origin: checkpoint.origin.clone(),
                    size: checkpoint.size,
                    root: checkpoint.root,
                    extensions: vec![format!("{KEY_ROTATION_EXTENSION}{}", next.verifier_key())],
                };
                let note = next.cosign(&current.sign_checkpoint(&handover)?)?;
                let (mut log, _) = AppendLog::open(&checkpoints_path(&audit_dir), 0, |_, _| Ok(()))?;
                log.append([note.as_bytes()])?;
                log.sync()?;
            }
            Some(checkpoint.size)
        }
    };
    let rotation = Rotation { previous: published, next: next.verifier_key(), handover_size };
    let text = format!(
        "{}\n{}\n{}\n",
        rotation.previous,
        rotation.next,
        rotation.handover_size.map_or_else(|| "-".to_owned(), |size| size.to_string())
    );
    let key_error =
        |path: &Path, error: std::io::Error| CheckpointsError::Key { path: path.to_owned(), reason: error.to_string() };
    crate::store::log::replace_durably(&keys, ROTATION_TO_RECORD_FILE, text.as_bytes())
        .map_err(|error| key_error(&record, error))?;
    std::fs::rename(&next_path, &current_path).map_err(|error| key_error(&current_path, error))?;
    crate::store::log::sync_dir(&keys).map_err(|error| key_error(&keys, error))?;
    publish_verifier_key(&keys, &next)?;
    Ok(rotation)
}

/// A rotation [`rotate_signing_key`] left to record (retired verifier key, new verifier key, handover size), once;
/// the file is removed by [`rotation_recorded`] after the entry is durable. A note that cannot be read or does not
/// name two verifier keys is logged and left where it is.
pub fn take_rotation_to_record(keys_dir: &Path) -> Option<Rotation> {
    let path = keys_dir.join(ROTATION_TO_RECORD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), error = %error, "cannot read the note of a checkpoint key rotation");
            return None;
        }
    };
    let mut lines = text.lines();
    let rotation = match (lines.next(), lines.next(), lines.next()) {
        (Some(previous), Some(next), Some(size))
            if NoteVerifier::from_verifier_key(previous).is_ok() && NoteVerifier::from_verifier_key(next).is_ok() =>
        {
            Some(Rotation { previous: previous.to_owned(), next: next.to_owned(), handover_size: size.parse().ok() })
        }
        _ => None,
    };
    if rotation.is_none() {
        tracing::warn!(path = %path.display(), "the note of a checkpoint key rotation is not one this broker wrote");
    }
    rotation
}

/// Forgets the rotation [`take_rotation_to_record`] returned, now that it is recorded.
pub fn rotation_recorded(keys_dir: &Path) -> std::io::Result<()> {
    std::fs::remove_file(keys_dir.join(ROTATION_TO_RECORD_FILE))?;
    crate::store::log::sync_dir(keys_dir)
}

/// Reads a hex seed file; `None` if there is none.
fn read_seed(path: &Path) -> Result<Option<[u8; 32]>, CheckpointsError> {
    let key_error = |reason: String| CheckpointsError::Key { path: path.to_owned(), reason };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim()).map_err(|error| key_error(error.to_string()))?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map(Some)
                .map_err(|_| key_error("expected 32 bytes of hex".to_owned()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(key_error(error.to_string())),
    }
}

/// Writes the signer's verifier key to `keys_dir` unless it is already there.
fn publish_verifier_key(keys_dir: &Path, signer: &NoteSigner) -> Result<(), CheckpointsError> {
    let vkey_path = verifier_key_path(keys_dir);
    let published = std::fs::read_to_string(&vkey_path).unwrap_or_default();
    if published.trim() != signer.verifier_key() {
        crate::pki::write_file(&vkey_path, &format!("{}\n", signer.verifier_key()))
            .map_err(|error| CheckpointsError::Key { path: vkey_path.clone(), reason: error.to_string() })?;
    }
    Ok(())
}

/// Writes a secret file readable only by its owner, durably.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Reads the published verifier key from `keys_dir`.
pub fn read_verifier_key(keys_dir: &Path) -> Result<String, CheckpointsError> {
    let path = verifier_key_path(keys_dir);
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_owned())
        .map_err(|error| CheckpointsError::Key { path, reason: error.to_string() })
}

/// Parses a stored note without checking its signature (the caller checks it with a [`NoteVerifier`]).
pub fn parse_note(note: &str) -> Result<Checkpoint, CheckpointError> {
    let Some(split) = note.rfind("\n\n") else {
        return Err(CheckpointError::MalformedNote("no blank line before the signatures"));
    };
    Checkpoint::parse_body(&note[..split + 1])
}

/// Opens a signed note with `verifier` and parses its checkpoint.
pub fn open_note(verifier: &NoteVerifier, note: &str) -> Result<Checkpoint, CheckpointError> {
    Checkpoint::parse_body(verifier.open(note)?)
}

/// Reads every stored signed note, in order, without changing the file. A missing file holds none.
pub fn read_notes(audit_dir: &Path) -> Result<Vec<String>, CheckpointsError> {
    let path = checkpoints_path(audit_dir);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut notes = Vec::new();
    read_all(&path, |offset, bytes| {
        let note = std::str::from_utf8(bytes).map_err(|_| LogError::Corrupt {
            path: path.clone(),
            offset,
            reason: "a checkpoint is not UTF-8 text".to_owned(),
        })?;
        notes.push(note.to_owned());
        Ok(())
    })?;
    Ok(notes)
}

/// The latest stored checkpoint, if any, parsed (not signature-checked).
pub fn latest_note(audit_dir: &Path) -> Result<Option<SignedCheckpoint>, CheckpointsError> {
    let notes = read_notes(audit_dir)?;
    let index = notes.len().saturating_sub(1) as u64;
    match notes.into_iter().last() {
        Some(note) => {
            let checkpoint = parse_note(&note).map_err(|error| CheckpointsError::Stored {
                path: checkpoints_path(audit_dir),
                index,
                reason: error.to_string(),
            })?;
            Ok(Some(SignedCheckpoint { checkpoint, note }))
        }
        None => Ok(None),
    }
}

struct Signed {
    log: AppendLog,
    latest: Option<SignedCheckpoint>,
}

/// Signs and keeps checkpoints of the audit tree. Cheap to share (`Arc`).
pub struct Checkpointer {
    signer: NoteSigner,
    tree: SharedTree,
    signed: Mutex<Signed>,
    /// Every key handover note stored, oldest first ([`handover_key`]).
    handovers: Vec<String>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Checkpointer").field("signer", &self.signer).finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Opens `audit_dir/checkpoints.log` (cutting a torn tail left by a crash), checks the latest stored checkpoint
    /// is signed by `signer`, and is ready to sign `tree`.
    pub fn open(audit_dir: &Path, signer: NoteSigner, tree: SharedTree) -> Result<Self, CheckpointsError> {
        let path = checkpoints_path(audit_dir);
        let mut last = None;
        let mut count = 0u64;
        let mut handovers = Vec::new();
        let mut handed_to = None;
        // Most notes are not handovers: only those with the extension's text are parsed (a log keeps every checkpoint
        // it ever signed, so this runs over all of them at every start).
        let marker = format!("\n{KEY_ROTATION_EXTENSION}");
        let (log, _recovery) = AppendLog::open(&path, 0, |_, bytes| {
            if bytes.windows(marker.len()).any(|window| window == marker.as_bytes())
                && let Ok(note) = std::str::from_utf8(bytes)
                && let Ok(checkpoint) = parse_note(note)
                && let Some(key) = handover_key(&checkpoint)
            {
                handed_to = Some(key.to_owned());
                handovers.push(note.to_owned());
            }
            last = Some(bytes.to_vec());
            count += 1;
            Ok(())
        })?;
        // A log handed over to another key can only go on with that key: checkpoints signed with this one would not
        // verify after the handover.
        if let Some(key) = handed_to
            && key != signer.verifier_key()
        {
            return Err(CheckpointsError::HandedOverElsewhere { path, key });
        }
        let verifier = NoteVerifier::from_verifier_key(&signer.verifier_key())?;
        let latest = match last {
            Some(bytes) => {
                let stored = |reason: String| CheckpointsError::Stored { path: path.clone(), index: count - 1, reason };
                let note = String::from_utf8(bytes).map_err(|_| stored("not UTF-8 text".to_owned()))?;
                // Its first line is its origin: one that differs is a configuration change, not damage.
                let existing = note.lines().next().unwrap_or_default();
                if existing != signer.name() && is_valid_key_name(existing) {
                    return Err(CheckpointsError::OriginChanged {
                        path,
                        existing: existing.to_owned(),
                        configured: signer.name().to_owned(),
                    });
                }
                let checkpoint = open_note(&verifier, &note).map_err(|error| stored(error.to_string()))?;
                Some(SignedCheckpoint { checkpoint, note })
            }
            None => None,
        };
        Ok(Self { signer, tree, signed: Mutex::new(Signed { log, latest }), handovers })
    }

    /// Loads (or creates) the signing key under `data_dir/keys` and opens `data_dir/audit/checkpoints.log`: what
    /// `broker::run` calls at start.
    /// The verifier key is published only once the stored checkpoints are known to be this signer's, so a start
    /// refused for another origin leaves the published key as it was.
    pub fn open_in(data_dir: &Path, tree: SharedTree, origin: &str) -> Result<Arc<Self>, CheckpointsError> {
        let keys = data_dir.join("keys");
        let signer = load_signer(&keys, origin)?;
        let checkpointer = Self::open(&data_dir.join("audit"), signer, tree)?;
        publish_verifier_key(&keys, &checkpointer.signer)?;
        Ok(Arc::new(checkpointer))
    }

    /// The tree this signer checkpoints.
    pub fn tree(&self) -> SharedTree {
        self.tree.clone()
    }

    /// The verifier key auditors use.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    /// Every key handover note, oldest first: how an auditor who trusts an earlier key comes to trust this one.
    pub fn handovers(&self) -> &[String] {
        &self.handovers
    }

    /// The latest checkpoint signed, if any.
    pub fn latest(&self) -> Option<SignedCheckpoint> {
        match self.signed.lock() {
            Ok(signed) => signed.latest.clone(),
            Err(poisoned) => poisoned.into_inner().latest.clone(),
        }
    }

    /// Signs and durably stores a checkpoint of the tree as it is now, unless the latest checkpoint already covers
    /// it; returns the latest checkpoint (`None` only while the log is empty and nothing was ever signed).
    pub fn checkpoint_now(&self) -> Result<Option<SignedCheckpoint>, CheckpointsError> {
        let mut signed =
            self.signed.lock().map_err(|_| CheckpointsError::Tree("checkpoint lock poisoned".to_owned()))?;
        let (size, root) = {
            let tree = self.tree.read().map_err(|_| CheckpointsError::Tree("tree lock poisoned".to_owned()))?;
            (tree.size(), tree.root())
        };
        let latest_size = signed.latest.as_ref().map(SignedCheckpoint::size);
        if size == 0 || latest_size.is_some_and(|latest| latest >= size) {
            return Ok(signed.latest.clone());
        }
        let checkpoint = Checkpoint { origin: self.signer.name().to_owned(), size, root, extensions: Vec::new() };
        let note = self.signer.sign_checkpoint(&checkpoint)?;
        signed.log.append([note.as_bytes()])?;
        signed.log.sync()?;
        let fresh = SignedCheckpoint { checkpoint, note };
        signed.latest = Some(fresh.clone());
        Ok(Some(fresh))
    }

    /// Signs a checkpoint whenever the tree has grown, checking every `interval`, until the task is aborted.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let checkpointer = self.clone();
            match tokio::task::spawn_blocking(move || checkpointer.checkpoint_now()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(error = %error, "could not sign or store a checkpoint"),
                Err(error) => tracing::error!(error = %error, "the checkpoint task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::MerkleTree;

    /// A log created with a configured origin signs with it; the origin cannot change under the log afterwards,
    /// whether the published verifier key or only the stored checkpoints still name the old one.
    #[test]
    fn a_log_keeps_the_origin_it_was_created_with() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let tree: SharedTree = Arc::new(std::sync::RwLock::new(MerkleTree::new()));
        let origin = "safeguarding.luton.example/audit";
        let checkpointer = Checkpointer::open_in(dir.path(), tree.clone(), origin).unwrap();
        tree.write().unwrap().push(b"one");
        let signed = checkpointer.checkpoint_now().unwrap().unwrap();
        assert!(signed.note.starts_with("safeguarding.luton.example/audit\n1\n"), "{}", signed.note);
        let published = read_verifier_key(&keys).unwrap();
        assert!(published.starts_with("safeguarding.luton.example/audit+"));
        drop(checkpointer);

        let changed = Checkpointer::open_in(dir.path(), tree.clone(), DEFAULT_ORIGIN).unwrap_err();
        assert!(
            matches!(&changed, CheckpointsError::OriginChanged { existing, configured, .. }
                if existing == origin && configured == DEFAULT_ORIGIN),
            "{changed:?}"
        );
        assert_eq!(read_verifier_key(&keys).unwrap(), published, "left as it was");

        // With the published key gone, the stored checkpoints still name the log's origin, and the refused start
        // publishes no key naming the other one.
        std::fs::remove_file(verifier_key_path(&keys)).unwrap();
        let changed = Checkpointer::open_in(dir.path(), tree.clone(), DEFAULT_ORIGIN).unwrap_err();
        assert!(matches!(changed, CheckpointsError::OriginChanged { .. }), "{changed:?}");
        assert!(!verifier_key_path(&keys).exists(), "no key published for the refused origin");
        let reopened = Checkpointer::open_in(dir.path(), tree, origin).unwrap();
        assert_eq!(reopened.latest(), Some(signed));
        assert_eq!(read_verifier_key(&keys).unwrap(), published, "published again");
    }

    #[test]
    fn checkpoints_are_signed_kept_and_verify_with_the_published_key_alone() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let audit = dir.path().join("audit");
        let tree: SharedTree = Arc::new(std::sync::RwLock::new(MerkleTree::new()));
        let signer = load_or_create_signer(&keys, DEFAULT_ORIGIN).unwrap();
        let checkpointer = Checkpointer::open(&audit, signer, tree.clone()).unwrap();
        assert_eq!(checkpointer.checkpoint_now().unwrap(), None, "nothing to sign while empty");
        tree.write().unwrap().push(b"one");
        let first = checkpointer.checkpoint_now().unwrap().unwrap();
        assert_eq!(first.size(), 1);
        assert_eq!(checkpointer.checkpoint_now().unwrap().unwrap(), first, "no new checkpoint without growth");
        tree.write().unwrap().push(b"two");
        let second = checkpointer.checkpoint_now().unwrap().unwrap();
        assert_eq!(second.size(), 2);
        assert_eq!(second.root(), tree.read().unwrap().root());
        drop(checkpointer);

        let notes = read_notes(&audit).unwrap();
        assert_eq!(notes, vec![first.note.clone(), second.note.clone()]);
        let verifier = NoteVerifier::from_verifier_key(&read_verifier_key(&keys).unwrap()).unwrap();
        assert_eq!(open_note(&verifier, &second.note).unwrap(), second.checkpoint);
        assert!(second.note.starts_with("safeguarding-broker/audit\n2\n"));

        // The same key on the next start, and the latest checkpoint is remembered.
        let signer = load_or_create_signer(&keys, DEFAULT_ORIGIN).unwrap();
        assert_eq!(signer.verifier_key(), verifier_key_from(&keys));
        let reopened = Checkpointer::open(&audit, signer, tree).unwrap();
        assert_eq!(reopened.latest(), Some(second));
    }

    fn verifier_key_from(keys: &Path) -> String {
        read_verifier_key(keys).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn the_signing_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        load_or_create_signer(dir.path(), DEFAULT_ORIGIN).unwrap();
        let mode = std::fs::metadata(signing_key_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
}
