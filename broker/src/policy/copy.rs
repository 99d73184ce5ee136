//! Building a recipient's copy from the allowed fields only (DESIGN.md invariant 3).
//!
//! Two builders with the same semantics, both driven by the prost-reflect descriptors of `proto::descriptor_pool()`:
//!
//! - [`build_copy_encoded`] (used by `PolicySet::build_copy_encoded`, and so by every send) walks the sender's
//!   encoded envelope and writes into an empty buffer only the fields the decision's mask holds, recursing into
//!   every message field through a [`WirePlan`] compiled from the descriptors, so a field held whole is still written
//!   field by field. Bytes in, bytes out: a send encodes its envelope once for all its recipients and stores each
//!   copy as it comes out, so on the send's path nothing is decoded or encoded again per recipient. [`build_copy`]
//!   wraps it for callers that hold decoded messages (tests, tools).
//! - [`build_copy_dynamic`] reads the envelope into a `DynamicMessage` and fills an empty `DynamicMessage` field by
//!   field. It is the reference implementation; tests check both give the same copy.
//!
//! In both, fields the descriptors do not know (which protobuf keeps as unknown fields) are never carried over, and
//! nothing is ever copied and then cleared.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use super::Decision;
use super::fields::{FieldMask, MaskNode, WirePlan};

/// Why a copy could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyError {
    #[error("the decision refused this recipient, so there is no copy to build")]
    NotPermitted,
    #[error("the message could not be read against the broker's descriptors: {0}")]
    Decode(String),
    #[error("the recipient's copy could not be encoded: {0}")]
    Encode(String),
}

/// The copy of `encoded` (an encoded `pb::Envelope`) that `decision` allows, encoded.
pub fn build_copy_encoded(plan: &WirePlan, encoded: &[u8], decision: &Decision) -> Result<Vec<u8>, CopyError> {
    let mask = match (&decision.mask, decision.permitted) {
        (Some(mask), true) => mask,
        _ => return Err(CopyError::NotPermitted),
    };
    let mut copy = Vec::with_capacity(encoded.len());
    super::fields::copy_wire(encoded, plan, Some(mask), &mut copy)
        .map_err(|_| CopyError::Decode("the encoded message is malformed".to_owned()))?;
    Ok(copy)
}

/// [`build_copy_encoded`] for a decoded envelope, giving a decoded copy.
pub fn build_copy(
    plan: &WirePlan,
    envelope: &proto::pb::Envelope,
    decision: &Decision,
) -> Result<proto::pb::Envelope, CopyError> {
    let encoded = build_copy_encoded(plan, &envelope.encode_to_vec(), decision)?;
    proto::pb::Envelope::decode(encoded.as_slice()).map_err(|error| CopyError::Encode(error.to_string()))
}

/// The reference builder over `DynamicMessage`s; same result as [`build_copy`].
pub fn build_copy_dynamic(
    descriptor: &MessageDescriptor,
    envelope: &proto::pb::Envelope,
    decision: &Decision,
) -> Result<proto::pb::Envelope, CopyError> {
    let mask = match (&decision.mask, decision.permitted) {
        (Some(mask), true) => mask,
        _ => return Err(CopyError::NotPermitted),
    };
    let bytes = envelope.encode_to_vec();
    let source = DynamicMessage::decode(descriptor.clone(), bytes.as_slice())
        .map_err(|error| CopyError::Decode(error.to_string()))?;
    let copy = copy_dynamic(&source, mask);
    let encoded = copy.encode_to_vec();
    proto::pb::Envelope::decode(encoded.as_slice()).map_err(|error| CopyError::Encode(error.to_string()))
}

/// Builds a `DynamicMessage` copy of `source` holding only what `mask` allows (exposed for tests and benchmarks
/// that work on dynamic messages directly).
pub fn copy_dynamic(source: &DynamicMessage, mask: &MaskNode) -> DynamicMessage {
    let mut copy = DynamicMessage::new(source.descriptor());
    copy_node(source, &mut copy, mask);
    copy
}

fn copy_message(source: &DynamicMessage, mask: &FieldMask) -> DynamicMessage {
    let mut copy = DynamicMessage::new(source.descriptor());
    match mask {
        FieldMask::Whole => {
            for field in source.descriptor().fields() {
                copy_field(source, &mut copy, &field, &FieldMask::Whole);
            }
        }
        FieldMask::Partial(node) => copy_node(source, &mut copy, node),
    }
    copy
}

fn copy_node(source: &DynamicMessage, copy: &mut DynamicMessage, node: &MaskNode) {
    for (field, mask) in &node.fields {
        copy_field(source, copy, field, mask);
    }
}

fn copy_field(source: &DynamicMessage, copy: &mut DynamicMessage, field: &FieldDescriptor, mask: &FieldMask) {
    if !source.has_field(field) {
        return;
    }
    let value = source.get_field(field);
    copy.set_field(field, copy_value(&value, mask));
}

fn copy_value(value: &Value, mask: &FieldMask) -> Value {
    match value {
        Value::Message(message) => Value::Message(copy_message(message, mask)),
        Value::List(items) => Value::List(items.iter().map(|item| copy_value(item, mask)).collect()),
        Value::Map(entries) => {
            Value::Map(entries.iter().map(|(key, item)| (key.clone(), copy_value(item, &FieldMask::Whole))).collect())
        }
        scalar => scalar.clone(),
    }
}
