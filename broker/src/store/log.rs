//! An append-only file of framed records, written in batches and made durable with `fdatasync`.
//!
//! Frame: `len: u32 LE | crc32(payload): u32 LE | payload`. The broker keeps such files: the audit log
//! (`audit/entries.log`, see [`crate::audit`], made durable only now and then: its newest entries are durable in the
//! journal) and the signed checkpoints. The state journal uses the same frame in segment files written ahead
//! ([`super::journal`]); an older broker's single journal file, `journal.log`, was one of these files.
//!
//! How opening treats a record it cannot read is the caller's choice ([`Tail`]). For a file made durable after every
//! batch ([`Tail::TornOnly`]): a crash can leave a torn last record (a partial frame, or a frame whose checksum fails
//! and that runs to the end of the file), which opening truncates (it was never acknowledged, because acknowledgement
//! waits for the `fdatasync` that follows a complete write), while a bad frame followed by more data is corruption,
//! not a torn write, and opening fails with [`LogError::Corrupt`]. For a file made durable only up to a recorded
//! point ([`Tail::DurableTo`]), any bad frame before that point is corruption, and the first one after it ends the
//! log.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

/// Largest record accepted (a message with all its recipient copies must fit).
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

/// Bytes before each record's payload (length and CRC).
pub const HEADER_BYTES: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`{path}`: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("`{path}` is corrupt at byte offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("a record of {0} bytes is larger than the largest allowed")]
    TooLarge(usize),
}

/// The append-only file, positioned at its end.
pub struct AppendLog {
    path: PathBuf,
    file: File,
    len: u64,
    scratch: Vec<u8>,
}

/// Whether [`AppendLog::open_until`] keeps a record (and reads on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Yes,
    No,
}

/// How [`AppendLog::open_until`] treats a record it cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// For a file made durable after every batch: only a torn last record (a partial frame, or a bad checksum
    /// running to the end of the file) is cut off; a bad frame followed by more data is corruption.
    TornOnly,
    /// For a file made durable only now and then (the audit log, whose entries are also in the journal): every
    /// record before this byte offset was made durable and must read back whole (any bad frame there, or a file
    /// shorter than this, is corruption); from it on, the first bad frame ends the log and it and everything after
    /// it are cut off, since a power loss may leave unsynced bytes with holes (zeros) or stale data in them.
    DurableTo(u64),
}

/// What [`AppendLog::open`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Records read (from the scan offset on).
    pub records: u64,
    /// Bytes of a torn tail that were cut off.
    pub truncated_bytes: u64,
}

impl AppendLog {
    /// Opens (creating if needed) the log at `path`, reads every record from byte `scan_from` on and hands each to
    /// `visit` with its offset, and truncates a torn tail.
    pub fn open(
        path: &Path,
        scan_from: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), LogError>,
    ) -> Result<(Self, Recovery), LogError> {
        Self::open_until(path, scan_from, Tail::TornOnly, |offset, payload| visit(offset, payload).map(|()| Keep::Yes))
    }

    /// As [`AppendLog::open`], with the treatment of unreadable records given by `tail`, and `visit` may answer
    /// [`Keep::No`]: that record and every one after it are cut off like a torn tail (counted in
    /// [`Recovery::truncated_bytes`]). For records the caller can tell were never acknowledged (see
    /// [`crate::store`]), or were never made durable in this file (the audit log's tail past its durable point,
    /// which the journal puts back).
    pub fn open_until(
        path: &Path,
        scan_from: u64,
        tail: Tail,
        mut visit: impl FnMut(u64, &[u8]) -> Result<Keep, LogError>,
    ) -> Result<(Self, Recovery), LogError> {
        let io_err = |source| LogError::Io { path: path.to_owned(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let durable_to = match tail {
            Tail::TornOnly => 0,
            Tail::DurableTo(durable_to) => durable_to,
        };
        if file_len < durable_to {
            return Err(LogError::Corrupt {
                path: path.to_owned(),
                offset: file_len,
                reason: format!(
                    "the file is shorter than the {durable_to} bytes recorded as durable (for the audit log, in `durable` beside it)"
                ),
            });
        }
        let corrupt =
            |offset, reason: &str| LogError::Corrupt { path: path.to_owned(), offset, reason: reason.to_owned() };
        let mut recovery = Recovery::default();
        let scan_from = scan_from.min(file_len);
        let mut reader = BufReader::with_capacity(1 << 20, &mut file);
        reader.seek(SeekFrom::Start(scan_from)).map_err(io_err)?;
        let mut offset = scan_from;
        let mut payload = Vec::new();
        loop {
            match read_frame(&mut reader, &mut payload, file_len - offset) {
                Ok(Frame::End) => break,
                Ok(Frame::Record) => {
                    if visit(offset, &payload)? == Keep::No {
                        recovery.truncated_bytes = file_len - offset;
                        break;
                    }
                    recovery.records += 1;
                    offset += HEADER_BYTES + payload.len() as u64;
                }
                Ok(Frame::Torn) if offset < durable_to => {
                    return Err(corrupt(offset, "a record made durable is incomplete"));
                }
                Ok(Frame::BadChecksum { .. }) if offset < durable_to => {
                    return Err(corrupt(offset, "checksum mismatch in a record made durable"));
                }
                Ok(Frame::Torn) => {
                    recovery.truncated_bytes = file_len - offset;
                    break;
                }
                Ok(Frame::BadChecksum { frame_len }) => {
                    if offset + frame_len >= file_len || matches!(tail, Tail::DurableTo(_)) {
                        recovery.truncated_bytes = file_len - offset;
                        break;
                    }
                    return Err(corrupt(offset, "checksum mismatch before the end of the file"));
                }
                Err(source) => return Err(io_err(source)),
            }
        }
        drop(reader);
        if recovery.truncated_bytes > 0 {
            file.set_len(offset).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        Ok((Self { path: path.to_owned(), file, len: offset, scratch: Vec::new() }, recovery))
    }

    /// Byte length of the log, which is also the offset the next record will have.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the records (not yet durable) and returns the offset of each.
    pub fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u64>, LogError> {
        self.scratch.clear();
        let mut offsets = Vec::new();
        let mut next = self.len;
        for record in records {
            if record.len() > MAX_RECORD_BYTES {
                return Err(LogError::TooLarge(record.len()));
            }
            offsets.push(next);
            self.scratch.extend_from_slice(&(record.len() as u32).to_le_bytes());
            self.scratch.extend_from_slice(&crc32fast::hash(record).to_le_bytes());
            self.scratch.extend_from_slice(record);
            next += HEADER_BYTES + record.len() as u64;
        }
        if let Err(source) = self.file.write_all(&self.scratch) {
            // A failed write (disk full) may have written part of the batch. Cut it off so that the file still
            // ends on a record boundary; the batch is reported as failed and nothing in it was acknowledged.
            let _ = self.file.set_len(self.len);
            return Err(LogError::Io { path: self.path.clone(), source });
        }
        self.len = next;
        Ok(offsets)
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(|source| LogError::Io { path: self.path.clone(), source })
    }

    /// Cuts the log back to `len` bytes (a record boundary at or before its end): records written but never made
    /// durable, after a failed `fdatasync`, so that the next batch does not follow them. The cut is made durable
    /// before this returns: another thread's `fdatasync` may have made the records durable meanwhile, and the next
    /// batch, written in their place, must never be followed by what is left of them after a power loss.
    pub fn truncate(&mut self, len: u64) -> Result<(), LogError> {
        let len = len.min(self.len);
        let io_err = |source| LogError::Io { path: self.path.clone(), source };
        self.file.set_len(len).map_err(io_err)?;
        self.len = len;
        self.file.sync_all().map_err(io_err)
    }

    /// A second handle on the file, for making it durable from another thread (`sync_data` on it covers everything
    /// written through this one). It opens the file again rather than duplicating this handle, so that it is an open
    /// file of its own: Linux reports a failed write-back once to each open file, and a duplicate would share (and
    /// could use up) this one's report.
    pub fn sync_handle(&self) -> Result<SyncHandle, LogError> {
        let file = File::open(&self.path).map_err(|source| LogError::Io { path: self.path.clone(), source })?;
        Ok(SyncHandle { file, path: self.path.clone() })
    }
}

/// See [`AppendLog::sync_handle`].
pub struct SyncHandle {
    file: File,
    path: PathBuf,
}

impl SyncHandle {
    pub fn sync(&self) -> Result<(), LogError> {
        self.file.sync_data().map_err(|source| LogError::Io { path: self.path.clone(), source })
    }
}

pub(super) enum Frame {
    End,
    Record,
    Torn,
    BadChecksum { frame_len: u64 },
}

pub(super) fn read_frame(reader: &mut impl Read, payload: &mut Vec<u8>, remaining: u64) -> io::Result<Frame> {
    if remaining == 0 {
        return Ok(Frame::End);
    }
    if remaining < HEADER_BYTES {
        return Ok(Frame::Torn);
    }
    let mut header = [0u8; 8];
    reader.read_exact(&mut header)?;
    let len = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > remaining - HEADER_BYTES || len as usize > MAX_RECORD_BYTES {
        return Ok(Frame::Torn);
    }
    payload.resize(len as usize, 0);
    reader.read_exact(payload)?;
    if crc32fast::hash(payload) != crc {
        return Ok(Frame::BadChecksum { frame_len: HEADER_BYTES + len });
    }
    Ok(Frame::Record)
}

/// Replaces the small file `dir/name` with `bytes` so that a crash leaves the old or the new one whole: writes
/// `name.new`, makes it durable, renames it over `name` and makes the folder durable. Used for the marks and
/// metadata that sit beside the logs (the data format, the audit log's durable point, its start-up cache's `meta`).
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    replace(dir, name, bytes, std::fs::OpenOptions::new())
}

/// [`replace_durably`] for a secret (a key): the file is readable by its owner only from the moment it exists.
pub fn replace_privately(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    replace(dir, name, bytes, options)
}

fn replace(dir: &Path, name: &str, bytes: &[u8], mut options: std::fs::OpenOptions) -> io::Result<()> {
    let temporary = dir.join(format!("{name}.new"));
    // A leftover of an interrupted replace may have another mode: made afresh.
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = options.write(true).create_new(true).open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(name))?;
    sync_dir(dir)
}

/// Makes a folder's entries (a file created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads every record of a log without changing it (for offline verification and export).
pub fn read_all(path: &Path, mut visit: impl FnMut(u64, &[u8]) -> Result<(), LogError>) -> Result<u64, LogError> {
    let io_err = |source| LogError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0;
    let mut payload = Vec::new();
    loop {
        match read_frame(&mut reader, &mut payload, file_len - offset).map_err(io_err)? {
            Frame::End => return Ok(offset),
            Frame::Record => {
                visit(offset, &payload)?;
                offset += HEADER_BYTES + payload.len() as u64;
            }
            Frame::Torn => {
                return Err(LogError::Corrupt {
                    path: path.to_owned(),
                    offset,
                    reason: "the last record is incomplete".to_owned(),
                });
            }
            Frame::BadChecksum { .. } => {
                return Err(LogError::Corrupt {
                    path: path.to_owned(),
                    offset,
                    reason: "checksum mismatch".to_owned(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path) -> (AppendLog, Vec<Vec<u8>>, Recovery) {
        let mut seen = Vec::new();
        let (log, recovery) = AppendLog::open(path, 0, |_, record| {
            seen.push(record.to_vec());
            Ok(())
        })
        .unwrap();
        (log, seen, recovery)
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, seen, _) = collect(&path);
        assert!(seen.is_empty());
        let offsets = log.append([b"one".as_slice(), b"two".as_slice()]).unwrap();
        assert_eq!(offsets, vec![0, 11]);
        log.sync().unwrap();
        drop(log);
        let (log, seen, recovery) = collect(&path);
        assert_eq!(seen, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(recovery, Recovery { records: 2, truncated_bytes: 0 });
        assert_eq!(log.len(), 22);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _, _) = collect(&path);
        log.append([b"complete".as_slice()]).unwrap();
        log.append([b"torn record".as_slice()]).unwrap();
        drop(log);
        let full = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 3).unwrap();
        let (mut log, seen, recovery) = collect(&path);
        assert_eq!(seen, vec![b"complete".to_vec()]);
        assert_eq!(recovery.truncated_bytes, 8 + 11 - 3);
        log.append([b"after".as_slice()]).unwrap();
        drop(log);
        let (_, seen, _) = collect(&path);
        assert_eq!(seen, vec![b"complete".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _, _) = collect(&path);
        log.append([b"first".as_slice(), b"second".as_slice()]).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let result = AppendLog::open(&path, 0, |_, _| Ok(()));
        assert!(matches!(result, Err(LogError::Corrupt { offset: 0, .. })));
        assert!(matches!(read_all(&path, |_, _| Ok(())), Err(LogError::Corrupt { offset: 0, .. })));
    }

    /// A log holding the records `a`, `b` and `c`, closed; their offsets.
    fn log_of_three(path: &Path) -> Vec<u64> {
        let (mut log, _, _) = collect(path);
        log.append([b"a".as_slice(), b"b".as_slice(), b"c".as_slice()]).unwrap()
    }

    #[test]
    fn scanning_can_start_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let offsets = log_of_three(&path);
        let mut seen = Vec::new();
        AppendLog::open(&path, offsets[1], |offset, record| {
            seen.push((offset, record.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(offsets[1], b"b".to_vec()), (offsets[2], b"c".to_vec())]);
    }

    /// A record the reader refuses is cut off with everything after it, and appending continues where it was.
    #[test]
    fn open_until_cuts_off_a_refused_record_and_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let offsets = log_of_three(&path);
        let mut seen = Vec::new();
        let (mut log, recovery) = AppendLog::open_until(&path, 0, Tail::TornOnly, |_, record| {
            seen.push(record.to_vec());
            Ok(if record == b"b" { Keep::No } else { Keep::Yes })
        })
        .unwrap();
        assert_eq!(seen, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(recovery, Recovery { records: 1, truncated_bytes: 2 * (HEADER_BYTES + 1) });
        assert_eq!(log.len(), offsets[1]);
        log.append([b"d".as_slice()]).unwrap();
        drop(log);
        let (_, records, _) = collect(&path);
        assert_eq!(records, vec![b"a".to_vec(), b"d".to_vec()]);
    }

    /// Past the durable point, a hole of zeros or a bad frame followed by more data ends the log (bytes never made
    /// durable); before it, the same damage is corruption, and so is a file shorter than the durable point.
    #[test]
    fn past_the_durable_point_any_bad_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let offsets = log_of_three(&path);
        let read = |tail| {
            let mut seen = Vec::new();
            AppendLog::open_until(&path, 0, tail, |_, record| {
                seen.push(record.to_vec());
                Ok(Keep::Yes)
            })
            .map(|(log, recovery)| (log.len(), recovery, seen))
        };
        // The middle record's checksum is damaged, with a whole record after it.
        let mut bytes = std::fs::read(&path).unwrap();
        let original = bytes.clone();
        bytes[offsets[1] as usize + HEADER_BYTES as usize] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(Tail::TornOnly), Err(LogError::Corrupt { .. })));
        assert!(matches!(read(Tail::DurableTo(offsets[2])), Err(LogError::Corrupt { .. })));
        let (len, recovery, seen) = read(Tail::DurableTo(offsets[1])).unwrap();
        assert_eq!((len, seen), (offsets[1], vec![b"a".to_vec()]));
        assert_eq!(recovery.truncated_bytes, 2 * (HEADER_BYTES + 1));
        // A hole of zeros where the last record was, and a length running past the end of the file.
        let mut holed = original.clone();
        holed[offsets[2] as usize..].fill(0);
        std::fs::write(&path, &holed).unwrap();
        let (_, _, seen) = read(Tail::DurableTo(offsets[2])).unwrap();
        assert_eq!(seen.last().unwrap(), &Vec::<u8>::new(), "zeros read as an empty record, for the caller to refuse");
        let mut long = original.clone();
        long[offsets[1] as usize] = 200;
        std::fs::write(&path, &long).unwrap();
        assert!(matches!(read(Tail::DurableTo(offsets[2])), Err(LogError::Corrupt { .. })));
        std::fs::write(&path, &long).unwrap();
        let (len, _, _) = read(Tail::DurableTo(offsets[1])).unwrap();
        assert_eq!(len, offsets[1]);
        // Shorter than the durable point.
        std::fs::write(&path, &original[..offsets[2] as usize]).unwrap();
        assert!(matches!(read(Tail::DurableTo(offsets[2] + 1)), Err(LogError::Corrupt { .. })));
    }
}
