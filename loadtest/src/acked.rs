//! The acknowledged-requests file (`--acked`): one JSON line per record the gateway
//! acknowledged with 2xx, `{"channel":"events","key":"01K…"}`.
//!
//! `key` is what identifies the record in Kafka: for `events` the record `id` from the 202
//! answer and for `chat` the `record_id` of the ack frame; for `twilio`, `meta`, `wechat` and
//! `smtp` the provider message id the harness generated (the record's `provider_message_id`:
//! MessageSid, wamid, MsgId, the mail's Message-ID without angle brackets). A re-sent duplicate
//! writes its key again; readers treat keys as a set.

use crate::channels::Channel;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckLine {
    pub channel: String,
    pub key: String,
}

/// The channel name of chat acks (chat is not a `--mix` channel).
pub const CHAT: &str = "chat";

/// Whether `name` is a channel an acked line may name.
pub fn known_channel(name: &str) -> bool {
    name == CHAT || Channel::from_name(name).is_some()
}

impl AckLine {
    /// Whether the key is a record id (events, chat) rather than a provider message id.
    pub fn is_record_id(&self) -> bool {
        self.channel == Channel::Events.name() || self.channel == CHAT
    }
}

pub struct AckWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
}

impl AckWriter {
    pub fn create(path: &Path) -> Result<Self, String> {
        let f = File::create(path)
            .map_err(|e| format!("--acked {}: cannot create: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, f),
            written: 0,
        })
    }

    pub fn write(&mut self, channel: Channel, key: &str) -> Result<(), String> {
        self.write_name(channel.name(), key)
    }

    pub fn write_name(&mut self, channel: &str, key: &str) -> Result<(), String> {
        let line = AckLine {
            channel: channel.to_string(),
            key: key.to_string(),
        };
        serde_json::to_writer(&mut self.out, &line)
            .map_err(|e| format!("--acked {}: write failed: {e}", self.path.display()))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| format!("--acked {}: write failed: {e}", self.path.display()))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes and syncs; the number of lines written.
    pub fn finish(mut self) -> Result<u64, String> {
        self.out
            .flush()
            .map_err(|e| format!("--acked {}: flush failed: {e}", self.path.display()))?;
        Ok(self.written)
    }
}

/// Reads an acked file; blank lines are skipped, a malformed line is an error naming it.
pub fn read(path: &Path) -> Result<Vec<AckLine>, String> {
    let f = File::open(path).map_err(|e| format!("--acked {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("--acked {}: read failed: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let a: AckLine = serde_json::from_str(&line).map_err(|e| {
            format!(
                "--acked {} line {}: not an acked line ({e}); expected {{\"channel\":..,\"key\":..}}",
                path.display(),
                i + 1
            )
        })?;
        if !known_channel(&a.channel) {
            return Err(format!(
                "--acked {} line {}: unknown channel `{}`",
                path.display(),
                i + 1,
                a.channel
            ));
        }
        out.push(a);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "switchboard-loadtest-{name}-{}.jsonl",
            ulid::Ulid::new()
        ))
    }

    #[test]
    fn round_trip() {
        let path = temp("acked");
        let mut w = AckWriter::create(&path).unwrap();
        w.write(Channel::Events, "01KABCDEFGHJKMNPQRSTVWXYZ0")
            .unwrap();
        w.write(Channel::Twilio, "SM0123456789abcdef0123456789abcdef")
            .unwrap();
        w.write(Channel::Wechat, "6054768590064713728").unwrap();
        w.write(Channel::Meta, "wamid.\"quoted\"\\").unwrap();
        w.write(Channel::Smtp, "lt.01K@loadtest.switchboard.example")
            .unwrap();
        w.write_name(CHAT, "01KCHATRECORD0000000000000").unwrap();
        assert_eq!(w.finish().unwrap(), 6);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"channel":"events","key":"01KABCDEFGHJKMNPQRSTVWXYZ0"}"#
        );
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 6);
        assert!(back[0].is_record_id());
        assert!(!back[1].is_record_id());
        assert!(!back[4].is_record_id(), "smtp keys are Message-IDs");
        assert!(back[5].is_record_id(), "chat keys are record ids");
        assert_eq!(back[3].key, "wamid.\"quoted\"\\");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn bad_lines_are_named() {
        let path = temp("bad");
        std::fs::write(
            &path,
            "{\"channel\":\"events\",\"key\":\"a\"}\n\nnot json\n",
        )
        .unwrap();
        let e = read(&path).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        std::fs::write(&path, "{\"channel\":\"fax\",\"key\":\"a\"}\n").unwrap();
        assert!(read(&path).unwrap_err().contains("unknown channel"));
        std::fs::remove_file(&path).ok();
        assert!(read(Path::new("/nonexistent/acked.jsonl")).is_err());
    }
}
