//! The information-sharing policy through the real broker (issue 3): what each recipient receives, field by field;
//! refusals as PERMISSION_DENIED with their reasons; hot reload that validates, tests and swaps, or keeps the last
//! good set.

use std::time::Duration;

use anyhow::Result;
use proto::pb;
use tests::{Area, BrokerSettings, InProcessBroker, error_reason, example};
use tokio_stream::StreamExt;

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";
const FRONT_DOOR: &str = "luton-csc";
const HOSPITAL: &str = "ldh-hospital";

async fn next_delivery(client: &mut tests::Client) -> Result<pb::Delivery> {
    let mut stream = client.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    client.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id.clone() }).await?;
    Ok(delivery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_notification_reaches_each_recipient_without_the_placement_address() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut front_door = area.client(FRONT_DOOR, broker.address).await?;
    let envelope = example("child-protection-plan-notification.json")?;
    let Some(pb::envelope::Body::PlanStatus(sent)) = envelope.body.clone() else { panic!("example changed") };
    assert!(!sent.placement_address.is_empty(), "the example carries a placement address");
    let receipt = front_door.send(pb::SendRequest { envelope: Some(envelope.clone()) }).await?.into_inner();
    assert_eq!(receipt.recipients.len(), 2);
    for recipient in [HOSPITAL, SCHOOL] {
        let decided = receipt.recipients.iter().find(|r| r.recipient == recipient).unwrap();
        assert_eq!(decided.outcome, pb::RecipientOutcome::Accepted as i32, "{decided:?}");
        assert!(decided.fields_withheld.iter().any(|field| field == "plan_status.placement_address"), "{decided:?}");
        let mut client = area.client(recipient, broker.address).await?;
        let delivery = next_delivery(&mut client).await?;
        // The sender's receipt names what was withheld; the recipient is not told which fields the message held.
        assert!(delivery.fields_withheld.is_empty(), "{recipient}: {:?}", delivery.fields_withheld);
        let copy = delivery.envelope.unwrap();
        let Some(pb::envelope::Body::PlanStatus(received)) = copy.body else { panic!("wrong body") };
        assert!(received.placement_address.is_empty(), "{recipient} must never see a placement address");
        assert_eq!(received.plan_type, sent.plan_type);
        assert_eq!(received.out_of_hours_phone, sent.out_of_hours_phone);
        // Every field the copy holds is one the receipt said it would share (or a routing fact).
        for path in ["plan_status.plan_type", "plan_status.out_of_hours_phone"] {
            assert!(decided.fields_shared.iter().any(|field| field == path), "{path} in {decided:?}");
        }
        assert!(copy.recipients.is_empty(), "a recipient does not learn who else was told");
        assert_eq!(copy.message_id, receipt.message_id);
        assert_eq!(delivery.rule_ids, decided.rule_ids);
        assert!(!delivery.lawful_basis.is_empty());
    }
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_in_a_message_never_reach_a_recipient() -> Result<()> {
    // Protobuf keeps fields it does not know; a copy made by clearing fields would pass them on. Append an unknown
    // field (number 999) to the body's encoding and check the recipient's copy does not hold it.
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "unknown-field".to_owned();
    let mut bytes = prost::Message::encode_to_vec(&pb::SendRequest { envelope: Some(envelope) });
    // SendRequest field 1 (envelope) is length-delimited: rewrite it with an extra unknown field appended.
    let request: pb::SendRequest = prost::Message::decode(bytes.as_slice())?;
    let mut inner = prost::Message::encode_to_vec(&request.envelope.unwrap());
    inner.extend_from_slice(&[0xba, 0x3e, 0x06]); // field 999, wire type 2, length 6
    inner.extend_from_slice(b"secret");
    bytes.clear();
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut bytes);
    prost::encoding::encode_varint(inner.len() as u64, &mut bytes);
    bytes.extend_from_slice(&inner);
    let decoded: pb::SendRequest = prost::Message::decode(bytes.as_slice())?;
    police.send(decoded).await?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let delivery = next_delivery(&mut school).await?;
    let copy = prost::Message::encode_to_vec(&delivery);
    assert!(!copy.windows(6).any(|window| window == b"secret"), "an unknown field leaked into the copy");
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_permission_denied_with_reason_and_rules() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.recipients = vec!["luton-womens-aid".to_owned()];
    let status = police.send(pb::SendRequest { envelope: Some(envelope) }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let reason = error_reason(&status).unwrap();
    assert!(!reason.is_empty() && reason != "permitted", "{reason}");
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().unwrap();
    assert!(info.metadata.contains_key("reason_code.luton-womens-aid"), "{info:?}");
    assert!(info.metadata.contains_key("policy_set_hash"));
    // A partly refused send is accepted for the permitted recipient, and the receipt explains the refusal.
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "partly".to_owned();
    envelope.recipients.push("luton-womens-aid".to_owned());
    let receipt = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();
    let refused = receipt.recipients.iter().find(|r| r.recipient == "luton-womens-aid").unwrap();
    assert_eq!(refused.outcome, pb::RecipientOutcome::Refused as i32);
    assert!(!refused.explanation.is_empty());
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_swaps_a_valid_set_and_keeps_the_last_good_one_otherwise() -> Result<()> {
    let policies = tempfile::tempdir()?;
    tests::copy_sample_policies(policies.path())?;
    let area =
        Area::with_settings(BrokerSettings { policy_dir: Some(policies.path().to_owned()), ..Default::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let to_charity = |key: &str| -> Result<pb::SendRequest> {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.recipients = vec!["luton-womens-aid".to_owned()];
        envelope.recipient_role = String::new();
        envelope.idempotency_key = key.to_owned();
        Ok(pb::SendRequest { envelope: Some(envelope) })
    };
    assert_eq!(police.send(to_charity("before")?).await.unwrap_err().code(), tonic::Code::PermissionDenied);

    // A broken file is rejected: the last good set stays in force.
    std::fs::write(policies.path().join("rules/zz-broken.yaml"), "rules:\n  - id: [not, a, string\n")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(police.send(to_charity("broken")?).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut f1 = example("operation-encompass-notification.json")?;
    f1.idempotency_key = "still-works".to_owned();
    police.send(pb::SendRequest { envelope: Some(f1) }).await?;
    next_delivery(&mut school).await?;
    std::fs::remove_file(policies.path().join("rules/zz-broken.yaml"))?;

    // A valid new rule is swapped in.
    std::fs::write(
        policies.path().join("rules/zz-encompass-to-charity.yaml"),
        r#"rules:
  - id: test-encompass-to-womens-aid
    explanation: Test rule added by a hot reload test.
    from: [beds-police]
    to: [luton-womens-aid]
    kinds: [domestic-abuse-notification]
    purposes: [operation-encompass]
    lawful_basis: [uk-gdpr-6-1-e, dpa-2018-sch1-pt2-para18, uk-gdpr-10, dpa-2018-sch1-pt3]
    share:
      - domestic_abuse_incident.police_reference
"#,
    )?;
    let mut accepted = None;
    for attempt in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(receipt) = police.send(to_charity(&format!("after-{attempt}"))?).await {
            accepted = Some(receipt.into_inner());
            break;
        }
    }
    let receipt = accepted.expect("the new rule was never activated");
    assert_eq!(receipt.recipients[0].rule_ids, vec!["test-encompass-to-womens-aid".to_owned()]);
    broker.stop().await?;

    let mut events = Vec::new();
    broker::store::log::read_all(&broker::audit::AuditLog::path(&area.data_dir().join("audit")), |_, bytes| {
        let entry = broker::audit::AuditEntry::decode(bytes).unwrap();
        if matches!(
            entry.event,
            Some(broker::audit::EventType::PolicyActivated | broker::audit::EventType::PolicyRejected)
        ) {
            events.push(entry.event.unwrap().as_str());
        }
        Ok(())
    })?;
    assert_eq!(events.first(), Some(&"policy-activated"), "{events:?}");
    assert!(events.contains(&"policy-rejected"), "{events:?}");
    assert_eq!(events.last(), Some(&"policy-activated"), "{events:?}");
    Ok(())
}

/// An agency removed from the policy set by a hot reload may no longer receive: the delivery stream it holds open
/// ends (UNAUTHENTICATED, `unknown-agency`) as soon as the reload takes effect (each reload is announced to the open
/// streams), well before it would carry another copy, here the redelivery of a copy it did not acknowledge (due ten
/// seconds after it went out), which stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_removed_by_a_reload_receives_nothing_more_on_its_open_stream() -> Result<()> {
    const HUB: &str = "test-removed-hub";
    let policies = tempfile::tempdir()?;
    tests::copy_sample_policies(policies.path())?;
    let extra = policies.path().join("zz-test-removed-hub.yaml");
    std::fs::write(
        &extra,
        format!(
            r#"agencies:
  - id: {HUB}
    name: A family hub this test removes
    kind: family-hub
rules:
  - id: test-encompass-to-removed-hub
    explanation: Test rule removed by a hot reload test.
    from: [beds-police]
    to: [{HUB}]
    kinds: [domestic-abuse-notification]
    purposes: [operation-encompass]
    lawful_basis: [uk-gdpr-6-1-e, dpa-2018-sch1-pt2-para18, uk-gdpr-10, dpa-2018-sch1-pt3]
    share:
      - domestic_abuse_incident.police_reference
"#
        ),
    )?;
    let mut area = Area::with_settings(BrokerSettings {
        policy_dir: Some(policies.path().to_owned()),
        ack_wait_seconds: 10,
        ..Default::default()
    })?;
    area.agencies.push((HUB.to_owned(), "practitioner".to_owned()));
    let broker = InProcessBroker::start(&area).await?;
    let mut hub = area.client(HUB, broker.address).await?;
    let mut stream = hub.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.recipients = vec![HUB.to_owned()];
    envelope.recipient_role = String::new();
    envelope.idempotency_key = "to-the-hub".to_owned();
    police.send(pb::SendRequest { envelope: Some(envelope) }).await?;
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.expect("a copy")?;
    let sent_at = tokio::time::Instant::now();
    assert_eq!(first.attempt, 1);

    // The hub leaves the policy set (its calls are refused as from an unknown agency once the reload has taken
    // effect); its copy is not acknowledged, so it is due again ten seconds after it went out.
    std::fs::remove_file(&extra)?;
    let mut reloaded = false;
    for _ in 0..30 {
        let probe = hub.acknowledge(pb::AcknowledgeRequest { delivery_id: "none".to_owned() }).await;
        if probe.is_err_and(|status| error_reason(&status).as_deref() == Some("unknown-agency")) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(reloaded, "the reload never took effect");
    assert!(sent_at.elapsed() < Duration::from_secs(9), "the reload took effect too late for this test to tell");
    let ended = tokio::time::timeout(Duration::from_secs(3), stream.next()).await?.expect("the stream ends");
    assert!(sent_at.elapsed() < Duration::from_secs(10), "ended by the reload, not at the redelivery");
    let status = ended.expect_err("with an error, not the copy again");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(error_reason(&status).as_deref(), Some("unknown-agency"));
    broker.stop().await
}
