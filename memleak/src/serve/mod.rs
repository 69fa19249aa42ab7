//! `--listen`: pages for the monitoring a fleet already runs. `/metrics` (Prometheus,
//! OpenMetrics), `/debug/pprof/heap` and `/debug/pprof/allocs` (as Go's net/http/pprof serves
//! them: `go tool pprof`, Parca, Alloy's pyroscope.scrape; `?seconds=` is ignored, the
//! profile is always the current state) and `/`, the HTML report, refreshed.
//!
//! The pages are rendered once per interval into an immutable [`Pages`] that is swapped in
//! whole; a connection only clones the `Arc` and writes bytes. So no client, however slow or
//! gone, holds the tracer's maps or delays an interval: it holds at most an old snapshot,
//! for a bounded time, in one of a bounded number of connections.

mod http;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::timeout,
};

use crate::{
    analysis::{Analysis, analyze},
    proc_stats,
    report::{
        html,
        metrics::{self, Format, SelfUsage},
        pprof,
    },
    stacks::StackTable,
    timeline::Timeline,
};

/// Connections served at once; more are closed at once (a scraper retries next interval).
const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request, and then to take the response.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything served, as rendered at the last interval.
struct Pages {
    prometheus: String,
    openmetrics: String,
    /// Gzipped profile.proto.
    heap: Vec<u8>,
    live: String,
}

impl Pages {
    /// The one place the pages meet the run's analysis.
    fn render(analysis: &Analysis, top: usize, refresh_s: u64) -> Pages {
        let own = self_usage();
        let text = |format| metrics::render(analysis, top, own, format);
        Pages {
            prometheus: text(Format::Prometheus),
            openmetrics: text(Format::OpenMetrics),
            heap: pprof::gzipped(analysis),
            live: live_page(analysis, refresh_s),
        }
    }

    /// What a request gets: status, content type, extra headers, body.
    fn route(&self, path: &str, accept: Option<&str>) -> ((u16, &str), &str, &str, &[u8]) {
        const OK: (u16, &str) = (200, "OK");
        match path {
            "/metrics" => {
                let format = Format::from_accept(accept);
                let body = match format {
                    Format::Prometheus => &self.prometheus,
                    Format::OpenMetrics => &self.openmetrics,
                };
                (OK, format.content_type(), "", body.as_bytes())
            }
            // Parca's and Alloy's memory scrape asks for allocs by default: the same profile
            // (its alloc_* values are in it too).
            "/debug/pprof/heap" | "/debug/pprof/allocs" => (
                OK,
                "application/octet-stream",
                "Content-Disposition: attachment; filename=\"heap\"\r\n\
                 X-Content-Type-Options: nosniff\r\n",
                &self.heap,
            ),
            "/" => (OK, "text/html; charset=utf-8", "", self.live.as_bytes()),
            _ => (
                (404, "Not Found"),
                "text/plain; charset=utf-8",
                "",
                b"memleak serves /metrics, /debug/pprof/heap, /debug/pprof/allocs and /\n",
            ),
        }
    }
}

/// The HTML report with a refresh every interval; a placeholder before the first one.
fn live_page(analysis: &Analysis, refresh_s: u64) -> String {
    let refresh = format!("<meta http-equiv=\"refresh\" content=\"{refresh_s}\">");
    let page = match analysis.timeline.last() {
        None => Ok(String::from(
            "<!DOCTYPE html>\n<html><head><title>memleak</title></head>\
             <body><p>memleak: waiting for the first interval...</p></body></html>\n",
        )),
        Some(_) => html::render(analysis),
    };
    match page {
        Ok(page) => page.replacen("<head>", &format!("<head>{refresh}"), 1),
        Err(e) => format!(
            "<!DOCTYPE html>\n<html><head>{refresh}</head><body><p>memleak: {e:#}</p></body></html>\n"
        ),
    }
}

/// memleak's own CPU time and resident set.
fn self_usage() -> SelfUsage {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    SelfUsage {
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        rss_bytes: proc_stats::parse_status(&status).rss_bytes,
    }
}

/// The listening side: publish the pages after each interval.
pub struct Server {
    pages: watch::Sender<Arc<Pages>>,
    top: usize,
    refresh_s: u64,
}

impl Server {
    /// Binds now, so that a bad address or a port in use fails before tracing starts, and
    /// serves from the runtime's tasks.
    pub fn bind(addr: SocketAddr, top: usize, interval: Duration) -> Result<Server> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("--listen {addr}"))?;
        let listener =
            TcpListener::from_std(listener).with_context(|| format!("--listen {addr}"))?;
        let local = listener.local_addr()?;
        let refresh_s = interval.as_secs().max(1);
        let empty = Timeline::new(Default::default(), interval.as_secs_f64());
        let first = Pages::render(&analyze(&empty, &StackTable::default()), top, refresh_s);
        let (pages, rx) = watch::channel(Arc::new(first));
        tokio::spawn(accept(listener, rx));
        println!("Serving http://{local}/metrics, /debug/pprof/heap and / (a live page).");
        Ok(Server {
            pages,
            top,
            refresh_s,
        })
    }

    /// Renders the timeline just recorded and swaps it in for every later request.
    pub fn publish(&self, timeline: &Timeline, table: &StackTable) {
        let pages = Pages::render(&analyze(timeline, table), self.top, self.refresh_s);
        self.pages.send_replace(Arc::new(pages));
    }
}

async fn accept(listener: TcpListener, pages: watch::Receiver<Arc<Pages>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, say: try again a little later, without spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // All slots taken: this one is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let pages = pages.clone();
        tokio::spawn(async move {
            let _ = connection(stream, pages).await;
            drop(slot);
        });
    }
}

/// One request, one response, then the connection is closed.
async fn connection(mut stream: TcpStream, pages: watch::Receiver<Arc<Pages>>) -> Result<()> {
    let request = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => http::parse(&head),
        Ok(Ok(None)) => Err(http::Refused::TooLarge),
        // Silent or gone: nothing to answer.
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    let pages = pages.borrow().clone();
    let (head, body) = match &request {
        Ok(req) => {
            let (status, content_type, extra, body) = pages.route(&req.path, req.accept.as_deref());
            let head = http::response_head(status, content_type, extra, body.len());
            (head, if req.head_only { &[][..] } else { body })
        }
        Err(refused) => {
            let extra = match refused {
                http::Refused::MethodNotAllowed => "Allow: GET, HEAD\r\n",
                _ => "",
            };
            let head = http::response_head(refused.status(), "text/plain", extra, 0);
            (head, &[][..])
        }
    };
    timeout(WRITE_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    })
    .await??;
    Ok(())
}

/// The request head; `None`: longer than `http::MAX_HEAD`.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match http::head_len(&buf) {
            Some(len) if len <= http::MAX_HEAD => {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            _ if buf.len() > http::MAX_HEAD => return Ok(None),
            _ => {}
        }
    }
}
