//! Capture verdicts that never hide a leak: held memory is named with its bytes and kept out
//! of the rate, churn is not named, no rate comes from too little data, and stacks sharing a
//! deciding frame are told apart. Fixtures in C, compiled here, whose memory over time is
//! known.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use memleak_tests::{Report, Scratch, can_trace, expect_success, run_memleak};
use serde_json::Value;

/// `verdicts MODE SECONDS`, by the clock (absolute deadlines):
/// - held:     one 5 MiB block taken at t = 1 s, never freed;
/// - mmaps:    five 1 MiB anonymous mmaps at t = 0.6, 0.8, ... 1.4 s, never unmapped, and a
///   steady leak of 64 KiB every 100 ms (640 KiB/s) beside them;
/// - sawtooth: 1 MiB every 100 ms up to 8 MiB, then all freed and 600 ms with nothing;
/// - apart:    64 KiB every 100 ms through leak_block, called from main and, as often,
///   through chain_one -> chain_two -> chain_three.
const VERDICTS_C: &str = r#"
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

#define MIB (1 << 20)
static struct timespec start;

static void until_ms(long ms) {
    struct timespec t = start;
    t.tv_sec += ms / 1000;
    t.tv_nsec += (ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) { t.tv_nsec -= 1000000000L; t.tv_sec++; }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
}

char *kept[4096];
int n_kept;

__attribute__((noinline)) void load_table(void) {
    char *p = malloc(5 * MIB);
    memset(p, 1, 5 * MIB);
    kept[n_kept++] = p;
}

__attribute__((noinline)) void map_region(void) {
    char *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 2, MIB);
    kept[n_kept++] = p;
}

__attribute__((noinline)) void leak_block(void) {
    char *p = malloc(64 << 10);
    memset(p, 3, 64 << 10);
    kept[n_kept++ % 4096] = p;
}

__attribute__((noinline)) void chain_three(void) { leak_block(); }
__attribute__((noinline)) void chain_two(void) { chain_three(); }
__attribute__((noinline)) void chain_one(void) { chain_two(); }

__attribute__((noinline)) void saw_tooth(long total_ms) {
    char *teeth[8];
    for (long t = 0; t + 1400 <= total_ms; t += 1400) {
        for (int i = 0; i < 8; i++) {
            teeth[i] = malloc(MIB);
            memset(teeth[i], 4, MIB);
            until_ms(t + 100 * (i + 1));
        }
        for (int i = 0; i < 8; i++) free(teeth[i]);
        until_ms(t + 1400);
    }
}

int main(int argc, char **argv) {
    const char *mode = argv[1];
    long total_ms = atol(argv[2]) * 1000;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (!strcmp(mode, "held")) { until_ms(1000); load_table(); }
    if (!strcmp(mode, "sawtooth")) saw_tooth(total_ms);
    for (long t = 0; t < total_ms; t += 100) {
        if (!strcmp(mode, "mmaps")) { if (t >= 600 && t <= 1400 && t % 200 == 0) map_region(); leak_block(); }
        if (!strcmp(mode, "apart")) { if (t % 200) chain_one(); else leak_block(); }
        until_ms(t + 100);
    }
    return 0;
}
"#;

fn fixture(scratch: &Scratch) -> Result<PathBuf> {
    let source = scratch.path("verdicts.c");
    std::fs::write(&source, VERDICTS_C)?;
    scratch.compile(source.with_extension("").to_str().unwrap(), "verdicts", &[])
}

/// `memleak -c "verdicts MODE SECONDS" ARGS... --json`: the JSON report and the stdout.
fn capture(
    test: &str,
    mode: &str,
    seconds: u32,
    args: &[&str],
) -> Result<Option<(Report, String)>> {
    if !can_trace(test) {
        return Ok(None);
    }
    let scratch = Scratch::new(test)?;
    let command = format!("{} {mode} {seconds}", fixture(&scratch)?.display());
    let out = scratch.path("report.json");
    let mut all = vec!["-c", &command, "--json", out.to_str().unwrap()];
    all.extend(args);
    let run = run_memleak(&scratch, &all, None, Duration::from_secs(60))?;
    expect_success(&run)?;
    ensure!(run.stdout.contains("VERDICT: "), "{}", run.transcript());
    Ok(Some((Report::read(&out)?, run.stdout)))
}

/// The named stacks (the verdict's list) and the stack whose deciding frame is `function`.
fn through<'a>(r: &'a Value, function: &str) -> Option<&'a Value> {
    r["stacks"].as_array()?.iter().find(|s| {
        let at = s["deciding_frame"].as_u64();
        at.is_some_and(|i| s["frames"][i as usize]["function"] == function)
    })
}

fn summary(r: &Value, stdout: &str) -> String {
    let stacks: Vec<String> = r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let at = s["deciding_frame"]
                .as_u64()
                .map(|i| &s["frames"][i as usize]["function"]);
            format!(
                "{} {} named {} bytes {}",
                s["stack_id"], s["trend"], s["named"], s["bytes"]
            ) + &format!(" at {at:?}")
        })
        .collect();
    format!("{}\n{}\n{stdout}", r["summary"], stacks.join("\n"))
}

#[test]
fn held_block_is_named_and_not_in_the_rate() -> Result<()> {
    let args = ["--interval", "500ms", "--duration", "5s"];
    let Some((report, stdout)) = capture("held_block", "held", 8, &args)? else {
        return Ok(());
    };
    let r = &report.json;
    let why = || summary(r, &stdout);
    let held =
        through(r, "load_table").ok_or_else(|| anyhow::anyhow!("no load_table\n{}", why()))?;
    ensure!(held["trend"] == "held", "{}", why());
    ensure!(held["named"] == true, "{}", why());
    ensure!(r["summary"]["held_bytes"] == 5 << 20, "{}", why());
    ensure!(r["summary"]["leaking"] == false, "{}", why());
    ensure!(r["summary"]["leak_rate_bytes_per_min"] == 0.0, "{}", why());
    ensure!(stdout.contains("held: 5.0 MiB taken once"), "{}", why());
    ensure!(stdout.contains("at load_table+"), "{}", why());
    Ok(())
}

#[test]
fn leaked_mappings_are_named() -> Result<()> {
    let args = ["--interval", "1s", "--duration", "4s"];
    let Some((report, stdout)) = capture("leaked_mmaps", "mmaps", 8, &args)? else {
        return Ok(());
    };
    let r = &report.json;
    let why = || summary(r, &stdout);
    let maps =
        through(r, "map_region").ok_or_else(|| anyhow::anyhow!("no map_region\n{}", why()))?;
    ensure!(maps["named"] == true, "{}", why());
    ensure!(
        maps["bytes"].as_array().unwrap().last() == Some(&Value::from(5 << 20)),
        "{}",
        why()
    );
    let id = &maps["stack_id"];
    ensure!(
        r["summary"]["named_stacks"]
            .as_array()
            .unwrap()
            .contains(id),
        "{}",
        why()
    );
    ensure!(stdout.contains("at map_region+"), "{}", why());
    Ok(())
}

#[test]
fn sawtooth_is_churn_and_not_named() -> Result<()> {
    let args = ["--interval", "500ms", "--duration", "8s"];
    let Some((report, stdout)) = capture("sawtooth", "sawtooth", 12, &args)? else {
        return Ok(());
    };
    let r = &report.json;
    let why = || summary(r, &stdout);
    let saw = through(r, "saw_tooth").ok_or_else(|| anyhow::anyhow!("no saw_tooth\n{}", why()))?;
    ensure!(saw["trend"] == "churn", "{}", why());
    ensure!(saw["named"] == false, "{}", why());
    ensure!(r["summary"]["leaking"] == false, "{}", why());
    ensure!(!stdout.contains("at saw_tooth+"), "{}", why());
    Ok(())
}

#[test]
fn two_samples_give_no_rate() -> Result<()> {
    // BCC's positional INTERVAL COUNT: two intervals of 1 s.
    let Some((report, stdout)) = capture("two_samples", "apart", 10, &["1", "2"])? else {
        return Ok(());
    };
    let r = &report.json;
    ensure!(
        r["summary"]["conclusive"] == false,
        "{}",
        summary(r, &stdout)
    );
    ensure!(r["summary"]["total"].is_null(), "{}", summary(r, &stdout));
    ensure!(stdout.contains("VERDICT: not enough data"), "{stdout}");
    ensure!(!stdout.contains("B/min"), "a rate was printed:\n{stdout}");
    Ok(())
}

#[test]
fn stacks_with_one_deciding_frame_are_told_apart() -> Result<()> {
    let args = ["--interval", "1s", "--duration", "5s"];
    let Some((report, stdout)) = capture("told_apart", "apart", 8, &args)? else {
        return Ok(());
    };
    let r = &report.json;
    let why = || summary(r, &stdout);
    let leaks: Vec<&Value> = r["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["named"] == true && s["trend"] == "growing")
        .collect();
    ensure!(leaks.len() == 2, "{}", why());
    let parts: Vec<&Value> = leaks
        .iter()
        .map(|s| &s["frames"][s["differs_at"].as_u64().unwrap_or(0) as usize]["function"])
        .collect();
    ensure!(
        parts.contains(&&Value::from("main")),
        "{parts:?}\n{}",
        why()
    );
    ensure!(
        parts.contains(&&Value::from("chain_three")),
        "{parts:?}\n{}",
        why()
    );
    ensure!(
        stdout.contains("via main+") && stdout.contains("via chain_three+"),
        "{}",
        why()
    );
    Ok(())
}
