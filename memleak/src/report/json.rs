//! `--json FILE`: every interval and the final state (schema `memleak/1`).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::model::Snapshot;

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    pid: u32,
    snapshots: &'a [Snapshot],
    #[serde(rename = "final")]
    final_state: Option<&'a Snapshot>,
}

/// Creates the output file now, so a bad path fails before tracing rather than after it.
pub fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Writes the document into `file` (made by `create` for `path`).
pub fn write(
    file: std::fs::File,
    path: &Path,
    pid: u32,
    snapshots: &[Snapshot],
    final_state: Option<&Snapshot>,
) -> Result<()> {
    let doc = Document {
        schema: "memleak/1",
        pid,
        snapshots,
        final_state,
    };
    serde_json::to_writer(std::io::BufWriter::new(file), &doc)
        .with_context(|| format!("writing {}", path.display()))
}
