//! Practitioner identity (issue 4): every request carries a JWT from the caller's own agency. Each bad token is
//! refused with UNAUTHENTICATED or PERMISSION_DENIED, audited as a refused request, and stores nothing.

use anyhow::Result;
use base64::Engine;
use broker::auth::token::{Claims, DEFAULT_AUDIENCE, DevIssuer};
use proto::pb;
use tests::{Area, InProcessBroker, error_reason, example};

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn police_claims(issuer: &DevIssuer) -> Claims {
    Claims {
        iss: issuer.issuer.clone(),
        sub: "pc-4321".to_owned(),
        aud: DEFAULT_AUDIENCE.to_owned(),
        exp: now() + 600,
        nbf: None,
        iat: Some(now()),
        agency: POLICE.to_owned(),
        name: String::new(),
        roles: vec!["spoc".to_owned()],
        role: None,
    }
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

async fn try_send(area: &Area, broker: &InProcessBroker, token: Option<&str>) -> tonic::Status {
    let mut client = area.client_with_token(POLICE, broker.address, token).await.unwrap();
    let mut envelope = example("operation-encompass-notification.json").unwrap();
    envelope.idempotency_key = "identity".to_owned();
    client.send(pb::SendRequest { envelope: Some(envelope) }).await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_audited_and_stores_nothing() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let police = area.issuer(POLICE)?;
    let mut cases: Vec<(&str, Option<String>, tonic::Code, &str)> = Vec::new();

    cases.push(("missing token", None, tonic::Code::Unauthenticated, "missing-token"));
    cases.push(("malformed token", Some("not.a.jwt".to_owned()), tonic::Code::Unauthenticated, "malformed-token"));
    let payload = b64(&serde_json::to_value(police_claims(&police))?);
    let none = format!("{}.{payload}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})));
    cases.push(("alg none", Some(none), tonic::Code::Unauthenticated, "malformed-token"));
    // Algorithm confusion: HS256 with the trusted public key as the HMAC secret.
    let public = std::fs::read(area.path().join(format!("tokens/keys/{POLICE}.pub.pem")))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(police.kid.clone());
    let confused =
        jsonwebtoken::encode(&header, &police_claims(&police), &jsonwebtoken::EncodingKey::from_secret(&public))?;
    cases.push(("hmac confusion", Some(confused), tonic::Code::Unauthenticated, "algorithm-not-allowed"));
    // A genuine school token over the police certificate.
    cases.push((
        "other agency's token",
        Some(area.default_token(SCHOOL)?),
        tonic::Code::Unauthenticated,
        "unknown-issuer",
    ));
    let mut expired = police_claims(&police);
    expired.exp = now() - 3600;
    cases.push(("expired", Some(police.mint_claims(&expired).unwrap()), tonic::Code::Unauthenticated, "token-expired"));
    let mut early = police_claims(&police);
    early.nbf = Some(now() + 3600);
    cases.push((
        "not yet valid",
        Some(police.mint_claims(&early).unwrap()),
        tonic::Code::Unauthenticated,
        "token-not-yet-valid",
    ));
    let mut audience = police_claims(&police);
    audience.aud = "some-other-service".to_owned();
    cases.push((
        "wrong audience",
        Some(police.mint_claims(&audience).unwrap()),
        tonic::Code::Unauthenticated,
        "wrong-audience",
    ));
    let (stranger, _, _) = DevIssuer::generate(POLICE).unwrap();
    let mut foreign = police_claims(&stranger);
    foreign.iss = "https://idp.elsewhere.invalid/".to_owned();
    cases.push((
        "unknown issuer",
        Some(stranger.mint_claims(&foreign).unwrap()),
        tonic::Code::Unauthenticated,
        "unknown-issuer",
    ));
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("not-a-key-id".to_owned());
    let private = std::fs::read(area.path().join(format!("tokens/keys/{POLICE}.key")))?;
    let unknown_kid =
        jsonwebtoken::encode(&header, &police_claims(&police), &jsonwebtoken::EncodingKey::from_ed_pem(&private)?)?;
    cases.push(("unknown key id", Some(unknown_kid), tonic::Code::Unauthenticated, "unknown-key"));
    let good = police.mint_claims(&police_claims(&police)).unwrap();
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut raised = police_claims(&police);
    raised.roles = vec!["manager".to_owned()];
    parts[1] = b64(&serde_json::to_value(raised)?);
    cases.push(("tampered payload", Some(parts.join(".")), tonic::Code::Unauthenticated, "bad-signature"));
    // Signed by the police's own key but claiming another agency.
    let mut claims = police_claims(&police);
    claims.agency = SCHOOL.to_owned();
    cases.push((
        "agency claim mismatch",
        Some(police.mint_claims(&claims).unwrap()),
        tonic::Code::PermissionDenied,
        "agency-mismatch",
    ));

    for (name, token, code, reason) in &cases {
        let status = try_send(&area, &broker, token.as_deref()).await;
        assert_eq!(status.code(), *code, "{name}: {status:?}");
        assert_eq!(error_reason(&status).as_deref(), Some(*reason), "{name}: {status:?}");
        assert!(!status.message().contains("BEGIN"), "{name}: the error must not carry key material");
    }

    // A genuine token whose role the policy does not allow for the act.
    let practitioner = area.token(POLICE, "pc-0001", &["practitioner"])?;
    let mut client = area.client_with_token(POLICE, broker.address, Some(&practitioner)).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.sender_role = String::new();
    let status = client.send(pb::SendRequest { envelope: Some(envelope) }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    broker.stop().await?;
    // Each refused token is one audit entry; the role refusal is a decision not to share. Nothing was queued.
    let mut refused = 0;
    let mut not_shared = 0;
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        let entry = broker::audit::AuditEntry::decode(bytes).unwrap();
        match entry.event {
            Some(broker::audit::EventType::RequestRefused) => refused += 1,
            Some(broker::audit::EventType::PolicyActivated) => {}
            Some(broker::audit::EventType::DecisionNotToShare) => {
                assert_eq!(entry.actor.practitioner, "pc-0001", "the practitioner is in the audit entry");
                not_shared += 1
            }
            other => panic!("unexpected audit entry {other:?}"),
        }
        Ok(())
    })?;
    assert_eq!(refused, cases.len());
    assert_eq!(not_shared, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_practitioner_and_role_reach_the_recipient_and_the_audit_log() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let token = area.token(POLICE, "pc-2468", &["spoc"])?;
    let mut police = area.client_with_token(POLICE, broker.address, Some(&token)).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "who".to_owned();
    police.send(pb::SendRequest { envelope: Some(envelope) }).await?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery = tokio_stream::StreamExt::next(&mut stream).await.unwrap()?;
    assert_eq!(delivery.sender_practitioner, "pc-2468");
    assert_eq!(delivery.sender_role, "spoc");
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id }).await?;
    broker.stop().await?;
    let mut acts = Vec::new();
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        let entry = broker::audit::AuditEntry::decode(bytes).unwrap();
        if entry.event != Some(broker::audit::EventType::PolicyActivated) {
            acts.push((entry.event.unwrap().as_str(), entry.actor.agency, entry.actor.practitioner, entry.actor.role));
        }
        Ok(())
    })?;
    assert_eq!(acts[0], ("decision-to-share", POLICE.to_owned(), "pc-2468".to_owned(), "spoc".to_owned()));
    assert!(acts.iter().any(|(event, agency, practitioner, role)| *event == "acknowledgement"
        && agency == SCHOOL
        && practitioner == "test-dsl"
        && role == "dsl"));
    Ok(())
}

/// The area CA revokes a school's lost certificate: once the broker has reloaded the revocation list, every call
/// with it is refused (UNAUTHENTICATED, `certificate-revoked`), the stream it holds open ends at once, and the next
/// copy waits for the school's new certificate. A broken list published later does
/// not replace the one in force; at start, it stops the broker with an error naming `tls.crls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_and_its_open_stream_ends() -> Result<()> {
    use std::time::Duration;
    let crl = std::path::PathBuf::from("pki/area.crl.pem");
    let area = Area::with_settings(tests::BrokerSettings { crls: vec![crl.clone()], ..Default::default() })?;
    let crl = area.path().join(crl);
    broker::pki::write_file(&crl, &area.ca.revocation_list(&[], 1)?)?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let send = |key: &str| -> Result<pb::SendRequest> {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = key.to_owned();
        Ok(pb::SendRequest { envelope: Some(envelope) })
    };
    police.send(send("revoked-1")?).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await??.expect("a copy");
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: first.delivery_id }).await?;

    // The school's certificate is lost: the CA revokes it.
    let (lost_cert, lost_key) = area.agency_credentials(SCHOOL)?;
    let lost = std::fs::read_to_string(&lost_cert)?;
    broker::pki::write_file(&crl, &area.ca.revocation_list(&[&lost], 2)?)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let answer = school.acknowledge(pb::AcknowledgeRequest { delivery_id: "none".into() }).await;
        match answer {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break status,
            _ if tokio::time::Instant::now() > deadline => panic!("still accepted after 10 s: {answer:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(error_reason(&refused).as_deref(), Some("certificate-revoked"));
    assert!(refused.message().contains(SCHOOL), "{}", refused.message());

    // The stream open with it ends as soon as the list is loaded, with no copy due; the next copy waits for the
    // school's new certificate.
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?;
    let status = ended.expect_err("the stream ends with an error");
    assert_eq!(error_reason(&status).as_deref(), Some("certificate-revoked"));
    police.send(send("revoked-2")?).await?;
    std::fs::remove_file(&lost_cert)?;
    std::fs::remove_file(&lost_key)?;
    let mut renewed = area.client(SCHOOL, broker.address).await?;
    let mut stream = renewed.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message()).await??.expect("the copy");
    renewed.acknowledge(pb::AcknowledgeRequest { delivery_id: second.delivery_id }).await?;

    // A broken list does not replace the one in force: the lost certificate stays refused, the new one works.
    std::fs::write(&crl, "not a revocation list")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = school.acknowledge(pb::AcknowledgeRequest { delivery_id: "none".into() }).await.unwrap_err();
    assert_eq!(error_reason(&still).as_deref(), Some("certificate-revoked"));
    let fine = renewed.acknowledge(pb::AcknowledgeRequest { delivery_id: "none".into() }).await.unwrap_err();
    assert_ne!(fine.code(), tonic::Code::Unauthenticated, "{fine:?}");
    broker.stop().await?;

    let refused = InProcessBroker::start(&area).await?.stop().await.expect_err("a broken list stops the start");
    assert!(broker::error_report(&refused).contains("tls.crls"), "{refused:#}");
    Ok(())
}

/// A client looping on a bad token (or a revoked certificate) is refused every time, but only the first
/// `REFUSALS_RECORDED_PER_MINUTE` refusals of its kind each minute become audit entries: the permanent log, and the
/// disk, do not grow without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_requests_is_recorded_up_to_a_limit_a_minute() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let limit = broker::transport::service::REFUSALS_RECORDED_PER_MINUTE as usize;
    let mut client = area.client_with_token(POLICE, broker.address, Some("not-a-token")).await?;
    for _ in 0..limit + 20 {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = "flood".to_owned();
        let status = client.send(pb::SendRequest { envelope: Some(envelope) }).await.unwrap_err();
        assert_eq!(error_reason(&status).as_deref(), Some("malformed-token"), "every one is refused");
    }
    broker.stop().await?;
    let mut refused = 0;
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        if broker::audit::AuditEntry::decode(bytes).unwrap().event == Some(broker::audit::EventType::RequestRefused) {
            refused += 1;
        }
        Ok(())
    })?;
    assert_eq!(refused, limit);
    Ok(())
}
