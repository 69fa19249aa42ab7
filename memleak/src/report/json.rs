//! `--json`: the whole run for programs. Schema `memleak/1`, described by
//! `docs/memleak-json.schema.json`; keys are only ever added under the same version, a key
//! removed or changing meaning bumps it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    capture::{self, Analysis, Timeline},
    model::Snapshot,
    owners::Findings,
    proc_stats::ProcessContext,
};

pub const SCHEMA: &str = "memleak/1";

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    pid: u32,
    /// Every interval's snapshot, oldest first, with its frames put back.
    snapshots: Vec<serde_json::Value>,
    /// The last snapshot (`null` before the first interval).
    #[serde(rename = "final")]
    last: Option<&'a Snapshot>,
    summary: &'a capture::Verdict,
    thresholds: Thresholds,
    process: &'a ProcessContext,
    timeline: &'a [capture::Point],
    stacks: &'a [capture::StackTrend<'a>],
    classes: &'a [capture::ClassBytes<'a>],
    /// What holds the first stacks' memory, read from the live target at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    owners: Option<&'a Findings>,
}

/// The classification thresholds in force, so a reader knows what "growing" meant.
#[derive(Serialize)]
struct Thresholds {
    min_points: usize,
    min_growth_blocks: f64,
    min_growth_bytes: f64,
    min_growth_r2: f64,
    min_recent_rate_share: f64,
    plateau_min_level: f64,
    plateau_max_spread: f64,
}

pub fn to_value(timeline: &Timeline) -> serde_json::Value {
    let a: Analysis = timeline.analyze();
    let doc = Document {
        schema: SCHEMA,
        pid: timeline.pid(),
        snapshots: timeline
            .snapshots
            .iter()
            .map(|s| restored(timeline, s))
            .collect(),
        last: timeline.last(),
        summary: &a.verdict,
        thresholds: Thresholds {
            min_points: capture::MIN_POINTS,
            min_growth_blocks: capture::MIN_GROWTH_BLOCKS,
            min_growth_bytes: capture::MIN_GROWTH_BYTES,
            min_growth_r2: capture::MIN_GROWTH_R2,
            min_recent_rate_share: capture::MIN_RECENT_RATE_SHARE,
            plateau_min_level: capture::PLATEAU_MIN_LEVEL,
            plateau_max_spread: capture::PLATEAU_MAX_SPREAD,
        },
        process: &timeline.context,
        timeline: &a.points,
        stacks: &a.stacks,
        classes: &a.classes,
        owners: timeline.owners.as_ref(),
    };
    serde_json::to_value(doc).expect("the document has only string keys and finite numbers")
}

/// A stored snapshot as the collector made it: the timeline keeps older snapshots without
/// their stacks' frames, and each stack's frames once.
fn restored(timeline: &Timeline, snapshot: &Snapshot) -> serde_json::Value {
    let mut value = serde_json::to_value(snapshot).expect("a snapshot serializes");
    if let Some(stacks) = value["stacks"].as_array_mut() {
        for (json, stack) in stacks.iter_mut().zip(&snapshot.stacks) {
            json["frames"] =
                serde_json::to_value(timeline.frames(stack.stack_id)).expect("frames serialize");
        }
    }
    value
}

pub fn write(timeline: &Timeline, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(&to_value(timeline))?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::tests::{cache, churn, leak, timeline},
        model::Class,
    };

    const SCHEMA_TEXT: &str = include_str!("../../../docs/memleak-json.schema.json");

    fn validate(doc: &serde_json::Value) {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn document_validates_against_the_schema() {
        let mut t = timeline(&[leak(1), cache(2), churn(3)], 2.0, 12);
        t.set_class(2, Class::CpythonInternal);
        t.context.cmdline = vec!["./leaker".into(), "12".into()];
        t.owners = Some(crate::report::summary::tests::owners_of(1));
        let doc = to_value(&t);
        validate(&doc);
        assert_eq!(doc["owners"]["owners"][0]["root"], "module-global");
        assert_eq!(doc["schema"], "memleak/1");
        assert_eq!(doc["snapshots"].as_array().unwrap().len(), 12);
        assert_eq!(
            doc["final"]["total_bytes"],
            doc["timeline"][11]["outstanding_bytes"]
        );
        assert_eq!(doc["summary"]["leaking"], true);
        assert_eq!(doc["stacks"][0]["trend"], "growing");
        assert_eq!(doc["stacks"][0]["frames"][1]["function"], "leak_one");
        let older = doc["snapshots"][3]["stacks"].as_array().unwrap();
        let leak = older.iter().find(|s| s["stack_id"] == 1).unwrap();
        assert_eq!(
            leak["frames"], doc["stacks"][0]["frames"],
            "older snapshots get their frames back"
        );
        assert_eq!(doc["classes"][0]["class"], "cpython-internal");
    }

    #[test]
    fn empty_and_real_process_documents_validate() {
        validate(&to_value(&Timeline::new(ProcessContext::default())));
        let mut t = Timeline::new(ProcessContext::read(std::process::id()));
        t.record(timeline(&[leak(1)], 1.0, 1).snapshots.pop().unwrap());
        let doc = to_value(&t);
        validate(&doc);
        assert!(doc["timeline"][0]["process"]["rss_bytes"].as_u64().unwrap() > 0);
    }

    #[test]
    fn schema_rejects_a_wrong_document() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut doc = to_value(&timeline(&[leak(1)], 1.0, 3));
        assert!(validator.is_valid(&doc));
        doc["stacks"][0]["trend"] = "leaky".into();
        assert!(!validator.is_valid(&doc));
    }
}
