//! `cargo xtask soak`: memleak watching a service for a long time, as `--listen` is meant to
//! be used. The load fixture (tests/fixtures/load.c: 8 threads, a paced allocation rate, a
//! few leaks over the run) runs under `memleak --listen`, which is scraped every interval the
//! way Prometheus and a pprof scraper would; memleak's own resident set and CPU time are read
//! from /proc along the way. Its memory must stay flat: the timeline is thinned, the pages
//! are replaced, nothing grows with the run's length.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{run, workspace_root};

#[derive(Args)]
pub struct Options {
    /// Seconds of load.
    #[arg(long, default_value_t = 3600)]
    seconds: u64,
    /// Allocating calls per second the fixture's threads aim for, all together.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// memleak's interval, in seconds (the pages are scraped as often).
    #[arg(long, default_value_t = 5)]
    interval: u64,
}

/// memleak's figures at one instant.
struct Sample {
    at_s: f64,
    rss_kib: u64,
    cpu_s: f64,
}

pub fn run_soak(memleak: &Path, opts: &Options) -> Result<()> {
    let dir = workspace_root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let fixture = dir.join("load");
    let fixtures = workspace_root().join("tests/fixtures");
    run(Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&fixture)
        .arg(fixtures.join("load.c")))?;
    let log = dir.join("memleak.log");
    let command = format!(
        "{} {} {} {} untraced",
        fixture.display(),
        dir.join("ledger.json").display(),
        opts.seconds,
        opts.rate
    );
    let interval = format!("{}s", opts.interval);
    let mut tracer = Command::new(memleak)
        .args(["--listen", "0", "--interval", &interval, "-c", &command])
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting memleak")?;
    let addr = served_address(&log)?;
    println!(
        "soak: {} s at {} calls/s, memleak --listen {addr} --interval {interval}; scraped every interval",
        opts.seconds, opts.rate
    );
    println!(
        "{:>8}  {:>12}  {:>12}  {:>10}",
        "elapsed", "memleak RSS", "CPU (1 core)", "points"
    );
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let every = (opts.seconds / 20).clamp(10, 300) as f64;
    while tracer.try_wait()?.is_none() {
        // Both pages, as Prometheus and Parca/Alloy fetch them; a failed scrape is said.
        let metrics = get(&addr, "/metrics").unwrap_or_default();
        if let Err(e) = get(&addr, "/debug/pprof/heap")
            && tracer.try_wait()?.is_none()
        {
            println!("soak: /debug/pprof/heap: {e:#}");
        }
        let due = samples
            .last()
            .is_none_or(|s| start.elapsed().as_secs_f64() - s.at_s >= every);
        if due && let Some(s) = sample(tracer.id(), start) {
            print_row(&s, samples.last(), &metrics);
            samples.push(s);
        }
        sleep(Duration::from_secs(opts.interval));
    }
    print_summary(&samples, &std::fs::read_to_string(&log)?)
}

/// The address memleak prints once it listens.
fn served_address(log: &Path) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("Serving http://").nth(1) {
            return Ok(rest.split('/').next().unwrap_or("").to_string());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("memleak did not start serving:\n{text}");
        }
        sleep(Duration::from_millis(50));
    }
}

fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!("{}", text.lines().next().unwrap_or("no answer"));
    }
    Ok(text)
}

/// memleak's VmRSS and its user and system CPU time, from /proc.
fn sample(pid: u32, start: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(Sample {
        at_s: start.elapsed().as_secs_f64(),
        rss_kib,
        cpu_s: ticks / hz,
    })
}

fn print_row(s: &Sample, previous: Option<&Sample>, metrics: &str) {
    let cpu = previous.map_or(s.cpu_s / s.at_s.max(1.0), |p| {
        (s.cpu_s - p.cpu_s) / (s.at_s - p.at_s).max(1e-3)
    });
    let points = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memleak_timeline_points "))
        .unwrap_or("-");
    println!(
        "{:>7.0}s  {:>8.1} MiB  {:>11.1}%  {points:>10}",
        s.at_s,
        s.rss_kib as f64 / 1024.0,
        cpu * 100.0
    );
}

/// RSS after the first minute and at the end, the peak, the mean CPU, and the rate the
/// fixture reached (its "allocations N seconds S" line, in memleak's output).
fn print_summary(samples: &[Sample], log: &str) -> Result<()> {
    let (Some(first), Some(last)) = (
        samples.iter().find(|s| s.at_s >= 60.0).or(samples.first()),
        samples.last(),
    ) else {
        bail!("memleak exited before a sample was taken:\n{log}");
    };
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "soak: memleak RSS {:.1} MiB at {:.0} s, {:.1} MiB at {:.0} s (peak {:.1} MiB); CPU {:.1}% of one core over the run",
        mib(first.rss_kib),
        first.at_s,
        mib(last.rss_kib),
        last.at_s,
        mib(peak),
        100.0 * last.cpu_s / last.at_s.max(1.0)
    );
    if let Some(line) = log.lines().find(|l| l.starts_with("allocations ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(n), Some(s)) = (words.get(1), words.get(3)) {
            let rate = n.parse::<f64>()? / s.parse::<f64>()?;
            println!("soak: the fixture made {n} allocating calls in {s} s ({rate:.0}/s)");
        }
    }
    Ok(())
}
