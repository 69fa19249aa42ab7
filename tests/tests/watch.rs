//! `--listen`: the pages the monitoring a fleet already runs reads, read by those very
//! programs. Prometheus (Debian's) scrapes two memleaks every second and evaluates an alert
//! on the per-stack series; `promtool` checks the README's config and evaluates its alert
//! rule; Go's own `go tool pprof` reads the heap endpoint. Also: the address errors come
//! before tracing, and clients that stall do not stall the tracer.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{
    Running, Scratch, can_trace, expect_success, in_ci, memleak_bin, run_memleak, skipped,
    wait_for_text, workspace_root,
};
use serde_json::Value;

/// A fixture (tests/fixtures/watch.c, in `mode`) started by a memleak serving on a port of
/// its own choosing, once the fixture runs: memleak and its address.
fn watched(scratch: &Scratch, mode: &str, interval: &str) -> Result<(Running, SocketAddr)> {
    let fixture = scratch.path("watch");
    if !fixture.exists() {
        scratch.compile("watch", "watch", &[])?;
    }
    let command = format!("{} {mode}", fixture.display());
    let args = ["--listen", "0", "--interval", interval, "-c", &command];
    let label = format!("memleak-{mode}");
    let tracer = Running::start(scratch, &label, &memleak_bin(), &args, None)?;
    let stdout = scratch.path(&format!("{label}.stdout"));
    // Attaching takes seconds, more on a loaded machine.
    wait_for_text(&stdout, "ready", Duration::from_secs(90))?;
    let text = std::fs::read_to_string(&stdout)?;
    let addr = text
        .split("Serving http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("no address in memleak's output:\n{text}"))?;
    Ok((tracer, addr.parse()?))
}

/// Ends a [`watched`] memleak as a user would, with Ctrl+C: it must exit cleanly. Its
/// command runs on after it; dropping the `Running` ends that too.
fn stop(tracer: Running) -> Result<()> {
    expect_success(&tracer.interrupt(Duration::from_secs(60))?)
}

/// A GET with `headers` (`Name: value\r\n` lines): the status line and headers, and the body.
fn get(addr: SocketAddr, path: &str, headers: &str) -> Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    Ok((head, raw[split + 4..].to_vec()))
}

/// One sample's value from a /metrics text (the first line starting with `series`).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A program a test needs: the test setup installs it, so it is missing only on a machine
/// set up by hand (skipped, loudly) or by a broken setup (under CI, a failure).
fn tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test}: {name} is missing; `cargo xtask test` installs it"
        );
        skipped(test, &format!("no {name}; cargo xtask test installs it"));
    }
    found
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Prometheus's alerts, as its HTTP API lists them.
fn alerts(prometheus: SocketAddr) -> Result<Vec<Value>> {
    let (_, body) = get(prometheus, "/api/v1/alerts", "")?;
    let doc: Value = serde_json::from_slice(&body)?;
    Ok(doc["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A leaking fixture's stack trips the alert (deriv over 30 s above 100 KB/s, for 10 s); a
/// churning one, watched the same way at the same time, never gets it even pending.
#[test]
fn prometheus_alert_fires_for_a_leak_and_not_for_churn() -> Result<()> {
    let test = "prometheus_alert_fires_for_a_leak_and_not_for_churn";
    if !can_trace(test) {
        return Ok(());
    }
    let Some(prometheus) = tool(test, "prometheus") else {
        return Ok(());
    };
    let scratch = Scratch::new("watch-prom")?;
    let (leak, leak_addr) = watched(&scratch, "leak", "1s")?;
    let (churn, churn_addr) = watched(&scratch, "churn", "1s")?;
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = scratch.path("prometheus.yml");
    std::fs::write(
        scratch.path("rules.yml"),
        "groups:\n- name: memleak\n  rules:\n  - alert: StackLeaking\n    \
         expr: deriv(memleak_stack_outstanding_bytes{stack!=\"other\"}[30s]) > 100000\n    \
         for: 10s\n",
    )?;
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\nscrape_configs:\n\
             - job_name: leak\n  static_configs: [{{targets: ['{leak_addr}']}}]\n\
             - job_name: churn\n  static_configs: [{{targets: ['{churn_addr}']}}]\n"
        ),
    )?;
    let data = scratch.path("tsdb");
    let config_flag = format!("--config.file={}", config.display());
    let data_flag = format!("--storage.tsdb.path={}", data.display());
    let listen_flag = format!("--web.listen-address={api}");
    let _server = Running::start(
        &scratch,
        "prometheus",
        &prometheus,
        &[&config_flag, &data_flag, &listen_flag],
        None,
    )?;
    let start = Instant::now();
    let fired = loop {
        let now = alerts(api).unwrap_or_default();
        if let Some(a) = now.iter().find(|a| a["state"] == "firing") {
            break a.clone();
        }
        if start.elapsed() > Duration::from_secs(90) {
            bail!(
                "no alert fired within 90 s; alerts: {now:?}\n{}",
                std::fs::read_to_string(scratch.path("prometheus.stderr")).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(250));
    };
    let labels = &fired["labels"];
    assert_eq!(labels["job"], "leak", "{fired}");
    let frame = labels["frame"].as_str().unwrap_or("");
    assert!(frame.starts_with("leak_slowly "), "{fired}");
    // Every alert so far, pending or firing, is the leak's.
    for a in alerts(api)? {
        assert_eq!(a["labels"]["job"], "leak", "the churn got an alert: {a}");
    }
    // The churn was scraped all along: its silence is not a lack of data.
    let (_, body) = get(
        api,
        "/api/v1/query?query=count_over_time(memleak_stack_outstanding_bytes%7Bjob%3D%22churn%22%2Cframe%3D~%22churn_replace.*%22%7D%5B1m%5D)",
        "",
    )?;
    let doc: Value = serde_json::from_slice(&body)?;
    let samples: f64 = doc["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no churn series in Prometheus: {doc}"))?;
    assert!(samples >= 10.0, "only {samples} churn samples");
    stop(leak)?;
    stop(churn)
}

/// The README's fenced block that starts with the line `# NAME`.
fn readme_block(name: &str) -> Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let start = readme
        .find(&format!("```yaml\n# {name}\n"))
        .with_context(|| format!("no {name} block in README.md"))?
        + "```yaml\n".len();
    let end = readme[start..].find("```").context("an unclosed block")? + start;
    Ok(readme[start..end].to_string())
}

/// The alert the README offers, as Prometheus's own `promtool` evaluates it: a stack growing
/// by 300 kB/s fires after the rule's 5 minutes, with its summary; a flat stack and the
/// (faster) "other" never do. The README's scrape config is valid as written. (Prometheus
/// drops the empty `class` label.)
#[test]
fn readme_prometheus_config_and_alert_rule_hold() -> Result<()> {
    let test = "readme_prometheus_config_and_alert_rule_hold";
    let Some(promtool) = tool(test, "promtool") else {
        return Ok(());
    };
    let scratch = Scratch::new("watch-readme")?;
    std::fs::write(
        scratch.path("prometheus.yml"),
        readme_block("prometheus.yml")?,
    )?;
    std::fs::write(scratch.path("rules.yml"), readme_block("rules.yml")?)?;
    let series = |stack: &str, frame: &str, values: &str| {
        format!(
            "      - series: 'memleak_stack_outstanding_bytes{{pid=\"42\",stack=\"{stack}\",class=\"\",frame=\"{frame}\"}}'\n        values: '{values}'\n"
        )
    };
    let leak = "leak_slowly /src/watch.c";
    let unit = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 15s\ntests:\n  - interval: 15s\n    input_series:\n{}{}{}\
         \x20   alert_rule_test:\n\
         \x20     - {{eval_time: 4m, alertname: MemoryLeakByStack, exp_alerts: []}}\n\
         \x20     - eval_time: 10m\n        alertname: MemoryLeakByStack\n        exp_alerts:\n\
         \x20         - exp_labels: {{pid: '42', stack: 0badf00d, frame: '{leak}'}}\n\
         \x20           exp_annotations: {{summary: 'pid 42: {leak} grows 293kiB/s'}}\n",
        series("0badf00d", leak, "0+4500000x60"),
        series("other", "", "0+9000000x60"),
        series("5eed5eed", "churn_replace /src/watch.c", "1000000+0x60"),
    );
    std::fs::write(scratch.path("unit.yml"), unit)?;
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["test", "rules", "unit.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(scratch.path(""))
            .output()?;
        ensure!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `go tool pprof` reads /debug/pprof/heap as it reads a Go program's, and its inuse_space
/// total is what memleak's table says is outstanding.
#[test]
fn go_pprof_reads_the_heap_endpoint() -> Result<()> {
    let test = "go_pprof_reads_the_heap_endpoint";
    if !can_trace(test) {
        return Ok(());
    }
    let Some(go) = tool(test, "go") else {
        return Ok(());
    };
    let scratch = Scratch::new("watch-pprof")?;
    let (tracer, addr) = watched(&scratch, "hold", "1s")?;
    // Past the age filter, the held blocks are all in the pages.
    wait_for_metric(addr, "memleak_intervals_total", 3.0)?;
    let (_, metrics) = get(addr, "/metrics", "")?;
    let unhooked = sample(
        &String::from_utf8_lossy(&metrics),
        "memleak_unhooked_functions{",
    );
    assert!(unhooked.is_some(), "no memleak_unhooked_functions");
    let (head, _) = get(addr, "/debug/pprof/heap?seconds=5", "")?;
    assert!(
        head.contains("Content-Type: application/octet-stream"),
        "{head}"
    );
    assert!(
        head.contains("Content-Disposition: attachment; filename=\"heap\""),
        "{head}"
    );
    let out = Command::new(go)
        .args(["tool", "pprof", "-raw", "-symbolize=none"])
        .arg(format!("http://{addr}/debug/pprof/heap"))
        .env("HOME", scratch.path(""))
        .env("PPROF_TMPDIR", scratch.path(""))
        .output()?;
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{raw}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inuse = inuse_space_total(&raw)?;
    let run = tracer.interrupt(Duration::from_secs(60))?;
    let table = last_table_total(&run.stdout)?;
    assert_eq!(
        inuse, table,
        "pprof says {inuse} bytes in use, the table {table}\n{raw}"
    );
    // 100 blocks of 10000 bytes from hold_blocks, plus stdout's buffer.
    assert!(raw.contains("hold_blocks"), "{raw}");
    assert!((1_000_000..1_000_000 + 8192).contains(&inuse), "{inuse}");
    Ok(())
}

/// Waits until `series` on /metrics reaches `at_least`.
fn wait_for_metric(addr: SocketAddr, series: &str, at_least: f64) -> Result<f64> {
    let start = Instant::now();
    loop {
        let (_, body) = get(addr, "/metrics", "")?;
        let v = sample(&String::from_utf8_lossy(&body), series).unwrap_or(0.0);
        if v >= at_least {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{series} stayed at {v}, below {at_least}");
        }
        sleep(Duration::from_millis(100));
    }
}

/// The inuse_space column (the 4th) of `go tool pprof -raw`'s samples, summed.
fn inuse_space_total(raw: &str) -> Result<u64> {
    let samples = raw.split("Samples:\n").nth(1).context("no samples")?;
    let header = samples.lines().next().unwrap_or("");
    assert!(header.contains("inuse_space/bytes"), "{header}");
    let mut total = 0;
    for line in samples
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Locations"))
    {
        let Some((values, _)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = values
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if v.len() == 4 {
            total += v[3];
        }
    }
    Ok(total)
}

/// The bytes of every stack in the last table memleak printed (its final one, on Ctrl-C).
fn last_table_total(stdout: &str) -> Result<u64> {
    let table = stdout.rsplit("Top ").next().context("no table")?;
    Ok(table
        .lines()
        .filter(|l| l.ends_with(" allocations from stack"))
        .filter_map(|l| l.trim().split(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// A port in use and a bad address: one line on stderr and a failure, before anything is
/// started (the command never runs).
#[test]
fn listen_errors_come_before_tracing() -> Result<()> {
    if !can_trace("listen_errors_come_before_tracing") {
        return Ok(());
    }
    let scratch = Scratch::new("watch-errors")?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let marker = scratch.path("started");
    let command = format!("touch {}", marker.display());
    for (listen, says) in [
        (port.as_str(), "Address already in use"),
        ("99999", "the port must be 0 to 65535"),
        ("nowhere", "expected PORT, :PORT or HOST:PORT"),
        ("no.such.host.invalid:80", "not an address and port"),
    ] {
        let run = run_memleak(
            &scratch,
            &["--listen", listen, "-c", &command],
            None,
            Duration::from_secs(60),
        )?;
        assert!(!run.status.success(), "{listen}: {}", run.transcript());
        let stderr = run.stderr.trim_end();
        assert_eq!(stderr.lines().count(), 1, "{listen}: {}", run.transcript());
        assert!(
            stderr.starts_with("memleak: ") && stderr.contains(says),
            "{stderr}"
        );
        assert!(!marker.exists(), "{listen}: the command ran");
    }
    Ok(())
}

/// Connections that send nothing, send half a request, or ask and never read: intervals go
/// on at their pace, and a fresh scrape is answered at once.
#[test]
fn stalled_clients_do_not_stall_tracing() -> Result<()> {
    if !can_trace("stalled_clients_do_not_stall_tracing") {
        return Ok(());
    }
    let scratch = Scratch::new("watch-stall")?;
    let (tracer, addr) = watched(&scratch, "leak", "200ms")?;
    let before = wait_for_metric(addr, "memleak_intervals_total", 1.0)?;
    let start = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..30 {
        let mut s = TcpStream::connect(addr)?;
        match i % 3 {
            0 => {}
            1 => s.write_all(b"GET /metr")?,
            // The live page, asked for and never read.
            _ => s.write_all(b"GET / HTTP/1.1\r\n\r\n")?,
        }
        stalled.push(s);
    }
    sleep(Duration::from_secs(3));
    // Had the stalled connections held the server, the scrape would wait out their 5 s to
    // speak, and the intervals would have stopped; the margins are for a loaded machine.
    let asked = Instant::now();
    let (head, body) = get(addr, "/metrics", "")?;
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "a scrape waited {:?}",
        asked.elapsed()
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let elapsed = start.elapsed().as_secs_f64();
    let after = sample(&String::from_utf8_lossy(&body), "memleak_intervals_total").unwrap();
    let expected = elapsed / 0.2;
    assert!(
        after - before >= expected * 0.25,
        "{} intervals of 200 ms in {elapsed:.1} s",
        after - before
    );
    drop(stalled);
    stop(tracer)
}

/// The live page refreshes itself and carries the chart; allocs is the heap profile; what is
/// not served is refused with its status, and a HEAD gets the headers alone.
#[test]
fn pages_and_refusals() -> Result<()> {
    if !can_trace("pages_and_refusals") {
        return Ok(());
    }
    let scratch = Scratch::new("watch-pages")?;
    let (tracer, addr) = watched(&scratch, "hold", "1s")?;
    wait_for_metric(addr, "memleak_intervals_total", 1.0)?;
    let (head, page) = get(addr, "/", "")?;
    let page = String::from_utf8_lossy(&page);
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"1\">"),
        "{page}"
    );
    assert!(
        page.contains("<svg") && page.contains("hold_blocks"),
        "{page}"
    );
    let (_, heap) = get(addr, "/debug/pprof/heap", "")?;
    let (head, allocs) = get(addr, "/debug/pprof/allocs", "")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(&allocs[..2], b"\x1f\x8b", "gzip");
    assert!(heap.len().abs_diff(allocs.len()) < 64, "the same profile");
    let (head, _) = get(addr, "/nothing", "")?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, om) = get(
        addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    )?;
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with(b"# EOF\n"));
    for (request, status) in [
        ("POST /metrics HTTP/1.1\r\n\r\n".to_string(), "405"),
        ("HEAD /metrics HTTP/1.1\r\n\r\n".to_string(), "200"),
        (
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)),
            "431",
        ),
        ("NONSENSE\r\n\r\n".to_string(), "400"),
    ] {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
    }
    stop(tracer)
}
