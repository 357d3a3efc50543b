//! The spool: a local append-only log of records, checksummed, in segments, with group commit,
//! and a durable replay cursor.
//!
//! Layout: `DIR/LOCK` (held while a gateway uses the directory), segments
//! `DIR/00000000000000000001.seg`, ... and `DIR/CURSOR`. Each segment starts with the 8-byte
//! magic `SBSPOOL1`, then frames: `len: u32 LE | crc32(payload): u32 LE | payload`. The payload
//! is the record JSON; key and headers are derived from it again on replay (see `replay`).
//!
//! One writer thread owns the open segment. Requests queue their frames; the thread takes all that
//! are waiting (up to `max_batch_records`), writes them, calls `fdatasync` once, and only then
//! answers every request in the group: one fsync per group, not per record, and nothing is
//! acknowledged before it is on disk. When the previous group held more than one request (there
//! is concurrency), the thread first waits up to `group_commit_wait_us` for more to join, so
//! under load one fsync covers more records; a lone request is never delayed.
//!
//! The cursor (`CURSOR`, JSON `{"segment":S,"offset":O}`) is the position of the first record
//! Kafka has not acknowledged; everything before it has been forwarded. It is replaced atomically
//! (write `CURSOR.tmp`, fsync, rename, fsync the directory), so a crash leaves the old or the new
//! cursor, never a torn one; a lost update only replays records again (same record ids). Sealed
//! segments wholly behind the cursor are deleted after the cursor that covers them is durable.
//! Without Kafka the cursor never moves: the spool is the sink and keeps everything.
//!
//! On open, every segment is scanned frame by frame (never loaded whole). A torn or corrupt frame
//! (a crash mid-write) ends its segment: earlier frames are kept, the rest is skipped and counted,
//! and the last segment is truncated to its last good frame. Appends always go to a fresh segment.
//!
//! A failed write or fdatasync (ENOSPC, EIO) fails every request of its group (the caller answers
//! 503 / 451), counts `switchboard_spool_write_errors_total`, sets `switchboard_spool_up` to 0,
//! logs an error, and abandons the segment at its last good offset (truncated there when possible:
//! after a failed fsync the kernel may have dropped the dirty pages, so the segment is never
//! trusted again). While down, requests fail at once; the thread tries a fresh segment after a
//! backoff (100 ms doubling to 5 s), also without traffic, and is up again when that succeeds.

use super::{Encoded, Health, Landed, Sink, SinkError};
use crate::config::SpoolConfig;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

pub const MAGIC: &[u8; 8] = b"SBSPOOL1";
const MAGIC_LEN: u64 = MAGIC.len() as u64;
const FRAME_HEADER: u64 = 8;
/// A frame longer than this is corruption, not a record (the HTTP body cap is far below).
const MAX_FRAME: u32 = 64 * 1024 * 1024;
pub const CURSOR_FILE: &str = "CURSOR";
const CURSOR_TMP: &str = "CURSOR.tmp";
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A position in the spool: a segment and a byte offset in it. Ordered as the log is.
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    pub torn: u64,
    /// Records past the cursor: not yet forwarded to Kafka.
    pub backlog_records: u64,
    /// Frame bytes of those records.
    pub backlog_bytes: u64,
    pub cursor: Pos,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

/// Segments in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(seq) = name
            .strip_suffix(".seg")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The durable cursor; `None` when there is none yet (nothing was ever forwarded). A cursor file
/// that does not parse is reported as an error: callers fall back to replaying everything.
pub fn read_cursor(dir: &Path) -> io::Result<Option<Pos>> {
    match fs::read(dir.join(CURSOR_FILE)) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("CURSOR: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the cursor atomically: temp file, fsync, rename, fsync the directory.
pub fn write_cursor(dir: &Path, pos: Pos) -> io::Result<()> {
    let tmp = dir.join(CURSOR_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&pos).expect("a position serialises"))?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(CURSOR_FILE))?;
    sync_dir(dir)
}

/// The cursor to start from: the file's, or the start of the log when absent or unreadable
/// (replaying too much only duplicates; replaying too little would lose).
fn load_cursor(dir: &Path) -> Pos {
    match read_cursor(dir) {
        Ok(Some(p)) => p,
        Ok(None) => Pos::default(),
        Err(e) => {
            tracing::error!(error = %e, dir = %dir.display(), "spool cursor unreadable; replaying the whole spool (duplicates keep their record ids)");
            Pos::default()
        }
    }
}

/// One frame read from a segment.
enum Frame {
    /// A good frame from `start` to `end`; the payload is in the caller's buffer.
    Record { start: u64, end: u64 },
    /// Clean end: end of file, or the committed limit reached.
    End,
    /// A torn or corrupt frame (or a bad magic): nothing after it in this segment is trusted.
    Bad,
}

/// Reads frames sequentially with a bounded buffer; never loads a segment whole.
struct FrameReader {
    r: BufReader<File>,
    /// Offset just past the last good frame (or the magic).
    pos: u64,
    bad: bool,
    magic_ok: bool,
}

impl FrameReader {
    fn open(path: &Path, offset: u64) -> io::Result<Self> {
        let mut f = File::open(path)?;
        let mut magic_ok = true;
        let pos = if offset < MAGIC_LEN {
            let mut magic = [0u8; 8];
            magic_ok = read_full(&mut f, &mut magic)? == magic.len() && &magic == MAGIC;
            MAGIC_LEN
        } else {
            f.seek(SeekFrom::Start(offset))?;
            offset
        };
        Ok(Self {
            r: BufReader::with_capacity(256 * 1024, f),
            pos,
            bad: !magic_ok,
            magic_ok,
        })
    }

    /// The next frame, not reading past `limit` (the committed length of an active segment).
    fn next(&mut self, limit: Option<u64>, payload: &mut Vec<u8>) -> io::Result<Frame> {
        if self.bad {
            return Ok(Frame::Bad);
        }
        if limit.is_some_and(|l| self.pos + FRAME_HEADER > l) {
            return Ok(Frame::End);
        }
        let mut header = [0u8; 8];
        match read_full(&mut self.r, &mut header)? {
            0 => return Ok(Frame::End),
            8 => {}
            _ => return Ok(self.mark_bad()),
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let end = self.pos + FRAME_HEADER + u64::from(len);
        if len > MAX_FRAME || limit.is_some_and(|l| end > l) {
            return Ok(self.mark_bad());
        }
        payload.clear();
        payload.resize(len as usize, 0);
        if read_full(&mut self.r, payload)? < payload.len() || crc32fast::hash(payload) != crc {
            return Ok(self.mark_bad());
        }
        let start = self.pos;
        self.pos = end;
        Ok(Frame::Record { start, end })
    }

    fn mark_bad(&mut self) -> Frame {
        self.bad = true;
        Frame::Bad
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What one segment holds.
#[derive(Debug, Default, Clone, Copy)]
struct SegInfo {
    records: u64,
    /// Offset just past the last good frame.
    good_len: u64,
    /// Bytes after the last good frame (a torn or corrupt tail).
    torn_bytes: u64,
    backlog_records: u64,
    backlog_bytes: u64,
}

/// Scans a segment frame by frame; records at or past `cursor` count as backlog.
fn survey_segment(
    seq: u64,
    path: &Path,
    cursor: Pos,
    mut each: impl FnMut(&[u8]),
) -> io::Result<SegInfo> {
    let total = fs::metadata(path)?.len();
    let mut r = FrameReader::open(path, 0)?;
    let mut info = SegInfo::default();
    let mut payload = Vec::new();
    loop {
        match r.next(None, &mut payload)? {
            Frame::Record { start, end } => {
                info.records += 1;
                info.good_len = end;
                if (Pos {
                    segment: seq,
                    offset: start,
                }) >= cursor
                {
                    info.backlog_records += 1;
                    info.backlog_bytes += end - start;
                }
                each(&payload);
            }
            Frame::End => break,
            Frame::Bad => break,
        }
    }
    // `pos` only moves past good frames; a segment without a good magic keeps nothing.
    info.good_len = if r.magic_ok { r.pos } else { 0 };
    info.torn_bytes = total.saturating_sub(info.good_len);
    Ok(info)
}

/// Reads every record in a spool directory (read-only; usable while a gateway runs).
pub fn read_all(dir: &Path) -> io::Result<(Vec<Vec<u8>>, SpoolStats)> {
    let mut records = Vec::new();
    let stats = survey(dir, |r| records.push(r.to_vec()))?;
    Ok((records, stats))
}

/// Counts segments, records, torn tails and the backlog past the cursor (read-only).
pub fn stats_of(dir: &Path) -> io::Result<SpoolStats> {
    survey(dir, |_| {})
}

fn survey(dir: &Path, mut each: impl FnMut(&[u8])) -> io::Result<SpoolStats> {
    let mut stats = SpoolStats::default();
    if !dir.exists() {
        return Ok(stats);
    }
    let cursor = load_cursor(dir);
    stats.cursor = cursor;
    for (seq, path) in list_segments(dir)? {
        let info = match survey_segment(seq, &path, cursor, &mut each) {
            Ok(i) => i,
            // A segment released by a running gateway between listing and reading.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        stats.segments += 1;
        stats.records += info.records;
        stats.bytes += info.good_len;
        stats.backlog_records += info.backlog_records;
        stats.backlog_bytes += info.backlog_bytes;
        if info.torn_bytes > 0 {
            stats.torn += 1;
        }
    }
    Ok(stats)
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    torn: AtomicU64,
    backlog_records: AtomicU64,
    backlog_bytes: AtomicU64,
    /// Group commits done (one write + fdatasync each); for tests of the group-commit wait.
    commits: AtomicU64,
}

/// State shared by the writer thread, the `Spool` handle and the replayer.
struct Shared {
    dir: PathBuf,
    /// The active segment and its committed (fsynced) length: readers never read past it.
    tip: parking_lot::Mutex<Pos>,
    /// Woken when records are committed or the active segment changes.
    wake: Notify,
    up: AtomicBool,
    counters: Counters,
    segs: parking_lot::Mutex<BTreeMap<u64, SegInfo>>,
    /// The last durable cursor.
    cursor: parking_lot::Mutex<Pos>,
    #[cfg(test)]
    faults: faults::Faults,
}

impl Shared {
    fn publish(&self) {
        use crate::telemetry::*;
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metrics::gauge!(SPOOL_SEGMENTS).set(get(&c.segments));
        metrics::gauge!(SPOOL_RECORDS).set(get(&c.records));
        metrics::gauge!(SPOOL_BYTES).set(get(&c.bytes));
        metrics::gauge!(SPOOL_BACKLOG_RECORDS).set(get(&c.backlog_records));
        metrics::gauge!(SPOOL_BACKLOG_BYTES).set(get(&c.backlog_bytes));
        metrics::gauge!(SPOOL_UP).set(if self.up.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        });
    }

    #[cfg(test)]
    fn inject(&self, f: faults::Fault) -> io::Result<()> {
        self.faults.check(f)
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn inject(&self, _f: faults::Fault) -> io::Result<()> {
        Ok(())
    }
}

/// Error injection for unit tests of the recovery path (compiled to nothing otherwise).
mod faults {
    #[derive(Clone, Copy)]
    pub enum Fault {
        Write,
        Sync,
        Open,
    }

    #[cfg(test)]
    #[derive(Default)]
    pub struct Faults {
        /// How many of the next operations of each kind fail.
        pub write: std::sync::atomic::AtomicU32,
        pub sync: std::sync::atomic::AtomicU32,
        pub open: std::sync::atomic::AtomicU32,
    }

    #[cfg(test)]
    impl Faults {
        pub fn check(&self, f: Fault) -> std::io::Result<()> {
            use std::sync::atomic::Ordering;
            let n = match f {
                Fault::Write => &self.write,
                Fault::Sync => &self.sync,
                Fault::Open => &self.open,
            };
            if n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                return Err(std::io::Error::other("injected I/O error"));
            }
            Ok(())
        }
    }
}

enum Job {
    Append {
        payloads: Vec<Bytes>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Seal the active segment if it holds records (the replayer forwarded them all), so it can
    /// be released.
    Roll,
}

struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    max_batch: usize,
    group_wait: Duration,
    /// The active segment, or the last one tried while `file` is `None`.
    seq: u64,
    /// `None` after an I/O error: no segment is trusted until a fresh one opens.
    file: Option<File>,
    /// Committed length of the active segment.
    len: u64,
    retry_at: Instant,
    backoff: Duration,
    /// Requests in the previous group: more than one means there is concurrency to wait for.
    last_group: usize,
}

impl Writer {
    fn open_segment(&self, seq: u64) -> io::Result<File> {
        let dir = &self.shared.dir;
        let path = dir.join(segment_name(seq));
        let r = (|| {
            self.shared.inject(faults::Fault::Open)?;
            let mut f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            f.write_all(MAGIC)?;
            f.sync_all()?;
            sync_dir(dir)?;
            Ok(f)
        })();
        if r.is_err() {
            // A partial segment holds nothing acknowledged; leaving it would only count as torn.
            let _ = fs::remove_file(&path);
        }
        r
    }

    /// Makes `seq` (just opened) the active segment.
    fn activate(&mut self, seq: u64, file: File) {
        self.seq = seq;
        self.file = Some(file);
        self.len = MAGIC_LEN;
        self.shared.segs.lock().insert(
            seq,
            SegInfo {
                good_len: MAGIC_LEN,
                ..SegInfo::default()
            },
        );
        let c = &self.shared.counters;
        c.segments.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(MAGIC_LEN, Ordering::Relaxed);
        *self.shared.tip.lock() = Pos {
            segment: seq,
            offset: MAGIC_LEN,
        };
        self.shared.wake.notify_one();
    }

    fn roll(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            self.shared.inject(faults::Fault::Sync)?;
            f.sync_data()?;
        }
        let next = self.seq + 1;
        // Even when opening fails, `next` is spent: a leftover file must not be reused.
        self.seq = next;
        let f = self.open_segment(next)?;
        self.activate(next, f);
        Ok(())
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut buf = Vec::with_capacity(1 << 20);
        loop {
            let first = if self.file.is_none() {
                // Down: try a fresh segment after the backoff, also when no request comes.
                let wait = self.retry_at.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => {
                        self.try_recover();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            let mut jobs = Vec::new();
            let mut n = 0;
            let mut roll = false;
            let mut take = |j: Job, jobs: &mut Vec<_>, n: &mut usize| match j {
                Job::Append { payloads, done } => {
                    *n += payloads.len();
                    jobs.push((payloads, done));
                }
                Job::Roll => roll = true,
            };
            take(first, &mut jobs, &mut n);
            while n < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => take(j, &mut jobs, &mut n),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.group_wait.is_zero() && self.last_group > 1 && !jobs.is_empty() {
                let deadline = Instant::now() + self.group_wait;
                while n < self.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(j) => take(j, &mut jobs, &mut n),
                        Err(_) => break,
                    }
                }
            }
            if !jobs.is_empty() {
                self.last_group = jobs.len();
                if self.file.is_none() && Instant::now() >= self.retry_at {
                    self.try_recover();
                }
                let result = if self.file.is_some() {
                    let started = Instant::now();
                    let r = self.commit(&jobs, &mut buf);
                    metrics::histogram!(crate::telemetry::SPOOL_FSYNC_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    if let Err(e) = &r {
                        self.abandon(e);
                    }
                    r
                } else {
                    Err(io::Error::other(
                        "spool unavailable after an I/O error (retrying with a fresh segment)",
                    ))
                };
                for (_, done) in jobs {
                    let r = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    let _ = done.send(r);
                }
            }
            if roll && self.file.is_some() && self.len > MAGIC_LEN {
                if let Err(e) = self.roll() {
                    self.abandon(&e);
                }
            }
            self.shared.publish();
        }
        // Channel closed: every group was synced before it was answered.
        if let Some(f) = &self.file {
            let _ = f.sync_data();
        }
    }

    fn commit(
        &mut self,
        jobs: &[(Vec<Bytes>, oneshot::Sender<io::Result<()>>)],
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        if self.len >= self.segment_bytes {
            self.roll()?;
        }
        buf.clear();
        let mut count = 0u64;
        for (payloads, _) in jobs {
            for p in payloads {
                frame(p, buf);
                count += 1;
            }
        }
        let file = self
            .file
            .as_mut()
            .expect("commit runs with an open segment");
        self.shared.inject(faults::Fault::Write)?;
        file.write_all(buf)?;
        self.shared.inject(faults::Fault::Sync)?;
        file.sync_data()?;
        self.len += buf.len() as u64;
        let bytes = buf.len() as u64;
        if let Some(info) = self.shared.segs.lock().get_mut(&self.seq) {
            info.records += count;
            info.good_len = self.len;
        }
        let c = &self.shared.counters;
        c.records.fetch_add(count, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        c.backlog_records.fetch_add(count, Ordering::Relaxed);
        c.backlog_bytes.fetch_add(bytes, Ordering::Relaxed);
        c.commits.fetch_add(1, Ordering::Relaxed);
        self.shared.tip.lock().offset = self.len;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// After a failed write or fsync: the segment ends at its last good offset and is never
    /// written again; the spool is down until a fresh segment opens.
    fn abandon(&mut self, e: &io::Error) {
        metrics::counter!(crate::telemetry::SPOOL_WRITE_ERRORS).increment(1);
        if let Some(f) = self.file.take() {
            // Best effort: cut what the failed group left behind, so no unacknowledged frame is
            // ever replayed. If this fails too, replay may forward a record whose sender was
            // told to retry (a duplicate downstream, never a loss).
            let _ = f.set_len(self.len);
        }
        if self.shared.up.swap(false, Ordering::Relaxed) {
            tracing::error!(
                error = %e,
                dir = %self.shared.dir.display(),
                segment = self.seq,
                "ALERT spool write failed: the spool stops acknowledging until a fresh segment can be written (retrying with backoff)"
            );
        } else {
            tracing::warn!(error = %e, "spool still failing");
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.shared.publish();
    }

    fn try_recover(&mut self) {
        let seq = self.seq + 1;
        self.seq = seq;
        match self.open_segment(seq) {
            Ok(f) => {
                self.activate(seq, f);
                self.backoff = FIRST_BACKOFF;
                self.shared.up.store(true, Ordering::Relaxed);
                tracing::warn!(segment = seq, "spool recovered: writing to a fresh segment");
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::SPOOL_WRITE_ERRORS).increment(1);
                tracing::warn!(error = %e, "spool still cannot open a segment");
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.shared.publish();
    }
}

pub struct Spool {
    shared: Arc<Shared>,
    tx: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Spool {
    /// Opens (creating) the spool directory, recovers existing segments, starts the writer.
    pub fn open(cfg: &SpoolConfig) -> io::Result<Self> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("spool {} is in use by another process", dir.display()),
            )
        })?;

        let cursor = load_cursor(&dir);
        let counters = Counters::default();
        let mut segs = BTreeMap::new();
        let segments = list_segments(&dir)?;
        let last_seq = segments.last().map(|(s, _)| *s).unwrap_or(0);
        for (seq, path) in &segments {
            if *seq < cursor.segment {
                // Wholly forwarded; its release was cut short by a stop or crash.
                fs::remove_file(path)?;
                metrics::counter!(crate::telemetry::SPOOL_SEGMENTS_RELEASED).increment(1);
                continue;
            }
            let info = survey_segment(*seq, path, cursor, |_| {})?;
            counters.segments.fetch_add(1, Ordering::Relaxed);
            counters.records.fetch_add(info.records, Ordering::Relaxed);
            counters.bytes.fetch_add(info.good_len, Ordering::Relaxed);
            counters
                .backlog_records
                .fetch_add(info.backlog_records, Ordering::Relaxed);
            counters
                .backlog_bytes
                .fetch_add(info.backlog_bytes, Ordering::Relaxed);
            if info.torn_bytes > 0 {
                counters.torn.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::telemetry::SPOOL_TORN_RECORDS).increment(1);
                tracing::warn!(
                    segment = %path.display(),
                    kept = info.records,
                    skipped_bytes = info.torn_bytes,
                    "spool segment has a torn or corrupt tail; earlier records kept"
                );
                if *seq == last_seq && info.good_len >= MAGIC_LEN {
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.set_len(info.good_len)?;
                    f.sync_all()?;
                }
            }
            segs.insert(*seq, info);
        }
        let backlog = counters.backlog_records.load(Ordering::Relaxed);
        if backlog > 0 {
            tracing::info!(
                records = backlog,
                cursor_segment = cursor.segment,
                cursor_offset = cursor.offset,
                "spool holds records not yet forwarded to Kafka"
            );
        }

        let shared = Arc::new(Shared {
            dir: dir.clone(),
            tip: parking_lot::Mutex::new(Pos::default()),
            wake: Notify::new(),
            up: AtomicBool::new(true),
            counters,
            segs: parking_lot::Mutex::new(segs),
            cursor: parking_lot::Mutex::new(cursor),
            #[cfg(test)]
            faults: faults::Faults::default(),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            segment_bytes: cfg.segment_bytes,
            max_batch: cfg.max_batch_records,
            group_wait: Duration::from_micros(cfg.group_commit_wait_us),
            seq: last_seq.max(cursor.segment),
            file: None,
            len: 0,
            retry_at: Instant::now(),
            backoff: FIRST_BACKOFF,
            last_group: 0,
        };
        let seq = writer.seq + 1;
        let file = writer.open_segment(seq)?;
        writer.activate(seq, file);
        shared.publish();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                // The lock lives as long as the writer.
                let _lock = lock;
                writer.run(rx)
            })?;
        Ok(Self {
            shared,
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn stats(&self) -> SpoolStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpoolStats {
            segments: get(&c.segments),
            records: get(&c.records),
            bytes: get(&c.bytes),
            torn: get(&c.torn),
            backlog_records: get(&c.backlog_records),
            backlog_bytes: get(&c.backlog_bytes),
            cursor: *self.shared.cursor.lock(),
        }
    }

    /// Group commits done so far (one write + fdatasync each).
    pub fn commits(&self) -> u64 {
        self.shared.counters.commits.load(Ordering::Relaxed)
    }

    /// Appends payloads; resolves once they are fsynced.
    pub async fn append(&self, payloads: Vec<Bytes>) -> Result<(), SinkError> {
        let (done, rx) = oneshot::channel();
        {
            let guard = self.tx.lock();
            let tx = guard.as_ref().ok_or(SinkError::Closed)?;
            tx.send(Job::Append { payloads, done })
                .map_err(|_| SinkError::Closed)?;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError::Spool(e.to_string())),
            Err(_) => Err(SinkError::Closed),
        }
    }

    pub fn usable(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed) && self.tx.lock().is_some()
    }

    /// The durable cursor.
    pub fn cursor(&self) -> Pos {
        *self.shared.cursor.lock()
    }

    /// The active segment and its committed length.
    pub fn tip(&self) -> Pos {
        *self.shared.tip.lock()
    }

    /// Resolves when records were committed or the active segment changed since the last call.
    pub async fn changed(&self) {
        self.shared.wake.notified().await
    }

    /// Asks the writer to seal the active segment if it holds records, so that a fully
    /// forwarded spool can release it.
    pub fn request_roll(&self) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(Job::Roll);
        }
    }

    /// Makes `pos` the durable cursor (`records`/`bytes` forwarded since the last one), then
    /// deletes the sealed segments wholly behind it. Blocking file I/O.
    pub fn commit_cursor(&self, pos: Pos, records: u64, bytes: u64) -> io::Result<()> {
        let sh = &self.shared;
        write_cursor(&sh.dir, pos)?;
        *sh.cursor.lock() = pos;
        let c = &sh.counters;
        // Saturating: records appended before a crash may be counted again after a restart.
        let sub = |a: &AtomicU64, v: u64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
                Some(x.saturating_sub(v))
            });
        };
        sub(&c.backlog_records, records);
        sub(&c.backlog_bytes, bytes);
        let active = sh.tip.lock().segment;
        let released: Vec<(u64, SegInfo)> = {
            let mut segs = sh.segs.lock();
            let keep = segs.split_off(&pos.segment.min(active));
            std::mem::replace(&mut *segs, keep).into_iter().collect()
        };
        for (seq, info) in released {
            match fs::remove_file(sh.dir.join(segment_name(seq))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Harmless: the next start deletes it (it is behind the cursor).
                    tracing::warn!(error = %e, segment = seq, "cannot release a forwarded spool segment");
                }
            }
            sub(&c.segments, 1);
            sub(&c.records, info.records);
            sub(&c.bytes, info.good_len);
            metrics::counter!(crate::telemetry::SPOOL_SEGMENTS_RELEASED).increment(1);
        }
        sh.publish();
        Ok(())
    }

    /// A reader of the log from `from`, for replay.
    pub fn tail(self: &Arc<Self>, from: Pos) -> Tail {
        Tail {
            spool: self.clone(),
            pos: from,
            reader: None,
            payload: Vec::new(),
        }
    }

    /// Stops the writer after it has committed everything queued.
    pub async fn close(&self) {
        let tx = self.tx.lock().take();
        drop(tx);
        let thread = self.thread.lock().take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    #[cfg(test)]
    fn faults(&self) -> &faults::Faults {
        &self.shared.faults
    }
}

/// One step of a `Tail`.
#[derive(Debug)]
pub enum Step {
    /// A record; `end` is the position just after it.
    Record {
        payload: Bytes,
        end: Pos,
        bytes: u64,
    },
    /// A sealed segment is done (read to its end, or its tail is torn); the log goes on at the
    /// given position. Nothing between the previous position and it is a record.
    Next(Pos),
    /// Everything committed so far has been read.
    Idle,
}

/// Reads the log in order from a position, never past what the writer has committed.
pub struct Tail {
    spool: Arc<Spool>,
    pos: Pos,
    reader: Option<(u64, FrameReader)>,
    payload: Vec<u8>,
}

impl Tail {
    pub fn pos(&self) -> Pos {
        self.pos
    }

    /// Goes back (or forward) to `pos`, e.g. to resend from the last acknowledged record.
    pub fn reset(&mut self, pos: Pos) {
        self.pos = pos;
        self.reader = None;
    }

    /// Up to `max` steps, stopping at the first `Idle`. Blocking file I/O.
    pub fn read(&mut self, max: usize) -> io::Result<Vec<Step>> {
        let mut out = Vec::new();
        while out.len() < max {
            let step = self.next()?;
            let idle = matches!(step, Step::Idle);
            out.push(step);
            if idle {
                break;
            }
        }
        Ok(out)
    }

    fn next(&mut self) -> io::Result<Step> {
        let tip = self.spool.tip();
        if self.pos.segment > tip.segment {
            return Ok(Step::Idle);
        }
        let dir = self.spool.dir().to_path_buf();
        if self.reader.as_ref().map(|(s, _)| *s) != Some(self.pos.segment) {
            let path = dir.join(segment_name(self.pos.segment));
            match FrameReader::open(&path, self.pos.offset) {
                Ok(r) => self.reader = Some((self.pos.segment, r)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return self.skip_to_next(&dir, tip);
                }
                Err(e) => return Err(e),
            }
        }
        let sealed = self.pos.segment < tip.segment;
        let limit = (!sealed).then_some(tip.offset);
        let (_, reader) = self.reader.as_mut().expect("opened above");
        match reader.next(limit, &mut self.payload)? {
            Frame::Record { start, end } => {
                let bytes = end - start;
                self.pos.offset = end;
                Ok(Step::Record {
                    payload: Bytes::copy_from_slice(&self.payload),
                    end: self.pos,
                    bytes,
                })
            }
            Frame::End if !sealed => Ok(Step::Idle),
            Frame::End => self.skip_to_next(&dir, tip),
            Frame::Bad => {
                metrics::counter!(crate::telemetry::SPOOL_TORN_RECORDS).increment(1);
                tracing::error!(
                    segment = self.pos.segment,
                    offset = self.pos.offset,
                    "spool segment is corrupt past this offset; replay goes on with the next segment"
                );
                if sealed {
                    self.skip_to_next(&dir, tip)
                } else {
                    self.spool.request_roll();
                    Ok(Step::Idle)
                }
            }
        }
    }

    /// Moves to the first segment after the current one (at most the active one).
    fn skip_to_next(&mut self, dir: &Path, tip: Pos) -> io::Result<Step> {
        let next = list_segments(dir)?
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| *s > self.pos.segment && *s <= tip.segment);
        match next {
            Some(seq) => {
                self.pos = Pos {
                    segment: seq,
                    offset: MAGIC_LEN,
                };
                self.reader = None;
                Ok(Step::Next(self.pos))
            }
            None => Ok(Step::Idle),
        }
    }
}

impl Sink for Spool {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move {
            let started = Instant::now();
            let payloads = batch.iter().map(|e| e.payload.clone()).collect();
            let r = self.append(payloads).await;
            metrics::histogram!(crate::telemetry::SINK_WRITE_SECONDS, "sink" => "spool")
                .record(started.elapsed().as_secs_f64());
            if r.is_err() {
                metrics::counter!(crate::telemetry::SINK_ERRORS, "sink" => "spool").increment(1);
            }
            r.map(|()| vec![Landed::Spool; batch.len()])
        })
    }

    fn health(&self) -> Health {
        let ok = self.usable();
        Health {
            usable: ok,
            healthy: ok,
            parts: vec![("spool".into(), if ok { "up" } else { "failed" }.into())],
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 4096,
            max_batch_records: 64,
            ..SpoolConfig::default()
        }
    }

    fn payload(i: usize) -> Bytes {
        Bytes::from(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(100)))
    }

    fn n_of(p: &[u8]) -> usize {
        serde_json::from_slice::<serde_json::Value>(p).unwrap()["n"]
            .as_u64()
            .unwrap() as usize
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_roll_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        let mut handles = Vec::new();
        let spool = Arc::new(spool);
        for i in 0..100 {
            let s = spool.clone();
            handles.push(tokio::spawn(
                async move { s.append(vec![payload(i)]).await },
            ));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        spool.close().await;
        let (records, stats) = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 100);
        assert!(stats.segments > 1, "4 KiB segments roll");
        assert_eq!(stats.torn, 0);
        assert_eq!(stats.backlog_records, 100, "no cursor: nothing forwarded");
        drop(spool);
        // Reopen: old records still readable, new ones appended after.
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        assert_eq!(spool.stats().records, 100);
        assert_eq!(spool.stats().backlog_records, 100);
        spool.append(vec![payload(100)]).await.unwrap();
        spool.close().await;
        let (records, _) = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 101);
        assert_eq!(records[100], payload(100).to_vec());
    }

    #[tokio::test]
    async fn torn_last_record_is_skipped_and_earlier_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&SpoolConfig {
            segment_bytes: 1 << 20,
            ..cfg(tmp.path())
        })
        .unwrap();
        for i in 0..5 {
            spool.append(vec![payload(i)]).await.unwrap();
        }
        spool.close().await;
        drop(spool);
        // Simulate a crash mid-write: cut the last frame short.
        let (_, last) = list_segments(tmp.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let (records, stats) = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(stats.torn, 1);

        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        assert_eq!(spool.stats().records, 4);
        assert_eq!(spool.stats().torn, 1);
        spool.append(vec![payload(9)]).await.unwrap();
        spool.close().await;
        let (records, stats) = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 5, "four kept plus the new one");
        assert_eq!(stats.torn, 0, "recovery truncated the torn tail");
        assert_eq!(records[3], payload(3).to_vec());
        assert_eq!(records[4], payload(9).to_vec());
    }

    #[tokio::test]
    async fn corrupt_frame_is_detected_by_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        spool.append(vec![payload(0), payload(1)]).await.unwrap();
        spool.close().await;
        let (_, last) = list_segments(tmp.path()).unwrap().pop().unwrap();
        let mut data = fs::read(&last).unwrap();
        let n = data.len();
        data[n - 3] ^= 0xff;
        fs::write(&last, data).unwrap();
        let (records, stats) = read_all(tmp.path()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(stats.torn, 1);
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_the_same_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let _a = Spool::open(&cfg(tmp.path())).unwrap();
        let e = Spool::open(&cfg(tmp.path())).err().expect("locked");
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn cursor_is_replaced_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(read_cursor(dir).unwrap(), None);
        let a = Pos {
            segment: 3,
            offset: 120,
        };
        write_cursor(dir, a).unwrap();
        assert_eq!(read_cursor(dir).unwrap(), Some(a));
        // A crash after writing the temp file, before the rename: the old cursor stands.
        fs::write(dir.join(CURSOR_TMP), b"{\"segment\":9,\"off").unwrap();
        assert_eq!(read_cursor(dir).unwrap(), Some(a));
        // The next update overwrites the leftover and replaces the cursor whole.
        let b = Pos {
            segment: 4,
            offset: 8,
        };
        write_cursor(dir, b).unwrap();
        assert_eq!(read_cursor(dir).unwrap(), Some(b));
        assert!(!dir.join(CURSOR_TMP).exists());
        // A damaged cursor (never written by us) means: replay everything, lose nothing.
        fs::write(dir.join(CURSOR_FILE), b"garbage").unwrap();
        assert!(read_cursor(dir).is_err());
        assert_eq!(load_cursor(dir), Pos::default());
    }

    /// Reads everything the tail yields until idle: (records' n, positions after each record).
    fn drain_tail(tail: &mut Tail) -> (Vec<usize>, Vec<Pos>, usize) {
        let mut ns = Vec::new();
        let mut ends = Vec::new();
        let mut boundaries = 0;
        loop {
            let steps = tail.read(7).unwrap();
            let mut idle = false;
            for s in steps {
                match s {
                    Step::Record { payload, end, .. } => {
                        ns.push(n_of(&payload));
                        ends.push(end);
                    }
                    Step::Next(_) => boundaries += 1,
                    Step::Idle => idle = true,
                }
            }
            if idle {
                return (ns, ends, boundaries);
            }
        }
    }

    #[tokio::test]
    async fn tail_reads_in_order_and_the_cursor_releases_forwarded_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(&cfg(tmp.path())).unwrap());
        for i in 0..100 {
            spool.append(vec![payload(i)]).await.unwrap();
        }
        let segments = spool.stats().segments;
        assert!(segments > 3, "{segments}");
        let mut tail = spool.tail(spool.cursor());
        let (ns, ends, boundaries) = drain_tail(&mut tail);
        assert_eq!(ns, (0..100).collect::<Vec<_>>(), "spool order");
        assert!(boundaries as u64 >= segments - 1);
        // Nothing more until something is committed; then exactly the new record.
        assert_eq!(drain_tail(&mut tail).0, Vec::<usize>::new());
        spool.append(vec![payload(100)]).await.unwrap();
        assert_eq!(drain_tail(&mut tail).0, vec![100]);

        // Forward the first 50: the segments wholly before record 50 go, the rest stays.
        let cut = ends[49];
        let bytes: u64 = 50 * (FRAME_HEADER + payload(0).len() as u64);
        spool.commit_cursor(cut, 50, bytes).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.backlog_records, 51);
        assert_eq!(stats.cursor, cut);
        let on_disk = list_segments(tmp.path()).unwrap();
        assert!(on_disk.iter().all(|(s, _)| *s >= cut.segment));
        assert!((on_disk.len() as u64) < segments);
        assert_eq!(stats.segments, on_disk.len() as u64);
        spool.close().await;
        drop(tail);
        drop(spool);

        // After a restart the backlog starts at the cursor.
        let spool = Arc::new(Spool::open(&cfg(tmp.path())).unwrap());
        assert_eq!(spool.stats().backlog_records, 51);
        assert_eq!(stats_of(tmp.path()).unwrap().backlog_records, 51);
        let mut tail = spool.tail(spool.cursor());
        let (ns, ends, _) = drain_tail(&mut tail);
        assert_eq!(ns, (50..=100).collect::<Vec<_>>());
        // Everything forwarded: every sealed segment is released.
        let end = *ends.last().unwrap();
        spool.commit_cursor(end, 51, 0).unwrap();
        assert_eq!(spool.stats().backlog_records, 0);
        spool.request_roll();
        spool.close().await;
        let left = list_segments(tmp.path()).unwrap();
        assert!(left.iter().all(|(s, _)| *s >= end.segment), "{left:?}");
        assert_eq!(stats_of(tmp.path()).unwrap().backlog_records, 0);
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_fsync_refuses_the_group_and_the_spool_recovers_on_a_fresh_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&SpoolConfig {
            segment_bytes: 1 << 20,
            ..cfg(tmp.path())
        })
        .unwrap();
        spool.append(vec![payload(0)]).await.unwrap();
        let seg_before = spool.tip().segment;
        spool.faults().sync.store(1, Ordering::Relaxed);
        let e = spool.append(vec![payload(1)]).await.unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(!spool.usable(), "down after a failed fsync");
        // While down, requests fail at once rather than touching the damaged segment.
        assert!(spool.append(vec![payload(2)]).await.is_err());
        // It comes back by itself (no request needed) on a fresh segment.
        wait_until("recovery", || spool.usable()).await;
        assert!(spool.tip().segment > seg_before);
        spool.append(vec![payload(3)]).await.unwrap();
        spool.close().await;
        let (records, stats) = read_all(tmp.path()).unwrap();
        let ns: Vec<usize> = records.iter().map(|r| n_of(r)).collect();
        assert_eq!(
            ns,
            vec![0, 3],
            "refused records are not in the spool, acked ones are"
        );
        assert_eq!(
            stats.torn, 0,
            "the damaged segment was cut at its last good frame"
        );
    }

    #[tokio::test]
    async fn failed_writes_and_failed_reopens_back_off_and_recover() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        spool.faults().write.store(1, Ordering::Relaxed);
        spool.faults().open.store(2, Ordering::Relaxed);
        assert!(spool.append(vec![payload(0)]).await.is_err());
        assert!(!spool.usable());
        // Two reopen attempts fail (100 ms, then 200 ms of backoff), the third succeeds.
        wait_until("recovery", || spool.usable()).await;
        assert_eq!(spool.faults().open.load(Ordering::Relaxed), 0);
        for i in 1..=3 {
            spool.append(vec![payload(i)]).await.unwrap();
        }
        // Rolling to a new segment fails once too: the group is refused, then recovered.
        spool.faults().open.store(1, Ordering::Relaxed);
        let big: Vec<Bytes> = (10..40).map(payload).collect();
        spool.append(big.clone()).await.unwrap();
        let r = spool.append(vec![payload(50)]).await;
        assert!(r.is_err(), "the roll to a fresh segment failed");
        wait_until("recovery", || spool.usable()).await;
        spool.append(vec![payload(51)]).await.unwrap();
        spool.close().await;
        let (records, _) = read_all(tmp.path()).unwrap();
        let ns: Vec<usize> = records.iter().map(|r| n_of(r)).collect();
        let mut want = vec![1, 2, 3];
        want.extend(10..40);
        want.push(51);
        assert_eq!(ns, want);
    }

    /// Sequential appends by `tasks` concurrent tasks; returns the group commits used.
    async fn commits_for(wait_us: u64, tasks: usize, each: usize) -> u64 {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Arc::new(
            Spool::open(&SpoolConfig {
                segment_bytes: 64 << 20,
                group_commit_wait_us: wait_us,
                ..cfg(tmp.path())
            })
            .unwrap(),
        );
        let mut handles = Vec::new();
        for t in 0..tasks {
            let s = spool.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..each {
                    s.append(vec![payload(t * 1000 + i)]).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let commits = spool.commits();
        spool.close().await;
        assert_eq!(read_all(tmp.path()).unwrap().0.len(), tasks * each);
        commits
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_wait_collects_concurrent_requests_and_never_delays_a_lone_one() {
        // 32 concurrent writers: with a (generous, for a loaded CI machine) 20 ms wait nearly all
        // of them share each fsync; without it, groups are whatever happened to be queued.
        let with = commits_for(20_000, 32, 10).await;
        assert!(with <= 40, "{with} commits for 320 records with the wait");
        let without = commits_for(0, 32, 10).await;
        assert!(with < without, "with wait {with}, without {without}");
        // One writer at a time: every group is a single request, so no commit ever waits (with
        // a 1 s wait, 5 waits would take 5 s).
        let started = Instant::now();
        let lone = commits_for(1_000_000, 1, 5).await;
        assert_eq!(lone, 5);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a lone request waited"
        );
    }
}
