//! The state journal: framed records (the frame of [`super::log`]) in segment files that are written full of zeros
//! before they are used.
//!
//! # Why segments written ahead
//! On ext4, an `fdatasync` after an append waits for the data and then writes the inode, because the file's size
//! changed: two device round trips in series. Overwriting bytes a file already has needs only the first (1 KiB write
//! and `fdatasync` on this project's machine: p50 130–147 µs appending, 90–102 µs into a file already written full of
//! zeros; PERFORMANCE.md). So the journal is written into segments that a background thread has already filled with
//! zeros and made durable (`fallocate` would not do: the first write into an allocated but unwritten extent changes
//! the extent tree, which `fdatasync` writes too). An `fdatasync` of a file waits for every dirty page of that file,
//! so the zeros are written into a separate file, never ahead in the one being committed to.
//!
//! # Layout
//! `journal/<start>.seg`, where `<start>` (20 decimal digits) is the journal offset of the segment's first byte: the
//! journal is one sequence of bytes, and an offset into it (what sled's replay point and the copies' references
//! record) names the segment whose start is the greatest not after it. A data directory written by an older broker
//! holds `journal.log`, read as the segment that starts at offset 0; new records go into segments after it.
//! `journal/next.ready` is a segment filled with zeros and made durable, waiting to be used (kept across restarts);
//! `journal/*.tmp` is one being filled (removed on open); `journal/cleared-<offset>.bin` holds bytes an open cleared
//! from the end of the journal (below), kept for inspection.
//!
//! # Where the records end
//! A segment's records end at the first frame that is not a whole record with a valid checksum: zeros (the journal
//! never writes an empty record, so a zero header is never a record), a torn frame, or a bad checksum. Every segment
//! but the last must end exactly where the next begins (the committer moves to a new segment only when everything
//! before it is durable). In the last segment, what follows the end is a group that was never made durable, so
//! never acknowledged: opening copies it to `cleared-<offset>.bin` (best effort) and writes zeros over it (durably)
//! before anything new is written there, so that no record of it can ever be read back after a later, shorter
//! group. One exception: a bad frame directly followed by a whole valid record is corruption, and opening fails (a
//! power loss can leave that within the one group it tore, too: ARCHITECTURE.md "Known limits").

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use super::log::{self, HEADER_BYTES, Keep, LogError, MAX_RECORD_BYTES, Recovery};

/// The default size of a segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// The smallest segment size accepted (a smaller one would switch segments for nearly every group).
pub const MIN_SEGMENT_BYTES: u64 = 64 * 1024;

/// The journal written by older brokers, read as the segment at offset 0.
pub const LEGACY_FILE: &str = "journal.log";

/// The folder of segments, in the data directory.
pub const DIR: &str = "journal";

const READY_FILE: &str = "next.ready";

/// Zeros written at a time when filling a segment in the background, each made durable before the next after a
/// short pause, so that filling one never puts much in the device's queue ahead of a commit's write (64 MiB in 4 MiB
/// steps raised the end-to-end p99 at 1,000 messages/s; PERFORMANCE.md).
const FILL_CHUNK: usize = 256 * 1024;
const FILL_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// The file name of the segment starting at `start`.
pub fn segment_name(start: u64) -> String {
    format!("{start:020}.seg")
}

/// The start of a segment, from its file name.
pub fn segment_start(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every segment file of the data directory `data_dir`, in journal order: `journal.log` (if any) first, then the
/// segments by start.
pub fn segment_files(data_dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    let legacy = data_dir.join(LEGACY_FILE);
    if legacy.exists() {
        segments.push((0, legacy));
    }
    let dir = data_dir.join(DIR);
    let mut found = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if let Some(start) = entry.file_name().to_str().and_then(segment_start) {
                    found.push((start, entry.path()));
                }
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    found.sort();
    segments.extend(found);
    Ok(segments)
}

/// How many bytes at the start of a segment file are whole records with valid checksums (where a copy of it may
/// end: `broker backup` copies only those, so that a group being written while it copies, or the zeros after it, do
/// not come along as a damaged record followed by whole ones).
pub fn whole_records_len(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut payload = Vec::new();
    let mut at = 0;
    while let Frame::Record = read_frame(&mut reader, &mut payload, file_len - at)? {
        at += HEADER_BYTES + payload.len() as u64;
    }
    Ok(at)
}

/// Read-only access to the segments, for reading a value back at its journal offset from any thread (shared with
/// the committer, which adds each new segment before writing into it). Handles are kept open on the
/// [`OPEN_SEGMENTS`] segments used last (the journal is not compacted yet, and one descriptor per segment would reach
/// the process's limit on a long-lived broker); another is opened when it is read, in place of the one used least
/// recently.
#[derive(Clone, Default)]
pub struct JournalReader {
    segments: Arc<Mutex<Segments>>,
}

/// Segments whose read handles are kept open.
const OPEN_SEGMENTS: usize = 16;

#[derive(Default)]
struct Segments {
    /// Each segment's path and, if open, a read-only handle on it, by start.
    all: BTreeMap<u64, (PathBuf, Option<Arc<File>>)>,
    /// The starts of the segments with open handles, the one used least recently first.
    open: std::collections::VecDeque<u64>,
}

impl Segments {
    /// Notes that the segment at `start` was used, with `file` as its handle, and closes the one used least recently
    /// beyond [`OPEN_SEGMENTS`].
    fn used(&mut self, start: u64, file: Arc<File>) {
        // Already the one used last, with its handle: nothing to move (the common case, reading the newest copies).
        if self.open.back() == Some(&start) && self.all.get(&start).is_some_and(|(_, handle)| handle.is_some()) {
            return;
        }
        if let Some((_, handle)) = self.all.get_mut(&start) {
            *handle = Some(file);
        }
        self.open.retain(|open| *open != start);
        self.open.push_back(start);
        while self.open.len() > OPEN_SEGMENTS {
            if let Some(oldest) = self.open.pop_front()
                && let Some((_, handle)) = self.all.get_mut(&oldest)
            {
                *handle = None;
            }
        }
    }
}

impl JournalReader {
    /// Reads `buf.len()` bytes at journal offset `offset` (within one record).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LogError> {
        let poisoned = || LogError::Io {
            path: PathBuf::from(DIR),
            source: io::Error::other("the journal's segment list is poisoned"),
        };
        let (start, path, file) = {
            let mut segments = self.segments.lock().map_err(|_| poisoned())?;
            let Some((start, (path, file))) = segments.all.range(..=offset).next_back() else {
                return Err(LogError::Io {
                    path: PathBuf::from(DIR),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no journal segment holds offset {offset}"),
                    ),
                });
            };
            let (start, path) = (*start, path.clone());
            let file = match file.clone() {
                Some(file) => file,
                None => Arc::new(File::open(&path).map_err(|source| LogError::Io { path: path.clone(), source })?),
            };
            segments.used(start, file.clone());
            (start, path, file)
        };
        file.read_exact_at(buf, offset - start).map_err(|source| LogError::Io { path, source })
    }

    /// Adds a segment (or replaces one with the same start), with `file` as its handle if given.
    fn insert(&self, start: u64, path: PathBuf, file: Option<File>) {
        if let Ok(mut segments) = self.segments.lock() {
            segments.all.insert(start, (path, None));
            if let Some(file) = file {
                segments.used(start, Arc::new(file));
            }
        }
    }

    /// How many segment handles are open (for tests).
    #[cfg(test)]
    fn open_handles(&self) -> usize {
        self.segments
            .lock()
            .map(|segments| segments.all.values().filter(|(_, file)| file.is_some()).count())
            .unwrap_or(0)
    }
}

/// The segment being written.
struct Current {
    file: File,
    path: PathBuf,
    /// Journal offset of its first byte.
    start: u64,
    /// Bytes it can hold without growing (its length when it was opened; the file grows past it when a group larger
    /// than a segment is written into it, or when the next segment is not ready in time).
    capacity: u64,
    /// How far into it writes may have reached, including a write that failed part way: what [`Journal::truncate`]
    /// must clear.
    written_to: u64,
}

/// The journal, positioned at its end, owned by the committer.
pub struct Journal {
    dir: PathBuf,
    current: Current,
    /// Journal offset of the end of the last record written.
    len: u64,
    reader: JournalReader,
    preparer: Preparer,
    /// Whether the next segment has been asked for since the last move.
    asked_next: bool,
    scratch: Vec<u8>,
    /// Set when a failed move to a new segment could not be undone: the files no longer say where the records end,
    /// so nothing more may be written (see [`Journal::truncate`]).
    broken: bool,
    /// For tests: the next write puts its bytes in the file and then reports a failure (as a disk filling up part way
    /// through a write would).
    #[cfg(test)]
    pub(crate) fail_next_write: Arc<AtomicBool>,
}

impl Journal {
    /// Opens (creating if needed) the journal of `data_dir`, hands every record from journal offset `scan_from` on to
    /// `visit` with its offset, and writes zeros over a tail that was never made durable (see the module
    /// documentation). As with [`super::log::AppendLog::open_until`], `visit` may answer [`Keep::No`]: that record
    /// and everything after it are cut off like a torn tail.
    pub fn open(
        data_dir: &Path,
        scan_from: u64,
        segment_bytes: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<Keep, LogError>,
    ) -> Result<(Self, Recovery), LogError> {
        let dir = data_dir.join(DIR);
        let io_at = |path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Io { path, source }
        };
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            sync_dir(data_dir)?;
        }
        remove_unfinished(&dir)?;
        let mut segments = segment_files(data_dir).map_err(io_at(&dir))?;
        if segments.is_empty() {
            // A new journal: its first segment is filled now (once), so that the first commits already overwrite zeros.
            let path = dir.join(segment_name(0));
            place_filled_segment(&dir, segment_bytes, &path)?;
            segments.push((0, path));
        }
        let corrupt =
            |path: &Path, offset: u64, reason: String| LogError::Corrupt { path: path.to_owned(), offset, reason };
        let first = segments.iter().rposition(|(start, _)| *start <= scan_from).ok_or_else(|| {
            corrupt(
                &segments[0].1,
                scan_from,
                format!("the journal's first segment starts at {}, after where replay must begin", segments[0].0),
            )
        })?;
        let reader = JournalReader::default();
        let mut recovery = Recovery::default();
        let last = segments.len() - 1;
        let mut end: Option<u64> = None;
        for (index, (start, path)) in segments.iter().enumerate() {
            let file = OpenOptions::new().read(true).write(index == last).open(path).map_err(io_at(path))?;
            let legacy = path.ends_with(LEGACY_FILE);
            if index >= first {
                let from = match end {
                    None => scan_from,
                    Some(previous) if previous == *start => *start,
                    Some(previous) => {
                        return Err(corrupt(
                            path,
                            previous,
                            format!(
                                "the previous segment's records end at journal offset {previous}, not where this one begins"
                            ),
                        ));
                    }
                };
                let scan = scan_segment(&file, path, *start, from, &mut visit)?;
                recovery.records += scan.records;
                if index < last {
                    if scan.refused {
                        return Err(corrupt(path, scan.end, "a record refused before the last segment".to_owned()));
                    }
                } else {
                    recovery.truncated_bytes = clear_tail(&file, path, *start, scan.end, legacy)?;
                }
                end = Some(scan.end);
            }
            let handle = if last - index < OPEN_SEGMENTS { Some(file.try_clone().map_err(io_at(path))?) } else { None };
            reader.insert(*start, path.clone(), handle);
            if index == last {
                let end = end.unwrap_or(scan_from);
                let current = if legacy {
                    // An older broker's `journal.log` is not written again: new records go into segments after it.
                    let path = dir.join(segment_name(end));
                    place_filled_segment(&dir, segment_bytes, &path)?;
                    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_at(&path))?;
                    reader.insert(end, path.clone(), Some(file.try_clone().map_err(io_at(&path))?));
                    let capacity = file.metadata().map_err(io_at(&path))?.len();
                    Current { file, path, start: end, capacity, written_to: 0 }
                } else {
                    let capacity = file.metadata().map_err(io_at(path))?.len();
                    Current { file, path: path.clone(), start: *start, capacity, written_to: end - start }
                };
                // The next segment is filled once this one is half full (or at once, if it already is).
                let asked_next = (end - current.start) * 2 > current.capacity;
                let preparer = Preparer::start(&dir, segment_bytes, asked_next)?;
                let journal = Self {
                    dir,
                    current,
                    len: end,
                    reader,
                    preparer,
                    asked_next,
                    scratch: Vec::new(),
                    broken: false,
                    #[cfg(test)]
                    fail_next_write: Arc::default(),
                };
                return Ok((journal, recovery));
            }
        }
        // Not reached: the loop returns at the last segment, and there is at least one.
        Err(LogError::Io { path: dir, source: io::Error::other("the journal has no segment") })
    }

    /// Journal offset of the end of the last record, which is also the offset the next record will have.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A handle for reading values back (see [`JournalReader`]).
    pub fn reader(&self) -> JournalReader {
        self.reader.clone()
    }

    /// Writes the records (not yet durable) and returns the journal offset of each. They go into the current segment,
    /// or into the next one when they do not fit and a segment filled with zeros is ready.
    pub fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u64>, LogError> {
        if self.broken {
            return Err(self.broken_error());
        }
        self.scratch.clear();
        let mut sizes = Vec::new();
        for record in records {
            if record.len() > MAX_RECORD_BYTES {
                return Err(LogError::TooLarge(record.len()));
            }
            if record.is_empty() {
                return Err(LogError::Io {
                    path: self.current.path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "the journal never holds an empty record"),
                });
            }
            sizes.push(HEADER_BYTES + record.len() as u64);
            self.scratch.extend_from_slice(&(record.len() as u32).to_le_bytes());
            self.scratch.extend_from_slice(&crc32fast::hash(record).to_le_bytes());
            self.scratch.extend_from_slice(record);
        }
        let used = self.len - self.current.start;
        if used + self.scratch.len() as u64 > self.current.capacity {
            self.next_segment()?;
        }
        let at = self.len - self.current.start;
        // Before writing: a write that fails may still have put some of the bytes in the file.
        self.current.written_to = self.current.written_to.max(at + self.scratch.len() as u64);
        #[cfg(test)]
        if self.fail_next_write.swap(false, Ordering::AcqRel) {
            let _ = self.current.file.write_all_at(&self.scratch, at);
            return Err(LogError::Io { path: self.current.path.clone(), source: io::Error::other("injected failure") });
        }
        self.current
            .file
            .write_all_at(&self.scratch, at)
            .map_err(|source| LogError::Io { path: self.current.path.clone(), source })?;
        let mut offsets = Vec::with_capacity(sizes.len());
        for size in sizes {
            offsets.push(self.len);
            self.len += size;
        }
        if !self.asked_next && (self.len - self.current.start) * 2 > self.current.capacity {
            self.preparer.want();
            self.asked_next = true;
        }
        Ok(offsets)
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.current.file.sync_data().map_err(|source| LogError::Io { path: self.current.path.clone(), source })
    }

    /// Takes records written but never made durable back off the journal (after a failed write or `fdatasync`): the
    /// journal ends at `len` again (a record boundary in the current segment), and zeros are written, durably, over
    /// everything a write may have put after it (a failed write included), so that the next group, written in their
    /// place, is never followed by what is left of them after a power loss (another thread's `fdatasync` may have
    /// made them durable meanwhile).
    pub fn truncate(&mut self, len: u64) -> Result<(), LogError> {
        if self.broken {
            return Err(self.broken_error());
        }
        let len = len.clamp(self.current.start, self.len);
        let io_err = |source| LogError::Io { path: self.current.path.clone(), source };
        let from = len - self.current.start;
        let file_len = self.current.file.metadata().map_err(io_err)?.len();
        let written = self.current.written_to.max(self.len - self.current.start).min(file_len);
        // Zeros where the segment was filled; past that (it grew), the file is cut back, which frees the space.
        write_zeros(&self.current.file, from, written.min(self.current.capacity.max(from))).map_err(io_err)?;
        if file_len > self.current.capacity.max(from) {
            self.current.file.set_len(self.current.capacity.max(from)).map_err(io_err)?;
            self.current.file.sync_all().map_err(io_err)?;
        } else {
            self.current.file.sync_data().map_err(io_err)?;
        }
        self.len = len;
        self.current.written_to = from;
        Ok(())
    }

    fn broken_error(&self) -> LogError {
        LogError::Io {
            path: self.dir.clone(),
            source: io::Error::other("an earlier move to a new journal segment failed and could not be undone"),
        }
    }

    /// Moves to the segment filled with zeros that is ready, if one is (and the current one holds something): it is
    /// renamed to its place and the folder made durable before anything is written to it.
    fn next_segment(&mut self) -> Result<(), LogError> {
        let start = self.len;
        if self.current.start == start {
            return Ok(());
        }
        let Some(ready) = self.preparer.take() else {
            if !self.asked_next {
                self.preparer.want();
                self.asked_next = true;
            }
            return Ok(());
        };
        let path = self.dir.join(segment_name(start));
        let io_at = |path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Io { path, source }
        };
        if let Err(error) = std::fs::rename(&ready, &path) {
            // Nothing changed: go on in the current segment (it grows), and ask for another.
            tracing::warn!(error = %error, "could not move to the next journal segment; going on in the current one");
            self.preparer.want();
            return Ok(());
        }
        let opened = sync_dir(&self.dir)
            .and_then(|()| OpenOptions::new().read(true).write(true).open(&path).map_err(io_at(&path)))
            .and_then(|file| {
                let capacity = file.metadata().map_err(io_at(&path))?.len();
                let reading = file.try_clone().map_err(io_at(&path))?;
                Ok((capacity, file, reading))
            });
        let (capacity, file, reading) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                // Unless the new segment goes again, it would begin where the current one goes on.
                if std::fs::remove_file(&path).is_err() || sync_dir(&self.dir).is_err() {
                    self.broken = true;
                    return Err(error);
                }
                tracing::warn!(error = %error, "could not move to the next journal segment; going on in the current one");
                self.preparer.want();
                return Ok(());
            }
        };
        self.reader.insert(start, path.clone(), Some(reading));
        self.current = Current { file, path, start, capacity, written_to: 0 };
        self.asked_next = false;
        Ok(())
    }
}

/// What scanning one segment found.
struct Scan {
    records: u64,
    /// Journal offset where its records end.
    end: u64,
    /// Whether the reader refused a record ([`Keep::No`]).
    refused: bool,
}

/// Reads the records of the segment starting at journal offset `start`, from journal offset `from` on.
fn scan_segment(
    file: &File,
    path: &Path,
    start: u64,
    from: u64,
    visit: &mut impl FnMut(u64, &[u8]) -> Result<Keep, LogError>,
) -> Result<Scan, LogError> {
    let io_err = |source| LogError::Io { path: path.to_owned(), source };
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut at = (from - start).min(file_len);
    let mut reading = file;
    let mut reader = BufReader::with_capacity(1 << 20, &mut reading);
    reader.seek(SeekFrom::Start(at)).map_err(io_err)?;
    let mut payload = Vec::new();
    let mut scan = Scan { records: 0, end: start + at, refused: false };
    loop {
        match read_frame(&mut reader, &mut payload, file_len - at).map_err(io_err)? {
            Frame::Record => {
                if visit(start + at, &payload)? == Keep::No {
                    scan.refused = true;
                    break;
                }
                scan.records += 1;
                at += HEADER_BYTES + payload.len() as u64;
            }
            Frame::End => break,
            Frame::Bad { frame_len } => {
                let next = at + frame_len;
                if frame_len > HEADER_BYTES && record_at(file, next, file_len).map_err(io_err)? {
                    return Err(LogError::Corrupt {
                        path: path.to_owned(),
                        offset: start + at,
                        reason: "a damaged record followed by a whole one".to_owned(),
                    });
                }
                break;
            }
        }
    }
    scan.end = start + at;
    Ok(scan)
}

enum Frame {
    Record,
    /// The end of the file, or a zero header.
    End,
    /// A torn frame or a bad checksum; `frame_len` is what its header claims (header included), or the header's size
    /// when that runs past the end of the file.
    Bad {
        frame_len: u64,
    },
}

/// [`super::log`]'s frame reader, read the journal's way: a zero header (which that reader takes for an empty record
/// with the empty record's checksum, 0) is where the records end, since the journal never writes an empty record.
fn read_frame(reader: &mut impl Read, payload: &mut Vec<u8>, remaining: u64) -> io::Result<Frame> {
    Ok(match log::read_frame(reader, payload, remaining)? {
        log::Frame::End => Frame::End,
        log::Frame::Record if payload.is_empty() => Frame::End,
        log::Frame::Record => Frame::Record,
        log::Frame::Torn => Frame::Bad { frame_len: HEADER_BYTES },
        log::Frame::BadChecksum { frame_len } => Frame::Bad { frame_len },
    })
}

/// Whether a whole record with a valid checksum starts at byte `at` of the file.
fn record_at(file: &File, at: u64, file_len: u64) -> io::Result<bool> {
    /// Reads the file from a position of its own (the file's shared offset is the scan's).
    struct ReadAt<'a>(&'a File, u64);
    impl Read for ReadAt<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let read = self.0.read_at(buf, self.1)?;
            self.1 += read as u64;
            Ok(read)
        }
    }
    let remaining = file_len.saturating_sub(at);
    Ok(matches!(read_frame(&mut ReadAt(file, at), &mut Vec::new(), remaining)?, Frame::Record))
}

/// Makes the last segment end at journal offset `end` for good: zeros over any bytes left after it (written
/// durably), or, for an older broker's `journal.log`, the file cut there. Returns how many bytes were cleared.
fn clear_tail(file: &File, path: &Path, start: u64, end: u64, legacy: bool) -> Result<u64, LogError> {
    let io_err = |source| LogError::Io { path: path.to_owned(), source };
    let file_len = file.metadata().map_err(io_err)?.len();
    let from = end - start;
    if legacy {
        if file_len > from {
            keep_cleared(file, path, end, from, file_len);
            file.set_len(from).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        return Ok(file_len.saturating_sub(from));
    }
    // Where the last non-zero byte after the end is.
    let mut buffer = vec![0u8; FILL_CHUNK];
    let mut at = from;
    let mut dirty_to = from;
    while at < file_len {
        let chunk = (file_len - at).min(FILL_CHUNK as u64) as usize;
        file.read_exact_at(&mut buffer[..chunk], at).map_err(io_err)?;
        if let Some(last) = buffer[..chunk].iter().rposition(|byte| *byte != 0) {
            dirty_to = at + last as u64 + 1;
        }
        at += chunk as u64;
    }
    if dirty_to > from {
        keep_cleared(file, path, end, from, dirty_to);
        write_zeros(file, from, dirty_to).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
    }
    Ok(dirty_to - from)
}

/// Copies bytes `from..to` of a segment, about to be cleared from journal offset `end` on, to a new file beside it
/// (`cleared-<end>.bin`, or `cleared-<end>-<n>.bin` if that exists). What is cleared is a group never made durable,
/// unless damage in an acknowledged record made it look like one (ARCHITECTURE.md "Known limits"), so its bytes are
/// kept for whoever looks into it. Best effort: a failure (a full disk, often what caused the crash) is logged and
/// the open goes on.
fn keep_cleared(file: &File, path: &Path, end: u64, from: u64, to: u64) {
    let dir = path.parent().unwrap_or(Path::new("."));
    let copy = || -> io::Result<PathBuf> {
        let (kept, mut out) = (0..1000)
            .map(|n| match n {
                0 => dir.join(format!("cleared-{end:020}.bin")),
                n => dir.join(format!("cleared-{end:020}-{n}.bin")),
            })
            .find_map(|kept| OpenOptions::new().write(true).create_new(true).open(&kept).ok().map(|out| (kept, out)))
            .ok_or_else(|| io::Error::other("no free name for the copy"))?;
        let mut buffer = vec![0u8; FILL_CHUNK];
        let mut at = from;
        while at < to {
            let chunk = (to - at).min(FILL_CHUNK as u64) as usize;
            file.read_exact_at(&mut buffer[..chunk], at)?;
            io::Write::write_all(&mut out, &buffer[..chunk])?;
            at += chunk as u64;
        }
        out.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(kept)
    };
    match copy() {
        Ok(kept) => tracing::warn!(
            journal_offset = end,
            bytes = to - from,
            kept = %kept.display(),
            "the journal's last segment ends in bytes never made durable; they were cleared (a copy is kept)"
        ),
        Err(error) => tracing::error!(
            journal_offset = end,
            bytes = to - from,
            error = %error,
            "the journal's last segment ends in bytes never made durable; they were cleared, and no copy could be kept"
        ),
    }
}

/// Puts a segment filled with zeros at `path` (the one ready, or one filled now) and makes the folder durable.
fn place_filled_segment(dir: &Path, segment_bytes: u64, path: &Path) -> Result<(), LogError> {
    let segment_bytes = segment_bytes.max(MIN_SEGMENT_BYTES);
    let ready = dir.join(READY_FILE);
    let ready_len = std::fs::metadata(&ready).map(|metadata| metadata.len()).ok();
    if ready_len != Some(segment_bytes) {
        // It stops early only when asked to, and nothing asks this one.
        fill_segment(dir, segment_bytes, &AtomicBool::new(false), false)?;
    }
    std::fs::rename(&ready, path).map_err(|source| LogError::Io { path: ready.clone(), source })?;
    sync_dir(dir)
}

/// Writes zeros over bytes `from..to` of the file.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; FILL_CHUNK.min(to.saturating_sub(from) as usize)];
    let mut at = from;
    while at < to {
        let chunk = (to - at).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..chunk], at)?;
        at += chunk as u64;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|folder| folder.sync_all()).map_err(|source| LogError::Io { path: dir.to_owned(), source })
}

/// Removes segments left half-filled by a run that stopped while filling one.
fn remove_unfinished(dir: &Path) -> Result<(), LogError> {
    let io_err = |source| LogError::Io { path: dir.to_owned(), source };
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        if path.extension().is_some_and(|extension| extension == "tmp") {
            std::fs::remove_file(&path).map_err(io_err)?;
        }
    }
    Ok(())
}

/// The thread that fills the next segment with zeros, one at a time, ahead of need.
struct Preparer {
    shared: Arc<Prepared>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Prepared {
    state: Mutex<PreparedState>,
    changed: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct PreparedState {
    ready: Option<PathBuf>,
    wanted: bool,
}

impl Preparer {
    /// Starts the thread, filling one at once if `wanted`; a segment left ready by the previous run (of the same size)
    /// is used as it is.
    fn start(dir: &Path, segment_bytes: u64, wanted: bool) -> Result<Self, LogError> {
        let segment_bytes = segment_bytes.max(MIN_SEGMENT_BYTES);
        let ready_path = dir.join(READY_FILE);
        let ready = match std::fs::metadata(&ready_path) {
            Ok(metadata) if metadata.len() == segment_bytes => Some(ready_path.clone()),
            Ok(_) => {
                std::fs::remove_file(&ready_path)
                    .map_err(|source| LogError::Io { path: ready_path.clone(), source })?;
                None
            }
            Err(_) => None,
        };
        let wanted = wanted && ready.is_none();
        let shared = Arc::new(Prepared {
            state: Mutex::new(PreparedState { ready, wanted }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let dir = dir.to_owned();
        let thread = thread::Builder::new()
            .name("journal-segments".to_owned())
            .spawn(move || run_preparer(&worker, &dir, segment_bytes))
            .map_err(|source| LogError::Io { path: PathBuf::from(DIR), source })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// The segment ready for use, if there is one.
    fn take(&self) -> Option<PathBuf> {
        self.shared.state.lock().ok().and_then(|mut state| state.ready.take())
    }

    /// Asks for the next one.
    fn want(&self) {
        if let Ok(mut state) = self.shared.state.lock()
            && state.ready.is_none()
        {
            state.wanted = true;
            self.shared.changed.notify_one();
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Ok(_state) = self.shared.state.lock() {
            self.shared.changed.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Free space a segment filled ahead must leave on the journal's filesystem, for commits and the index.
const FILL_HEADROOM: u64 = 64 * 1024 * 1024;

/// Whether a segment of `segment_bytes` may be filled ahead with `available` bytes free.
fn room_to_fill(available: u64, segment_bytes: u64) -> bool {
    available >= segment_bytes.saturating_add(FILL_HEADROOM)
}

/// How long the preparer waits before trying again to fill a segment it could not (a full disk).
const PREPARE_RETRY: std::time::Duration =
    if cfg!(test) { std::time::Duration::from_millis(50) } else { std::time::Duration::from_secs(10) };

fn run_preparer(shared: &Prepared, dir: &Path, segment_bytes: u64) {
    loop {
        {
            let Ok(mut state) = shared.state.lock() else { return };
            while !(state.wanted && state.ready.is_none()) {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                state = match shared.changed.wait(state) {
                    Ok(state) => state,
                    Err(_) => return,
                };
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            state.wanted = false;
        }
        match fill_segment(dir, segment_bytes, &shared.stop, true) {
            Ok(Some(path)) => {
                if let Ok(mut state) = shared.state.lock() {
                    state.ready = Some(path);
                }
            }
            Ok(None) => return,
            Err(error) => {
                // The committer goes on growing the current segment (appends, slower); this thread tries again.
                tracing::warn!(
                    error = %error,
                    retry_after_millis = PREPARE_RETRY.as_millis() as u64,
                    "could not prepare the next journal segment; trying again after a pause"
                );
                // The pause and the next request are made under one hold of the lock, which is let go before the
                // next fill. (Re-taking the lock while the wait's guard was still held deadlocked this thread after
                // its first failure, and with it the committer's next request and the journal's closing.)
                let Ok(state) = shared.state.lock() else { return };
                let Ok((mut state, _)) =
                    shared.changed.wait_timeout_while(state, PREPARE_RETRY, |_| !shared.stop.load(Ordering::Acquire))
                else {
                    return;
                };
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                state.wanted = true;
            }
        }
    }
}

/// Writes a segment full of zeros, makes it durable and names it `next.ready`; `None` if asked to stop meanwhile.
/// `paced`: in steps (see [`FILL_CHUNK`]), for filling while commits are being made.
fn fill_segment(dir: &Path, segment_bytes: u64, stop: &AtomicBool, paced: bool) -> Result<Option<PathBuf>, LogError> {
    if paced {
        // Filling ahead is an optimisation: on a nearly full disk it would take the last free space (for the moments
        // before a failed fill is removed) from the commits and the index, every time it tried.
        let available = rustix::fs::statvfs(dir)
            .map(|stats| stats.f_bavail.saturating_mul(stats.f_frsize))
            .map_err(|error| LogError::Io { path: dir.to_owned(), source: error.into() })?;
        if !room_to_fill(available, segment_bytes) {
            return Err(LogError::Io {
                path: dir.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "{} MiB free: the next segment ({} MiB) is filled only while {} MiB more stay free",
                        available >> 20,
                        segment_bytes >> 20,
                        FILL_HEADROOM >> 20
                    ),
                ),
            });
        }
    }
    let filling = dir.join("next.tmp");
    let filled = fill(&filling, dir, segment_bytes, stop, paced);
    if !matches!(filled, Ok(Some(_))) {
        // Stopped, or failed (a full disk): the space goes back.
        let _ = std::fs::remove_file(&filling);
    }
    filled
}

fn fill(
    filling: &Path,
    dir: &Path,
    segment_bytes: u64,
    stop: &AtomicBool,
    paced: bool,
) -> Result<Option<PathBuf>, LogError> {
    let io_err = |source| LogError::Io { path: filling.to_owned(), source };
    let file = File::create(filling).map_err(io_err)?;
    let zeros = vec![0u8; FILL_CHUNK];
    let mut at = 0;
    while at < segment_bytes {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        let chunk = (segment_bytes - at).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..chunk], at).map_err(io_err)?;
        at += chunk as u64;
        if paced {
            file.sync_data().map_err(io_err)?;
            thread::sleep(FILL_PAUSE);
        }
    }
    file.sync_all().map_err(io_err)?;
    let ready = dir.join(READY_FILE);
    std::fs::rename(filling, &ready).map_err(io_err)?;
    Ok(Some(ready))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = MIN_SEGMENT_BYTES;

    impl Journal {
        /// Asks for the next segment and waits until it is ready, so that tests move between segments when they
        /// expect to.
        fn wait_until_ready(&mut self) {
            self.preparer.want();
            self.asked_next = true;
            self.poll_until_ready();
        }

        fn is_ready(&self) -> bool {
            self.preparer.shared.state.lock().unwrap().ready.is_some()
        }

        /// Waits (up to ten seconds) until the next segment is ready, without asking for it.
        fn poll_until_ready(&self) {
            for _ in 0..1000 {
                if self.is_ready() {
                    return;
                }
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// A new journal in a new folder, holding `first`, made durable.
    fn journal_holding(first: &[u8]) -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.append([first]).unwrap();
        journal.sync().unwrap();
        (dir, journal)
    }

    /// Appends `last` durably, closes the journal, and returns [`records`].
    fn closed_after(mut journal: Journal, last: &[u8], dir: &Path) -> (Vec<Vec<u8>>, Recovery) {
        journal.append([last]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        records(dir)
    }

    /// The records of the journal in `dir`, opened again, and what opening cleared.
    fn records(dir: &Path) -> (Vec<Vec<u8>>, Recovery) {
        let (_, seen, recovery) = open(dir);
        (seen.into_iter().map(|(_, record)| record).collect(), recovery)
    }

    fn open(dir: &Path) -> (Journal, Vec<(u64, Vec<u8>)>, Recovery) {
        let mut seen = Vec::new();
        let (journal, recovery) = Journal::open(dir, 0, SEGMENT, |offset, record| {
            seen.push((offset, record.to_vec()));
            Ok(Keep::Yes)
        })
        .unwrap();
        (journal, seen, recovery)
    }

    fn record(index: usize, len: usize) -> Vec<u8> {
        (0..len).map(|at| (index * 31 + at) as u8 | 1).collect()
    }

    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        segment_files(dir).unwrap().into_iter().map(|(_, path)| path).collect()
    }

    /// Records spread over several segments read back in order, at the offsets they were given, both on open and
    /// through the reader; segments filled ahead keep their length as they are written.
    #[test]
    fn records_span_segments_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, seen, _) = open(dir.path());
        assert!(seen.is_empty());
        let mut written = Vec::new();
        for index in 0..24 {
            journal.wait_until_ready();
            let bytes = record(index, 10_000);
            let offsets = journal.append([bytes.as_slice()]).unwrap();
            journal.sync().unwrap();
            written.push((offsets[0], bytes));
        }
        let reader = journal.reader();
        drop(journal);
        let segments = segment_paths(dir.path());
        assert!(segments.len() >= 4, "{segments:?}");
        for path in &segments {
            assert_eq!(std::fs::metadata(path).unwrap().len(), SEGMENT, "{path:?} kept the length it was filled to");
        }
        let (journal, seen, recovery) = open(dir.path());
        assert_eq!(seen, written);
        assert_eq!(recovery, Recovery { records: 24, truncated_bytes: 0 });
        let (last_offset, last) = written.last().unwrap();
        assert_eq!(journal.len(), last_offset + HEADER_BYTES + last.len() as u64);
        for (offset, bytes) in &written {
            let mut back = vec![0u8; bytes.len()];
            reader.read_exact_at(&mut back, offset + HEADER_BYTES).unwrap();
            assert_eq!(&back, bytes);
            journal.reader().read_exact_at(&mut back, offset + HEADER_BYTES).unwrap();
            assert_eq!(&back, bytes);
        }
    }

    /// However many segments there are, at most [`OPEN_SEGMENTS`] handles stay open, and every segment reads back.
    #[test]
    fn read_handles_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        let mut written = Vec::new();
        for index in 0..(OPEN_SEGMENTS + 8) {
            journal.wait_until_ready();
            let bytes = record(index, 40_000);
            written.push((journal.append([bytes.as_slice()]).unwrap()[0], bytes));
        }
        journal.sync().unwrap();
        let reader = journal.reader();
        assert!(segment_paths(dir.path()).len() > OPEN_SEGMENTS);
        assert!(reader.open_handles() <= OPEN_SEGMENTS);
        for (offset, bytes) in written.iter().chain(written.iter().rev()) {
            let mut back = vec![0u8; bytes.len()];
            reader.read_exact_at(&mut back, offset + HEADER_BYTES).unwrap();
            assert_eq!(&back, bytes);
            assert!(reader.open_handles() <= OPEN_SEGMENTS);
        }
        drop(journal);
        let (journal, _, _) = open(dir.path());
        assert!(journal.reader().open_handles() <= OPEN_SEGMENTS);
    }

    /// A record larger than a segment makes its segment grow; the next record goes into the next one.
    #[test]
    fn a_record_larger_than_a_segment_fits() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        let large = record(1, 3 * SEGMENT as usize);
        journal.wait_until_ready();
        journal.append([b"small".as_slice(), large.as_slice()]).unwrap();
        journal.wait_until_ready();
        journal.append([b"after".as_slice()]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let (records, _) = records(dir.path());
        assert_eq!(records, vec![b"small".to_vec(), large, b"after".to_vec()]);
    }

    /// A group that never became durable, damaged so that a later, shorter group could end where one of its records
    /// begins, is zeroed on open: nothing of it is read back after the group written in its place.
    #[test]
    fn a_torn_tail_is_zeroed_and_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.wait_until_ready();
        journal.append([b"acknowledged".as_slice()]).unwrap();
        journal.sync().unwrap();
        let torn = journal.append([b"torn one".as_slice(), b"stale two".as_slice()]).unwrap();
        drop(journal);
        let path = segment_paths(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[torn[0] as usize..torn[0] as usize + 8].fill(0); // the first record's header never reached the disk
        std::fs::write(&path, &bytes).unwrap();

        let (journal, seen, recovery) = open(dir.path());
        assert_eq!(seen.iter().map(|(_, record)| record.as_slice()).collect::<Vec<_>>(), [b"acknowledged".as_slice()]);
        let kept = std::fs::read(dir.path().join(DIR).join(format!("cleared-{:020}.bin", torn[0]))).unwrap();
        assert_eq!(kept, bytes[torn[0] as usize..(torn[1] + HEADER_BYTES + 9) as usize], "the cleared bytes are kept");
        assert_eq!(
            recovery.truncated_bytes,
            torn[1] + HEADER_BYTES + 9 - torn[0],
            "from the zeroed header to the end of `stale two`"
        );
        assert_eq!(journal.len(), torn[0]);
        let (records, recovery) = closed_after(journal, b"new  one".as_slice(), dir.path()); // as long as the torn one: ends where `stale two` began
        assert_eq!(records, [b"acknowledged".as_slice(), b"new  one".as_slice()]);
        assert_eq!(recovery.truncated_bytes, 0);
    }

    /// A second crash that leaves a tail to clear at the same offset keeps the first copy and adds another.
    #[test]
    fn a_second_clear_at_the_same_offset_keeps_the_first_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.append([b"acknowledged".as_slice()]).unwrap();
        journal.sync().unwrap();
        let tear = |journal: Journal, record: &[u8]| {
            let mut journal = journal;
            let at = journal.append([record]).unwrap()[0];
            drop(journal);
            let path = segment_paths(dir.path()).pop().unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at as usize..at as usize + 8].fill(0);
            std::fs::write(&path, &bytes).unwrap();
            at
        };
        let at = tear(journal, b"first torn");
        let (journal, _, _) = open(dir.path());
        let first = dir.path().join(DIR).join(format!("cleared-{at:020}.bin"));
        let kept = std::fs::read(&first).unwrap();
        assert_eq!(tear(journal, b"second torn!"), at);
        let (_, seen, _) = open(dir.path());
        assert_eq!(seen.len(), 1);
        assert_eq!(std::fs::read(&first).unwrap(), kept, "the first copy is left as it was");
        let second = std::fs::read(dir.path().join(DIR).join(format!("cleared-{at:020}-1.bin"))).unwrap();
        assert!(second.ends_with(b"second torn!"));
    }

    /// A damaged record followed by a whole one is not a torn write: opening refuses.
    #[test]
    fn a_damaged_record_followed_by_a_whole_one_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.wait_until_ready();
        let offsets = journal.append([b"first".as_slice(), b"second".as_slice(), b"third".as_slice()]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let path = segment_paths(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offsets[1] as usize + 9] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let result = Journal::open(dir.path(), 0, SEGMENT, |_, _| Ok(Keep::Yes));
        assert!(matches!(result, Err(LogError::Corrupt { offset, .. }) if offset == offsets[1]));
    }

    /// Every segment but the last must end where the next begins.
    #[test]
    fn a_segment_that_ends_short_of_the_next_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        let mut last_in_first = 0;
        for index in 0..8 {
            journal.wait_until_ready();
            let offsets = journal.append([record(index, 20_000).as_slice()]).unwrap();
            if segment_paths(dir.path()).len() == 1 {
                last_in_first = offsets[0];
            }
            journal.sync().unwrap();
        }
        drop(journal);
        let first = segment_paths(dir.path()).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[last_in_first as usize..last_in_first as usize + 8].fill(0);
        std::fs::write(&first, &bytes).unwrap();
        let result = Journal::open(dir.path(), 0, SEGMENT, |_, _| Ok(Keep::Yes));
        assert!(
            matches!(result, Err(LogError::Corrupt { offset, .. }) if offset == last_in_first),
            "{:?}",
            result.err()
        );
    }

    /// A group taken back after a failed `fdatasync` is zeroed where it was, and the next group takes its place.
    #[test]
    fn a_group_taken_back_is_zeroed_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.wait_until_ready();
        journal.append([b"kept".as_slice()]).unwrap();
        journal.sync().unwrap();
        let before = journal.len();
        journal.append([b"taken back".as_slice(), b"with it".as_slice()]).unwrap();
        journal.truncate(before).unwrap();
        assert_eq!(journal.len(), before);
        // As long as the first record taken back: ends where `with it` began.
        let (records, recovery) = closed_after(journal, b"in itplace".as_slice(), dir.path());
        assert_eq!(records, [b"kept".as_slice(), b"in itplace".as_slice()]);
        assert_eq!(recovery.truncated_bytes, 0, "nothing of the group taken back was left to clear");
    }

    /// A write that fails after putting its bytes in the file (a disk filling up part way) is taken back whole.
    #[test]
    fn a_failed_write_is_taken_back_whole() {
        let (dir, mut journal) = journal_holding(b"kept");
        let before = journal.len();
        journal.fail_next_write.store(true, Ordering::Release);
        assert!(journal.append([b"failed one".as_slice(), b"failed two".as_slice()]).is_err());
        assert_eq!(journal.len(), before, "a failed write moves nothing");
        journal.truncate(before).unwrap();
        let (records, recovery) = closed_after(journal, b"next group".as_slice(), dir.path()); // ends where `failed two` began
        assert_eq!(records, [b"kept".as_slice(), b"next group".as_slice()]);
        assert_eq!(recovery.truncated_bytes, 0);
    }

    /// A failed write that grew its segment past what was filled is cut back off, freeing the space.
    #[test]
    fn a_failed_write_past_the_filled_part_is_cut_back() {
        let (dir, mut journal) = journal_holding(b"kept");
        let before = journal.len();
        journal.fail_next_write.store(true, Ordering::Release);
        assert!(journal.append([record(1, 2 * SEGMENT as usize).as_slice()]).is_err());
        let path = journal.current.path.clone();
        assert!(std::fs::metadata(&path).unwrap().len() > SEGMENT);
        journal.truncate(before).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEGMENT);
        let (records, recovery) = closed_after(journal, b"next".as_slice(), dir.path());
        assert_eq!(records, [b"kept".as_slice(), b"next".as_slice()]);
        assert_eq!(recovery.truncated_bytes, 0);
    }

    /// A segment that cannot be filled (here `next.tmp` is a folder, as a full disk would refuse the file) is tried
    /// again after a pause, as often as it takes; meanwhile the committer can still ask for one and the journal can
    /// still be closed, and once the fill can succeed the segment is made.
    #[test]
    fn a_segment_that_could_not_be_filled_is_tried_again_without_holding_up_anyone() {
        fn within<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
            let (done, answer) = std::sync::mpsc::channel();
            thread::spawn(move || {
                let _ = done.send(work());
            });
            answer.recv_timeout(std::time::Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} hung"))
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("next.tmp")).unwrap();
        let preparer = Arc::new(Preparer::start(dir.path(), SEGMENT, true).unwrap());
        thread::sleep(PREPARE_RETRY * 4);
        let asking = preparer.clone();
        let ready = within("asking for a segment after failed fills", move || {
            asking.want();
            asking.take()
        });
        assert!(ready.is_none(), "nothing can be filled yet");
        std::fs::remove_dir(dir.path().join("next.tmp")).unwrap();
        let waiting = preparer.clone();
        let ready = within("filling once it can", move || {
            loop {
                if let Some(path) = waiting.take() {
                    return path;
                }
                thread::sleep(PREPARE_RETRY);
            }
        });
        assert_eq!(std::fs::metadata(ready).unwrap().len(), SEGMENT.max(MIN_SEGMENT_BYTES));
        std::fs::create_dir(dir.path().join("next.tmp")).unwrap();
        preparer.want();
        thread::sleep(PREPARE_RETRY * 3);
        within("closing while fills fail", move || drop(preparer));
    }

    /// A segment is filled ahead only while it leaves the headroom free (statvfs is asked by every paced fill in
    /// these tests, on a disk with room).
    #[test]
    fn a_segment_is_filled_ahead_only_with_room_to_spare() {
        assert!(room_to_fill(SEGMENT + FILL_HEADROOM, SEGMENT));
        assert!(!room_to_fill(SEGMENT + FILL_HEADROOM - 1, SEGMENT));
        assert!(!room_to_fill(0, SEGMENT));
        assert!(!room_to_fill(u64::MAX - 1, u64::MAX));
    }

    /// If the ready segment cannot be moved into place, the journal goes on in the current one and asks for another.
    #[test]
    fn a_failed_move_goes_on_in_the_current_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        journal.wait_until_ready();
        std::fs::remove_file(dir.path().join(DIR).join(READY_FILE)).unwrap();
        let large = record(1, SEGMENT as usize);
        journal.append([b"first".as_slice()]).unwrap();
        journal.append([large.as_slice()]).unwrap();
        journal.sync().unwrap();
        assert_eq!(segment_paths(dir.path()).len(), 1, "still the first segment, grown");
        journal.poll_until_ready();
        journal.append([b"after".as_slice()]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        assert_eq!(segment_paths(dir.path()).len(), 2, "another segment was asked for and used");
        let (records, _) = records(dir.path());
        assert_eq!(records, vec![b"first".to_vec(), large, b"after".to_vec()]);
    }

    /// A new journal's first segment is filled when it is made; the next is filled once the current one is half
    /// full, kept for the next run if unused, and used there as it is; one left half-filled is removed.
    #[test]
    fn segments_are_filled_ahead_and_a_ready_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join(DIR);
        let (mut journal, _, _) = open(dir.path());
        let first = segment_paths(dir.path());
        assert_eq!(first.len(), 1);
        assert_eq!(std::fs::metadata(&first[0]).unwrap().len(), SEGMENT, "the first segment is filled at once");
        journal.append([record(0, 20_000).as_slice()]).unwrap();
        thread::sleep(std::time::Duration::from_millis(200));
        assert!(!journal.is_ready() && !journal_dir.join(READY_FILE).exists(), "not asked for below half full");
        journal.append([record(1, 20_000).as_slice()]).unwrap();
        journal.poll_until_ready();
        assert!(journal.is_ready(), "asked for once half full");
        journal.sync().unwrap();
        drop(journal);
        assert_eq!(std::fs::metadata(journal_dir.join(READY_FILE)).unwrap().len(), SEGMENT);

        std::fs::write(journal_dir.join("next.tmp"), b"half").unwrap();
        let (mut journal, seen, _) = open(dir.path());
        assert_eq!(seen.len(), 2);
        assert!(!journal_dir.join("next.tmp").exists());
        assert!(journal.is_ready(), "the ready segment is used as it is");
        journal.append([record(2, 30_000).as_slice()]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let segments = segment_paths(dir.path());
        assert_eq!(segments.len(), 2, "{segments:?}");
        assert_eq!(std::fs::metadata(&segments[1]).unwrap().len(), SEGMENT);
        let (_, seen, _) = open(dir.path());
        assert_eq!(seen.len(), 3);
    }

    /// Scanning can start in any segment; the ones before it are still read through the reader.
    #[test]
    fn scanning_starts_at_an_offset_in_a_later_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _, _) = open(dir.path());
        let mut written = Vec::new();
        for index in 0..8 {
            journal.wait_until_ready();
            let bytes = record(index, 20_000);
            written.push((journal.append([bytes.as_slice()]).unwrap()[0], bytes));
            journal.sync().unwrap();
        }
        drop(journal);
        let from = written[6].0;
        let mut seen = Vec::new();
        let (journal, _) = Journal::open(dir.path(), from, SEGMENT, |offset, record| {
            seen.push((offset, record.to_vec()));
            Ok(Keep::Yes)
        })
        .unwrap();
        assert_eq!(seen, written[6..].to_vec());
        let mut back = vec![0u8; 20_000];
        journal.reader().read_exact_at(&mut back, written[0].0 + HEADER_BYTES).unwrap();
        assert_eq!(back, written[0].1);
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(1234), "00000000000000001234.seg");
        assert_eq!(segment_start(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(segment_start("1234.seg"), None);
        assert_eq!(segment_start("0000000000000000123x.seg"), None);
        assert_eq!(segment_start("next.ready"), None);
    }
}
