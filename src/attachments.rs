//! The attachment store: email attachment bytes on their own volume, content-addressed (a file
//! per sha256), with quotas and retention.
//!
//! Quotas: bytes per message, per sender per hour, in all; and free space kept on the volume. An
//! attachment over a quota, or whose write fails (a full disk included), is not stored: the mail
//! is still recorded, and its attachment entry says `stored: false` with `omitted` naming why.
//! Writes go to a temp file (`.<sha>.<ulid>`) renamed into place; the temp file is removed on
//! every failure path (a guard deletes it unless the rename happened). A sweep deletes files
//! older than `max_age`, temp files a crash left behind, and recounts the store from the disk.

use crate::telemetry::{
    ATTACHMENTS, ATTACHMENTS_DELETED, ATTACHMENT_STORE_BYTES, ATTACHMENT_STORE_FILES,
    DISK_FREE_BYTES,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Temp files older than this are left-overs of a crash (a write takes milliseconds).
const STALE_TEMP: Duration = Duration::from_secs(600);
const HOUR: Duration = Duration::from_secs(3600);

/// Why an attachment's bytes were not stored (the record's `omitted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Omitted {
    QuotaMessage,
    QuotaSender,
    QuotaTotal,
    DiskLow,
    DiskFull,
    WriteError,
}

impl Omitted {
    pub fn code(self) -> &'static str {
        match self {
            Omitted::QuotaMessage => "quota_message",
            Omitted::QuotaSender => "quota_sender",
            Omitted::QuotaTotal => "quota_total",
            Omitted::DiskLow => "disk_low",
            Omitted::DiskFull => "disk_full",
            Omitted::WriteError => "write_error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreLimits {
    pub max_message_bytes: u64,
    pub sender_bytes_per_hour: u64,
    pub max_total_bytes: u64,
    /// `None`: kept forever.
    pub max_age: Option<Duration>,
    pub min_free_bytes: u64,
}

impl StoreLimits {
    pub fn from_config(e: &crate::config::EmailConfig) -> Self {
        Self {
            max_message_bytes: e.attachment_max_message_bytes,
            sender_bytes_per_hour: e.attachment_sender_bytes_per_hour,
            max_total_bytes: e.attachment_max_total_bytes,
            max_age: (e.attachment_max_age_hours > 0)
                .then(|| Duration::from_secs(e.attachment_max_age_hours.saturating_mul(3600))),
            min_free_bytes: e.attachment_min_free_bytes,
        }
    }
}

/// Bytes one message has stored so far (its per-message quota).
#[derive(Debug, Default)]
pub struct MessageBudget {
    used: u64,
}

#[derive(Default)]
struct State {
    /// Bytes and files in the store (recounted by every sweep).
    bytes: u64,
    files: u64,
    /// Per sender (hashed address): start of its hour and the bytes stored in it.
    senders: HashMap<u64, (Instant, u64)>,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub expired: u64,
    pub stale_temp: u64,
    pub bytes: u64,
    pub files: u64,
}

impl std::fmt::Debug for AttachmentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachmentStore")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

pub struct AttachmentStore {
    dir: PathBuf,
    url_prefix: String,
    limits: StoreLimits,
    state: Mutex<State>,
}

/// Deletes a temp file unless it was renamed into place.
struct TempFile<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, "could not remove an attachment temp file");
                }
            }
        }
    }
}

fn is_sha_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// ENOSPC or EDQUOT: the volume (or the user's quota on it) is full.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn count(outcome: &'static str) {
    metrics::counter!(ATTACHMENTS, "outcome" => outcome).increment(1);
}

/// Removes files in `dir` (not below) whose mtime is older than `age`, when `pick` selects their
/// name; returns how many.
pub fn remove_older_than(
    dir: &Path,
    age: Duration,
    now: SystemTime,
    pick: impl Fn(&str) -> bool,
) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !pick(name) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|d| d > age);
        if meta.is_file() && old && std::fs::remove_file(entry.path()).is_ok() {
            n += 1;
        }
    }
    n
}

impl AttachmentStore {
    /// Creates the directory if needed, removes stale temp files and counts what is stored. A
    /// directory that cannot be created is logged, not fatal: intake goes on, attachments are
    /// recorded without their bytes (`write_error`) until it can be written.
    pub fn open(dir: PathBuf, url_prefix: String, limits: StoreLimits) -> std::sync::Arc<Self> {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(error = %e, dir = %dir.display(), "email.attachment_dir cannot be created; attachments are recorded without their bytes");
        }
        let store = std::sync::Arc::new(Self {
            dir,
            url_prefix,
            limits,
            state: Mutex::new(State::default()),
        });
        store.sweep(SystemTime::now());
        store
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Free bytes on the store's volume (also published as the gauge).
    pub fn free_bytes(&self) -> Option<u64> {
        let free = crate::disk::free_bytes(&self.dir).ok()?;
        metrics::gauge!(DISK_FREE_BYTES, "volume" => "attachments").set(free as f64);
        Some(free)
    }

    /// Free bytes on the volume, and whether that is under the free space it keeps
    /// (`/readyz`, informational).
    pub fn headroom(&self) -> serde_json::Value {
        match self.free_bytes() {
            Some(free) => serde_json::json!({
                "free_bytes": free,
                "low": free < self.limits.min_free_bytes,
            }),
            None => serde_json::json!({"free_bytes": null, "low": true}),
        }
    }

    fn url(&self, sha: &str) -> String {
        format!("{}{sha}", self.url_prefix)
    }

    /// Stores `bytes` (whose sha256 is `sha`, 64 hex digits) for `sender`, within the quotas;
    /// returns the reference, or why the bytes were not stored.
    pub fn put(
        &self,
        sender: &str,
        message: &mut MessageBudget,
        sha: &str,
        bytes: &[u8],
    ) -> Result<String, Omitted> {
        let outcome = self.put_inner(sender, message, sha, bytes);
        match &outcome {
            Ok(true) => count("stored"),
            Ok(false) => count("existing"),
            Err(o) => count(o.code()),
        }
        outcome.map(|_| self.url(sha))
    }

    /// `Ok(true)`: written; `Ok(false)`: already stored.
    fn put_inner(
        &self,
        sender: &str,
        message: &mut MessageBudget,
        sha: &str,
        bytes: &[u8],
    ) -> Result<bool, Omitted> {
        let size = bytes.len() as u64;
        if message.used.saturating_add(size) > self.limits.max_message_bytes {
            return Err(Omitted::QuotaMessage);
        }
        let path = self.dir.join(sha);
        if path.is_file() {
            // Already stored: referenced again, so its age starts over (retention counts from
            // the last mail that needs it). No new bytes: no sender or total quota spent.
            let _ = std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            message.used += size;
            return Ok(false);
        }
        let key = foldhash::fast::FixedState::with_seed(0x5b0a).hash_one(sender);
        {
            let mut st = self.state.lock();
            let now = Instant::now();
            let window = st.senders.entry(key).or_insert((now, 0));
            if now.duration_since(window.0) >= HOUR {
                *window = (now, 0);
            }
            if window.1.saturating_add(size) > self.limits.sender_bytes_per_hour {
                return Err(Omitted::QuotaSender);
            }
            if st.bytes.saturating_add(size) > self.limits.max_total_bytes {
                return Err(Omitted::QuotaTotal);
            }
            // Reserved now, released below if the write fails.
            st.bytes += size;
            st.files += 1;
            if let Some(w) = st.senders.get_mut(&key) {
                w.1 += size;
            }
        }
        let release = |st: &mut State| {
            st.bytes = st.bytes.saturating_sub(size);
            st.files = st.files.saturating_sub(1);
            if let Some(w) = st.senders.get_mut(&key) {
                w.1 = w.1.saturating_sub(size);
            }
        };
        // 0: no headroom kept (the write finds out, `disk_full`).
        let low = self.limits.min_free_bytes > 0
            && self
                .free_bytes()
                .is_some_and(|free| free < size.saturating_add(self.limits.min_free_bytes));
        if low {
            release(&mut self.state.lock());
            return Err(Omitted::DiskLow);
        }
        match self.write(sha, &path, bytes) {
            Ok(written) => {
                message.used += size;
                if !written {
                    release(&mut self.state.lock());
                }
                self.publish();
                Ok(written)
            }
            Err(e) => {
                release(&mut self.state.lock());
                let full = is_disk_full(&e);
                // The error kind only: never a path with a sender's file name in it.
                tracing::warn!(error_kind = %e.kind(), disk_full = full, "attachment not stored: write failed");
                self.free_bytes();
                Err(if full {
                    Omitted::DiskFull
                } else {
                    Omitted::WriteError
                })
            }
        }
    }

    /// Temp file, fsync, rename; `Ok(false)` when another mail stored the same bytes meanwhile.
    fn write(&self, sha: &str, path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
        let tmp = self.dir.join(format!(".{sha}.{}", ulid::Ulid::new()));
        let mut guard = TempFile {
            path: &tmp,
            armed: true,
        };
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if path.is_file() {
            return Ok(false);
        }
        std::fs::rename(&tmp, path)?;
        guard.armed = false;
        Ok(true)
    }

    fn publish(&self) {
        let st = self.state.lock();
        metrics::gauge!(ATTACHMENT_STORE_BYTES).set(st.bytes as f64);
        metrics::gauge!(ATTACHMENT_STORE_FILES).set(st.files as f64);
    }

    /// Retention: deletes stored files older than `max_age` and stale temp files, forgets
    /// senders whose hour is over, recounts the store and publishes the gauges. Blocking.
    pub fn sweep(&self, now: SystemTime) -> Swept {
        let mut out = Swept {
            stale_temp: remove_older_than(&self.dir, STALE_TEMP, now, |n| n.starts_with('.')),
            ..Swept::default()
        };
        if let Some(age) = self.limits.max_age {
            out.expired = remove_older_than(&self.dir, age, now, is_sha_name);
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let stored = entry.file_name().to_str().is_some_and(is_sha_name);
                if let (true, Ok(meta)) = (stored, entry.metadata()) {
                    if meta.is_file() {
                        out.bytes += meta.len();
                        out.files += 1;
                    }
                }
            }
        }
        {
            let mut st = self.state.lock();
            st.bytes = out.bytes;
            st.files = out.files;
            let t = Instant::now();
            st.senders.retain(|_, w| t.duration_since(w.0) < HOUR);
        }
        if out.expired > 0 {
            metrics::counter!(ATTACHMENTS_DELETED, "reason" => "expired").increment(out.expired);
        }
        if out.stale_temp > 0 {
            metrics::counter!(ATTACHMENTS_DELETED, "reason" => "stale_temp")
                .increment(out.stale_temp);
        }
        if out.expired + out.stale_temp > 0 {
            tracing::info!(
                expired = out.expired,
                stale_temp = out.stale_temp,
                "attachment sweep"
            );
        }
        self.publish();
        self.free_bytes();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn limits() -> StoreLimits {
        StoreLimits {
            max_message_bytes: 1000,
            sender_bytes_per_hour: 1500,
            max_total_bytes: 2500,
            max_age: Some(Duration::from_secs(3600)),
            min_free_bytes: 0,
        }
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn quotas_per_message_sender_and_total() {
        let dir = tempfile::tempdir().unwrap();
        let s = AttachmentStore::open(dir.path().into(), "a:".into(), limits());
        let (a, b, c) = (vec![1u8; 600], vec![2u8; 600], vec![3u8; 600]);
        let mut m = MessageBudget::default();
        assert_eq!(
            s.put("x", &mut m, &sha(&a), &a),
            Ok(format!("a:{}", sha(&a)))
        );
        // 600 + 600 > 1000 in one message.
        assert_eq!(s.put("x", &mut m, &sha(&b), &b), Err(Omitted::QuotaMessage));
        // The same bytes again: already stored, no sender bytes spent.
        let mut m = MessageBudget::default();
        assert!(s.put("x", &mut m, &sha(&a), &a).is_ok());
        let mut m = MessageBudget::default();
        assert!(s.put("x", &mut m, &sha(&b), &b).is_ok());
        // 1200 this hour; 600 more is over 1500.
        let mut m = MessageBudget::default();
        assert_eq!(s.put("x", &mut m, &sha(&c), &c), Err(Omitted::QuotaSender));
        // Another sender: 1200 + 600 stored = 1800; then 2400; 3000 > 2500.
        assert!(s
            .put("y", &mut MessageBudget::default(), &sha(&c), &c)
            .is_ok());
        let d = vec![4u8; 600];
        assert!(s
            .put("z", &mut MessageBudget::default(), &sha(&d), &d)
            .is_ok());
        let e = vec![5u8; 600];
        assert_eq!(
            s.put("w", &mut MessageBudget::default(), &sha(&e), &e),
            Err(Omitted::QuotaTotal)
        );
        assert_eq!(files(dir.path()).len(), 4, "no temp file left");
        let swept = s.sweep(SystemTime::now());
        assert_eq!((swept.files, swept.bytes), (4, 2400));
    }

    #[test]
    fn failed_write_leaves_no_temp_file_and_releases_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let s = AttachmentStore::open(dir.path().into(), "a:".into(), limits());
        let a = vec![1u8; 600];
        // A directory where the file would go: the rename fails.
        std::fs::create_dir_all(dir.path().join(sha(&a)).join("x")).unwrap();
        assert_eq!(
            s.put("x", &mut MessageBudget::default(), &sha(&a), &a),
            Err(Omitted::WriteError)
        );
        assert_eq!(files(dir.path()), vec![sha(&a)], "only the directory");
        std::fs::remove_dir_all(dir.path().join(sha(&a))).unwrap();
        // The failed attempt spent nothing of the sender's hour (1500).
        for fill in [7u8, 8] {
            let b = vec![fill; 700];
            assert!(s
                .put("x", &mut MessageBudget::default(), &sha(&b), &b)
                .is_ok());
        }
    }

    #[test]
    fn sweep_deletes_old_files_and_stale_temps() {
        let dir = tempfile::tempdir().unwrap();
        let s = AttachmentStore::open(dir.path().into(), "a:".into(), limits());
        let (a, b) = (vec![1u8; 10], vec![2u8; 20]);
        s.put("x", &mut MessageBudget::default(), &sha(&a), &a)
            .unwrap();
        s.put("x", &mut MessageBudget::default(), &sha(&b), &b)
            .unwrap();
        std::fs::write(dir.path().join(".tmp.crash"), b"x").unwrap();
        std::fs::write(dir.path().join("README"), b"not ours").unwrap();
        // A fresh temp file may be a write in progress.
        assert_eq!(s.sweep(SystemTime::now()).stale_temp, 0);
        let later = SystemTime::now() + Duration::from_secs(1800);
        let out = s.sweep(later);
        assert_eq!((out.expired, out.stale_temp, out.files), (0, 1, 2));
        let much_later = SystemTime::now() + Duration::from_secs(7200);
        let out = s.sweep(much_later);
        assert_eq!((out.expired, out.stale_temp, out.files), (2, 0, 0));
        assert_eq!(files(dir.path()), vec!["README".to_string()]);
    }
}
