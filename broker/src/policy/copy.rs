//! Building a recipient's copy from the allowed fields only (DESIGN.md invariant 3).
//!
//! The sender's envelope is read into a prost-reflect `DynamicMessage`; the copy starts as an empty
//! `DynamicMessage` and receives, field by field and recursively, only what the decision's mask holds. A field held
//! whole is still copied field by field through its descriptor, so fields the descriptors do not know (which
//! protobuf keeps as unknown fields) are never carried over, and nothing is ever copied and then cleared.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use super::Decision;
use super::fields::{FieldMask, MaskNode};

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

pub fn build_copy(
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
        Value::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|(key, item)| (key.clone(), copy_value(item, &FieldMask::Whole)))
                .collect(),
        ),
        scalar => scalar.clone(),
    }
}
