//! The spool: a local append-only log of records, checksummed, in segments, with group commit.
//!
//! Layout: `DIR/LOCK` (held while a gateway uses the directory) and segments
//! `DIR/00000000000000000001.seg`, ... Each segment starts with the 8-byte magic `SBSPOOL1`,
//! then frames: `len: u32 LE | crc32(payload): u32 LE | payload`. The payload is the record JSON;
//! key and headers are derived from it again on replay.
//!
//! One writer thread owns the open segment. Requests queue their frames; the thread takes all that
//! are waiting (up to `max_batch_records`), writes them, calls `fdatasync` once, and only then
//! answers every request in the group: one fsync per group, not per record, and nothing is
//! acknowledged before it is on disk.
//!
//! On open, every segment is scanned. A torn or corrupt frame (a crash mid-write) ends its
//! segment: earlier frames are kept, the rest is skipped and counted, and the last segment is
//! truncated to its last good frame. Appends always go to a fresh segment.

use super::{Encoded, Health, Landed, Sink, SinkError};
use crate::config::SpoolConfig;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

pub const MAGIC: &[u8; 8] = b"SBSPOOL1";
const FRAME_HEADER: usize = 8;
/// A frame longer than this is corruption, not a record (the HTTP body cap is far below).
const MAX_FRAME: u32 = 64 * 1024 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    pub torn: u64,
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    torn: AtomicU64,
}

impl Counters {
    fn publish(&self) {
        use crate::telemetry::*;
        metrics::gauge!(SPOOL_SEGMENTS).set(self.segments.load(Ordering::Relaxed) as f64);
        metrics::gauge!(SPOOL_RECORDS).set(self.records.load(Ordering::Relaxed) as f64);
        metrics::gauge!(SPOOL_BYTES).set(self.bytes.load(Ordering::Relaxed) as f64);
    }
}

struct Job {
    payloads: Vec<Bytes>,
    done: oneshot::Sender<io::Result<()>>,
}

pub struct Spool {
    dir: PathBuf,
    tx: parking_lot::Mutex<Option<mpsc::UnboundedSender<Job>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Arc<Counters>,
    failed: Arc<AtomicBool>,
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

/// Result of reading one segment.
pub struct SegmentScan {
    pub records: Vec<Vec<u8>>,
    /// Offset just past the last good frame.
    pub good_len: u64,
    /// Bytes after the last good frame (a torn or corrupt tail).
    pub torn_bytes: u64,
}

/// Reads a segment's frames up to the first torn or corrupt one.
pub fn scan_segment(path: &Path) -> io::Result<SegmentScan> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let total = data.len() as u64;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Ok(SegmentScan {
            records: Vec::new(),
            good_len: 0,
            torn_bytes: total,
        });
    }
    let mut pos = MAGIC.len();
    let mut records = Vec::new();
    while pos + FRAME_HEADER <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + FRAME_HEADER;
        if len > MAX_FRAME || start + len as usize > data.len() {
            break;
        }
        let payload = &data[start..start + len as usize];
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        pos = start + len as usize;
    }
    Ok(SegmentScan {
        records,
        good_len: pos as u64,
        torn_bytes: total - pos as u64,
    })
}

/// Reads every record in a spool directory (read-only; usable while a gateway runs).
pub fn read_all(dir: &Path) -> io::Result<(Vec<Vec<u8>>, SpoolStats)> {
    let mut stats = SpoolStats::default();
    let mut records = Vec::new();
    if !dir.exists() {
        return Ok((records, stats));
    }
    for (_, path) in list_segments(dir)? {
        let scan = scan_segment(&path)?;
        stats.segments += 1;
        stats.records += scan.records.len() as u64;
        stats.bytes += scan.good_len;
        if scan.torn_bytes > 0 {
            stats.torn += 1;
        }
        records.extend(scan.records);
    }
    Ok((records, stats))
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    max_batch: usize,
    seq: u64,
    file: File,
    len: u64,
    counters: Arc<Counters>,
    failed: Arc<AtomicBool>,
}

impl Writer {
    fn open_segment(dir: &Path, seq: u64) -> io::Result<File> {
        let path = dir.join(segment_name(seq));
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
        sync_dir(dir)?;
        Ok(f)
    }

    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.seq += 1;
        self.file = Self::open_segment(&self.dir, self.seq)?;
        self.len = MAGIC.len() as u64;
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(MAGIC.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            let mut n = jobs[0].payloads.len();
            while n < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => {
                        n += j.payloads.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let result = self.commit(&jobs, &mut buf);
            metrics::histogram!(crate::telemetry::SPOOL_FSYNC_SECONDS)
                .record(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                tracing::error!(error = %e, "spool write failed; the spool stops accepting");
                self.failed.store(true, Ordering::Relaxed);
            }
            for job in jobs {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                let _ = job.done.send(r);
            }
            self.counters.publish();
        }
        // Channel closed: final sync happened with the last group; sync once more for safety.
        let _ = self.file.sync_data();
    }

    fn commit(&mut self, jobs: &[Job], buf: &mut Vec<u8>) -> io::Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(io::Error::other("spool failed earlier"));
        }
        if self.len >= self.segment_bytes {
            self.roll()?;
        }
        buf.clear();
        let mut count = 0u64;
        for job in jobs {
            for p in &job.payloads {
                frame(p, buf);
                count += 1;
            }
        }
        self.file.write_all(buf)?;
        self.file.sync_data()?;
        self.len += buf.len() as u64;
        self.counters.records.fetch_add(count, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
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

        let counters = Arc::new(Counters::default());
        let segments = list_segments(&dir)?;
        let last_seq = segments.last().map(|(s, _)| *s).unwrap_or(0);
        for (seq, path) in &segments {
            let scan = scan_segment(path)?;
            counters.segments.fetch_add(1, Ordering::Relaxed);
            counters
                .records
                .fetch_add(scan.records.len() as u64, Ordering::Relaxed);
            counters.bytes.fetch_add(scan.good_len, Ordering::Relaxed);
            if scan.torn_bytes > 0 {
                counters.torn.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::telemetry::SPOOL_TORN_RECORDS).increment(1);
                tracing::warn!(
                    segment = %path.display(),
                    kept = scan.records.len(),
                    skipped_bytes = scan.torn_bytes,
                    "spool segment has a torn or corrupt tail; earlier records kept"
                );
                if *seq == last_seq && scan.good_len >= MAGIC.len() as u64 {
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.set_len(scan.good_len)?;
                    f.sync_all()?;
                }
            }
        }

        let seq = last_seq + 1;
        let file = Writer::open_segment(&dir, seq)?;
        counters.segments.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes
            .fetch_add(MAGIC.len() as u64, Ordering::Relaxed);
        counters.publish();
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            dir: dir.clone(),
            segment_bytes: cfg.segment_bytes,
            max_batch: cfg.max_batch_records,
            seq,
            file,
            len: MAGIC.len() as u64,
            counters: counters.clone(),
            failed: failed.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                // The lock lives as long as the writer.
                let _lock = lock;
                writer.run(rx)
            })?;
        Ok(Self {
            dir,
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some(thread)),
            counters,
            failed,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            segments: self.counters.segments.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
            torn: self.counters.torn.load(Ordering::Relaxed),
        }
    }

    /// Appends payloads; resolves once they are fsynced.
    pub async fn append(&self, payloads: Vec<Bytes>) -> Result<(), SinkError> {
        let (done, rx) = oneshot::channel();
        {
            let guard = self.tx.lock();
            let tx = guard.as_ref().ok_or(SinkError::Closed)?;
            tx.send(Job { payloads, done })
                .map_err(|_| SinkError::Closed)?;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError::Spool(e.to_string())),
            Err(_) => Err(SinkError::Closed),
        }
    }

    pub fn usable(&self) -> bool {
        !self.failed.load(Ordering::Relaxed) && self.tx.lock().is_some()
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
        }
    }

    fn payload(i: usize) -> Bytes {
        Bytes::from(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(100)))
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
        drop(spool);
        // Reopen: old records still readable, new ones appended after.
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        assert_eq!(spool.stats().records, 100);
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
}
