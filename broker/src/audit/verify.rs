//! Offline verification of a data directory's audit log (`broker audit verify`).
//!
//! Reads `audit/entries.log` and `audit/checkpoints.log` without changing them (so it can run beside a live broker),
//! and checks, in one pass over the entries:
//!
//! 1. every record's frame and checksum, and that it decodes as an entry;
//! 2. that sequence numbers run 0, 1, 2, ... without a gap or a repeat (a dropped or reordered entry fails here);
//! 3. every stored checkpoint's signature against the verifier key, that its origin is the key's name, and that each
//!    checkpoint's size is at least the previous one's (a log that shrank is not an extension). A key handover (a
//!    checkpoint signed by the key in force and by the next one, naming the next key in a `key-rotation` extension
//!    line; `broker audit rotate-key`) passes trust to the next key, and every later checkpoint must be signed by it.
//!    Checkpoints before the first one the given key signed (signed by keys it took over from) are counted, not
//!    checked; give the earliest key to check them too;
//! 4. that each checkpoint's root equals the RFC 6962 root recomputed from the entries at its size, which with (3)
//!    means every checkpoint extends the one before it. An entry rewritten with a valid checksum and sequence number
//!    is caught here: the failure names the range of entries between the last checkpoint that still matches and the
//!    first that does not;
//! 5. that no checkpoint is larger than the log (a log truncated at a record boundary fails here).
//!
//! The first problem found stops the check and is returned as a [`VerifyFailure`], whose
//! [`VerifyFailure::first_bad_sequence`] names the first entry that cannot be trusted.

use std::path::{Path, PathBuf};

use super::{
    AuditEntry, AuditLog,
    checkpoint::{Checkpoint, CheckpointError, NoteVerifier},
    checkpoints::{self, read_verifier_key},
    merkle::{EMPTY_ROOT, Hash, RootBuilder, leaf_hash},
};
use crate::store::log::{LogError, read_all};

/// What a successful verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    /// The root of the whole log as recomputed.
    pub root: Hash,
    pub checkpoints: u64,
    /// The latest checkpoint, if any.
    pub latest_checkpoint: Option<Checkpoint>,
    /// Checkpoints signed before the given key's first, by keys it took over from: not checked.
    pub unchecked_checkpoints: u64,
    /// The key handovers followed, as (checkpoint index, the next key's verifier key).
    pub key_rotations: Vec<(u64, String)>,
}

/// Why verification failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyFailure {
    #[error("could not read `{path}`: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("no verifier key: {0} (give one with --verifier-key)")]
    NoVerifierKey(String),
    #[error("the verifier key is not valid: {0}")]
    BadVerifierKey(String),
    #[error("entry {sequence} (byte offset {offset}) is damaged: {reason}")]
    Damaged { sequence: u64, offset: u64, reason: String },
    #[error("entry {sequence} (byte offset {offset}) does not decode: {reason}")]
    Undecodable { sequence: u64, offset: u64, reason: String },
    #[error(
        "the entry at position {position} (byte offset {offset}) has sequence number {found}: entries were dropped or \
         reordered"
    )]
    OutOfSequence { position: u64, offset: u64, found: u64 },
    #[error("checkpoint {index} is not validly signed: {reason}")]
    BadSignature { index: u64, reason: String },
    #[error("no checkpoint is signed by the verifier key `{0}` (nor handed over to it by a key rotation)")]
    NoCheckpointOfKey(String),
    #[error("checkpoint {index} is a key handover that does not pass the log on properly: {reason}")]
    BadHandover { index: u64, reason: String },
    #[error("checkpoint {index} has origin `{origin}`, not the verifier key's name `{expected}`")]
    WrongOrigin { index: u64, origin: String, expected: String },
    #[error("checkpoint {index} has size {size}, smaller than the previous checkpoint's {previous_size}")]
    Shrank { index: u64, size: u64, previous_size: u64 },
    #[error(
        "checkpoint {index} (size {size}) does not match the log: an entry from {first_suspect} to {last_suspect} was \
         altered"
    )]
    RootMismatch { index: u64, size: u64, first_suspect: u64, last_suspect: u64 },
    #[error(
        "checkpoint {index} covers {size} entries but the log has only {entries}: entries from {entries} on are missing"
    )]
    Truncated { index: u64, size: u64, entries: u64 },
}

impl VerifyFailure {
    /// The first entry that cannot be trusted, when the failure is about entries.
    pub fn first_bad_sequence(&self) -> Option<u64> {
        match self {
            VerifyFailure::Damaged { sequence, .. } | VerifyFailure::Undecodable { sequence, .. } => Some(*sequence),
            VerifyFailure::OutOfSequence { position, .. } => Some(*position),
            VerifyFailure::RootMismatch { first_suspect, .. } => Some(*first_suspect),
            VerifyFailure::Truncated { entries, .. } => Some(*entries),
            _ => None,
        }
    }
}

/// Verifies the audit log under `data_dir` (see the module documentation). `verifier_key` defaults to the one the
/// broker published in `keys/checkpoint.vkey`. `progress` is called now and then with the bytes of `entries.log`
/// read so far and the file's length.
pub fn verify_data_dir(
    data_dir: &Path,
    verifier_key: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, VerifyFailure> {
    let audit_dir = data_dir.join("audit");
    let verifier_key = match verifier_key {
        Some(key) => key.trim().to_owned(),
        None => read_verifier_key(&data_dir.join("keys"))
            .map_err(|error| VerifyFailure::NoVerifierKey(error.to_string()))?,
    };
    let verifier = NoteVerifier::from_verifier_key(&verifier_key)
        .map_err(|error| VerifyFailure::BadVerifierKey(error.to_string()))?;
    let notes = checkpoints::read_notes(&audit_dir).map_err(|error| VerifyFailure::Unreadable {
        path: checkpoints::checkpoints_path(&audit_dir),
        reason: error.to_string(),
    })?;
    let chain = check_signatures(&verifier, &notes)?;
    let mut report = verify_entries(&AuditLog::path(&audit_dir), &chain.checkpoints, chain.unchecked, progress)?;
    report.unchecked_checkpoints = chain.unchecked;
    report.key_rotations = chain.rotations;
    Ok(report)
}

/// The checkpoints [`check_signatures`] accepted.
#[derive(Debug, PartialEq, Eq)]
pub struct SignedChain {
    /// Checkpoints before the given key's first, not checked; they come first in the file.
    pub unchecked: u64,
    /// The checked checkpoints, in signing order (the file's from index `unchecked` on).
    pub checkpoints: Vec<Checkpoint>,
    /// The key handovers followed: (checkpoint index, the next key's verifier key).
    pub rotations: Vec<(u64, String)>,
}

/// Opens every note with the key in force, `verifier` at first and then each key a handover passes the log on to,
/// and checks origins and that sizes never decrease. Notes before the first one `verifier` opens are counted as
/// unchecked (signed by keys it took over from); after that, every note must open with the key in force.
pub fn check_signatures(verifier: &NoteVerifier, notes: &[String]) -> Result<SignedChain, VerifyFailure> {
    let mut trusted = verifier.clone();
    let mut chain = SignedChain { unchecked: 0, checkpoints: Vec::with_capacity(notes.len()), rotations: Vec::new() };
    for (index, note) in notes.iter().enumerate() {
        let index = index as u64;
        let checkpoint = match checkpoints::open_note(&trusted, note) {
            Ok(checkpoint) => checkpoint,
            Err(CheckpointError::UnknownKey { .. }) if chain.checkpoints.is_empty() => {
                chain.unchecked += 1;
                continue;
            }
            Err(error) => return Err(VerifyFailure::BadSignature { index, reason: error.to_string() }),
        };
        if checkpoint.origin != trusted.name() {
            return Err(VerifyFailure::WrongOrigin {
                index,
                origin: checkpoint.origin,
                expected: trusted.name().to_owned(),
            });
        }
        if let Some(previous) = chain.checkpoints.last()
            && checkpoint.size < previous.size
        {
            return Err(VerifyFailure::Shrank { index, size: checkpoint.size, previous_size: previous.size });
        }
        if checkpoints::mentions_handover(&checkpoint) && checkpoints::handover_key(&checkpoint).is_none() {
            return Err(VerifyFailure::BadHandover {
                index,
                reason: "a key handover's one extension line must be `key-rotation <verifier key>`".to_owned(),
            });
        }
        if let Some(next) = checkpoints::handover_key(&checkpoint) {
            let bad = |reason: String| VerifyFailure::BadHandover { index, reason };
            let next_verifier = NoteVerifier::from_verifier_key(next)
                .map_err(|error| bad(format!("the next key `{next}` is not a valid verifier key: {error}")))?;
            if next_verifier.name() != trusted.name() {
                return Err(bad(format!("the next key is named `{}`, not the log's origin", next_verifier.name())));
            }
            checkpoints::open_note(&next_verifier, note)
                .map_err(|error| bad(format!("it is not signed by the next key: {error}")))?;
            chain.rotations.push((index, next.to_owned()));
            trusted = next_verifier;
        }
        chain.checkpoints.push(checkpoint);
    }
    if chain.checkpoints.is_empty() && !notes.is_empty() {
        return Err(VerifyFailure::NoCheckpointOfKey(format!("{}+{:08x}", verifier.name(), verifier.key_id())));
    }
    Ok(chain)
}

/// The key that signs now, for an auditor who trusts `pinned`: the key the last of `handovers` (the broker's key
/// handover notes, oldest first) passes the log on to, following each from `pinned` as [`check_signatures`] does;
/// `pinned` itself when no handover came after it.
pub fn key_in_force(pinned: &NoteVerifier, handovers: &[String]) -> Result<NoteVerifier, VerifyFailure> {
    let chain = check_signatures(pinned, handovers)?;
    match chain.rotations.last() {
        Some((index, key)) => NoteVerifier::from_verifier_key(key)
            .map_err(|error| VerifyFailure::BadHandover { index: *index, reason: error.to_string() }),
        None => Ok(pinned.clone()),
    }
}

/// Replays `entries_path` against already signature-checked `checkpoints` (in signing order; the first is checkpoint
/// `first_index` of the file, for the failures' indexes).
pub fn verify_entries(
    entries_path: &Path,
    checkpoints: &[Checkpoint],
    first_index: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, VerifyFailure> {
    let unreadable = |reason: String| VerifyFailure::Unreadable { path: entries_path.to_owned(), reason };
    let total = match std::fs::metadata(entries_path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(unreadable(error.to_string())),
    };
    let mut builder = RootBuilder::new();
    let mut next_checkpoint = 0usize;
    // The size of the last checkpoint whose root matched: entries before it are vouched for.
    let mut matched_size = 0u64;
    let mut check_due = |builder: &RootBuilder, next_checkpoint: &mut usize| -> Result<(), VerifyFailure> {
        while let Some(checkpoint) = checkpoints.get(*next_checkpoint)
            && checkpoint.size == builder.size()
        {
            let root = if builder.size() == 0 { EMPTY_ROOT } else { builder.root() };
            if checkpoint.root != root {
                return Err(VerifyFailure::RootMismatch {
                    index: first_index + *next_checkpoint as u64,
                    size: checkpoint.size,
                    first_suspect: matched_size,
                    last_suspect: checkpoint.size.saturating_sub(1),
                });
            }
            matched_size = checkpoint.size;
            *next_checkpoint += 1;
        }
        Ok(())
    };
    check_due(&builder, &mut next_checkpoint)?;
    let mut failure = None;
    if total > 0 {
        let result = read_all(entries_path, |offset, bytes| {
            let sequence = builder.size();
            // The sequence number is the entry's first field: reading it alone keeps verification at hashing speed.
            // Whether the rest decodes is checked in full on the entries no signed checkpoint covers yet; those a
            // checkpoint covers are, byte for byte, what the broker signed.
            let covered = checkpoints.last().is_some_and(|last| sequence < last.size);
            let found = if covered {
                AuditEntry::decode_sequence(bytes)
            } else {
                AuditEntry::decode(bytes).map(|entry| entry.sequence)
            };
            let outcome = match found {
                Ok(found) if found == sequence => {
                    builder.push_leaf_hash(leaf_hash(bytes));
                    check_due(&builder, &mut next_checkpoint)
                }
                Ok(found) => Err(VerifyFailure::OutOfSequence { position: sequence, offset, found }),
                Err(reason) => Err(VerifyFailure::Undecodable { sequence, offset, reason }),
            };
            if sequence.is_multiple_of(65_536) {
                progress(offset, total);
            }
            outcome.map_err(|problem| {
                failure = Some(problem);
                // Stops the read; the failure above is what is reported.
                LogError::Corrupt { path: PathBuf::new(), offset, reason: String::new() }
            })
        });
        if let Some(problem) = failure {
            return Err(problem);
        }
        match result {
            Ok(_) => {}
            Err(LogError::Corrupt { offset, reason, .. }) => {
                return Err(VerifyFailure::Damaged { sequence: builder.size(), offset, reason });
            }
            Err(error) => return Err(unreadable(error.to_string())),
        }
    }
    progress(total, total);
    if let Some(checkpoint) = checkpoints.get(next_checkpoint) {
        if checkpoint.size > builder.size() {
            return Err(VerifyFailure::Truncated {
                index: first_index + next_checkpoint as u64,
                size: checkpoint.size,
                entries: builder.size(),
            });
        }
        // Sizes never decrease and every size up to the log's was checked on the way, so this cannot happen; it is
        // reported rather than ignored.
        return Err(VerifyFailure::RootMismatch {
            index: first_index + next_checkpoint as u64,
            size: checkpoint.size,
            first_suspect: 0,
            last_suspect: checkpoint.size.saturating_sub(1),
        });
    }
    Ok(VerifyReport {
        entries: builder.size(),
        root: if builder.size() == 0 { EMPTY_ROOT } else { builder.root() },
        checkpoints: checkpoints.len() as u64,
        latest_checkpoint: checkpoints.last().cloned(),
        unchecked_checkpoints: 0,
        key_rotations: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{
        EventType,
        checkpoints::{Checkpointer, DEFAULT_ORIGIN, load_or_create_signer},
    };

    /// A data directory with `count` entries appended in batches of 10 and a checkpoint after each batch.
    fn data_dir_with(count: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(&dir.path().join("audit")).unwrap();
        let signer = load_or_create_signer(&dir.path().join("keys"), DEFAULT_ORIGIN).unwrap();
        let checkpointer = Checkpointer::open(&dir.path().join("audit"), signer, log.tree()).unwrap();
        for batch in 0..count.div_ceil(10) {
            let entries = (0..10.min(count - batch * 10))
                .map(|index| AuditEntry {
                    event: Some(EventType::Delivery),
                    message_id: format!("m-{batch}-{index}"),
                    ..AuditEntry::default()
                })
                .collect();
            log.append(entries).unwrap();
            checkpointer.checkpoint_now().unwrap();
        }
        dir
    }

    fn verify(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
        verify_data_dir(dir, None, &mut |_, _| {})
    }

    #[test]
    fn an_intact_log_verifies() {
        let dir = data_dir_with(35);
        let report = verify(dir.path()).unwrap();
        assert_eq!(report.entries, 35);
        assert_eq!(report.checkpoints, 4);
        assert_eq!(report.latest_checkpoint.unwrap().root, report.root);
    }

    #[test]
    fn an_empty_data_dir_verifies_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_signer(&dir.path().join("keys"), DEFAULT_ORIGIN).unwrap();
        assert_eq!(verify(dir.path()).unwrap().entries, 0);
    }

    #[test]
    fn another_key_rejects_the_checkpoints() {
        let dir = data_dir_with(5);
        let other = tempfile::tempdir().unwrap();
        let key = load_or_create_signer(other.path(), DEFAULT_ORIGIN).unwrap().verifier_key();
        let failure = verify_data_dir(dir.path(), Some(&key), &mut |_, _| {}).unwrap_err();
        assert!(matches!(failure, VerifyFailure::NoCheckpointOfKey(_)), "{failure}");
    }

    fn signer_of(keys: &Path) -> crate::audit::checkpoint::NoteSigner {
        let seed: [u8; 32] =
            hex::decode(std::fs::read_to_string(keys.join(checkpoints::SIGNING_KEY_FILE)).unwrap().trim())
                .unwrap()
                .try_into()
                .unwrap();
        crate::audit::checkpoint::NoteSigner::new(DEFAULT_ORIGIN, ed25519_dalek::SigningKey::from_bytes(&seed)).unwrap()
    }

    fn rewrite_notes(audit: &Path, notes: &[String]) {
        let path = checkpoints::checkpoints_path(audit);
        std::fs::remove_file(&path).unwrap();
        let (mut log, _) = crate::store::log::AppendLog::open(&path, 0, |_, _| Ok(())).unwrap();
        log.append(notes.iter().map(String::as_bytes)).unwrap();
    }

    /// A rotated key keeps the chain: the handover is signed by both keys and names the new one, the broker signs on
    /// with the new key, and the log verifies from the retired key (following the handover) or from the new one
    /// (counting the earlier checkpoints as unchecked). A checkpoint signed by the retired key after the handover, or
    /// a handover the new key did not sign, fails.
    #[test]
    fn a_rotated_checkpoint_key_keeps_the_chain_of_trust() {
        let dir = data_dir_with(20);
        let (keys, audit) = (dir.path().join("keys"), dir.path().join("audit"));
        let retired_key = checkpoints::read_verifier_key(&keys).unwrap();
        let retired = signer_of(&keys);
        let rotation = checkpoints::rotate_signing_key(dir.path()).unwrap();
        assert_eq!(rotation.previous, retired_key);
        assert_eq!(rotation.handover_size, Some(20));
        assert_eq!(checkpoints::read_verifier_key(&keys).unwrap(), rotation.next, "the new key is published");
        assert_eq!(signer_of(&keys).verifier_key(), rotation.next, "and signs from now on");
        assert_eq!(checkpoints::take_rotation_to_record(&keys), Some(rotation.clone()), "left to record");

        let mut log = AuditLog::open(&audit).unwrap();
        let checkpointer = Checkpointer::open_in(dir.path(), log.tree(), DEFAULT_ORIGIN).unwrap();
        assert_eq!(checkpointer.handovers().len(), 1);
        log.append(vec![AuditEntry { event: Some(EventType::KeyRotation), ..AuditEntry::default() }]).unwrap();
        checkpointer.checkpoint_now().unwrap();

        let from_retired = verify_data_dir(dir.path(), Some(&retired_key), &mut |_, _| {}).unwrap();
        assert_eq!((from_retired.checkpoints, from_retired.unchecked_checkpoints), (4, 0));
        assert_eq!(from_retired.key_rotations, vec![(2, rotation.next.clone())]);
        assert_eq!(from_retired.latest_checkpoint.unwrap().size, 21);
        let from_new = verify(dir.path()).unwrap();
        assert_eq!((from_new.checkpoints, from_new.unchecked_checkpoints, from_new.entries), (2, 2, 21));

        // The retired key signs on after its handover (as a thief of it might).
        let notes = checkpoints::read_notes(&audit).unwrap();
        let mut forged = notes.clone();
        let mut latest = checkpoints::parse_note(&notes[3]).unwrap();
        latest.extensions.clear();
        forged[3] = retired.sign_checkpoint(&latest).unwrap();
        rewrite_notes(&audit, &forged);
        let failure = verify_data_dir(dir.path(), Some(&retired_key), &mut |_, _| {}).unwrap_err();
        assert!(matches!(failure, VerifyFailure::BadSignature { index: 3, .. }), "{failure}");

        // A handover the next key did not sign passes nothing on.
        let mut unsigned = notes.clone();
        let handover = checkpoints::parse_note(&notes[2]).unwrap();
        unsigned[2] = retired.sign_checkpoint(&handover).unwrap();
        rewrite_notes(&audit, &unsigned);
        let failure = verify_data_dir(dir.path(), Some(&retired_key), &mut |_, _| {}).unwrap_err();
        assert!(matches!(failure, VerifyFailure::BadHandover { index: 2, .. }), "{failure}");
    }

    /// A rotation interrupted after its new key was written, or after its handover was stored, stops the broker's
    /// start until it is run again, which finishes it with the same key and one handover.
    #[test]
    fn an_interrupted_rotation_is_finished_by_running_it_again() {
        let dir = data_dir_with(10);
        let (keys, audit) = (dir.path().join("keys"), dir.path().join("audit"));
        let retired = signer_of(&keys);
        let seed = [7u8; 32];
        std::fs::write(keys.join(checkpoints::NEXT_SIGNING_KEY_FILE), hex::encode(seed)).unwrap();
        let next =
            crate::audit::checkpoint::NoteSigner::new(DEFAULT_ORIGIN, ed25519_dalek::SigningKey::from_bytes(&seed))
                .unwrap();
        let log = AuditLog::open(&audit).unwrap();
        let refused = Checkpointer::open_in(dir.path(), log.tree(), DEFAULT_ORIGIN).unwrap_err();
        assert!(matches!(refused, checkpoints::CheckpointsError::RotationUnfinished(_)), "{refused}");

        // The handover was stored before the interruption.
        let mut notes = checkpoints::read_notes(&audit).unwrap();
        let mut handover = checkpoints::parse_note(notes.last().unwrap()).unwrap();
        handover.extensions = vec![format!("{}{}", checkpoints::KEY_ROTATION_EXTENSION, next.verifier_key())];
        notes.push(next.cosign(&retired.sign_checkpoint(&handover).unwrap()).unwrap());
        rewrite_notes(&audit, &notes);

        let rotation = checkpoints::rotate_signing_key(dir.path()).unwrap();
        assert_eq!(rotation.next, next.verifier_key(), "the interrupted rotation's key");
        assert_eq!(checkpoints::read_notes(&audit).unwrap().len(), notes.len(), "one handover");
        assert!(!keys.join(checkpoints::NEXT_SIGNING_KEY_FILE).exists());
        Checkpointer::open_in(dir.path(), log.tree(), DEFAULT_ORIGIN).unwrap();
        assert_eq!(verify(dir.path()).unwrap().unchecked_checkpoints, 1);

        // Interrupted after the new key took the old one's place but before it was published: running it again
        // publishes it.
        std::fs::write(keys.join(checkpoints::VERIFIER_KEY_FILE), format!("{}\n", retired.verifier_key())).unwrap();
        let finished = checkpoints::rotate_signing_key(dir.path()).unwrap();
        assert_eq!((finished.previous, finished.next.clone()), (retired.verifier_key(), next.verifier_key()));
        assert_eq!(checkpoints::read_verifier_key(&keys).unwrap(), next.verifier_key());

        // Another rotation waits until the broker has recorded this one.
        let refused = checkpoints::rotate_signing_key(dir.path()).unwrap_err();
        assert!(refused.to_string().contains("not yet recorded"), "{refused}");
        checkpoints::rotation_recorded(&keys).unwrap();
        checkpoints::rotate_signing_key(dir.path()).unwrap();

        // The retired key put back (a restored key file, say) cannot sign on: the log was handed over.
        std::fs::write(keys.join(checkpoints::SIGNING_KEY_FILE), hex::encode(seed)).unwrap();
        std::fs::write(keys.join(checkpoints::VERIFIER_KEY_FILE), format!("{}\n", next.verifier_key())).unwrap();
        let refused = Checkpointer::open_in(dir.path(), log.tree(), DEFAULT_ORIGIN).unwrap_err();
        assert!(matches!(refused, checkpoints::CheckpointsError::HandedOverElsewhere { .. }), "{refused}");
    }

    /// A handover must say nothing but the next key: a note with the `key-rotation` line among other extension lines
    /// is refused rather than read one way by one verifier and another way by the next.
    #[test]
    fn a_handover_with_other_extension_lines_is_refused() {
        let dir = data_dir_with(10);
        let (keys, audit) = (dir.path().join("keys"), dir.path().join("audit"));
        let signer = signer_of(&keys);
        let next =
            crate::audit::checkpoint::NoteSigner::new(DEFAULT_ORIGIN, ed25519_dalek::SigningKey::from_bytes(&[9; 32]))
                .unwrap();
        let mut notes = checkpoints::read_notes(&audit).unwrap();
        let mut handover = checkpoints::parse_note(&notes[0]).unwrap();
        handover.extensions =
            vec!["note 1".into(), format!("{}{}", checkpoints::KEY_ROTATION_EXTENSION, next.verifier_key())];
        notes.push(next.cosign(&signer.sign_checkpoint(&handover).unwrap()).unwrap());
        rewrite_notes(&audit, &notes);
        let failure = verify(dir.path()).unwrap_err();
        assert!(matches!(failure, VerifyFailure::BadHandover { index: 1, .. }), "{failure}");
    }

    #[test]
    fn checkpoints_that_shrink_are_rejected() {
        let dir = data_dir_with(20);
        let audit = dir.path().join("audit");
        let notes = checkpoints::read_notes(&audit).unwrap();
        let path = checkpoints::checkpoints_path(&audit);
        std::fs::remove_file(&path).unwrap();
        let (mut log, _) = crate::store::log::AppendLog::open(&path, 0, |_, _| Ok(())).unwrap();
        log.append([notes[1].as_bytes(), notes[0].as_bytes()]).unwrap();
        drop(log);
        let failure = verify(dir.path()).unwrap_err();
        assert_eq!(failure, VerifyFailure::Shrank { index: 1, size: 10, previous_size: 20 });
    }

    #[test]
    fn a_log_cut_at_a_record_boundary_is_caught_by_its_checkpoint() {
        let dir = data_dir_with(20);
        let path = AuditLog::path(&dir.path().join("audit"));
        let mut offsets = Vec::new();
        read_all(&path, |offset, _| {
            offsets.push(offset);
            Ok(())
        })
        .unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(offsets[17]).unwrap();
        let failure = verify(dir.path()).unwrap_err();
        assert_eq!(failure, VerifyFailure::Truncated { index: 1, size: 20, entries: 17 });
        assert_eq!(failure.first_bad_sequence(), Some(17));
    }

    #[test]
    fn progress_reaches_the_end() {
        let dir = data_dir_with(3);
        let mut last = (0, 1);
        verify_data_dir(dir.path(), None, &mut |done, total| last = (done, total)).unwrap();
        assert_eq!(last.0, last.1);
    }
}
