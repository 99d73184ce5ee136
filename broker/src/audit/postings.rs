//! One index key's postings: the ascending sequence numbers of the audit entries indexed under it, held compactly.
//!
//! Most keys hold a handful of entries (every message id is a key, with its decision, delivery and acknowledgement
//! entries; most children and practitioners appear in a few messages), while a few keys hold most of the log (an
//! agency, a rule). A list is held as varints: the first sequence number, then each one's difference from the one
//! before it, in a small vector whose first 16 bytes live inline, so that a message's entries need no allocation of
//! their own. Every [`SKIP_BYTES`] bytes or so a skip records where a varint starts and the sequence number before it,
//! so that a lookup from a given sequence number decodes about that many bytes (at most one varint more) before it
//! finds its place instead of the whole list.
//!
//! Held as `Vec<u64>` each with its own allocation, as before, a key cost 8 bytes per posting plus 16–32 bytes of
//! vector and ~16 bytes of allocator overhead: about 6 MB of the broker's memory with 100,000 messages queued
//! (PERFORMANCE.md, eighth session). The varints are prost's, which encodes every
//! message the broker handles.

use prost::encoding::{decode_varint, encode_varint};
use smallvec::SmallVec;

/// How many bytes of varints lie between skips, at least.
const SKIP_BYTES: usize = 256;

/// A key's sequence numbers, ascending, without repeats.
#[derive(Debug, Default, Clone)]
pub struct Postings {
    /// The first sequence number, then the differences, as varints.
    bytes: SmallVec<[u8; 16]>,
    /// The last sequence number pushed (meaningless while `bytes` is empty).
    last: u64,
    /// `(sequence number before, byte offset)`: the varints from the offset on decode to the postings after that
    /// sequence number. Ascending in both; none until the list outgrows [`SKIP_BYTES`]. Boxed so that the many lists
    /// without skips spend 8 bytes on them, not a `Vec`'s 24.
    #[allow(clippy::box_collection)]
    skips: Option<Box<Vec<(u64, usize)>>>,
}

impl Postings {
    /// Appends `sequence`, which must be greater than every sequence number already held; returns false (holding
    /// nothing new) if it is not.
    pub fn push(&mut self, sequence: u64) -> bool {
        let delta = match self.last() {
            None => sequence,
            Some(last) if sequence > last => sequence - last,
            Some(_) => return false,
        };
        let at = self.bytes.len();
        if at > 0 {
            let since = self.skips.as_ref().and_then(|skips| skips.last()).map_or(0, |(_, offset)| *offset);
            if at - since >= SKIP_BYTES {
                self.skips.get_or_insert_default().push((self.last, at));
            }
        }
        if delta < 0x80 {
            // The usual difference in a busy key's list: one byte.
            self.bytes.push(delta as u8);
        } else {
            let mut varint = [0u8; 10];
            let mut free = &mut varint[..];
            encode_varint(delta, &mut free);
            let written = 10 - free.len();
            self.bytes.extend_from_slice(&varint[..written]);
        }
        self.last = sequence;
        true
    }

    /// The greatest sequence number held.
    pub fn last(&self) -> Option<u64> {
        (!self.bytes.is_empty()).then_some(self.last)
    }

    /// The sequence numbers held from `first` on, ascending.
    pub fn from(&self, first: u64) -> Iter<'_> {
        let mut iter = Iter { rest: &self.bytes, previous: None, first };
        if let Some(skips) = &self.skips {
            // The last skip whose postings all lie before `first` up to its offset.
            let before = skips.partition_point(|(previous, _)| *previous < first);
            if let Some((previous, offset)) = before.checked_sub(1).and_then(|index| skips.get(index)) {
                iter.rest = self.bytes.get(*offset..).unwrap_or_default();
                iter.previous = Some(*previous);
            }
        }
        iter
    }

    /// Bytes held beyond the struct itself (for tests and measurements).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let bytes = if self.bytes.spilled() { self.bytes.capacity() } else { 0 };
        bytes + self.skips.as_ref().map_or(0, |skips| skips.capacity() * 16 + 24)
    }
}

/// The sequence numbers of a [`Postings`] from a given one on.
pub struct Iter<'a> {
    rest: &'a [u8],
    previous: Option<u64>,
    first: u64,
}

impl Iterator for Iter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while !self.rest.is_empty() {
            // Only `push` wrote these bytes: a varint that does not decode ends the list rather than panicking.
            let delta = decode_varint(&mut self.rest).ok()?;
            let value = match self.previous {
                None => delta,
                Some(previous) => previous.checked_add(delta)?,
            };
            self.previous = Some(value);
            if value >= self.first {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(postings: &Postings, first: u64) -> Vec<u64> {
        postings.from(first).collect()
    }

    #[test]
    fn postings_read_back_from_any_point_as_pushed() {
        // Gaps of every varint length, and long enough for many skips.
        let mut sequences = Vec::new();
        let mut next = 0u64;
        for step in 0..5_000u64 {
            sequences.push(next);
            next += match step % 7 {
                0 => 1,
                1 => 127,
                2 => 128,
                3 => 16_384,
                4 => 3,
                5 => 1 << 35,
                _ => 2,
            };
        }
        let mut postings = Postings::default();
        assert_eq!(postings.last(), None);
        for sequence in &sequences {
            assert!(postings.push(*sequence));
        }
        assert!(postings.skips.as_ref().is_some_and(|skips| skips.len() > 10), "a long list has skips");
        assert_eq!(postings.last(), sequences.last().copied());
        assert_eq!(held(&postings, 0), sequences);
        for first in [0, 1, 2, 127, 128, 129, sequences[2_500], sequences[2_500] + 1, next - 1, next, u64::MAX] {
            let expected: Vec<u64> = sequences.iter().copied().filter(|sequence| *sequence >= first).collect();
            assert_eq!(held(&postings, first), expected, "from {first}");
        }
        // From every skip's own sequence number, and the ones either side of it.
        for (previous, _) in postings.skips.as_deref().cloned().unwrap_or_default() {
            for first in [previous.saturating_sub(1), previous, previous + 1] {
                let expected: Vec<u64> = sequences.iter().copied().filter(|sequence| *sequence >= first).collect();
                assert_eq!(held(&postings, first), expected, "from {first}");
            }
        }
    }

    #[test]
    fn only_ascending_sequence_numbers_are_taken() {
        let mut postings = Postings::default();
        assert!(postings.push(5));
        assert!(!postings.push(5), "a repeat");
        assert!(!postings.push(4), "going back");
        assert!(postings.push(u64::MAX));
        assert_eq!(held(&postings, 0), vec![5, u64::MAX]);
        let mut zero = Postings::default();
        assert!(zero.push(0));
        assert!(!zero.push(0));
        assert_eq!(held(&zero, 0), vec![0]);
        assert!(held(&zero, 1).is_empty());
    }

    #[test]
    fn a_message_keys_few_postings_need_no_allocation_of_their_own() {
        // A message's decision, delivery and acknowledgement entries, far into a large log.
        let mut postings = Postings::default();
        for sequence in [9_000_000_000u64, 9_000_000_003, 9_000_004_000] {
            postings.push(sequence);
        }
        assert_eq!(postings.heap_bytes(), 0);
        assert!(std::mem::size_of::<Postings>() <= 40, "{}", std::mem::size_of::<Postings>());
    }
}
