//! The backbone (issue 2): send and receive across agents, idempotency, acknowledgement, redelivery, negative
//! acknowledgement, dead letters, offline agents, refused certificates, oversized and malformed messages.

use std::time::Duration;

use anyhow::Result;
use proto::pb;
use tests::{Area, BrokerSettings, InProcessBroker, error_reason, eventually, example};
use tokio_stream::StreamExt;

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";
const FRONT_DOOR: &str = "luton-csc";

struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), agent::AgentError>>,
}

impl RunningAgent {
    fn start(config: agent::AgentConfig) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(config, async move {
            let _ = stopped.await;
        }));
        Self { stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

fn read_delivery(path: &std::path::Path) -> pb::Delivery {
    let bytes = std::fs::read(path).unwrap();
    agent::json::read_message_json::<pb::Delivery>(agent::json::DELIVERY_MESSAGE, &bytes).unwrap()
}

fn inbox_files(inbox: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(inbox) else { return Vec::new() };
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

async fn send(client: &mut tests::Client, envelope: pb::Envelope) -> Result<pb::SendResponse, tonic::Status> {
    client.send(pb::SendRequest { envelope: Some(envelope) }).await.map(tonic::Response::into_inner)
}

fn with_key(mut envelope: pb::Envelope, key: &str) -> pb::Envelope {
    envelope.idempotency_key = key.to_owned();
    envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_reaches_the_recipient_agent_with_only_the_fields_it_may_see() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let school = RunningAgent::start(area.agent_config(SCHOOL, broker.address)?);
    let mut police = area.client(POLICE, broker.address).await?;

    let receipt = send(&mut police, with_key(example("operation-encompass-notification.json")?, "f1-1")).await?;
    assert!(!receipt.message_id.is_empty());
    assert_eq!(receipt.recipients.len(), 1);
    assert_eq!(receipt.recipients[0].outcome, pb::RecipientOutcome::Accepted as i32, "{receipt:?}");

    let inbox = area.inbox(SCHOOL);
    assert!(eventually(Duration::from_secs(10), || inbox_files(&inbox).len() == 1).await, "no delivery arrived");
    let delivery = read_delivery(&inbox_files(&inbox)[0]);
    assert_eq!(delivery.message_id, receipt.message_id);
    assert_eq!(delivery.sender_agency, POLICE, "the sender is the certificate's agency");
    let envelope = delivery.envelope.unwrap();
    let Some(pb::envelope::Body::DomesticAbuseIncident(incident)) = envelope.body else { panic!("wrong body") };
    assert_eq!(incident.police_reference, "BP-2026-000123");
    assert!(incident.child_present);
    assert!(incident.crime_report.is_empty(), "the full crime report must never reach a school");
    assert!(incident.criminal_history.is_empty());
    assert!(incident.victim_health.is_empty());

    // The agent acknowledged after its durable write: tracking shows it.
    let mut acknowledged = false;
    for _ in 0..200 {
        let track = police.track(pb::TrackRequest { message_id: receipt.message_id.clone() }).await?.into_inner();
        if track.recipients[0].state == pb::DeliveryState::Acknowledged as i32 {
            let events: Vec<_> = track.recipients[0].events.iter().map(|e| e.event.as_str()).collect();
            assert_eq!(events, ["queued", "delivered", "acknowledged"]);
            acknowledged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(acknowledged, "the delivery was never acknowledged");
    school.stop().await;
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_gives_the_same_message_and_one_delivery() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let envelope = with_key(example("operation-encompass-notification.json")?, "same-key");
    let first = send(&mut police, envelope.clone()).await?;
    let second = send(&mut police, envelope.clone()).await?;
    assert_eq!(first.message_id, second.message_id);
    assert!(!first.duplicate);
    assert!(second.duplicate);

    let school = RunningAgent::start(area.agent_config(SCHOOL, broker.address)?);
    let inbox = area.inbox(SCHOOL);
    assert!(eventually(Duration::from_secs(10), || inbox_files(&inbox).len() == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inbox_files(&inbox).len(), 1, "one delivery only");
    // Another agency's identical key is its own message.
    let mut school_client = area.client(SCHOOL, broker.address).await?;
    let referral = with_key(example("school-referral-to-front-door.json")?, "same-key");
    let other = send(&mut school_client, referral).await?;
    assert_ne!(other.message_id, first.message_id);
    school.stop().await;
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_delivery_is_delivered_again_after_the_deadline() -> Result<()> {
    let area = Area::with_settings(BrokerSettings { ack_wait_seconds: 1, ..BrokerSettings::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let receipt = send(&mut police, with_key(example("operation-encompass-notification.json")?, "redeliver")).await?;

    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    assert_eq!(first.message_id, receipt.message_id);
    assert_eq!(first.attempt, 1);
    // Not acknowledged: it comes again after the acknowledgement wait, with the same delivery id.
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    assert_eq!(second.delivery_id, first.delivery_id);
    assert_eq!(second.attempt, 2);
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: second.delivery_id.clone() }).await?;
    // Acknowledging twice is harmless.
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: second.delivery_id.clone() }).await?;
    let track = police.track(pb::TrackRequest { message_id: receipt.message_id }).await?.into_inner();
    assert_eq!(track.recipients[0].state, pb::DeliveryState::Acknowledged as i32);
    assert_eq!(track.recipients[0].attempts, 2);
    assert!(track.recipients[0].events.iter().any(|event| event.event == "redelivered"));
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_acknowledgement_delays_and_the_last_attempt_dead_letters() -> Result<()> {
    let area = Area::with_settings(BrokerSettings { max_attempts: 2, ..BrokerSettings::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let receipt = send(&mut police, with_key(example("operation-encompass-notification.json")?, "nack")).await?;

    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    let answer = school
        .negative_acknowledge(pb::NegativeAcknowledgeRequest {
            delivery_id: first.delivery_id.clone(),
            retry_after_millis: 300,
            reason: "case system offline".to_owned(),
        })
        .await?
        .into_inner();
    assert!(!answer.dead_lettered);
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    assert!(started.elapsed() >= Duration::from_millis(250), "the retry delay was not kept");
    assert_eq!(second.attempt, 2);
    let answer = school
        .negative_acknowledge(pb::NegativeAcknowledgeRequest {
            delivery_id: second.delivery_id.clone(),
            retry_after_millis: 0,
            reason: "still offline".to_owned(),
        })
        .await?
        .into_inner();
    assert!(answer.dead_lettered, "the second of two attempts dead-letters");

    let track = police.track(pb::TrackRequest { message_id: receipt.message_id.clone() }).await?.into_inner();
    assert_eq!(track.recipients[0].state, pb::DeliveryState::DeadLettered as i32);
    assert!(track.recipients[0].events.iter().any(|event| event.event == "dead-lettered"));
    // A dead-lettered copy is no longer waiting: acknowledging it is refused.
    let late = school.acknowledge(pb::AcknowledgeRequest { delivery_id: second.delivery_id }).await;
    assert!(late.is_ok() || late.unwrap_err().code() == tonic::Code::NotFound);

    // The school will never get it through the broker: the police, and the local authority the rule escalates to,
    // are told at once (not at the deadline, which a dead letter no longer has), so they can act by other means.
    for agency in [POLICE, FRONT_DOOR] {
        let mut client = area.client(agency, broker.address).await?;
        let mut notices = client.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
        let notice = tokio::time::timeout(Duration::from_secs(10), notices.next()).await?.unwrap()?;
        let envelope = notice.envelope.expect("the notice");
        assert_eq!(envelope.kind, pb::MessageKind::EscalationNotice as i32, "{agency}");
        assert_eq!(envelope.correlation_id, receipt.message_id);
        let Some(pb::envelope::Body::Escalation(escalation)) = envelope.body else { panic!("an escalation body") };
        assert_eq!(escalation.reason, pb::EscalationReason::DeadLettered as i32);
        assert_eq!(escalation.recipient, SCHOOL);
        assert!(escalation.explanation.contains("2 delivery attempts"), "{}", escalation.explanation);
        assert!(envelope.subject.is_none(), "a notice never names the child");
        client.acknowledge(pb::AcknowledgeRequest { delivery_id: notice.delivery_id }).await?;
    }
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_an_offline_agent_wait_until_it_connects_in_order() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut sent = Vec::new();
    for index in 0..5 {
        let receipt =
            send(&mut police, with_key(example("operation-encompass-notification.json")?, &format!("offline-{index}")))
                .await?;
        sent.push(receipt.message_id);
    }
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let mut received = Vec::new();
    for _ in 0..5 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
        school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id.clone() }).await?;
        received.push(delivery.message_id);
    }
    assert_eq!(received, sent, "order is kept per sender-recipient pair");
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_authority_is_refused() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let rogue = broker::pki::CertificateAuthority::generate("Rogue")?;
    let issued = rogue.issue_agency(POLICE)?;
    let ca = std::fs::read(area.path().join("pki/ca.pem"))?;
    let result = async {
        let channel =
            tests::channel_with(&ca, issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), broker.address).await?;
        let token = format!("Bearer {}", area.default_token(POLICE)?).parse()?;
        let mut client = pb::broker_client::BrokerClient::with_interceptor(channel, tests::Bearer(Some(token)));
        send(&mut client, example("operation-encompass-notification.json")?).await.map_err(anyhow::Error::from)
    }
    .await;
    assert!(result.is_err(), "a certificate that does not chain to the area CA must be refused");
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_an_unknown_agency_is_refused() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut stranger = area.client("not-in-the-registry", broker.address).await?;
    let status = send(&mut stranger, example("operation-encompass-notification.json")?).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(error_reason(&status).as_deref(), Some("unknown-agency"));
    let status = stranger.deliveries(pb::DeliveriesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    broker.stop().await?;
    // Both attempts are audited as refused requests, naming the agency the certificate claims.
    let mut refused = Vec::new();
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        let entry = broker::audit::AuditEntry::decode(bytes).unwrap();
        if entry.event == Some(broker::audit::EventType::RequestRefused) {
            refused.push((entry.actor.agency, entry.reason_code, entry.detail));
        }
        Ok(())
    })?;
    let expected =
        |operation: &str| ("not-in-the-registry".to_owned(), "unknown-agency".to_owned(), operation.to_owned());
    assert_eq!(refused, vec![expected("send"), expected("deliveries")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_claim_another_agency() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    // The school presents its own certificate but sends a police-only Operation Encompass notification claiming to
    // be the police's SPOC: the policy sees the certificate's agency, and refuses.
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.recipients = vec![FRONT_DOOR.to_owned()];
    let status = send(&mut school, envelope).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Tracking another agency's message is refused as unknown.
    let mut police = area.client(POLICE, broker.address).await?;
    let receipt = send(&mut police, with_key(example("operation-encompass-notification.json")?, "mine")).await?;
    let status = school.track(pb::TrackRequest { message_id: receipt.message_id }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_messages_are_refused_and_nothing_is_stored() -> Result<()> {
    let area = Area::with_settings(BrokerSettings { max_message_bytes: 64 * 1024, ..BrokerSettings::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;

    let mut oversized = with_key(example("operation-encompass-notification.json")?, "big");
    if let Some(pb::envelope::Body::DomesticAbuseIncident(incident)) = &mut oversized.body {
        incident.location = "x".repeat(100 * 1024);
    }
    let status = send(&mut police, oversized).await.unwrap_err();
    // OUT_OF_RANGE (tonic's size limit), not RESOURCE_EXHAUSTED: agents retry the latter (the broker's disk is full),
    // so an oversized envelope must not be answered with it.
    assert_eq!(status.code(), tonic::Code::OutOfRange, "oversized: {status:?}");

    let mut mismatched = with_key(example("operation-encompass-notification.json")?, "mismatch");
    mismatched.kind = pb::MessageKind::Referral as i32;
    let status = send(&mut police, mismatched).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("envelope.body"), "{}", status.message());

    let mut no_recipients = with_key(example("operation-encompass-notification.json")?, "none");
    no_recipients.recipients.clear();
    let status = send(&mut police, no_recipients).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("envelope.recipients"), "{}", status.message());

    let status = police.send(pb::SendRequest { envelope: None }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Bytes that are not a SendRequest at all.
    let status = raw_unary(&area, broker.address, b"\x0a\xff\xff\xff\xff\x0f").await?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    broker.stop().await?;
    // Nothing was stored: no audit entry but the policy activation at start, no message record.
    let mut events = Vec::new();
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        events.push(broker::audit::AuditEntry::decode(bytes).unwrap().event);
        Ok(())
    })?;
    assert_eq!(events, vec![Some(broker::audit::EventType::PolicyActivated)], "refused input leaves no audit entry");
    Ok(())
}

/// Sends raw bytes as the body of a `Send` call; returns the status it fails with.
async fn raw_unary(area: &Area, address: std::net::SocketAddr, body: &[u8]) -> Result<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(area.channel(POLICE, address).await?);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/safeguarding.v1.Broker/Send");
    let result: Result<tonic::Response<Vec<u8>>, tonic::Status> =
        grpc.unary(tonic::Request::new(body.to_vec()), path, RawCodec).await;
    result.err().ok_or_else(|| anyhow::anyhow!("undecodable bytes were accepted"))
}

#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
