//! TensorBoard scalars: every line a run logs to metrics.jsonl is also written to an event file
//! in the run folder (`events.out.tfevents.<seconds>.graft`), so that `tensorboard --logdir runs`
//! shows each run's curves beside other trainers' runs.
//!
//! An event file is a TFRecord stream of `tensorflow.Event` protobuf messages: each record is
//! its length (u64, little-endian), the length's masked CRC-32C, the message, and the message's
//! masked CRC-32C. The messages are encoded with `prost`; the four that scalars need are declared
//! here with the field numbers of TensorFlow's `event.proto` and `summary.proto` (no `protoc` at
//! build time), and the checksums come from the `crc32c` crate.
//!
//! The event file is a projection of metrics.jsonl: a resumed run, whose metrics.jsonl drops the
//! lines logged after its checkpoint, rewrites the event file from the lines kept, so no step is
//! there twice (see [`EventFile::rewrite`]).
use crate::error::io_error;
use crate::Result;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `tensorflow.Event` (event.proto), the fields graft writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`, a scalar (`simple_value`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// The first event of every file, which readers check.
const FILE_VERSION: &str = "brain.Event:2";
const PREFIX: &str = "events.out.tfevents.";

/// The scalars of one metrics.jsonl line under the names other trainers use: a training step's
/// `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_sec`,
/// `train/peak_gb`, `train/epoch`; an evaluation's every number as `eval/<name>` (`eval/f1`,
/// `eval/loss`, ...). A skipped step's line has no finite loss to plot and gives none; a
/// non-finite value is left out (TensorBoard would plot it as a gap anyway).
pub fn scalars(line: &Value) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let mut push = |tag: String, value: Option<f64>| {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            out.push((tag, v as f32));
        }
    };
    if let Some(eval) = line.get("eval").and_then(Value::as_object) {
        for (name, value) in eval {
            push(format!("eval/{name}"), value.as_f64());
        }
        return out;
    }
    if line.get("skipped").is_some() {
        return out;
    }
    for (key, tag) in [
        ("loss", "train/loss"),
        ("lr", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("tokens_per_s", "train/tokens_per_sec"),
        ("peak_gb", "train/peak_gb"),
        ("epoch", "train/epoch"),
    ] {
        push(tag.to_string(), line.get(key).and_then(Value::as_f64));
    }
    out
}

/// The run's event file, open for appending.
pub struct EventFile {
    path: PathBuf,
    file: std::fs::File,
}

impl EventFile {
    /// Starts a new event file in `dir` (after removing any earlier one: a run has one) with
    /// the scalars of `lines`, each at its `step`.
    pub fn rewrite<'a>(dir: &Path, lines: impl IntoIterator<Item = &'a Value>) -> Result<Self> {
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            let is_events = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX));
            if is_events {
                std::fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        let now = wall_time();
        let path = dir.join(format!("{PREFIX}{}.graft", now as u64));
        let file = std::fs::File::create(&path).map_err(io_error(&path))?;
        let mut events = Self { path, file };
        events.write(&Event {
            wall_time: now,
            step: 0,
            file_version: Some(FILE_VERSION.into()),
            summary: None,
        })?;
        for line in lines {
            events.log(line)?;
        }
        Ok(events)
    }

    /// Appends the scalars of a metrics line (nothing if it has none, or no step) and flushes.
    pub fn log(&mut self, line: &Value) -> Result<()> {
        let Some(step) = line.get("step").and_then(Value::as_i64) else {
            return Ok(());
        };
        let value: Vec<SummaryValue> = scalars(line)
            .into_iter()
            .map(|(tag, v)| SummaryValue {
                tag,
                simple_value: Some(v),
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: wall_time(),
            step,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let record = record(&prost::Message::encode_to_vec(event));
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(io_error(&self.path))
    }
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC-32C (a rotation and a constant, so that a CRC of data holding CRCs
/// is not degenerate).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_is_framed_as_tensorflow_frames_it() {
        // The CRC-32C of 32 zero bytes (RFC 3720's test vector), and the first 12 bytes of
        // every TensorFlow event file: its 24-byte version event's length and masked CRC.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let framed = record(&[0u8; 24]);
        assert_eq!(
            framed[..12],
            [0x18, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0x7f, 0x4b, 0x22]
        );
        assert_eq!(framed.len(), 8 + 4 + 24 + 4);
    }

    #[test]
    fn lines_become_conventional_scalar_names() {
        let step = json!({"step": 3, "epoch": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0,
            "tokens_per_s": 100.0, "peak_gb": 1.5, "elapsed_s": 9.0});
        let names: Vec<String> = scalars(&step).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "train/loss",
                "train/learning_rate",
                "train/grad_norm",
                "train/tokens_per_sec",
                "train/peak_gb",
                "train/epoch"
            ]
        );
        let eval = json!({"step": 3, "eval": {"f1": 0.9, "loss": 0.2, "count": 10, "note": "x"}});
        let mut names: Vec<String> = scalars(&eval).into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, ["eval/count", "eval/f1", "eval/loss"]);
        assert!(scalars(&json!({"step": 4, "skipped": true, "loss": "NaN"})).is_empty());
    }
}
