//! A real service under load: a FastAPI app served by uvicorn on the loopback, driven by wrk
//! from outside the traced process (16 connections, a fixed time), untraced and under each
//! tracer: requests/s and p50/p99 latency.

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Tracer, bpf_stats, wait_for_attach, wait_for_probes};

const APP: &str = r#"
from fastapi import FastAPI
app = FastAPI()
ITEMS = [{"id": i, "name": "item%d" % i, "tags": ["a", "b", str(i)], "score": i * 0.5}
         for i in range(40)]

@app.get("/items")
def items(limit: int = 40):
    return {"count": limit, "items": [dict(item) for item in ITEMS[:limit]]}
"#;

const PORT: u16 = 18719;
const CONNECTIONS: &str = "16";
const SECONDS: &str = "10";

/// What wrk measured.
pub struct Load {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Under memleak's allocation mode: its return probe's BPF time per call.
    pub return_probe_ns: Option<f64>,
}

/// How the server runs: directly (untraced, or attached to by a tracer) or under memray.
pub enum Server<'a> {
    Plain,
    Memray { native: bool, out: &'a Path },
}

/// One round: starts the server, attaches `tracer` if any, warms up, loads it, stops all.
pub fn measure(
    venv_python: &Path,
    out: &Path,
    server: Server,
    tracer: Option<&Tracer>,
) -> Result<Load> {
    let app_dir = out.join("service");
    std::fs::create_dir_all(&app_dir)?;
    std::fs::write(app_dir.join("app.py"), APP)?;
    let mut cmd = match server {
        Server::Plain => Command::new(venv_python),
        Server::Memray { native, out } => super::python::under_memray(venv_python, out, native),
    };
    let port = PORT.to_string();
    cmd.args([
        "-m",
        "uvicorn",
        "app:app",
        "--port",
        &port,
        "--log-level",
        "warning",
    ])
    .arg("--no-access-log")
    .current_dir(&app_dir)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut server = ServerProcess(cmd.spawn().context("starting uvicorn")?);
    wait_for_port(&mut server.0)?;
    let mut running = None;
    if let Some(t) = tracer {
        let log = out.join(format!("service-{}.stderr.log", t.name));
        let mut r = t.spawn(server.0.id(), &log)?;
        let ready = if t.growth {
            wait_for_attach(&mut r)
        } else {
            wait_for_probes(server.0.id(), &mut r).map(drop)
        };
        running = Some(r);
        ready?;
    }
    wrk("2")?;
    let load = wrk(SECONDS).map(|mut load| {
        if let Some(r) = &running {
            load.return_probe_ns = bpf_stats::return_probe_ns(&bpf_stats::of_process(r.child.id()));
        }
        load
    });
    if let Some(r) = running {
        r.stop()?;
    }
    load
}

/// Kills the server when dropped, whatever happened.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(server: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", PORT)).is_err() {
        if let Some(status) = server.try_wait()? {
            bail!("uvicorn exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("uvicorn not listening on {PORT} after 60 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `wrk` for `seconds` with `CONNECTIONS` connections on two threads.
fn wrk(seconds: &str) -> Result<Load> {
    let url = format!("http://127.0.0.1:{PORT}/items");
    let out = Command::new("wrk")
        .args(["-t2", "-c", CONNECTIONS, "-d"])
        .arg(format!("{seconds}s"))
        .args(["--latency", &url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).with_context(|| format!("wrk said:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Load> {
    let value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.trim().to_string())
    };
    Some(Load {
        requests_per_s: value("Requests/sec:")?.parse().ok()?,
        p50_ms: millis(&value("50%")?)?,
        p99_ms: millis(&value("99%")?)?,
        return_probe_ns: None,
    })
}

/// wrk's `812.00us`, `3.41ms`, `1.02s` in milliseconds.
fn millis(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else {
        (v.strip_suffix('s')?, 1e3)
    };
    Some(num.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrk_output() {
        let text = "  Latency Distribution\n     50%  812.00us\n     99%    3.41ms\nRequests/sec:   4321.50\n";
        let load = super::parse_wrk(text).unwrap();
        assert_eq!(load.requests_per_s, 4321.5);
        assert!((load.p50_ms - 0.812).abs() < 1e-9);
        assert!((load.p99_ms - 3.41).abs() < 1e-9);
    }
}
