//! Signed checkpoints of the audit log in the C2SP formats, so that any transparency-log tool
//! can check them with the log's public key alone.
//!
//! - [`Checkpoint`] is a C2SP `tlog-checkpoint` note text: the origin line, the tree size in
//!   decimal, the base64 root hash and optional extension lines, each ending in a newline.
//! - [`NoteSigner`] signs a note text as a C2SP `signed-note` with Ed25519: the text, a blank
//!   line, then `— <key name> <base64(key id || signature)>` where the key id is the first four
//!   bytes of `SHA-256(key name || 0x0A || 0x01 || public key)`. It also prints the verifier
//!   key as Go's `golang.org/x/mod/sumdb/note` writes it: `<name>+<hex key id>+<base64(0x01 ||
//!   public key)>`.
//! - [`NoteVerifier`] parses such a verifier key and opens signed notes with the rules of the
//!   C2SP spec and of the Go implementation: signatures from other keys are ignored, a bad
//!   signature from our key rejects the note, and a note without a signature from our key is
//!   rejected.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::audit::merkle::Hash;

/// The signature type byte C2SP `signed-note` assigns to Ed25519.
const ED25519_SIGNATURE_TYPE: u8 = 0x01;

/// The start of every signature line: an em dash (U+2014) and a space.
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";

/// The most signature lines a note may carry before we refuse to parse it (the C2SP spec asks
/// verifiers to accept at least 16; Go's verifier stops at 100).
const MAXIMUM_SIGNATURES: usize = 100;

/// Why a checkpoint, a note or a key was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint text breaks the C2SP `tlog-checkpoint` format.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// The signed note breaks the C2SP `signed-note` format.
    #[error("malformed note: {0}")]
    MalformedNote(&'static str),
    /// A key name is empty or contains a space, a plus sign or a control character.
    #[error("invalid key name `{0}`: it must be non-empty, without spaces or `+`")]
    InvalidKeyName(String),
    /// The verifier key string is not `<name>+<hex key id>+<base64 key>`.
    #[error("malformed verifier key: {0}")]
    MalformedVerifierKey(&'static str),
    /// The key id in the verifier key does not match its name and public key.
    #[error("verifier key id `{0:08x}` does not match its name and public key")]
    VerifierKeyIdMismatch(u32),
    /// The verifier key is for a signature algorithm other than Ed25519.
    #[error("unsupported signature type `{0:#04x}`, only Ed25519 (0x01) is supported")]
    UnsupportedSignatureType(u8),
    /// The 32 bytes of the verifier key are not an Ed25519 public key.
    #[error("the verifier key does not hold a valid Ed25519 public key")]
    InvalidPublicKey,
    /// No signature line in the note is from the verifier's key.
    #[error("note has no signature from key `{name}+{key_id:08x}`")]
    UnknownKey { name: String, key_id: u32 },
    /// A signature line names the verifier's key but the signature does not verify.
    #[error("invalid signature for key `{name}+{key_id:08x}`")]
    InvalidSignature { name: String, key_id: u32 },
}

/// A tree head as C2SP `tlog-checkpoint` defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, for example `broker.example/audit`; it should equal the key name.
    pub origin: String,
    /// The number of entries in the tree.
    pub size: u64,
    /// The RFC 6962 root hash of the tree of `size` entries.
    pub root: Hash,
    /// Optional opaque lines after the root; each must be non-empty.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// Returns the note text: origin, size, base64 root and extension lines, each followed by
    /// a newline. Fails if the origin or an extension line is empty or holds a newline or
    /// another control character.
    pub fn to_body(&self) -> Result<String, CheckpointError> {
        check_line(&self.origin, "the origin line must be non-empty text")?;
        for extension in &self.extensions {
            check_line(extension, "extension lines must be non-empty text")?;
        }
        let mut body = format!("{}\n{}\n{}\n", self.origin, self.size, STANDARD.encode(self.root));
        for extension in &self.extensions {
            body.push_str(extension);
            body.push('\n');
        }
        Ok(body)
    }

    /// Parses a note text (without its signatures) as a checkpoint.
    pub fn parse_body(body: &str) -> Result<Checkpoint, CheckpointError> {
        let Some(without_final_newline) = body.strip_suffix('\n') else {
            return Err(CheckpointError::MalformedCheckpoint("the text must end with a newline"));
        };
        let mut lines = without_final_newline.split('\n');
        let origin = lines.next().unwrap_or_default();
        check_line(origin, "the origin line must be non-empty text")?;
        let Some(size_line) = lines.next() else {
            return Err(CheckpointError::MalformedCheckpoint("the tree size line is missing"));
        };
        let size = parse_tree_size(size_line)?;
        let Some(root_line) = lines.next() else {
            return Err(CheckpointError::MalformedCheckpoint("the root hash line is missing"));
        };
        let root_bytes = STANDARD
            .decode(root_line)
            .map_err(|_| CheckpointError::MalformedCheckpoint("the root hash is not base64"))?;
        let root = Hash::try_from(root_bytes.as_slice())
            .map_err(|_| CheckpointError::MalformedCheckpoint("the root hash must be 32 bytes"))?;
        let mut extensions = Vec::new();
        for extension in lines {
            check_line(extension, "extension lines must be non-empty text")?;
            extensions.push(extension.to_string());
        }
        Ok(Checkpoint { origin: origin.to_string(), size, root, extensions })
    }
}

/// Rejects an empty line or one with a control character (which includes newlines).
fn check_line(line: &str, reason: &'static str) -> Result<(), CheckpointError> {
    if line.is_empty() || line.chars().any(char::is_control) {
        return Err(CheckpointError::MalformedCheckpoint(reason));
    }
    Ok(())
}

/// Parses the tree size line: ASCII decimal digits with no leading zero (except `0` itself).
fn parse_tree_size(line: &str) -> Result<u64, CheckpointError> {
    const REASON: &str = "the tree size must be a decimal number without leading zeros";
    if line.is_empty() || !line.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(CheckpointError::MalformedCheckpoint(REASON));
    }
    if line.len() > 1 && line.starts_with('0') {
        return Err(CheckpointError::MalformedCheckpoint(REASON));
    }
    line.parse::<u64>().map_err(|_| CheckpointError::MalformedCheckpoint(REASON))
}

/// Whether `name` may name a note signing key (and so be a checkpoint's origin): non-empty, with no whitespace,
/// control characters or `+`.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name.chars().any(|character| character.is_whitespace() || character == '+' || character.is_control())
}

/// Returns the C2SP key id of an Ed25519 key: the first four bytes, big-endian, of
/// `SHA-256(name || 0x0A || 0x01 || public key)`.
fn ed25519_key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([b'\n', ED25519_SIGNATURE_TYPE]);
    hasher.update(public_key);
    let digest = hasher.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Checks the character rules of the whole signed-note format: no ASCII control characters
/// other than newline (the text is already valid UTF-8 since it is a `str`).
fn check_note_characters(text: &str) -> Result<(), CheckpointError> {
    if text.bytes().any(|byte| byte < 0x20 && byte != b'\n') {
        return Err(CheckpointError::MalformedNote("control characters other than newline are not allowed"));
    }
    Ok(())
}

/// Signs note texts with one Ed25519 key under one key name.
pub struct NoteSigner {
    name: String,
    key_id: u32,
    signing_key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    // The private key stays out of debug output.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// Returns a signer for `name` (which should be the log's origin) with `signing_key`.
    pub fn new(name: &str, signing_key: SigningKey) -> Result<NoteSigner, CheckpointError> {
        if !is_valid_key_name(name) {
            return Err(CheckpointError::InvalidKeyName(name.to_string()));
        }
        let key_id = ed25519_key_id(name, signing_key.verifying_key().as_bytes());
        Ok(NoteSigner { name: name.to_string(), key_id, signing_key })
    }

    /// Returns the key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the four-byte key id as a number.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Returns the verifier key to publish: `<name>+<hex key id>+<base64(0x01 || public key)>`,
    /// the format Go's `golang.org/x/mod/sumdb/note.NewVerifier` reads.
    pub fn verifier_key(&self) -> String {
        let mut encoded = Vec::with_capacity(33);
        encoded.push(ED25519_SIGNATURE_TYPE);
        encoded.extend_from_slice(self.signing_key.verifying_key().as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_id, STANDARD.encode(encoded))
    }

    /// Signs a note text and returns the whole signed note: the text, a blank line and one
    /// signature line. The text must end with a newline and may hold no control character
    /// other than newline.
    pub fn sign(&self, body: &str) -> Result<String, CheckpointError> {
        Ok(format!("{body}\n{}", self.signature_line(body)?))
    }

    /// This key's signature line (`— <name> <base64(key id || signature)>` and a newline) for a note text.
    fn signature_line(&self, body: &str) -> Result<String, CheckpointError> {
        if !body.ends_with('\n') {
            return Err(CheckpointError::MalformedNote("the text must end with a newline"));
        }
        check_note_characters(body)?;
        let signature = self.signing_key.sign(body.as_bytes());
        let mut signature_bytes = Vec::with_capacity(4 + 64);
        signature_bytes.extend_from_slice(&self.key_id.to_be_bytes());
        signature_bytes.extend_from_slice(&signature.to_bytes());
        Ok(format!("{SIGNATURE_LINE_PREFIX}{} {}\n", self.name, STANDARD.encode(signature_bytes)))
    }

    /// Signs a checkpoint and returns the whole signed note.
    pub fn sign_checkpoint(&self, checkpoint: &Checkpoint) -> Result<String, CheckpointError> {
        self.sign(&checkpoint.to_body()?)
    }

    /// Adds this key's signature line to an already signed note (a note signed by several keys, as C2SP
    /// `signed-note` allows). The note's text and existing signatures are kept as they are.
    pub fn cosign(&self, note: &str) -> Result<String, CheckpointError> {
        let Some(split) = note.rfind("\n\n") else {
            return Err(CheckpointError::MalformedNote("no blank line before the signatures"));
        };
        if !note.ends_with('\n') {
            return Err(CheckpointError::MalformedNote("the signature lines must end with a newline"));
        }
        Ok(format!("{note}{}", self.signature_line(&note[..split + 1])?))
    }
}

/// Opens signed notes with one Ed25519 verifier key.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    key_id: u32,
    verifying_key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a verifier key `<name>+<hex key id>+<base64(0x01 || public key)>`, checking that
    /// the key id matches the name and the key.
    pub fn from_verifier_key(verifier_key: &str) -> Result<NoteVerifier, CheckpointError> {
        let Some((name, rest)) = verifier_key.split_once('+') else {
            return Err(CheckpointError::MalformedVerifierKey("expected `<name>+<key id>+<key>`"));
        };
        let Some((key_id_hex, key_base64)) = rest.split_once('+') else {
            return Err(CheckpointError::MalformedVerifierKey("expected `<name>+<key id>+<key>`"));
        };
        if !is_valid_key_name(name) {
            return Err(CheckpointError::InvalidKeyName(name.to_string()));
        }
        if key_id_hex.len() != 8 || !key_id_hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(CheckpointError::MalformedVerifierKey("the key id must be 8 hexadecimal digits"));
        }
        let key_id = u32::from_str_radix(key_id_hex, 16)
            .map_err(|_| CheckpointError::MalformedVerifierKey("the key id must be 8 hexadecimal digits"))?;
        let key =
            STANDARD.decode(key_base64).map_err(|_| CheckpointError::MalformedVerifierKey("the key is not base64"))?;
        let Some((&signature_type, public_key)) = key.split_first() else {
            return Err(CheckpointError::MalformedVerifierKey("the key is empty"));
        };
        // As in Go's verifier, the key id covers the type byte and key bytes as given, so it
        // is checked before looking at the type.
        let computed_key_id = {
            let mut hasher = Sha256::new();
            hasher.update(name.as_bytes());
            hasher.update([b'\n']);
            hasher.update(&key);
            let digest = hasher.finalize();
            u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
        };
        if computed_key_id != key_id {
            return Err(CheckpointError::VerifierKeyIdMismatch(key_id));
        }
        if signature_type != ED25519_SIGNATURE_TYPE {
            return Err(CheckpointError::UnsupportedSignatureType(signature_type));
        }
        let public_key = <[u8; 32]>::try_from(public_key)
            .map_err(|_| CheckpointError::MalformedVerifierKey("an Ed25519 key must be 32 bytes"))?;
        let verifying_key = VerifyingKey::from_bytes(&public_key).map_err(|_| CheckpointError::InvalidPublicKey)?;
        Ok(NoteVerifier { name: name.to_string(), key_id, verifying_key })
    }

    /// Returns the key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the four-byte key id as a number.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Checks a signed note and returns its text (including the final newline) if it carries
    /// a valid signature from this key. Signatures from other keys are ignored; a signature
    /// line naming this key that does not verify rejects the note.
    pub fn open<'note>(&self, note: &'note str) -> Result<&'note str, CheckpointError> {
        check_note_characters(note)?;
        let Some(split) = note.rfind("\n\n") else {
            return Err(CheckpointError::MalformedNote("no blank line before the signatures"));
        };
        let text = &note[..split + 1];
        let signatures = &note[split + 2..];
        let Some(signatures) = signatures.strip_suffix('\n') else {
            return Err(CheckpointError::MalformedNote("the signature lines must end with a newline"));
        };
        if signatures.is_empty() {
            return Err(CheckpointError::MalformedNote("there are no signature lines"));
        }

        let mut verified = false;
        for (count, line) in signatures.split('\n').enumerate() {
            if count >= MAXIMUM_SIGNATURES {
                return Err(CheckpointError::MalformedNote("too many signature lines"));
            }
            let Some(line) = line.strip_prefix(SIGNATURE_LINE_PREFIX) else {
                return Err(CheckpointError::MalformedNote("a signature line must start with an em dash and a space"));
            };
            let (name, signature_base64) = line.split_once(' ').unwrap_or((line, ""));
            if !is_valid_key_name(name) || signature_base64.is_empty() {
                return Err(CheckpointError::MalformedNote("a signature line must be `— <key name> <base64>`"));
            }
            let signature_bytes = STANDARD
                .decode(signature_base64)
                .map_err(|_| CheckpointError::MalformedNote("a signature is not base64"))?;
            if signature_bytes.len() < 5 {
                return Err(CheckpointError::MalformedNote("a signature is too short"));
            }
            let key_id =
                u32::from_be_bytes([signature_bytes[0], signature_bytes[1], signature_bytes[2], signature_bytes[3]]);
            if name != self.name || key_id != self.key_id {
                continue;
            }
            let invalid = || CheckpointError::InvalidSignature { name: self.name.clone(), key_id: self.key_id };
            let signature = Signature::from_slice(&signature_bytes[4..]).map_err(|_| invalid())?;
            self.verifying_key.verify_strict(text.as_bytes(), &signature).map_err(|_| invalid())?;
            verified = true;
        }
        if !verified {
            return Err(CheckpointError::UnknownKey { name: self.name.clone(), key_id: self.key_id });
        }
        Ok(text)
    }

    /// Checks a signed checkpoint and returns the checkpoint. The caller should also check
    /// that its origin is the log it expects.
    pub fn verify(&self, note: &str) -> Result<Checkpoint, CheckpointError> {
        Checkpoint::parse_body(self.open(note)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    // Source: golang.org/x/mod sumdb/note/note_test.go (TestSign, TestOpen, TestNewVerifier):
    // keys and notes produced by Go's implementation.
    const PETER_SIGNER_KEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VERIFIER_KEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const ENOCH_VERIFIER_KEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const GO_TEXT: &str =
        "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const PETER_SIGNATURE_LINE: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIGNATURE_LINE: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    /// Reads the Ed25519 seed out of Go's private signer key format
    /// `PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>`.
    fn go_signing_key(signer_key: &str) -> (String, SigningKey) {
        let parts: Vec<&str> = signer_key.splitn(5, '+').collect();
        assert_eq!(parts[..2], ["PRIVATE", "KEY"]);
        let key = STANDARD.decode(parts[4]).expect("base64");
        assert_eq!(key[0], ED25519_SIGNATURE_TYPE);
        let seed: [u8; 32] = key[1..].try_into().expect("32-byte seed");
        (parts[2].to_string(), SigningKey::from_bytes(&seed))
    }

    fn go_note(signature_lines: &[&str]) -> String {
        format!("{GO_TEXT}\n{}", signature_lines.concat())
    }

    #[test]
    fn signer_reproduces_go_key_and_signed_note_byte_for_byte() {
        let (name, signing_key) = go_signing_key(PETER_SIGNER_KEY);
        let signer = NoteSigner::new(&name, signing_key).expect("signer");
        assert_eq!(signer.key_id(), 0xc74f20a3);
        assert_eq!(signer.verifier_key(), PETER_VERIFIER_KEY);
        assert_eq!(signer.sign(GO_TEXT), Ok(go_note(&[PETER_SIGNATURE_LINE])));
    }

    /// A note cosigned by a second key opens with either key, its text and first signature unchanged.
    #[test]
    fn a_cosigned_note_opens_with_either_key() {
        let (name, signing_key) = go_signing_key(PETER_SIGNER_KEY);
        let peter = NoteSigner::new(&name, signing_key).expect("signer");
        let other = test_signer();
        let note = other.cosign(&peter.sign(GO_TEXT).unwrap()).unwrap();
        assert!(note.starts_with(&go_note(&[PETER_SIGNATURE_LINE])), "{note}");
        assert_eq!(NoteVerifier::from_verifier_key(PETER_VERIFIER_KEY).unwrap().open(&note), Ok(GO_TEXT));
        assert_eq!(NoteVerifier::from_verifier_key(&other.verifier_key()).unwrap().open(&note), Ok(GO_TEXT));
        assert!(other.cosign(GO_TEXT).is_err(), "an unsigned text is not a note");
    }

    #[test]
    fn verifier_opens_go_signed_notes_and_ignores_unknown_keys() {
        let peter = NoteVerifier::from_verifier_key(PETER_VERIFIER_KEY).expect("peter");
        let enoch = NoteVerifier::from_verifier_key(ENOCH_VERIFIER_KEY).expect("enoch");
        let both = go_note(&[PETER_SIGNATURE_LINE, ENOCH_SIGNATURE_LINE]);
        assert_eq!(peter.open(&both), Ok(GO_TEXT));
        assert_eq!(enoch.open(&both), Ok(GO_TEXT));
        assert_eq!(peter.open(&go_note(&[PETER_SIGNATURE_LINE])), Ok(GO_TEXT));
        assert_eq!(
            peter.open(&go_note(&[ENOCH_SIGNATURE_LINE])),
            Err(CheckpointError::UnknownKey { name: "PeterNeumann".into(), key_id: 0xc74f20a3 })
        );
        // Repeated signatures are accepted, as Go does.
        let repeated = go_note(&[PETER_SIGNATURE_LINE, PETER_SIGNATURE_LINE, ENOCH_SIGNATURE_LINE]);
        assert_eq!(peter.open(&repeated), Ok(GO_TEXT));
    }

    #[test]
    fn verifier_rejects_what_go_rejects() {
        let peter = NoteVerifier::from_verifier_key(PETER_VERIFIER_KEY).expect("peter");
        // Source: TestOpen "Invalid signature" in note_test.go.
        let corrupted = format!("{}ABCD{}", &PETER_SIGNATURE_LINE[..60], &PETER_SIGNATURE_LINE[60..]);
        assert_eq!(
            peter.open(&go_note(&[&corrupted])),
            Err(CheckpointError::InvalidSignature { name: "PeterNeumann".into(), key_id: 0xc74f20a3 })
        );
        // Source: TestOpen "Invalid encoded message syntax" in note_test.go.
        let signature_without_newline = &PETER_SIGNATURE_LINE[..PETER_SIGNATURE_LINE.len() - 1];
        let bad_notes = [
            GO_TEXT.to_string(),
            format!("{GO_TEXT}\n"),
            format!("{GO_TEXT}\n{signature_without_newline}"),
            format!("\u{1}{GO_TEXT}\n{PETER_SIGNATURE_LINE}"),
            format!(
                "{GO_TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
            ),
            format!("{GO_TEXT}\n{PETER_SIGNATURE_LINE}Unexpected line.\n"),
            format!("{GO_TEXT}\n{}", PETER_SIGNATURE_LINE.repeat(101)),
        ];
        for note in bad_notes {
            assert!(matches!(peter.open(&note), Err(CheckpointError::MalformedNote(_))), "accepted {note:?}");
        }
        // A changed text with the original signature is a bad signature.
        let changed = go_note(&[PETER_SIGNATURE_LINE]).replacen("cryptography", "cryptanalysis", 1);
        assert!(matches!(peter.open(&changed), Err(CheckpointError::InvalidSignature { .. })));
    }

    #[test]
    fn verifier_key_manglings_are_rejected() {
        // Source: TestNewVerifier in note_test.go: every proper substring and every one-byte
        // increment of the key must fail, as must a wrong-length key and an unknown algorithm
        // (both with adjusted key ids).
        assert!(NoteVerifier::from_verifier_key(PETER_VERIFIER_KEY).is_ok());
        let bytes = PETER_VERIFIER_KEY.as_bytes();
        for start in 0..=bytes.len() {
            for end in start + 1..=bytes.len() {
                if start == 0 && end == bytes.len() {
                    continue;
                }
                let part = &PETER_VERIFIER_KEY[start..end];
                assert!(NoteVerifier::from_verifier_key(part).is_err(), "accepted {part:?}");
            }
        }
        for position in 0..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[position] = changed[position].wrapping_add(1);
            if let Ok(text) = String::from_utf8(changed) {
                assert!(NoteVerifier::from_verifier_key(&text).is_err(), "accepted {text:?}");
            }
        }
        assert!(
            NoteVerifier::from_verifier_key(
                "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
            )
            .is_err()
        );
        assert_eq!(
            NoteVerifier::from_verifier_key("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
                .map(|_| ()),
            Err(CheckpointError::UnsupportedSignatureType(0x65))
        );
    }

    fn test_signer() -> NoteSigner {
        let seed: [u8; 32] = Sha256::digest(b"audit checkpoint test key").into();
        NoteSigner::new("broker.example/audit", SigningKey::from_bytes(&seed)).expect("signer")
    }

    fn test_checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "broker.example/audit".into(),
            size: 20_852_163,
            root: Sha256::digest(b"a root").into(),
            extensions: Vec::new(),
        }
    }

    #[test]
    fn checkpoint_signed_here_verifies_with_ring_ed25519() {
        // ring is an independent Ed25519 and SHA-256 implementation: it checks the signature
        // over the exact note text and recomputes the key id from the spec's definition.
        let signer = test_signer();
        let checkpoint = test_checkpoint();
        let note = signer.sign_checkpoint(&checkpoint).expect("sign");
        let body = checkpoint.to_body().expect("body");
        let prefix = format!("{body}\n\u{2014} broker.example/audit ");
        let signature_base64 = note.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix('\n')).expect("layout");
        let signature = STANDARD.decode(signature_base64).expect("base64");
        assert_eq!(signature.len(), 68);

        let verifier_key = signer.verifier_key();
        let key_base64 = verifier_key.rsplit('+').next().expect("key");
        let key = STANDARD.decode(key_base64).expect("base64");
        assert_eq!(key[0], 0x01);
        let public_key = &key[1..];

        let mut key_id_input = b"broker.example/audit\n\x01".to_vec();
        key_id_input.extend_from_slice(public_key);
        let key_id_digest = ring::digest::digest(&ring::digest::SHA256, &key_id_input);
        assert_eq!(&signature[..4], &key_id_digest.as_ref()[..4]);
        assert!(verifier_key.starts_with(&format!("broker.example/audit+{}+", hex::encode(&signature[..4]))));

        let ring_key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
        assert!(ring_key.verify(body.as_bytes(), &signature[4..]).is_ok());
        assert!(ring_key.verify(b"another text\n", &signature[4..]).is_err());

        let verifier = NoteVerifier::from_verifier_key(&verifier_key).expect("verifier");
        assert_eq!(verifier.verify(&note), Ok(checkpoint));
    }

    #[test]
    fn checkpoint_body_round_trips_and_matches_the_c2sp_example() {
        // Source: C2SP tlog-checkpoint.md, the example checkpoint's note text.
        let example = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
        let parsed = Checkpoint::parse_body(example).expect("example parses");
        assert_eq!(parsed.origin, "example.com/behind-the-sofa");
        assert_eq!(parsed.size, 20_852_163);
        assert_eq!(parsed.extensions, Vec::<String>::new());
        assert_eq!(parsed.to_body().as_deref(), Ok(example));

        let mut with_extensions = test_checkpoint();
        with_extensions.extensions = vec!["policy-set sha256:abc".into(), "second".into()];
        let body = with_extensions.to_body().expect("body");
        assert!(body.ends_with("\npolicy-set sha256:abc\nsecond\n"));
        assert_eq!(Checkpoint::parse_body(&body), Ok(with_extensions));

        let empty =
            Checkpoint { origin: "o".into(), size: 0, root: crate::audit::merkle::EMPTY_ROOT, extensions: vec![] };
        assert_eq!(empty.to_body().as_deref(), Ok("o\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"));
    }

    #[test]
    fn malformed_checkpoint_bodies_are_rejected() {
        let root = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=";
        let bad_bodies = [
            format!("origin\n5\n{root}"),
            format!("\n5\n{root}\n"),
            format!("origin\n05\n{root}\n"),
            format!("origin\n+5\n{root}\n"),
            format!("origin\n-5\n{root}\n"),
            format!("origin\n 5\n{root}\n"),
            format!("origin\n18446744073709551616\n{root}\n"),
            "origin\n5\n".to_string(),
            "origin\n".to_string(),
            "origin\n5\nnot base64!\n".to_string(),
            "origin\n5\nAAAA\n".to_string(),
            format!("origin\n5\n{root}\n\n"),
            format!("origin\n5\n{root}\nextension\n\n"),
            format!("ori\tgin\n5\n{root}\n"),
            format!("origin\r\n5\n{root}\n"),
        ];
        for body in bad_bodies {
            assert!(
                matches!(Checkpoint::parse_body(&body), Err(CheckpointError::MalformedCheckpoint(_))),
                "accepted {body:?}"
            );
        }
        let mut checkpoint = test_checkpoint();
        checkpoint.origin = "two\nlines".into();
        assert!(checkpoint.to_body().is_err());
        checkpoint.origin = "origin".into();
        checkpoint.extensions = vec![String::new()];
        assert!(checkpoint.to_body().is_err());
    }

    #[test]
    fn tampered_or_foreign_checkpoints_are_rejected() {
        let signer = test_signer();
        let verifier = NoteVerifier::from_verifier_key(&signer.verifier_key()).expect("verifier");
        let note = signer.sign_checkpoint(&test_checkpoint()).expect("sign");
        assert!(verifier.verify(&note).is_ok());

        // A changed tree size with the original signature.
        let tampered = note.replacen("20852163", "20852164", 1);
        assert!(matches!(verifier.verify(&tampered), Err(CheckpointError::InvalidSignature { .. })));

        // Every single-bit change anywhere in the note is rejected one way or another.
        for position in 0..note.len() {
            for bit in 0..8 {
                let mut bytes = note.clone().into_bytes();
                bytes[position] ^= 1 << bit;
                if let Ok(changed) = String::from_utf8(bytes) {
                    assert!(verifier.verify(&changed).is_err(), "accepted a change at byte {position} bit {bit}");
                }
            }
        }

        // A note signed by another key under the same name is from an unknown key.
        let other_seed: [u8; 32] = Sha256::digest(b"another key").into();
        let impostor = NoteSigner::new("broker.example/audit", SigningKey::from_bytes(&other_seed)).expect("signer");
        let foreign = impostor.sign_checkpoint(&test_checkpoint()).expect("sign");
        assert!(matches!(verifier.verify(&foreign), Err(CheckpointError::UnknownKey { .. })));

        // A signature line that claims our key id but carries the impostor's signature.
        let our_id = STANDARD.encode(signer.key_id().to_be_bytes());
        let foreign_signature = foreign.rsplit(' ').next().expect("line").trim_end();
        let mut forged_bytes = STANDARD.decode(foreign_signature).expect("base64");
        forged_bytes[..4].copy_from_slice(&signer.key_id().to_be_bytes());
        let forged = foreign.replacen(foreign_signature, &STANDARD.encode(&forged_bytes), 1);
        assert!(!our_id.is_empty());
        assert!(matches!(verifier.verify(&forged), Err(CheckpointError::InvalidSignature { .. })));

        // A body without the final newline cannot be signed.
        assert!(signer.sign("origin\n1\nAAAA").is_err());
        assert!(signer.sign("origin\u{7}\n").is_err());
        assert!(NoteSigner::new("has space", SigningKey::from_bytes(&other_seed)).is_err());
        assert!(NoteSigner::new("has+plus", SigningKey::from_bytes(&other_seed)).is_err());
        assert!(NoteSigner::new("", SigningKey::from_bytes(&other_seed)).is_err());
    }
}
