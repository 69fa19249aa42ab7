//! `--json`: the whole run for programs. Schema `memleak/1`, described by
//! `docs/memleak-json.schema.json`; keys are only ever added under the same version, a key
//! removed or changing meaning bumps it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    analysis::{self, Analysis, classes},
    model::{Snapshot, StackUsage},
    owners::{Findings, each::Owners},
    proc_stats::ProcessContext,
    stacks::StackTable,
};

pub const SCHEMA: &str = "memleak/1";

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    pid: u32,
    /// Every interval's snapshot, oldest first, each stack joined with the stack table.
    snapshots: Vec<Value>,
    /// The last snapshot (`null` before the first interval).
    #[serde(rename = "final")]
    last: Option<Value>,
    summary: &'a analysis::Verdict,
    thresholds: Thresholds,
    process: &'a ProcessContext,
    timeline: &'a [analysis::Point],
    stacks: &'a [analysis::StackTrend<'a>],
    classes: &'a [analysis::ClassBytes],
    /// What holds the first stacks' memory, read from the live target at the end: when
    /// one process was walked (and none left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    owners: Option<&'a Findings>,
    /// The same per process walked (with its pid), and the processes a bound left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    owners_by_process: Option<&'a Owners>,
    /// Every traced process with its own verdict (empty in kernel mode).
    processes: &'a [analysis::verdict::ProcessVerdict],
}

/// The classification thresholds in force, so a reader knows what "growing" meant.
#[derive(Serialize)]
struct Thresholds {
    min_points: usize,
    min_growth_blocks: f64,
    min_growth_bytes: f64,
    min_growth_r2: f64,
    min_recent_rate_share: f64,
    max_held_blocks: u64,
    plateau_min_level: f64,
    plateau_max_spread: f64,
    min_rate_span_intervals: f64,
    named_min_share: f64,
    named_min_bytes: u64,
}

const THRESHOLDS: Thresholds = Thresholds {
    min_points: classes::MIN_POINTS,
    min_growth_blocks: classes::MIN_GROWTH_BLOCKS,
    min_growth_bytes: classes::MIN_GROWTH_BYTES,
    min_growth_r2: classes::MIN_GROWTH_R2,
    min_recent_rate_share: classes::MIN_RECENT_RATE_SHARE,
    max_held_blocks: classes::MAX_HELD_BLOCKS,
    plateau_min_level: classes::PLATEAU_MIN_LEVEL,
    plateau_max_spread: classes::PLATEAU_MAX_SPREAD,
    min_rate_span_intervals: analysis::MIN_RATE_SPAN_INTERVALS,
    named_min_share: analysis::verdict::NAMED_MIN_SHARE,
    named_min_bytes: analysis::verdict::NAMED_MIN_BYTES,
};

pub fn to_value(a: &Analysis) -> Value {
    let t = a.timeline;
    let doc = Document {
        schema: SCHEMA,
        pid: t.pid(),
        snapshots: t.snapshots.iter().map(|s| joined(s, a.table)).collect(),
        last: t.last().map(|s| joined(s, a.table)),
        summary: &a.verdict,
        thresholds: THRESHOLDS,
        process: &t.context,
        timeline: &a.points,
        stacks: &a.stacks,
        classes: &a.classes,
        owners: t.owners.as_ref().and_then(Owners::single),
        owners_by_process: t.owners.as_ref(),
        processes: &a.processes,
    };
    serde_json::to_value(doc).expect("the document has only string keys and finite numbers")
}

/// A snapshot as readers of memleak/1 know it: each stack with its frames, truncation, class
/// and the frame that decided the class, from the stack table.
fn joined(snapshot: &Snapshot, table: &StackTable) -> Value {
    let mut value = serde_json::to_value(snapshot).expect("a snapshot serializes");
    let join = |json: &mut Value, stacks: &[StackUsage]| {
        for (json, stack) in json.as_array_mut().into_iter().flatten().zip(stacks) {
            let info = table.get(stack.stack_id);
            json["pid"] = json!(info.pid);
            json["frames"] = json!(info.frames);
            json["truncated"] = json!(info.truncated);
            if let Some(cut) = info.python_cut {
                json["python_cut"] = json!(cut);
            }
            if let Some(class) = info.class {
                json["class"] = json!(class);
                json["class_frame"] = json!(info.deciding_frame);
            }
        }
    };
    join(&mut value["stacks"], &snapshot.stacks);
    if let Some(mapped) = &snapshot.mapped {
        join(&mut value["mapped"], mapped);
    }
    value
}

pub fn write(a: &Analysis, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(&to_value(a))?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::{
            analyze,
            tests::{cache, churn, leak, timeline},
        },
        model::Class,
        timeline::Timeline,
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
        t.timeline.context.cmdline = vec!["./leaker".into(), "12".into()];
        t.timeline.owners = Some(crate::report::summary::tests::owners_of(1));
        let doc = to_value(&t.analyze());
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
        let table = StackTable::default();
        let empty = Timeline::new(ProcessContext::default(), 1.0);
        validate(&to_value(&analyze(&empty, &table)));
        let mut t = Timeline::new(ProcessContext::read(std::process::id()), 1.0);
        let one = timeline(&[leak(1)], 1.0, 1);
        t.record(one.timeline.snapshots[0].clone());
        let doc = to_value(&analyze(&t, &one.table));
        validate(&doc);
        assert!(doc["timeline"][0]["process"]["rss_bytes"].as_u64().unwrap() > 0);
    }

    #[test]
    fn schema_rejects_a_wrong_document() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut doc = to_value(&timeline(&[leak(1)], 1.0, 3).analyze());
        assert!(validator.is_valid(&doc));
        doc["stacks"][0]["trend"] = "leaky".into();
        assert!(!validator.is_valid(&doc));
    }
}
