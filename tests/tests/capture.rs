//! Capture runs end to end: fixtures whose memory follows a known pattern over time, traced
//! with `--duration`, and the verdict, rates and trends memleak reports for them; plus a run
//! against the demo that writes every output file.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use memleak_tests::{Report, Scratch, can_trace, expect_success, read_json, run_memleak};
use serde_json::Value;

/// `patterns MODE SECONDS`: memory over time in one of four shapes, by the clock (absolute
/// deadlines, so the rate does not drift with scheduling):
/// - leak:  1 MiB every 0.5 s, never freed (120 MiB/min);
/// - cache: 1 MiB every 0.5 s for the first 16 entries (8 s), then held;
/// - churn: one block of 1 to 16 MiB at a time, freed after 0.2 to 2.5 s (pseudo-random, seeded);
/// - none:  one 4 MiB buffer from the start, and small blocks freed right away.
const PATTERNS_C: &str = r#"
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIB (1 << 20)
#define SLOTS 8192
char *kept[SLOTS];
int n_kept;

static struct timespec deadline;
static void every_ms(long ms) {
    deadline.tv_nsec += ms * 1000000L;
    while (deadline.tv_nsec >= 1000000000L) { deadline.tv_nsec -= 1000000000L; deadline.tv_sec++; }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
}

void leak_step(void) {
    char *p = malloc(MIB);
    memset(p, 1, MIB);
    kept[n_kept++ % SLOTS] = p;
}

void cache_fill(void) {
    char *p = malloc(MIB);
    memset(p, 2, MIB);
    kept[n_kept++ % SLOTS] = p;
}

/* One block at a time: 1 to 16 MiB, held 0.2 to 2.5 s, then a pause of up to 1.5 s. */
char *block;
long block_until_ms, pause_until_ms;
static unsigned seed = 12345;
static unsigned next_random(void) { seed = seed * 1103515245u + 12345u; return (seed >> 8) & 0xffff; }

void churn_step(long now_ms) {
    if (block && block_until_ms <= now_ms) {
        free(block);
        block = NULL;
        pause_until_ms = now_ms + next_random() % 1500;
    }
    if (!block && pause_until_ms <= now_ms) {
        size_t size = (size_t)MIB * (1 + next_random() % 16);
        block = malloc(size);
        memset(block, 3, size);
        block_until_ms = now_ms + 200 + next_random() % 2300;
    }
}

char *startup_buffer;
void small_work(void) {
    char *p = malloc(256);
    memset(p, 4, 256);
    free(p);
}

int main(int argc, char **argv) {
    const char *mode = argv[1];
    long total_ms = atol(argv[2]) * 1000;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (!strcmp(mode, "none")) { startup_buffer = malloc(4 * MIB); memset(startup_buffer, 5, 4 * MIB); }
    for (long t = 0; t < total_ms; ) {
        if (!strcmp(mode, "leak")) { leak_step(); every_ms(500); t += 500; }
        else if (!strcmp(mode, "cache")) { if (n_kept < 16) cache_fill(); every_ms(500); t += 500; }
        else if (!strcmp(mode, "churn")) { churn_step(t); every_ms(100); t += 100; }
        else { small_work(); every_ms(100); t += 100; }
    }
    return 0;
}
"#;

const MIB: f64 = 1048576.0;

fn patterns(scratch: &Scratch) -> Result<PathBuf> {
    let source = scratch.path("patterns.c");
    std::fs::write(&source, PATTERNS_C)?;
    // `compile` takes a fixture name under tests/fixtures; an absolute path stands for itself.
    scratch.compile(source.with_extension("").to_str().unwrap(), "patterns", &[])
}

/// Traces `patterns MODE FIXTURE_S` for `trace` at 1 s intervals; the JSON report.
fn capture(test: &str, mode: &str, fixture_s: u32, trace: &str) -> Result<Option<Report>> {
    if !can_trace(test) {
        return Ok(None);
    }
    let scratch = Scratch::new(test)?;
    let fixture = patterns(&scratch)?;
    let out = scratch.path("report.json");
    let command = format!("{} {mode} {fixture_s}", fixture.display());
    let mut args = vec!["-c", &command, "--interval", "1s", "--json"];
    args.push(out.to_str().unwrap());
    if !trace.is_empty() {
        args.extend(["--duration", trace]);
    }
    let run = run_memleak(&scratch, &args, None, Duration::from_secs(90))?;
    expect_success(&run)?;
    ensure!(
        run.stdout.contains("VERDICT: "),
        "no final report:\n{}",
        run.transcript()
    );
    Ok(Some(Report::read(&out)?))
}

/// The stack holding the most at the end.
fn largest(report: &Value) -> &Value {
    report["stacks"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .max_by_key(|s| s["bytes"].as_array().unwrap().last()?.as_u64())
        })
        .expect("at least one stack")
}

fn describe(report: &Value) -> String {
    let stacks: Vec<String> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "stack {} {} {:.1} MiB/min R² {:.2} bytes {}",
                s["stack_id"],
                s["trend"],
                s["fit"]["slope_per_min"].as_f64().unwrap() / MIB,
                s["fit"]["r2"].as_f64().unwrap(),
                s["bytes"]
            )
        })
        .collect();
    format!("summary {}\n{}", report["summary"], stacks.join("\n"))
}

#[test]
fn steady_leak_is_reported_at_its_rate() -> Result<()> {
    let Some(report) = capture("steady_leak", "leak", 30, "20s")? else {
        return Ok(());
    };
    let r = &report.json;
    let leak = largest(r);
    let rate = leak["fit"]["slope_per_min"].as_f64().unwrap() / MIB;
    eprintln!(
        "steady leak measured at {rate:.2} MiB/min (R² {})",
        leak["fit"]["r2"]
    );
    ensure!(leak["trend"] == "growing", "{}", describe(r));
    ensure!(
        (rate - 120.0).abs() <= 12.0,
        "rate {rate:.1} MiB/min, want 120 ± 10%\n{}",
        describe(r)
    );
    ensure!(r["summary"]["leaking"] == true, "{}", describe(r));
    let total = r["summary"]["leak_rate_bytes_per_min"].as_f64().unwrap() / MIB;
    ensure!(
        (total - 120.0).abs() <= 12.0,
        "leak rate {total:.1} MiB/min\n{}",
        describe(r)
    );
    // The kernel saw the same growth: RSS rises at about the same pace (pages were touched).
    let rss = r["summary"]["rss"]["slope_per_min"].as_f64().unwrap() / MIB;
    ensure!(
        (rss - 120.0).abs() <= 24.0,
        "RSS rate {rss:.1} MiB/min\n{}",
        describe(r)
    );
    let snapshots = r["snapshots"].as_array().unwrap().len();
    ensure!(
        snapshots == 20,
        "{snapshots} intervals in a 20 s run at 1 s"
    );
    // The line that decides, read from the fixture's own source.
    let decides = &leak["frames"][leak["deciding_frame"].as_u64().unwrap() as usize];
    ensure!(
        decides["function"] == "leak_step",
        "deciding frame {decides}"
    );
    ensure!(
        leak["deciding_source"] == "char *p = malloc(MIB);",
        "deciding source {}",
        leak["deciding_source"]
    );
    Ok(())
}

#[test]
fn filled_cache_is_a_plateau() -> Result<()> {
    // No --duration: the run ends when the fixture exits, with its state at exit.
    let Some(report) = capture("filled_cache", "cache", 20, "")? else {
        return Ok(());
    };
    let r = &report.json;
    let cache = largest(r);
    ensure!(cache["trend"] == "plateau", "{}", describe(r));
    ensure!(
        cache["peak_bytes"].as_u64() == Some(16 << 20),
        "{}",
        describe(r)
    );
    ensure!(r["summary"]["leaking"] == false, "{}", describe(r));
    ensure!(r["final"].is_object(), "the state at exit is the final one");
    Ok(())
}

#[test]
fn churn_is_churn_and_no_leak() -> Result<()> {
    let Some(report) = capture("churn", "churn", 25, "20s")? else {
        return Ok(());
    };
    let r = &report.json;
    let churn = largest(r);
    ensure!(churn["trend"] == "churn", "{}", describe(r));
    ensure!(r["summary"]["leaking"] == false, "{}", describe(r));
    Ok(())
}

#[test]
fn quiet_process_gets_a_no_leak_verdict() -> Result<()> {
    let Some(report) = capture("no_leak", "none", 15, "10s")? else {
        return Ok(());
    };
    let r = &report.json;
    ensure!(r["summary"]["leaking"] == false, "{}", describe(r));
    ensure!(r["summary"]["conclusive"] == true, "{}", describe(r));
    let buffer = largest(r);
    ensure!(buffer["trend"] == "plateau", "{}", describe(r));
    ensure!(
        buffer["peak_bytes"].as_u64() == Some(4 << 20),
        "{}",
        describe(r)
    );
    Ok(())
}

/// `memleak -c "leaky-demo S" --duration D --interval 5s` with every output file.
fn demo_run(test: &str, demo_s: u32, duration: &str, intervals: usize) -> Result<()> {
    if !can_trace(test) {
        return Ok(());
    }
    let scratch = Scratch::new(test)?;
    let demo = scratch.compile("demo", "leaky-demo", &[])?;
    let path = |name: &str| scratch.path(name).to_str().unwrap().to_string();
    let command = format!("{} {demo_s}", demo.display());
    let (json, folded, pprof, html, text) = (
        path("run.json"),
        path("run.folded"),
        path("run.pb.gz"),
        path("run.html"),
        path("run.txt"),
    );
    let args = [
        "-c",
        &command,
        "--duration",
        duration,
        "--interval",
        "5s",
        "--json",
        &json,
        "--folded",
        &folded,
        "--pprof",
        &pprof,
        "--html",
        &html,
        "--report",
        &text,
    ];
    let run = run_memleak(
        &scratch,
        &args,
        None,
        Duration::from_secs(60 + 2 * demo_s as u64),
    )?;
    expect_success(&run)?;
    let r = read_json(std::path::Path::new(&json))?;
    ensure!(
        r["snapshots"].as_array().map(Vec::len) == Some(intervals),
        "{}",
        describe(&r)
    );
    // The demo leaks 4 KiB per request and 512 B every other request: two growing stacks.
    ensure!(r["summary"]["leaking"] == true, "{}", describe(&r));
    ensure!(r["summary"]["growing_stacks"] == 2, "{}", describe(&r));
    let last = r["final"]["total_bytes"].as_u64().unwrap();
    let folded_sum: u64 = std::fs::read_to_string(&folded)?
        .lines()
        .map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap()
        })
        .sum();
    ensure!(
        folded_sum == last,
        "folded adds up to {folded_sum}, final state {last}"
    );
    let gz = std::fs::read(&pprof)?;
    ensure!(gz.starts_with(&[0x1f, 0x8b]), "{pprof} is not gzip");
    let page = std::fs::read_to_string(&html)?;
    ensure!(page.contains("<svg id=\"chart\"") && page.contains("id=\"flamegraph\""));
    let report = std::fs::read_to_string(&text).context("the --report file")?;
    ensure!(report.starts_with("VERDICT: LEAKING"), "{report}");
    for line in [
        "at cache_insert_without_evict+",
        "21 | char *entry = malloc(4096);",
        "at remember_request_headers+",
        "29 | char *copy = calloc(1, 512);",
    ] {
        ensure!(
            report.contains(line),
            "{line:?} missing from the report:\n{report}"
        );
    }
    ensure!(
        run.stdout.contains(&report),
        "the report printed is the one written"
    );
    Ok(())
}

#[test]
fn demo_capture_writes_every_output() -> Result<()> {
    demo_run("demo_capture", 40, "30s", 6)
}

/// The two-minute run of issue 7: a scripted capture that ends by itself with every file.
#[test]
fn demo_two_minute_capture() -> Result<()> {
    demo_run("demo_two_minutes", 130, "2m", 24)
}

/// An output file that cannot be created fails the run at once, not after the capture.
#[test]
fn bad_output_path_fails_before_the_capture() -> Result<()> {
    if !can_trace("bad_output_path") {
        return Ok(());
    }
    let scratch = Scratch::new("bad_output")?;
    let me = std::process::id().to_string();
    let bad = scratch.path("missing-dir/run.html");
    let started = std::time::Instant::now();
    let args = [
        "-p",
        &me,
        "--duration",
        "1m",
        "--html",
        bad.to_str().unwrap(),
    ];
    let run = run_memleak(&scratch, &args, None, Duration::from_secs(30))?;
    ensure!(!run.status.success(), "{}", run.transcript());
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "failed only after the capture"
    );
    let message = run.stderr.trim();
    ensure!(
        message.lines().count() == 1 && message.contains("missing-dir/run.html"),
        "{}",
        run.transcript()
    );
    Ok(())
}
