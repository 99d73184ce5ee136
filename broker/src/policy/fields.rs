//! Field paths into the envelope and the field masks built from them.
//!
//! A policy names fields as dotted paths from `safeguarding.v1.Envelope` (`subject.given_name`,
//! `referral.household.given_name`: a path through a repeated message applies to every element). [`resolve_path`]
//! checks a path against the proto descriptors. A [`MaskNode`] is the compiled form of a set of paths: a tree of the
//! fields a recipient may see, where a leaf shares the whole field (for a message field: every known field in it,
//! recursively). Masks are combined by union (several permits) and subtraction (withheld fields always win).
//! [`withheld_paths`] walks an encoded message and lists the fields present in it that a mask does not hold, without
//! decoding it into an intermediate structure.

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

/// The envelope fields every recipient copy holds: routing and correlation facts, not personal data.
/// `recipients` is not one of them: who else received a message is itself shared only when a rule says so.
pub const ROUTING_FACTS: [&str; 9] = [
    "message_id",
    "kind",
    "purpose",
    "urgency",
    "correlation_id",
    "corrects",
    "created_at",
    "sender_role",
    "recipient_role",
];

/// Why a field path does not name a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub message: String,
}

/// Resolves a dotted path against `root`, returning the field descriptors along it.
pub fn resolve_path(root: &MessageDescriptor, path: &str) -> Result<Vec<FieldDescriptor>, PathError> {
    if path.is_empty() {
        return Err(PathError { message: "empty field path".to_owned() });
    }
    let mut message = root.clone();
    let mut fields = Vec::new();
    let segments: Vec<&str> = path.split('.').collect();
    for (position, segment) in segments.iter().enumerate() {
        let Some(field) = message.get_field_by_name(segment) else {
            let known: Vec<String> = message.fields().map(|field| field.name().to_owned()).collect();
            let parent =
                if position == 0 { "the envelope".to_owned() } else { format!("`{}`", segments[..position].join(".")) };
            let suggestion =
                nearest_name(segment, &known).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default();
            return Err(PathError {
                message: format!("`{segment}` is not a field of {parent} in field path `{path}`{suggestion}"),
            });
        };
        let is_last = position + 1 == segments.len();
        if !is_last {
            match field.kind() {
                Kind::Message(child) if !field.is_map() => message = child,
                _ => {
                    return Err(PathError {
                        message: format!(
                            "`{}` in field path `{path}` has no fields inside it; name it without `.{}`",
                            segments[..=position].join("."),
                            segments[position + 1..].join(".")
                        ),
                    });
                }
            }
        }
        fields.push(field);
    }
    Ok(fields)
}

/// The known name closest to `given` by edit distance, if it is close enough to be a likely misspelling.
pub fn nearest_name(given: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|name| (edit_distance(given, name), name))
        .filter(|(distance, name)| *distance <= 2.max(name.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name.clone())
}

fn edit_distance(left: &str, right: &str) -> usize {
    let right_chars: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right_chars.len()).collect();
    for (left_index, left_char) in left.chars().enumerate() {
        let mut current = vec![left_index + 1];
        for (right_index, right_char) in right_chars.iter().enumerate() {
            let substitution = previous[right_index] + usize::from(left_char != *right_char);
            let insertion = current[right_index] + 1;
            let deletion = previous[right_index + 1] + 1;
            current.push(substitution.min(insertion).min(deletion));
        }
        previous = current;
    }
    previous[right_chars.len()]
}

/// What a mask holds of one field.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldMask {
    /// The whole field: for a message field, every known field inside it, recursively.
    Whole,
    /// Only the listed fields inside this message field.
    Partial(MaskNode),
}

/// The fields of one message that a mask holds, sorted by field number.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskNode {
    pub message: MessageDescriptor,
    pub fields: Vec<(FieldDescriptor, FieldMask)>,
    /// The field numbers of `fields`, in the same order: looked up on every decision, so kept apart from the
    /// descriptors (whose `number()` goes through the descriptor pool).
    numbers: Vec<u32>,
}

impl MaskNode {
    /// A mask holding nothing of `message`.
    pub fn empty(message: MessageDescriptor) -> MaskNode {
        MaskNode { message, fields: Vec::new(), numbers: Vec::new() }
    }

    /// A mask holding every known field of `message`.
    fn everything(message: &MessageDescriptor) -> MaskNode {
        MaskNode {
            message: message.clone(),
            fields: message.fields().map(|field| (field, FieldMask::Whole)).collect(),
            numbers: Vec::new(),
        }
        .sorted()
    }

    fn sorted(mut self) -> MaskNode {
        self.fields.sort_by_key(|(field, _)| field.number());
        self.numbers = self.fields.iter().map(|(field, _)| field.number()).collect();
        self
    }

    fn position(&self, number: u32) -> Result<usize, usize> {
        self.numbers.binary_search(&number)
    }

    /// The mask of the field numbered `number`, if the mask holds any of it.
    pub fn get(&self, number: u32) -> Option<&FieldMask> {
        self.position(number).ok().map(|index| &self.fields[index].1)
    }

    /// Adds a resolved path (every field of it, when it ends in a message field).
    pub fn insert(&mut self, path: &[FieldDescriptor]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let index = match self.position(first.number()) {
            Ok(index) => index,
            Err(index) => {
                let initial = if rest.is_empty() {
                    FieldMask::Whole
                } else {
                    match first.kind() {
                        Kind::Message(child) => FieldMask::Partial(MaskNode::empty(child)),
                        _ => FieldMask::Whole,
                    }
                };
                self.fields.insert(index, (first.clone(), initial));
                self.numbers.insert(index, first.number());
                index
            }
        };
        if rest.is_empty() {
            self.fields[index].1 = FieldMask::Whole;
            return;
        }
        if let FieldMask::Partial(child) = &mut self.fields[index].1 {
            child.insert(rest);
        }
    }

    /// Removes a resolved path: the copy will not hold it, whatever else the mask holds.
    pub fn remove(&mut self, path: &[FieldDescriptor]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let Ok(index) = self.position(first.number()) else {
            return;
        };
        if rest.is_empty() {
            self.fields.remove(index);
            self.numbers.remove(index);
            return;
        }
        let entry = &mut self.fields[index].1;
        if let FieldMask::Whole = entry {
            match first.kind() {
                Kind::Message(child) => *entry = FieldMask::Partial(MaskNode::everything(&child)),
                _ => return,
            }
        }
        let now_empty = match entry {
            FieldMask::Partial(child) => {
                child.remove(rest);
                child.fields.is_empty()
            }
            FieldMask::Whole => false,
        };
        if now_empty {
            self.fields.remove(index);
            self.numbers.remove(index);
        }
    }

    /// Adds everything `other` holds.
    pub fn union_with(&mut self, other: &MaskNode) {
        for (field, other_mask) in &other.fields {
            match self.position(field.number()) {
                Err(index) => {
                    self.fields.insert(index, (field.clone(), other_mask.clone()));
                    self.numbers.insert(index, field.number());
                }
                Ok(index) => {
                    let mine = &mut self.fields[index].1;
                    match (mine, other_mask) {
                        (FieldMask::Whole, _) => {}
                        (mine @ FieldMask::Partial(_), FieldMask::Whole) => *mine = FieldMask::Whole,
                        (FieldMask::Partial(mine), FieldMask::Partial(theirs)) => mine.union_with(theirs),
                    }
                }
            }
        }
    }

    /// Whether the mask holds the field at `path` (itself or through a parent held whole).
    pub fn covers(&self, path: &[FieldDescriptor]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return true;
        };
        match self.get(first.number()) {
            None => false,
            Some(FieldMask::Whole) => true,
            Some(FieldMask::Partial(child)) => {
                // A partial node holds the field itself only in part; the field as a whole is covered only when a
                // deeper path is asked for and is covered.
                !rest.is_empty() && child.covers(rest)
            }
        }
    }

    /// Whether the mask holds any part of the field at `path`.
    pub fn touches(&self, path: &[FieldDescriptor]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return true;
        };
        match self.get(first.number()) {
            None => false,
            Some(FieldMask::Whole) => true,
            Some(FieldMask::Partial(child)) => child.touches(rest),
        }
    }

    /// The dotted paths of the leaves of this mask, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths("", &mut out);
        out.sort();
        out
    }

    fn collect_paths(&self, prefix: &str, out: &mut Vec<String>) {
        for (field, mask) in &self.fields {
            let path = format!("{prefix}{}", field.name());
            match mask {
                FieldMask::Whole => out.push(path),
                FieldMask::Partial(child) => child.collect_paths(&format!("{path}."), out),
            }
        }
    }
}

/// Lists, as dotted paths, the fields present in the encoded message `bytes` (of type `node.message`) that the mask
/// does not hold. Fields the descriptors do not know are listed as `#<number>` under their parent path. Paths under
/// repeated fields are listed once.
pub fn withheld_paths(bytes: &[u8], node: &MaskNode, out: &mut Vec<String>) {
    let mut reported = 0u128;
    scan(bytes, &node.message, Some(node), "", &mut reported, out);
}

fn push_unique(out: &mut Vec<String>, path: String) {
    if !out.contains(&path) {
        out.push(path);
    }
}

/// Scans one encoded message. `reported` has bit `n` set once field `n` of this message (at this path) has been
/// listed, so the elements of a repeated field after the first cost a bit test per field.
fn scan(
    bytes: &[u8],
    message: &MessageDescriptor,
    node: Option<&MaskNode>,
    prefix: &str,
    reported: &mut u128,
    out: &mut Vec<String>,
) {
    let mut reader = WireReader { bytes, position: 0 };
    // Elements of a repeated field arrive one after another: their prefix and reported set are built once.
    let mut child: Option<(u32, String, u128)> = None;
    while reader.position < reader.bytes.len() {
        let Some(tag) = reader.varint() else {
            push_unique(out, format!("{prefix}#malformed"));
            return;
        };
        let number = u32::try_from(tag >> 3).unwrap_or(0);
        let payload: Result<Option<&[u8]>, ()> = match tag & 7 {
            0 => reader.varint().map(|_| None).ok_or(()),
            1 => reader.skip(8).map(|()| None).ok_or(()),
            2 => reader.length_delimited().map(Some).ok_or(()),
            5 => reader.skip(4).map(|()| None).ok_or(()),
            _ => Err(()),
        };
        let Ok(payload) = payload else {
            push_unique(out, format!("{prefix}#malformed"));
            return;
        };
        let bit = if number < 128 { 1u128 << number } else { 0 };
        match node.and_then(|node| node.get(number)) {
            Some(FieldMask::Whole) => {}
            None => {
                if *reported & bit != 0 {
                    continue;
                }
                *reported |= bit;
                match message.get_field(number) {
                    Some(field) => push_unique(out, format!("{prefix}{}", field.name())),
                    None => push_unique(out, format!("{prefix}#{number}")),
                }
            }
            Some(FieldMask::Partial(child_node)) => {
                let Some(field) = message.get_field(number) else {
                    continue;
                };
                if let (Kind::Message(child_message), Some(payload)) = (field.kind(), payload) {
                    if child.as_ref().is_none_or(|(cached, _, _)| *cached != number) {
                        child = Some((number, format!("{prefix}{}.", field.name()), 0));
                    }
                    if let Some((_, child_path, child_reported)) = &mut child {
                        scan(payload, &child_message, Some(child_node), child_path, child_reported, out);
                    }
                }
            }
        }
    }
}

struct WireReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> WireReader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for shift in 0..10 {
            let byte = *self.bytes.get(self.position)?;
            self.position += 1;
            value |= u64::from(byte & 0x7f) << (shift * 7);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn skip(&mut self, count: usize) -> Option<()> {
        let end = self.position.checked_add(count)?;
        if end > self.bytes.len() {
            return None;
        }
        self.position = end;
        Some(())
    }

    fn length_delimited(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.varint()?).ok()?;
        let start = self.position;
        self.skip(length)?;
        self.bytes.get(start..start + length)
    }
}

/// Why an encoded message could not be copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedMessage;

/// The message types reachable from the envelope, compiled for copying: each type's known field numbers and, for
/// message fields, which type they hold. Built once per policy set, so a copy walks plain sorted arrays instead of
/// asking the descriptor pool about every field it meets (`MessageDescriptor::get_field` and `FieldDescriptor::kind`
/// were 13% of a copy's time in a profile of the 16 KiB referral).
#[derive(Debug)]
pub struct WirePlan {
    /// Index 0 is the root type.
    messages: Vec<MessagePlan>,
}

/// One message type of a [`WirePlan`].
#[derive(Debug, Default)]
struct MessagePlan {
    /// Known field numbers, sorted.
    numbers: Vec<u32>,
    /// For each of `numbers`: the index in [`WirePlan::messages`] of the type a message field holds, `None` for
    /// every other kind of field.
    children: Vec<Option<usize>>,
}

impl WirePlan {
    /// Compiles every message type reachable from `root` (each once, so recursive types are fine).
    pub fn new(root: &MessageDescriptor) -> WirePlan {
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut types = vec![root.clone()];
        index.insert(root.full_name().to_owned(), 0);
        let mut messages = Vec::new();
        let mut next = 0;
        while let Some(message) = types.get(next).cloned() {
            let mut fields: Vec<(u32, Option<usize>)> = Vec::new();
            for field in message.fields() {
                let child = match field.kind() {
                    Kind::Message(child) => Some(match index.get(child.full_name()) {
                        Some(known) => *known,
                        None => {
                            index.insert(child.full_name().to_owned(), types.len());
                            types.push(child);
                            types.len() - 1
                        }
                    }),
                    _ => None,
                };
                fields.push((field.number(), child));
            }
            fields.sort_unstable_by_key(|(number, _)| *number);
            messages.push(MessagePlan {
                numbers: fields.iter().map(|(number, _)| *number).collect(),
                children: fields.iter().map(|(_, child)| *child).collect(),
            });
            next += 1;
        }
        WirePlan { messages }
    }

    /// Whether field `number` of type `message` is known, and if it is a message field, the type it holds.
    fn field(&self, message: usize, number: u32) -> Option<Option<usize>> {
        let plan = self.messages.get(message)?;
        let position = plan.numbers.binary_search(&number).ok()?;
        plan.children.get(position).copied()
    }
}

/// Writes to `out` the fields of the encoded message `bytes` (of the root type of `plan`) that `node` holds (`None`:
/// every known field), recursing into message fields so that only fields the descriptors know are ever written.
/// Fields are copied, never removed: what is not held, and every unknown field, is simply not written. `out` gets
/// the fields in the order `bytes` has them, so a canonically encoded message gives a canonically encoded copy.
pub fn copy_wire(
    bytes: &[u8],
    plan: &WirePlan,
    node: Option<&MaskNode>,
    out: &mut Vec<u8>,
) -> Result<(), MalformedMessage> {
    copy_message(bytes, plan, 0, node, out)
}

fn copy_message(
    bytes: &[u8],
    plan: &WirePlan,
    message: usize,
    node: Option<&MaskNode>,
    out: &mut Vec<u8>,
) -> Result<(), MalformedMessage> {
    let mut reader = WireReader { bytes, position: 0 };
    while reader.position < reader.bytes.len() {
        let field_start = reader.position;
        let tag = reader.varint().ok_or(MalformedMessage)?;
        let number = u32::try_from(tag >> 3).map_err(|_| MalformedMessage)?;
        let wire_type = tag & 7;
        let payload = match wire_type {
            0 => reader.varint().map(|_| None),
            1 => reader.skip(8).map(|()| None),
            2 => reader.length_delimited().map(Some),
            5 => reader.skip(4).map(|()| None),
            _ => None,
        }
        .ok_or(MalformedMessage)?;
        let Some(child_type) = plan.field(message, number) else {
            continue;
        };
        let mask = match node {
            None => Some(&FieldMask::Whole),
            Some(node) => node.get(number),
        };
        let Some(mask) = mask else {
            continue;
        };
        match (child_type, payload) {
            (Some(child_type), Some(payload)) => {
                let child_node = match mask {
                    FieldMask::Whole => None,
                    FieldMask::Partial(child) => Some(child),
                };
                // Write the child in place after room for its length; the copy is never longer than the original,
                // so the room is enough, and if the length needs fewer bytes the child is moved back.
                write_varint(out, tag);
                let mut room = [0u8; 10];
                let room_len = varint_into(payload.len() as u64, &mut room);
                let length_at = out.len();
                out.extend_from_slice(&room[..room_len]);
                let child_at = out.len();
                copy_message(payload, plan, child_type, child_node, out)?;
                let child_len = out.len() - child_at;
                let mut length = [0u8; 10];
                let length_len = varint_into(child_len as u64, &mut length);
                out[length_at..length_at + length_len].copy_from_slice(&length[..length_len]);
                if length_len < room_len {
                    out.copy_within(child_at.., length_at + length_len);
                    out.truncate(length_at + length_len + child_len);
                }
            }
            // A message field must be length-delimited; anything else is not a value of this field.
            (Some(_), None) => {}
            (None, _) => out.extend_from_slice(&reader.bytes[field_start..reader.position]),
        }
    }
    Ok(())
}

fn write_varint(out: &mut Vec<u8>, value: u64) {
    let mut bytes = [0u8; 10];
    let length = varint_into(value, &mut bytes);
    out.extend_from_slice(&bytes[..length]);
}

/// Encodes `value` as a varint into `bytes`, returning how many bytes it took (at most 10).
fn varint_into(mut value: u64, bytes: &mut [u8; 10]) -> usize {
    let mut length = 0;
    while value >= 0x80 && length < 9 {
        bytes[length] = (value as u8) | 0x80;
        value >>= 7;
        length += 1;
    }
    bytes[length] = value as u8;
    length + 1
}
