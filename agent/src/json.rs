//! The proto3 JSON mapping of the broker's messages, through prost-reflect: how agencies write the envelopes they
//! send, and how the agent writes deliveries and receipts for the agency's system to read.
//!
//! Output uses the field names of the `.proto` files (`recipient_role`, not `recipientRole`), which are also the
//! names in policy field paths; the proto3 JSON mapping lets readers accept either spelling, and the agent reads both.

use prost_reflect::{DeserializeOptions, DynamicMessage, ReflectMessage, SerializeOptions};
use proto::pb;

use crate::AgentError;

/// A message could not be read from or written to JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the embedded protobuf descriptors cannot be decoded: {0}")]
    Descriptors(String),
    #[error("message type `{0}` is not in the descriptors")]
    UnknownMessage(String),
    #[error("not a valid `{message}` in the proto3 JSON mapping: {reason}")]
    Invalid { message: String, reason: String },
    #[error("cannot convert `{message}`: {reason}")]
    Transcode { message: String, reason: String },
}

fn descriptor(message_name: &str) -> Result<prost_reflect::MessageDescriptor, JsonError> {
    let pool = proto::descriptor_pool().map_err(|error| JsonError::Descriptors(error.to_string()))?;
    pool.get_message_by_name(message_name).ok_or_else(|| JsonError::UnknownMessage(message_name.to_owned()))
}

/// Reads a message of type `message_name` (for example `safeguarding.v1.Envelope`) from proto3 JSON. Unknown fields
/// are refused, so that a misspelt field is an error rather than silently dropped.
///
/// # Errors
/// Fails when the bytes are not JSON or do not match the message.
pub fn read_message_json<T: prost::Message + Default>(message_name: &str, bytes: &[u8]) -> Result<T, JsonError> {
    let descriptor = descriptor(message_name)?;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let dynamic = DynamicMessage::deserialize_with_options(
        descriptor,
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .and_then(|dynamic| deserializer.end().map(|()| dynamic))
    .map_err(|error| JsonError::Invalid { message: message_name.to_owned(), reason: error.to_string() })?;
    dynamic
        .transcode_to::<T>()
        .map_err(|error| JsonError::Transcode { message: message_name.to_owned(), reason: error.to_string() })
}

/// Writes any message of the broker's contract as pretty-printed proto3 JSON, ending with a newline.
///
/// # Errors
/// Fails only if the message and the descriptors disagree, which would be a build problem.
pub fn message_to_json<T: prost::Message>(message_name: &str, message: &T) -> Result<Vec<u8>, JsonError> {
    let descriptor = descriptor(message_name)?;
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic
        .transcode_from(message)
        .map_err(|error| JsonError::Transcode { message: message_name.to_owned(), reason: error.to_string() })?;
    to_json(&dynamic)
}

fn to_json(dynamic: &DynamicMessage) -> Result<Vec<u8>, JsonError> {
    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::pretty(&mut bytes);
    dynamic.serialize_with_options(&mut serializer, &SerializeOptions::new().use_proto_field_name(true)).map_err(
        |error| JsonError::Transcode {
            message: dynamic.descriptor().full_name().to_owned(),
            reason: error.to_string(),
        },
    )?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Reads an [`pb::Envelope`] written in the proto3 JSON mapping.
///
/// # Errors
/// Fails when the bytes are not a valid envelope.
pub fn read_envelope_json(bytes: &[u8]) -> Result<pb::Envelope, AgentError> {
    Ok(read_message_json(proto::ENVELOPE_MESSAGE, bytes)?)
}

/// Writes an [`pb::Envelope`] as proto3 JSON.
///
/// # Errors
/// As [`message_to_json`].
pub fn envelope_to_json(envelope: &pb::Envelope) -> Result<Vec<u8>, AgentError> {
    Ok(message_to_json(proto::ENVELOPE_MESSAGE, envelope)?)
}

/// Full names of the other messages the agent writes as JSON.
pub const DELIVERY_MESSAGE: &str = "safeguarding.v1.Delivery";
pub const SEND_RESPONSE_MESSAGE: &str = "safeguarding.v1.SendResponse";
pub const TRACK_RESPONSE_MESSAGE: &str = "safeguarding.v1.TrackResponse";

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "kind": "MESSAGE_KIND_REFERRAL",
        "purpose": "safeguarding-referral",
        "urgency": "URGENCY_PRIORITY",
        "recipients": ["luton-csc"],
        "subject": {"givenName": "Test", "family_name": "Child", "date_of_birth": {"year": 2017, "month": 3, "day": 9}},
        "agreement": {"state": "AGREEMENT_STATE_NOT_SOUGHT", "override_reason": "OVERRIDE_REASON_RISK_OF_SIGNIFICANT_HARM"},
        "created_at": "2026-03-02T09:15:00Z",
        "referral": {"concern": {"facts": "fictional facts", "categories": ["neglect"]}, "immediate_risk": true}
    }"#;

    #[test]
    fn envelope_round_trips_through_json() {
        let envelope = read_envelope_json(SAMPLE.as_bytes()).unwrap();
        assert_eq!(envelope.kind, pb::MessageKind::Referral as i32);
        assert_eq!(envelope.recipients, vec!["luton-csc".to_owned()]);
        let subject = envelope.subject.as_ref().unwrap();
        assert_eq!(subject.given_name, "Test");
        assert_eq!(subject.date_of_birth.as_ref().unwrap().year, 2017);
        assert_eq!(envelope.created_at.as_ref().unwrap().seconds, 1_772_442_900);
        let Some(pb::envelope::Body::Referral(referral)) = &envelope.body else {
            panic!("the body should be a referral")
        };
        assert!(referral.immediate_risk);

        let written = envelope_to_json(&envelope).unwrap();
        let text = String::from_utf8(written.clone()).unwrap();
        assert!(text.contains("\"given_name\": \"Test\""), "{text}");
        assert!(text.contains("\"MESSAGE_KIND_REFERRAL\""), "{text}");
        assert_eq!(read_envelope_json(&written).unwrap(), envelope);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let misspelt = r#"{"kind": "MESSAGE_KIND_REFERRAL", "recipents": ["luton-csc"]}"#;
        let error = read_envelope_json(misspelt.as_bytes()).unwrap_err().to_string();
        assert!(error.contains("recipents"), "{error}");

        let bad_enum = r#"{"kind": "MESSAGE_KIND_GOSSIP"}"#;
        assert!(read_envelope_json(bad_enum.as_bytes()).is_err());
        assert!(read_envelope_json(b"{} trailing").is_err());
        assert!(read_envelope_json(b"not json").is_err());
    }

    #[test]
    fn delivery_is_written_with_its_envelope() {
        let envelope = read_envelope_json(SAMPLE.as_bytes()).unwrap();
        let delivery = pb::Delivery {
            delivery_id: "0190f0aa-0000-7000-8000-000000000001.luton-csc".into(),
            message_id: "0190f0aa-0000-7000-8000-000000000001".into(),
            attempt: 2,
            envelope: Some(envelope),
            obligations: Some(pb::Obligations { acknowledge_within_seconds: 3600, ..Default::default() }),
            ..Default::default()
        };
        let written = message_to_json(DELIVERY_MESSAGE, &delivery).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(value["delivery_id"], "0190f0aa-0000-7000-8000-000000000001.luton-csc");
        assert_eq!(value["obligations"]["acknowledge_within_seconds"], "3600");
        assert_eq!(value["envelope"]["referral"]["immediate_risk"], true);
        let read: pb::Delivery = read_message_json(DELIVERY_MESSAGE, &written).unwrap();
        assert_eq!(read, delivery);
    }
}
