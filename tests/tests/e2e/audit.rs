//! The verifiable audit log: tampering with a stopped broker's log is detected and named, the log verifies after a
//! SIGKILL under concurrent load, the audit service needs the auditor role, records its queries, and answers with
//! inclusion proofs that verify against a checkpoint the broker signed.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use broker::audit::{
    AuditEntry, AuditLog, EventType,
    checkpoint::NoteVerifier,
    checkpoints,
    merkle::{self, Hash},
    verify::{VerifyFailure, verify_data_dir},
};
use proto::pb::{self, audit_client::AuditClient};
use tests::{Area, Bearer, BrokerProcess, BrokerSettings, InProcessBroker, example};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";
const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");
const NHS_NUMBER: &str = "9434765919";

type Auditor = AuditClient<InterceptedService<Channel, Bearer>>;

async fn audit_client(area: &Area, agency: &str, token: &str, broker: std::net::SocketAddr) -> Result<Auditor> {
    let value = format!("Bearer {token}").parse()?;
    Ok(AuditClient::with_interceptor(area.channel(agency, broker).await?, Bearer(Some(value))))
}

fn notification(key: &str) -> Result<pb::Envelope> {
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = key.to_owned();
    if let Some(child) = envelope.subject.as_mut() {
        child.nhs_number = NHS_NUMBER.to_owned();
    }
    Ok(envelope)
}

fn verify(data_dir: &Path) -> Result<broker::audit::verify::VerifyReport, VerifyFailure> {
    verify_data_dir(data_dir, None, &mut |_, _| {})
}

/// Every record of `entries.log` with its byte offset.
fn records(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut found = Vec::new();
    broker::store::log::read_all(path, |offset, bytes| {
        found.push((offset, bytes.to_vec()));
        Ok(())
    })
    .unwrap();
    found
}

/// Writes records as the log frames them (length, CRC-32, payload): a forger who knows the format.
fn write_records(path: &Path, records: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for record in records {
        bytes.extend_from_slice(&(record.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast_hash(record).to_le_bytes());
        bytes.extend_from_slice(record);
    }
    std::fs::write(path, bytes).unwrap();
}

/// CRC-32 (IEEE), as the log uses, without another dependency.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A copy of a data directory's audit log and keys, to tamper with (the files only: not the broker's start-up cache
/// under `audit/cache/`, which verification never reads).
fn copy_of(data_dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    for folder in ["audit", "keys"] {
        std::fs::create_dir_all(copy.path().join(folder)).unwrap();
        for entry in std::fs::read_dir(data_dir.join(folder)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                continue;
            }
            std::fs::copy(entry.path(), copy.path().join(folder).join(entry.file_name())).unwrap();
        }
    }
    let entries = AuditLog::path(&copy.path().join("audit"));
    (copy, entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_a_stopped_brokers_log_is_detected_and_named() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    for index in 0..8 {
        police.send(pb::SendRequest { envelope: Some(notification(&format!("tamper-{index}"))?) }).await?;
    }
    drop(police);
    broker.stop().await?;
    let data_dir = area.data_dir();
    let intact = verify(&data_dir).expect("the untouched log verifies");
    assert!(intact.entries >= 9, "a policy activation and eight decisions: {}", intact.entries);
    assert_eq!(intact.latest_checkpoint.as_ref().map(|checkpoint| checkpoint.size), Some(intact.entries));
    let original = records(&AuditLog::path(&data_dir.join("audit")));
    let last = original.len() - 1;
    let target = 4usize;

    // A flipped byte inside entry 4: its checksum fails.
    let (copy, entries) = copy_of(&data_dir);
    let mut bytes = std::fs::read(&entries)?;
    bytes[original[target].0 as usize + 8 + 3] ^= 0x20;
    std::fs::write(&entries, bytes)?;
    let failure = verify(copy.path()).unwrap_err();
    assert!(matches!(failure, VerifyFailure::Damaged { sequence: 4, .. }), "{failure}");
    assert_eq!(failure.first_bad_sequence(), Some(4));

    // Truncated in the middle of the last entry.
    let (copy, entries) = copy_of(&data_dir);
    std::fs::OpenOptions::new().write(true).open(&entries)?.set_len(original[last].0 + 5)?;
    let failure = verify(copy.path()).unwrap_err();
    assert_eq!(failure.first_bad_sequence(), Some(last as u64), "{failure}");

    // Truncated cleanly at a record boundary: only the checkpoints show entries are missing.
    let (copy, entries) = copy_of(&data_dir);
    std::fs::OpenOptions::new().write(true).open(&entries)?.set_len(original[target].0)?;
    let failure = verify(copy.path()).unwrap_err();
    assert!(matches!(failure, VerifyFailure::Truncated { entries: 4, .. }), "{failure}");

    // An entry dropped.
    let (copy, entries) = copy_of(&data_dir);
    let mut kept: Vec<Vec<u8>> = original.iter().map(|(_, bytes)| bytes.clone()).collect();
    kept.remove(target);
    write_records(&entries, &kept);
    let failure = verify(copy.path()).unwrap_err();
    assert!(matches!(failure, VerifyFailure::OutOfSequence { position: 4, found: 5, .. }), "{failure}");

    // Two entries swapped.
    let (copy, entries) = copy_of(&data_dir);
    let mut swapped: Vec<Vec<u8>> = original.iter().map(|(_, bytes)| bytes.clone()).collect();
    swapped.swap(target, target + 1);
    write_records(&entries, &swapped);
    let failure = verify(copy.path()).unwrap_err();
    assert!(matches!(failure, VerifyFailure::OutOfSequence { position: 4, found: 5, .. }), "{failure}");

    // An entry rewritten by someone who knows the format: valid checksum, right sequence number, different content.
    let (copy, entries) = copy_of(&data_dir);
    let mut rewritten: Vec<Vec<u8>> = original.iter().map(|(_, bytes)| bytes.clone()).collect();
    let mut entry = AuditEntry::decode(&rewritten[target]).unwrap();
    entry.recipient = "someone-else".to_owned();
    rewritten[target] = entry.encode()?;
    write_records(&entries, &rewritten);
    let failure = verify(copy.path()).unwrap_err();
    match failure {
        VerifyFailure::RootMismatch { first_suspect, last_suspect, .. } => {
            assert!(first_suspect <= 4 && 4 <= last_suspect, "{failure}");
        }
        other => panic!("expected a root mismatch, got {other}"),
    }

    // The command line says so too, with a failing exit code; the intact log passes.
    let (copy, entries) = copy_of(&data_dir);
    write_records(&entries, &swapped);
    let verify_command = |dir: &Path| {
        broker::audit::cli::run(broker::audit::cli::AuditCommand::Verify(broker::audit::cli::VerifyArgs {
            data_dir: dir.to_owned(),
            verifier_key: None,
            quiet: true,
        }))
        .unwrap()
    };
    assert_eq!(verify_command(copy.path()), std::process::ExitCode::FAILURE);
    assert_eq!(verify_command(&data_dir), std::process::ExitCode::SUCCESS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_verifies_without_a_gap_after_sigkill_under_concurrent_load() -> Result<()> {
    let area = Area::new()?;
    let broker = BrokerProcess::start(BROKER, &area, "127.0.0.1:0".parse()?)?;
    let address = broker.address;
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for sender in 0..8 {
        let mut police = area.client(POLICE, address).await?;
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut index = 0;
            while !stop.load(Ordering::Relaxed) {
                let envelope = notification(&format!("load-{sender}-{index}")).unwrap();
                index += 1;
                match police.send(pb::SendRequest { envelope: Some(envelope) }).await {
                    Ok(receipt) => acknowledged.push(receipt.into_inner().message_id),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.kill()?;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for sender in senders {
        acknowledged.extend(sender.await?);
    }
    assert!(acknowledged.len() >= 8, "the load ran: {} sends acknowledged", acknowledged.len());

    // Restarted on the same data; verified while it runs, and again once it is killed.
    let broker = BrokerProcess::start(BROKER, &area, address)?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("after-restart")?) }).await?;
    let live = verify(&area.data_dir()).expect("the log verifies while the broker runs");
    broker.kill()?;
    let report = verify(&area.data_dir()).expect("the log verifies after SIGKILL");
    assert!(report.entries >= live.entries);
    assert!(report.checkpoints >= 1);

    // Every acknowledged send has its decision in the log: nothing acknowledged was lost.
    let mut decided = std::collections::BTreeSet::new();
    for (_, bytes) in records(&AuditLog::path(&area.data_dir().join("audit"))) {
        let entry = AuditEntry::decode(&bytes).unwrap();
        if entry.event == Some(EventType::DecisionToShare) {
            decided.insert(entry.message_id);
        }
    }
    let missing: Vec<_> = acknowledged.iter().filter(|id| !decided.contains(*id)).collect();
    assert!(missing.is_empty(), "acknowledged but not in the audit log: {missing:?}");
    Ok(())
}

fn hashes(raw: &[Vec<u8>]) -> Vec<Hash> {
    raw.iter().map(|hash| merkle::hash_from_slice(hash).unwrap()).collect()
}

/// Checks a record's inclusion proof against a checkpoint, recomputing the leaf hash from the entry's bytes.
fn assert_included(record: &pb::AuditRecord, size: u64, root: &Hash) {
    let entry = record.entry.as_ref().unwrap();
    let proof = record.proof.as_ref().unwrap();
    assert_eq!(proof.tree_size, size);
    assert_eq!(proof.leaf_index, entry.sequence);
    let leaf = merkle::leaf_hash(&entry.encoded);
    assert_eq!(proof.leaf_hash, leaf.to_vec());
    merkle::verify_inclusion(&leaf, proof.leaf_index, size, &hashes(&proof.hashes), root).unwrap();
    // The fields are the decoded bytes, not something else.
    assert_eq!(AuditEntry::decode(&entry.encoded).unwrap().sequence, entry.sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_query_by_child_with_proofs_and_their_queries_are_audited() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let address = broker.address;
    let mut police = area.client(POLICE, address).await?;
    let receipt = police.send(pb::SendRequest { envelope: Some(notification("child-1")?) }).await?.into_inner();
    // The school receives and acknowledges the copy.
    let mut school = area.client(SCHOOL, address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), tokio_stream::StreamExt::next(&mut stream)).await?.unwrap()?;
    assert_eq!(delivery.message_id, receipt.message_id);
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id.clone() }).await?;
    drop(stream);

    // Not an auditor: refused, whatever the call.
    let dsl_token = area.default_token(SCHOOL)?;
    let mut not_auditor = audit_client(&area, SCHOOL, &dsl_token, address).await?;
    let refused = not_auditor.query(pb::AuditQueryRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(tests::error_reason(&refused).as_deref(), Some("auditor-role-required"));
    let refused = not_auditor.latest_checkpoint(pb::LatestCheckpointRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = not_auditor
        .recipients_of_child(pb::RecipientsOfChildRequest { child_nhs_number: NHS_NUMBER.into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // A school's own identity provider granting its practitioner the auditor role does not make the school an
    // auditor of the area: only agencies in `audit.auditor_agencies` are trusted to audit.
    let self_made = area.token(SCHOOL, "dsl-0001", &["dsl", "auditor"])?;
    let mut self_made = audit_client(&area, SCHOOL, &self_made, address).await?;
    let filter = pb::AuditFilter { child_nhs_number: NHS_NUMBER.into(), ..Default::default() };
    let refused = self_made.query(pb::AuditQueryRequest { filter: Some(filter), ..Default::default() }).await;
    let refused = refused.expect_err("a school is not trusted to audit");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(tests::error_reason(&refused).as_deref(), Some("auditor-agency-not-trusted"));
    let request = pb::RecipientsOfChildRequest { child_nhs_number: NHS_NUMBER.into(), ..Default::default() };
    let refused = self_made.recipients_of_child(request).await.unwrap_err();
    assert_eq!(tests::error_reason(&refused).as_deref(), Some("auditor-agency-not-trusted"));

    let auditor_token = area.token("luton-csc", "auditor-0001", &["auditor"])?;
    let mut auditor = audit_client(&area, "luton-csc", &auditor_token, address).await?;
    let filter = pb::AuditFilter { child_nhs_number: "943 476 5919".into(), ..Default::default() };
    let response =
        auditor.query(pb::AuditQueryRequest { filter: Some(filter), ..Default::default() }).await?.into_inner();
    let events: Vec<&str> =
        response.records.iter().map(|record| record.entry.as_ref().unwrap().event_type.as_str()).collect();
    for expected in ["decision-to-share", "delivery", "acknowledgement"] {
        assert!(events.contains(&expected), "{expected} missing from {events:?}");
    }
    assert!(
        response.records.iter().all(|record| record.entry.as_ref().unwrap().message_id == receipt.message_id
            || record.entry.as_ref().unwrap().event_type == "auditor-query"),
        "only this child's entries"
    );

    // The checkpoint verifies with the published verifier key alone, and every proof verifies against it.
    let vkey = checkpoints::read_verifier_key(&area.data_dir().join("keys"))?;
    let verifier = NoteVerifier::from_verifier_key(&vkey)?;
    let checkpoint = response.checkpoint.as_ref().unwrap();
    let opened = checkpoints::open_note(&verifier, &checkpoint.note)?;
    assert_eq!(opened.size, checkpoint.tree_size);
    assert!(opened.size > response.query_sequence, "the checkpoint covers the query's own entry");
    for record in &response.records {
        assert_included(record, opened.size, &opened.root);
    }

    // The query is itself in the log, naming the auditor and the child only by pseudonym.
    let filter = pb::AuditFilter { event_types: vec!["auditor-query".into()], ..Default::default() };
    let queries =
        auditor.query(pb::AuditQueryRequest { filter: Some(filter), ..Default::default() }).await?.into_inner();
    let first = queries
        .records
        .iter()
        .map(|record| record.entry.as_ref().unwrap())
        .find(|entry| entry.sequence == response.query_sequence)
        .expect("the first query is recorded");
    assert_eq!(first.actor_agency, "luton-csc");
    assert_eq!(first.actor_practitioner, "auditor-0001");
    assert_eq!(first.actor_role, "auditor");
    assert!(first.detail.contains("child=v1:"), "{}", first.detail);
    assert!(first.detail.contains("limit 1000"), "the page asked for is recorded too: {}", first.detail);

    // The school practitioner's refused attempts name them, not only their agency.
    let filter = pb::AuditFilter { event_types: vec!["request-refused".into()], ..Default::default() };
    let refusals =
        auditor.query(pb::AuditQueryRequest { filter: Some(filter), ..Default::default() }).await?.into_inner();
    let untrusted: Vec<_> = refusals
        .records
        .iter()
        .map(|record| record.entry.as_ref().unwrap())
        .filter(|entry| entry.reason_code == "auditor-agency-not-trusted")
        .collect();
    assert_eq!(untrusted.len(), 2, "the query and the recipients-of-child call");
    assert!(untrusted.iter().all(|entry| entry.actor_agency == SCHOOL && entry.actor_practitioner == "dsl-0001"));
    assert!(!first.subject_pseudonym.is_empty());
    let log_bytes = std::fs::read(AuditLog::path(&area.data_dir().join("audit")))?;
    assert!(!log_bytes.windows(NHS_NUMBER.len()).any(|window| window == NHS_NUMBER.as_bytes()), "no NHS number");

    // Who received this child's data: the school, acknowledged, under the deciding rule and policy hash.
    let recipients = auditor
        .recipients_of_child(pb::RecipientsOfChildRequest { child_nhs_number: NHS_NUMBER.into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(recipients.recipients.len(), 1);
    let recipient = &recipients.recipients[0];
    assert_eq!(recipient.recipient, SCHOOL);
    assert_eq!(recipient.sender_agency, POLICE);
    assert_eq!(recipient.message_id, receipt.message_id);
    assert!(recipient.acknowledged_at.is_some() && recipient.first_delivered_at.is_some());
    assert!(!recipient.rule_ids.is_empty() && !recipient.policy_set_hash.is_empty());
    let checkpoint = checkpoints::open_note(&verifier, &recipients.checkpoint.as_ref().unwrap().note)?;
    assert_included(recipient.decision.as_ref().unwrap(), checkpoint.size, &checkpoint.root);

    // Proof calls: the latest checkpoint, an inclusion proof in it and a consistency proof from an older one.
    let latest = auditor.latest_checkpoint(pb::LatestCheckpointRequest {}).await?.into_inner();
    assert_eq!(latest.verifier_key, vkey);
    let latest_checkpoint = checkpoints::open_note(&verifier, &latest.checkpoint.unwrap().note)?;
    let inclusion = auditor
        .inclusion_proof(pb::InclusionProofRequest { leaf_index: 1, tree_size: 0 })
        .await?
        .into_inner()
        .proof
        .unwrap();
    merkle::verify_inclusion(
        &merkle::hash_from_slice(&inclusion.leaf_hash)?,
        1,
        inclusion.tree_size,
        &hashes(&inclusion.hashes),
        &latest_checkpoint.root,
    )?;
    let consistency = auditor
        .consistency_proof(pb::ConsistencyProofRequest { old_size: opened.size, new_size: 0 })
        .await?
        .into_inner();
    assert_eq!(consistency.new_size, latest_checkpoint.size);
    merkle::verify_consistency(
        opened.size,
        latest_checkpoint.size,
        &opened.root,
        &latest_checkpoint.root,
        &hashes(&consistency.hashes),
    )?;
    broker.stop().await?;
    verify(&area.data_dir()).expect("the log verifies after the queries");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_signs_checkpoints_while_the_log_grows() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("grow-1")?) }).await?;
    let audit_dir = area.data_dir().join("audit");
    let signed = tests::eventually(Duration::from_secs(3), || {
        checkpoints::latest_note(&audit_dir).ok().flatten().is_some_and(|latest| latest.size() >= 2)
    })
    .await;
    assert!(signed, "a checkpoint within a second or so of the log growing");
    let verifier = NoteVerifier::from_verifier_key(&checkpoints::read_verifier_key(&area.data_dir().join("keys"))?)?;
    let latest = checkpoints::latest_note(&audit_dir)?.unwrap();
    let opened = checkpoints::open_note(&verifier, &latest.note)?;
    assert_eq!(opened.origin, checkpoints::DEFAULT_ORIGIN);
    assert!(opened.size >= 2);
    broker.stop().await
}

/// An area names its log: the broker signs checkpoints under the configured origin and serves them with it; started
/// again on the same log with another origin, it refuses to start and says why, and the log is unchanged; with the
/// log's own origin it starts and the log goes on and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_is_signed_under_its_configured_origin_which_cannot_change() -> Result<()> {
    const ORIGIN: &str = "safeguarding.luton.example/audit";
    let mut area =
        Area::with_settings(BrokerSettings { checkpoint_origin: Some(ORIGIN.into()), ..Default::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("origin-1")?) }).await?;
    let auditor_token = area.token("luton-csc", "auditor-0001", &["auditor"])?;
    let mut auditor = audit_client(&area, "luton-csc", &auditor_token, broker.address).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let latest = loop {
        let latest = auditor.latest_checkpoint(pb::LatestCheckpointRequest {}).await?.into_inner();
        if latest.checkpoint.is_some() || tokio::time::Instant::now() > deadline {
            break latest;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(latest.verifier_key.starts_with(&format!("{ORIGIN}+")), "{}", latest.verifier_key);
    let verifier = NoteVerifier::from_verifier_key(&latest.verifier_key)?;
    let note = latest.checkpoint.expect("a checkpoint within a second or so of the log growing").note;
    assert_eq!(checkpoints::open_note(&verifier, &note)?.origin, ORIGIN);
    broker.stop().await?;
    let before = verify(&area.data_dir()).expect("the log verifies");

    area.settings.checkpoint_origin = Some("safeguarding.beds.example/audit".into());
    let refused = InProcessBroker::start(&area).await?.stop().await.expect_err("another origin is refused");
    let text = broker::error_report(&refused);
    assert!(text.contains(ORIGIN) && text.contains("audit.checkpoint_origin"), "{text}");
    assert_eq!(verify(&area.data_dir()).expect("the log is unchanged"), before);

    area.settings.checkpoint_origin = Some(ORIGIN.into());
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("origin-2")?) }).await?;
    broker.stop().await?;
    let after = verify(&area.data_dir()).expect("the log goes on and verifies");
    assert!(after.entries > before.entries);
    Ok(())
}

/// The operator rotates the checkpoint signing key with the broker stopped (refused while it runs). The broker
/// records the rotation in the audit log when it starts again and signs on with the new key; an auditor who pinned
/// the retired key follows the handover the broker serves to the new one; the log verifies from either key, and
/// the retired private key is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_key_is_rotated_and_auditors_follow_the_handover() -> Result<()> {
    use broker::audit::cli::{AuditCommand, RotateKeyArgs};
    let area = Area::new()?;
    let data_dir = area.data_dir();
    let keys = data_dir.join("keys");
    let rotate = || broker::audit::cli::run(AuditCommand::RotateKey(RotateKeyArgs { data_dir: data_dir.clone() }));
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("rotate-1")?) }).await?;
    let audit_dir = data_dir.join("audit");
    assert!(
        tests::eventually(Duration::from_secs(3), || checkpoints::latest_note(&audit_dir).ok().flatten().is_some())
            .await
    );
    let refused = rotate().expect_err("not while the broker runs");
    assert!(format!("{refused:#}").contains("in use"), "{refused:#}");
    broker.stop().await?;
    let retired_key = checkpoints::read_verifier_key(&keys)?;
    let retired_seed = std::fs::read_to_string(keys.join(checkpoints::SIGNING_KEY_FILE))?;
    let signed_before = checkpoints::read_notes(&audit_dir)?.len();

    assert_eq!(rotate()?, std::process::ExitCode::SUCCESS);
    let new_key = checkpoints::read_verifier_key(&keys)?;
    assert_ne!(new_key, retired_key);
    assert_ne!(std::fs::read_to_string(keys.join(checkpoints::SIGNING_KEY_FILE))?, retired_seed, "retired key gone");

    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    police.send(pb::SendRequest { envelope: Some(notification("rotate-2")?) }).await?;
    let auditor_token = area.token("luton-csc", "auditor-0001", &["auditor"])?;
    let mut auditor = audit_client(&area, "luton-csc", &auditor_token, broker.address).await?;
    let rotations = auditor
        .query(pb::AuditQueryRequest {
            filter: Some(pb::AuditFilter { event_types: vec!["key-rotation".into()], ..Default::default() }),
            limit: 10,
            after_sequence: None,
        })
        .await?
        .into_inner();
    assert_eq!(rotations.records.len(), 1, "the rotation is recorded once");
    let detail = &rotations.records[0].entry.as_ref().unwrap().detail;
    let key_id = |key: &str| key.split('+').nth(1).unwrap().to_owned();
    assert!(detail.contains(&key_id(&retired_key)) && detail.contains(&key_id(&new_key)), "{detail}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let latest = loop {
        let latest = auditor.latest_checkpoint(pb::LatestCheckpointRequest {}).await?.into_inner();
        let size = latest.checkpoint.as_ref().map_or(0, |checkpoint| checkpoint.tree_size);
        if size > rotations.checkpoint.as_ref().map_or(0, |checkpoint| checkpoint.tree_size)
            || tokio::time::Instant::now() > deadline
        {
            break latest;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(latest.verifier_key, new_key);
    assert_eq!(latest.key_handovers.len(), 1);
    let pinned = NoteVerifier::from_verifier_key(&retired_key)?;
    let in_force = broker::audit::verify::key_in_force(&pinned, &latest.key_handovers)?;
    assert_eq!(in_force.key_id(), NoteVerifier::from_verifier_key(&new_key)?.key_id());
    let note = &latest.checkpoint.expect("a checkpoint after the restart").note;
    checkpoints::open_note(&in_force, note)?;
    assert!(checkpoints::open_note(&pinned, note).is_err(), "the retired key signs no more");
    broker.stop().await?;

    let from_retired = verify_data_dir(&data_dir, Some(&retired_key), &mut |_, _| {})?;
    assert_eq!(from_retired.key_rotations, vec![(signed_before as u64, new_key.clone())]);
    assert_eq!(from_retired.unchecked_checkpoints, 0);
    let from_new = verify(&data_dir)?;
    assert_eq!(from_new.unchecked_checkpoints, signed_before as u64);
    assert_eq!(from_new.entries, from_retired.entries);
    Ok(())
}
