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

pub fn write(
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
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer(std::io::BufWriter::new(file), &doc)
        .with_context(|| format!("writing {}", path.display()))
}
