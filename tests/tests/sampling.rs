//! `-s 10`: about a tenth of 20000 equal leaks is recorded.

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
