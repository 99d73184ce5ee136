//! `broker audit ...`: the auditors' and operators' command-line tools for the audit log.
//!
//! - `verify --data-dir DIR`: replays the log offline and checks every checkpoint ([`super::verify`]).
//! - `checkpoint --data-dir DIR`: prints the latest signed checkpoint note.
//! - `prove --data-dir DIR --inclusion SEQ [--size N]` prints a C2SP `tlog-proof` (or JSON with `--format json`);
//!   `prove --consistency OLD NEW` prints an RFC 9162 consistency proof as JSON. Hashes are standard base64.
//! - `query --broker URL ...`: a client of the `Audit` gRPC service; checks every inclusion proof it receives against
//!   the response's checkpoint (and the checkpoint's signature with `--verifier-key`), and writes JSON lines, CSV or a
//!   table.
//!
//! `anyhow` is used here because this is the command-line edge; the library functions it calls return typed errors.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, anyhow, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::json;

use super::{
    checkpoint::NoteVerifier,
    checkpoints::{self, open_note, parse_note},
    merkle::{self, Hash, MerkleTree},
    query,
    verify::{VerifyFailure, verify_data_dir},
};
use proto::pb;

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Replay the whole audit log offline: checksums, sequence numbers, the Merkle tree and every signed checkpoint.
    Verify(VerifyArgs),
    /// Print the latest signed checkpoint (a C2SP signed note).
    Checkpoint(CheckpointArgs),
    /// Print an inclusion or consistency proof computed from the data directory.
    Prove(ProveArgs),
    /// Query the audit log of a running broker (needs a token with the `auditor` role).
    Query(Box<QueryArgs>),
    /// Replace the checkpoint signing key, with the broker stopped: the retired key and the new one both sign a
    /// handover checkpoint naming the new key, so auditors who trust the retired key can trust the new one.
    RotateKey(RotateKeyArgs),
}

#[derive(clap::Args, Debug)]
pub struct RotateKeyArgs {
    /// The broker's data directory (the broker must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The broker's data directory (read only; the broker may be running).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The verifier key, or a file holding it; by default `DATA_DIR/keys/checkpoint.vkey`.
    #[arg(long)]
    pub verifier_key: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Also print the verifier key (to standard error).
    #[arg(long)]
    pub with_key: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofFormat {
    /// C2SP `tlog-proof` text (inclusion proofs only).
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ProveArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The sequence number of the entry to prove.
    #[arg(long, conflicts_with = "consistency", required_unless_present = "consistency")]
    pub inclusion: Option<u64>,
    /// The tree size to prove inclusion in; by default the latest checkpoint's.
    #[arg(long, requires = "inclusion")]
    pub size: Option<u64>,
    /// Two tree sizes: prove the newer tree extends the older.
    #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
    pub consistency: Option<Vec<u64>>,
    /// `text` (C2SP tlog-proof, the default for inclusion) or `json` (the only format for consistency).
    #[arg(long, value_enum)]
    pub format: Option<ProofFormat>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Jsonl,
    Csv,
    Table,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionArg {
    Share,
    NotShare,
}

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The broker, e.g. `https://broker.example:50051`.
    #[arg(long)]
    pub broker: String,
    /// The name in the broker's certificate, if not the URL's host.
    #[arg(long)]
    pub server_name: Option<String>,
    /// The area CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// This agency's client certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// This agency's client key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// A file holding the auditor's bearer token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// The child's NHS number (the broker pseudonymises it; it is never recorded).
    #[arg(long)]
    pub child: Option<String>,
    /// List who received the child's data (needs --child) instead of entries.
    #[arg(long, requires = "child")]
    pub recipients_of_child: bool,
    #[arg(long)]
    pub agency: Option<String>,
    #[arg(long)]
    pub practitioner: Option<String>,
    #[arg(long)]
    pub rule: Option<String>,
    #[arg(long)]
    pub message: Option<String>,
    /// An event type (`decision-to-share`, `delivery`, ...); repeat for several.
    #[arg(long = "event")]
    pub events: Vec<String>,
    #[arg(long, value_enum)]
    pub decision: Option<DecisionArg>,
    /// From this time (RFC 3339, inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// Until this time (RFC 3339, exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Entries per page.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Fetch every page, not just the first.
    #[arg(long)]
    pub all: bool,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: OutputFormat,
    /// Check the response's checkpoint signature with this verifier key (or a file holding it).
    #[arg(long)]
    pub verifier_key: Option<String>,
}

/// Runs one `broker audit` command and returns the process exit code (1 when verification fails).
pub fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify(args) => verify(args),
        AuditCommand::Checkpoint(args) => checkpoint(args),
        AuditCommand::Prove(args) => prove(args),
        AuditCommand::RotateKey(args) => rotate_key(args),
        AuditCommand::Query(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(query(*args))
        }
    }
}

fn rotate_key(args: RotateKeyArgs) -> anyhow::Result<ExitCode> {
    let _lock = crate::store::lock_data_dir(&args.data_dir)?;
    let rotation = checkpoints::rotate_signing_key(&args.data_dir)?;
    println!("retired: {}", rotation.previous);
    println!("in force: {}", rotation.next);
    match rotation.handover_size {
        Some(size) => println!(
            "handover: the checkpoint at size {size}, signed by both keys, names the new key (served to auditors by \
             LatestCheckpoint, in `key_handovers`); the broker records the rotation in the audit log when it next starts"
        ),
        None => println!(
            "no checkpoint was signed with the retired key, so none hands over; the broker records the \
             rotation in the audit log when it next starts"
        ),
    }
    println!(
        "publish the new verifier key to the auditors (it is in {}); keep the retired one, which verifies the \
         checkpoints signed before",
        checkpoints::verifier_key_path(&args.data_dir.join("keys")).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A verifier key given as text or as the path of a file holding it.
fn key_argument(value: &str) -> anyhow::Result<String> {
    let path = Path::new(value);
    if path.is_file() {
        return Ok(std::fs::read_to_string(path).with_context(|| format!("reading `{value}`"))?.trim().to_owned());
    }
    Ok(value.trim().to_owned())
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = args.verifier_key.as_deref().map(key_argument).transpose()?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let result = verify_data_dir(&args.data_dir, key.as_deref(), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            println!(
                "ok: {} entries, {} signed checkpoints, root {}{}",
                report.entries,
                report.checkpoints,
                STANDARD.encode(report.root),
                report
                    .latest_checkpoint
                    .map(|checkpoint| format!(", latest checkpoint at size {}", checkpoint.size))
                    .unwrap_or_default()
            );
            for (index, key) in &report.key_rotations {
                println!("checkpoint {index} hands the log over to the key {key}");
            }
            if report.unchecked_checkpoints > 0 {
                println!(
                    "{} earlier checkpoints, signed by keys this one took over from, were not checked (give the \
                     earliest key with --verifier-key to check them too)",
                    report.unchecked_checkpoints
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            print_failure(&failure);
            let audit_dir = args.data_dir.join("audit");
            let durable_to = super::read_durable_mark(&audit_dir).ok().flatten();
            let log_len = std::fs::metadata(super::AuditLog::path(&audit_dir)).map(|metadata| metadata.len()).ok();
            if let Some(note) = unsynced_tail_note(&failure, durable_to, log_len) {
                println!("{note}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What to tell an auditor whose check failed where `entries.log` was not yet durable (past the point in
/// `audit/durable`): after a crash or power loss that part may be torn or missing, and the broker puts it back from
/// its journal when it next starts. Nothing when the failure is before that point, or the log is shorter than it
/// (durable entries gone: never explained by a crash).
fn unsynced_tail_note(failure: &VerifyFailure, durable_to: Option<u64>, log_len: Option<u64>) -> Option<String> {
    let (durable_to, log_len) = (durable_to?, log_len?);
    failure.first_bad_sequence()?;
    let past_durable_point = match failure {
        VerifyFailure::Damaged { offset, .. }
        | VerifyFailure::Undecodable { offset, .. }
        | VerifyFailure::OutOfSequence { offset, .. } => *offset >= durable_to,
        VerifyFailure::Truncated { .. } => true,
        // An entry rewritten with a valid checksum and sequence number: never a crash.
        _ => false,
    };
    if log_len < durable_to || !past_durable_point {
        return None;
    }
    Some(format!(
        "note: `entries.log` is recorded durable up to byte {durable_to} (`audit/durable`) and is {log_len} bytes long. \
         Newer entries are made durable in the broker's journal first, so after a crash or power loss the log may \
         end short or torn after that point, and the broker puts those entries back from its journal when it next \
         starts. If the broker has not started since, start it and verify again; a failure that remains is real."
    ))
}

fn print_failure(failure: &VerifyFailure) {
    println!("FAILED: {failure}");
    if let Some(sequence) = failure.first_bad_sequence() {
        println!("first bad sequence number: {sequence}");
    }
}

fn checkpoint(args: CheckpointArgs) -> anyhow::Result<ExitCode> {
    let latest = checkpoints::latest_note(&args.data_dir.join("audit"))?
        .ok_or_else(|| anyhow!("the log in `{}` has no checkpoint yet", args.data_dir.display()))?;
    print!("{}", latest.note);
    if args.with_key {
        eprintln!("{}", checkpoints::read_verifier_key(&args.data_dir.join("keys"))?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The tree of the first `size` entries and their encodings' leaf hashes, read from the data directory.
fn tree_of(audit_dir: &Path, size: u64) -> anyhow::Result<(MerkleTree, Vec<Vec<u8>>)> {
    let mut tree = MerkleTree::with_capacity(size);
    let mut wanted = Vec::new();
    query::scan(audit_dir, size, |encoded, _| {
        tree.push(&encoded);
        wanted.push(encoded);
        Ok(true)
    })
    .with_context(|| format!("reading the first {size} entries"))?;
    if tree.size() < size {
        bail!("the log has only {} entries, not {size}", tree.size());
    }
    Ok((tree, wanted))
}

/// The stored signed notes, parsed, latest last.
fn stored_checkpoints(audit_dir: &Path) -> anyhow::Result<Vec<checkpoints::SignedCheckpoint>> {
    checkpoints::read_notes(audit_dir)?
        .into_iter()
        .map(|note| Ok(checkpoints::SignedCheckpoint { checkpoint: parse_note(&note)?, note }))
        .collect()
}

fn b64(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|hash| STANDARD.encode(hash)).collect()
}

fn prove(args: ProveArgs) -> anyhow::Result<ExitCode> {
    let audit_dir = args.data_dir.join("audit");
    let stored = stored_checkpoints(&audit_dir)?;
    let at_size = |size: u64| stored.iter().rev().find(|signed| signed.size() == size);
    if let Some(index) = args.inclusion {
        let size = match args.size {
            Some(size) => size,
            None => {
                stored.last().map(|signed| signed.size()).ok_or_else(|| anyhow!("no checkpoint yet: give --size"))?
            }
        };
        let (tree, encoded) = tree_of(&audit_dir, size)?;
        let proof = tree.inclusion_proof(index, size)?;
        let entry = encoded.get(index as usize).ok_or_else(|| anyhow!("no entry {index}"))?;
        let checkpoint = at_size(size);
        match args.format.unwrap_or(ProofFormat::Text) {
            ProofFormat::Text => {
                let checkpoint = checkpoint.ok_or_else(|| {
                    anyhow!("no signed checkpoint has size {size}: omit --size, or use --format json")
                })?;
                // C2SP tlog-proof: the extra data is the entry's encoding, from which the leaf hash is computed.
                let mut text = format!("c2sp.org/tlog-proof@v1\nextra {}\nindex {index}\n", STANDARD.encode(entry));
                for hash in b64(&proof) {
                    text.push_str(&hash);
                    text.push('\n');
                }
                text.push('\n');
                text.push_str(&checkpoint.note);
                print!("{text}");
            }
            ProofFormat::Json => {
                let value = json!({
                    "leaf_index": index,
                    "tree_size": size,
                    "entry": STANDARD.encode(entry),
                    "leaf_hash": STANDARD.encode(merkle::leaf_hash(entry)),
                    "inclusion_path": b64(&proof),
                    "root_hash": STANDARD.encode(tree.root_at(size)?),
                    "checkpoint": checkpoint.map(|signed| signed.note.clone()),
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some([old_size, new_size]) = args.consistency.as_deref().and_then(|sizes| <[u64; 2]>::try_from(sizes).ok())
    else {
        bail!("give --inclusion SEQ or --consistency OLD NEW");
    };
    if args.format == Some(ProofFormat::Text) {
        bail!("consistency proofs have no C2SP text format: use --format json");
    }
    let (tree, _) = tree_of(&audit_dir, new_size)?;
    let proof = tree.consistency_proof(old_size, new_size)?;
    let value = json!({
        "old_size": old_size,
        "new_size": new_size,
        "old_root": STANDARD.encode(tree.root_at(old_size)?),
        "new_root": STANDARD.encode(tree.root_at(new_size)?),
        "consistency_path": b64(&proof),
        "old_checkpoint": at_size(old_size).map(|signed| signed.note.clone()),
        "new_checkpoint": at_size(new_size).map(|signed| signed.note.clone()),
    });
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(ExitCode::SUCCESS)
}

fn parse_time(value: &str) -> anyhow::Result<prost_types::Timestamp> {
    let time = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("`{value}` is not an RFC 3339 time"))?;
    let micros = (time.unix_timestamp_nanos() / 1000) as i64;
    Ok(crate::transport::audit_service::timestamp_of(micros))
}

fn format_time(timestamp: Option<&prost_types::Timestamp>) -> String {
    let Some(timestamp) = timestamp else { return String::new() };
    let nanos = i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Adds the bearer token to every call.
type TokenInterceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type AuditClient = pb::audit_client::AuditClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>,
>;

async fn connect(args: &QueryArgs) -> anyhow::Result<AuditClient> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("reading `{}`", path.display()));
    let endpoint = Endpoint::from_shared(args.broker.clone()).context("--broker is not a URL")?;
    let host = endpoint.uri().host().unwrap_or("localhost").to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&args.ca)?))
        .identity(Identity::from_pem(read(&args.cert)?, read(&args.key)?))
        .domain_name(args.server_name.clone().unwrap_or(host));
    let channel =
        endpoint.tls_config(tls)?.connect().await.with_context(|| format!("could not connect to `{}`", args.broker))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading `{}`", args.token_file.display()))?;
    let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", token.trim()).parse().context("the token is not valid header text")?;
    let interceptor: TokenInterceptor = Box::new(move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", header.clone());
        Ok(request)
    });
    Ok(pb::audit_client::AuditClient::with_interceptor(channel, interceptor).max_decoding_message_size(256 << 20))
}

/// Checks a response's checkpoint (signature, if a key is given) and returns its size and root.
fn check_checkpoint(
    checkpoint: Option<&pb::SignedCheckpoint>,
    verifier: Option<&NoteVerifier>,
) -> anyhow::Result<(u64, Hash)> {
    let checkpoint = checkpoint.ok_or_else(|| anyhow!("the response carries no checkpoint"))?;
    let parsed = match verifier {
        Some(verifier) => {
            open_note(verifier, &checkpoint.note).context("the checkpoint's signature does not verify")?
        }
        None => parse_note(&checkpoint.note)?,
    };
    Ok((parsed.size, parsed.root))
}

/// Checks one record's inclusion proof against the checkpoint: the leaf hash is recomputed from the entry's bytes.
fn check_record(record: &pb::AuditRecord, size: u64, root: &Hash) -> anyhow::Result<()> {
    let entry = record.entry.as_ref().ok_or_else(|| anyhow!("a record has no entry"))?;
    let proof = record.proof.as_ref().ok_or_else(|| anyhow!("entry {} has no proof", entry.sequence))?;
    let hashes = proof.hashes.iter().map(|hash| merkle::hash_from_slice(hash)).collect::<Result<Vec<_>, _>>()?;
    if proof.tree_size != size || proof.leaf_index != entry.sequence {
        bail!("entry {}'s proof is not for the response's checkpoint", entry.sequence);
    }
    merkle::verify_inclusion(&merkle::leaf_hash(&entry.encoded), proof.leaf_index, size, &hashes, root)
        .with_context(|| format!("entry {}'s inclusion proof does not verify", entry.sequence))
}

fn entry_json(record: &pb::AuditRecord) -> serde_json::Value {
    let entry = record.entry.clone().unwrap_or_default();
    let proof = record.proof.clone().unwrap_or_default();
    json!({
        "sequence": entry.sequence,
        "time": format_time(entry.time.as_ref()),
        "event_type": entry.event_type,
        "actor_agency": entry.actor_agency,
        "actor_practitioner": entry.actor_practitioner,
        "actor_role": entry.actor_role,
        "subject_pseudonym": entry.subject_pseudonym,
        "message_id": entry.message_id,
        "recipient": entry.recipient,
        "rule_ids": entry.rule_ids,
        "lawful_basis": entry.lawful_basis,
        "reason_code": entry.reason_code,
        "fields_shared": entry.fields_shared,
        "fields_withheld": entry.fields_withheld,
        "policy_set_hash": entry.policy_set_hash,
        "attempt": entry.attempt,
        "detail": entry.detail,
        "entry": STANDARD.encode(&entry.encoded),
        "proof": {
            "leaf_index": proof.leaf_index,
            "tree_size": proof.tree_size,
            "leaf_hash": STANDARD.encode(&proof.leaf_hash),
            "inclusion_path": proof.hashes.iter().map(|hash| STANDARD.encode(hash)).collect::<Vec<_>>(),
        },
    })
}

const ENTRY_COLUMNS: [&str; 17] = [
    "sequence",
    "time",
    "event_type",
    "actor_agency",
    "actor_practitioner",
    "actor_role",
    "subject_pseudonym",
    "message_id",
    "recipient",
    "rule_ids",
    "lawful_basis",
    "reason_code",
    "fields_shared",
    "fields_withheld",
    "policy_set_hash",
    "attempt",
    "detail",
];

const RECIPIENT_COLUMNS: [&str; 12] = [
    "recipient",
    "sender_agency",
    "sender_practitioner",
    "message_id",
    "decided_at",
    "first_delivered_at",
    "acknowledged_at",
    "rule_ids",
    "lawful_basis",
    "fields_shared",
    "policy_set_hash",
    "decision_sequence",
];

fn recipient_json(recipient: &pb::ChildDataRecipient) -> serde_json::Value {
    json!({
        "recipient": recipient.recipient,
        "sender_agency": recipient.sender_agency,
        "sender_practitioner": recipient.sender_practitioner,
        "message_id": recipient.message_id,
        "decided_at": format_time(recipient.decided_at.as_ref()),
        "first_delivered_at": format_time(recipient.first_delivered_at.as_ref()),
        "acknowledged_at": format_time(recipient.acknowledged_at.as_ref()),
        "rule_ids": recipient.rule_ids,
        "lawful_basis": recipient.lawful_basis,
        "fields_shared": recipient.fields_shared,
        "policy_set_hash": recipient.policy_set_hash,
        "decision_sequence": recipient.decision.as_ref().and_then(|record| record.entry.as_ref()).map(|entry| entry.sequence),
        "decision": recipient.decision.as_ref().map(entry_json),
    })
}

/// A cell for CSV and tables: lists joined with `;`, missing values empty.
fn cell(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Array(items)) => {
            items.iter().map(|item| cell(Some(item))).collect::<Vec<_>>().join(";")
        }
        Some(other) => other.to_string(),
    }
}

fn write_rows(format: OutputFormat, columns: &[&str], rows: &[serde_json::Value]) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        OutputFormat::Jsonl => {
            for row in rows {
                writeln!(out, "{row}")?;
            }
        }
        OutputFormat::Csv => {
            let mut writer = csv::Writer::from_writer(out);
            writer.write_record(columns)?;
            for row in rows {
                writer.write_record(columns.iter().map(|column| cell(row.get(*column))))?;
            }
            writer.flush()?;
        }
        OutputFormat::Table => {
            let cells: Vec<Vec<String>> =
                rows.iter().map(|row| columns.iter().map(|column| cell(row.get(*column))).collect()).collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(index, column)| {
                    cells.iter().map(|row| row[index].chars().count().min(48)).chain([column.len()]).max().unwrap_or(0)
                })
                .collect();
            let line = |values: Vec<String>| -> String {
                values
                    .iter()
                    .zip(&widths)
                    .map(|(value, width)| {
                        let shown: String = value.chars().take(48).collect();
                        format!("{shown:<width$}")
                    })
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            writeln!(out, "{}", line(columns.iter().map(|column| (*column).to_owned()).collect()))?;
            for row in cells {
                writeln!(out, "{}", line(row))?;
            }
        }
    }
    Ok(())
}

async fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let verifier = args
        .verifier_key
        .as_deref()
        .map(|value| key_argument(value).and_then(|key| NoteVerifier::from_verifier_key(&key).map_err(Into::into)))
        .transpose()?;
    let mut client = connect(&args).await?;
    // A pinned key that has been rotated away: its handovers say which key signs now.
    let verifier = match verifier {
        Some(pinned) => {
            let latest = client
                .latest_checkpoint(pb::LatestCheckpointRequest {})
                .await
                .map_err(|status| anyhow!("the broker refused: {}", status.message()))?
                .into_inner();
            let in_force = super::verify::key_in_force(&pinned, &latest.key_handovers)
                .context("the broker's key handovers do not lead from the given verifier key")?;
            if in_force.key_id() != pinned.key_id() {
                eprintln!(
                    "the checkpoint key was rotated: following its handovers, {}+{:08x} signs now",
                    in_force.name(),
                    in_force.key_id()
                );
            }
            Some(in_force)
        }
        None => None,
    };
    let from = args.from.as_deref().map(parse_time).transpose()?;
    let to = args.to.as_deref().map(parse_time).transpose()?;
    if args.recipients_of_child {
        let response = client
            .recipients_of_child(pb::RecipientsOfChildRequest {
                child_nhs_number: args.child.clone().unwrap_or_default(),
                from,
                to,
            })
            .await
            .map_err(|status| anyhow!("the broker refused: {}", status.message()))?
            .into_inner();
        let (size, root) = check_checkpoint(response.checkpoint.as_ref(), verifier.as_ref())?;
        for recipient in &response.recipients {
            if let Some(record) = &recipient.decision {
                check_record(record, size, &root)?;
            }
        }
        let rows: Vec<_> = response.recipients.iter().map(recipient_json).collect();
        write_rows(args.format, &RECIPIENT_COLUMNS, &rows)?;
        report_checkpoint(response.checkpoint.as_ref(), rows.len(), response.query_sequence, verifier.is_some());
        return Ok(ExitCode::SUCCESS);
    }
    let decision = match args.decision {
        Some(DecisionArg::Share) => pb::AuditDecision::Share,
        Some(DecisionArg::NotShare) => pb::AuditDecision::NotShare,
        None => pb::AuditDecision::Unspecified,
    };
    let filter = pb::AuditFilter {
        child_nhs_number: args.child.clone().unwrap_or_default(),
        agency: args.agency.clone().unwrap_or_default(),
        practitioner: args.practitioner.clone().unwrap_or_default(),
        rule_id: args.rule.clone().unwrap_or_default(),
        event_types: args.events.clone(),
        decision: decision.into(),
        from,
        to,
        message_id: args.message.clone().unwrap_or_default(),
    };
    let mut after = None;
    let mut count = 0;
    loop {
        let response = client
            .query(pb::AuditQueryRequest { filter: Some(filter.clone()), limit: args.limit, after_sequence: after })
            .await
            .map_err(|status| anyhow!("the broker refused: {}", status.message()))?
            .into_inner();
        let (size, root) = check_checkpoint(response.checkpoint.as_ref(), verifier.as_ref())?;
        for record in &response.records {
            check_record(record, size, &root)?;
        }
        let rows: Vec<_> = response.records.iter().map(entry_json).collect();
        count += rows.len();
        write_rows(args.format, &ENTRY_COLUMNS, &rows)?;
        report_checkpoint(response.checkpoint.as_ref(), count, response.query_sequence, verifier.is_some());
        match response.next_after_sequence {
            Some(next) if args.all => after = Some(next),
            Some(next) => {
                eprintln!("more entries match: run again with --all (next page after sequence {next})");
                break;
            }
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report_checkpoint(checkpoint: Option<&pb::SignedCheckpoint>, count: usize, query_sequence: u64, signed: bool) {
    let size = checkpoint.map_or(0, |checkpoint| checkpoint.tree_size);
    eprintln!(
        "{count} results; every inclusion proof verified against the checkpoint of size {size}{}; this query is audit \
         entry {query_sequence}",
        if signed { " (signature verified)" } else { " (signature not checked: give --verifier-key)" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The note on a failure past the durable point appears only where a crash could explain it.
    #[test]
    fn the_unsynced_tail_note_appears_only_where_a_crash_explains_the_failure() {
        let damaged = |offset| VerifyFailure::Damaged { sequence: 3, offset, reason: "checksum mismatch".into() };
        let truncated = VerifyFailure::Truncated { index: 1, size: 9, entries: 5 };
        let out_of_sequence = |offset| VerifyFailure::OutOfSequence { position: 4, offset, found: 9 };
        let zeros = |offset| VerifyFailure::Undecodable { sequence: 4, offset, reason: "empty".into() };
        assert!(unsynced_tail_note(&damaged(1_000), Some(900), Some(1_200)).is_some());
        assert!(unsynced_tail_note(&damaged(800), Some(900), Some(1_200)).is_none(), "before the durable point");
        assert!(unsynced_tail_note(&truncated, Some(900), Some(900)).is_some(), "the whole unsynced tail lost");
        assert!(unsynced_tail_note(&truncated, Some(900), Some(700)).is_none(), "durable entries gone");
        assert!(unsynced_tail_note(&out_of_sequence(950), Some(900), Some(1_200)).is_some());
        assert!(unsynced_tail_note(&out_of_sequence(100), Some(900), Some(1_200)).is_none(), "an early entry edited");
        assert!(unsynced_tail_note(&zeros(900), Some(900), Some(1_200)).is_some(), "a hole of zeros past the point");
        assert!(unsynced_tail_note(&zeros(10), Some(900), Some(1_200)).is_none());
        let rewritten = VerifyFailure::RootMismatch { index: 2, size: 9, first_suspect: 5, last_suspect: 8 };
        assert!(unsynced_tail_note(&rewritten, Some(900), Some(1_200)).is_none(), "a valid-looking rewrite");
        assert!(unsynced_tail_note(&damaged(1_000), None, Some(1_200)).is_none(), "no durable point recorded");
        let signature = VerifyFailure::BadSignature { index: 0, reason: "bad".into() };
        assert!(unsynced_tail_note(&signature, Some(900), Some(1_200)).is_none(), "not about entries");
    }
}
