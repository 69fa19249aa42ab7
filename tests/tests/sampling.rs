//! `-s 10`: about a tenth of 20000 equal leaks is recorded. `--sample-bytes 640`: about a
//! tenth of 20000 64-byte leaks is kept, and the figures are scaled back up to the truth.

use std::time::Duration;

use anyhow::{Result, ensure};
use memleak_tests::{Ledger, Report, Scratch, can_trace, expect_success, run_memleak, usage_of};

#[test]
fn sample_rate_ten_records_a_tenth() -> Result<()> {
    if !can_trace("sample_rate_ten_records_a_tenth") {
        return Ok(());
    }
    const N: u64 = 20000;
    const RATE: u64 = 10;
    let scratch = Scratch::new("sampling")?;
    let fixture = scratch.compile("sample", "sample", &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {} {N}", fixture.display(), ledger.display());
    let run = run_memleak(
        &scratch,
        &["-c", &command, "-s", "10", "--json", out.to_str().unwrap()],
        None,
        Duration::from_secs(90),
    )?;
    expect_success(&run)?;
    let ledger = Ledger::read(&ledger)?;
    let want = &ledger.sites(|_| true)["sampled_leak"];
    ensure!(want.count == N, "ledger: {want:?}");
    let got = usage_of(Report::read(&out)?.final_snapshot(), "sampled_leak");
    // Binomial(N, 1/RATE): mean N/RATE, five standard deviations either side.
    let p = 1.0 / RATE as f64;
    let mean = N as f64 * p;
    let sigma = (N as f64 * p * (1.0 - p)).sqrt();
    ensure!(
        (got.count as f64 - mean).abs() <= 5.0 * sigma,
        "-s {RATE}: {} of {N} allocations recorded, expected {mean} ± {:.0}",
        got.count,
        5.0 * sigma
    );
    ensure!(
        got.bytes == got.count * 64,
        "-s {RATE}: {} B for {} allocations of 64 B",
        got.bytes,
        got.count
    );
    Ok(())
}

#[test]
fn sample_bytes_scales_back_to_the_truth() -> Result<()> {
    if !can_trace("sample_bytes_scales_back_to_the_truth") {
        return Ok(());
    }
    const N: u64 = 20000;
    const EVERY: u64 = 640; // 64-byte blocks are kept with probability 64/640
    let scratch = Scratch::new("samplebytes")?;
    let fixture = scratch.compile("sample", "sample", &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {} {N}", fixture.display(), ledger.display());
    let every = EVERY.to_string();
    let run = run_memleak(
        &scratch,
        &[
            "-c",
            &command,
            "--sample-bytes",
            &every,
            "--json",
            out.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(90),
    )?;
    expect_success(&run)?;
    let want = &Ledger::read(&ledger)?.sites(|_| true)["sampled_leak"];
    let got = usage_of(Report::read(&out)?.final_snapshot(), "sampled_leak");
    // Each kept block stands for EVERY bytes in EVERY/64 blocks: the kept number is
    // Binomial(N, 64/EVERY), five standard deviations either side.
    let p = 64.0 / EVERY as f64;
    let kept = got.bytes / EVERY;
    ensure!(
        got.bytes.is_multiple_of(EVERY) && got.count == kept * (EVERY / 64),
        "{got:?}"
    );
    let sigma = (N as f64 * p * (1.0 - p)).sqrt();
    ensure!(
        (kept as f64 - N as f64 * p).abs() <= 5.0 * sigma,
        "--sample-bytes {EVERY}: kept {kept} of {N}, expected {} ± {:.0}",
        N as f64 * p,
        5.0 * sigma
    );
    // Scaled back up, the estimate of the truth is within the same bounds.
    let err = (got.bytes as f64 - want.bytes as f64).abs();
    ensure!(
        err <= 5.0 * sigma * EVERY as f64,
        "--sample-bytes {EVERY}: estimated {} B, truth {} B",
        got.bytes,
        want.bytes
    );
    Ok(())
}
