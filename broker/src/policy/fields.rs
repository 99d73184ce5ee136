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
        return Err(PathError {
            message: "empty field path".to_owned(),
        });
    }
    let mut message = root.clone();
    let mut fields = Vec::new();
    let segments: Vec<&str> = path.split('.').collect();
    for (position, segment) in segments.iter().enumerate() {
        let Some(field) = message.get_field_by_name(segment) else {
            let known: Vec<String> = message.fields().map(|field| field.name().to_owned()).collect();
            let parent = if position == 0 {
                "the envelope".to_owned()
            } else {
                format!("`{}`", segments[..position].join("."))
            };
            let suggestion = nearest_name(segment, &known)
                .map(|name| format!("; did you mean `{name}`?"))
                .unwrap_or_default();
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
}

impl MaskNode {
    /// A mask holding nothing of `message`.
    pub fn empty(message: MessageDescriptor) -> MaskNode {
        MaskNode {
            message,
            fields: Vec::new(),
        }
    }

    /// A mask holding every known field of `message`.
    fn everything(message: &MessageDescriptor) -> MaskNode {
        MaskNode {
            message: message.clone(),
            fields: message.fields().map(|field| (field, FieldMask::Whole)).collect(),
        }
        .sorted()
    }

    fn sorted(mut self) -> MaskNode {
        self.fields.sort_by_key(|(field, _)| field.number());
        self
    }

    fn position(&self, number: u32) -> Result<usize, usize> {
        self.fields.binary_search_by_key(&number, |(field, _)| field.number())
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
        }
    }

    /// Adds everything `other` holds.
    pub fn union_with(&mut self, other: &MaskNode) {
        for (field, other_mask) in &other.fields {
            match self.position(field.number()) {
                Err(index) => self.fields.insert(index, (field.clone(), other_mask.clone())),
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
    scan(bytes, &node.message, Some(node), "", out);
}

fn push_unique(out: &mut Vec<String>, path: String) {
    if !out.contains(&path) {
        out.push(path);
    }
}

fn scan(bytes: &[u8], message: &MessageDescriptor, node: Option<&MaskNode>, prefix: &str, out: &mut Vec<String>) {
    let mut reader = WireReader { bytes, position: 0 };
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
        let Some(field) = message.get_field(number) else {
            push_unique(out, format!("{prefix}#{number}"));
            continue;
        };
        match node.and_then(|node| node.get(number)) {
            None => push_unique(out, format!("{prefix}{}", field.name())),
            Some(FieldMask::Whole) => {}
            Some(FieldMask::Partial(child)) => {
                if let (Kind::Message(child_message), Some(payload)) = (field.kind(), payload) {
                    let child_prefix = format!("{prefix}{}.", field.name());
                    scan(payload, &child_message, Some(child), &child_prefix, out);
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
