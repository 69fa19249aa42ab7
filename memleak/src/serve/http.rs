//! Just enough HTTP/1.1 for scrapers and a browser: one GET or HEAD per connection, a request
//! head of bounded size, and `Connection: close` on every response. Pure: the server does
//! the reading and writing.

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8192;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// GET or HEAD; other methods are refused when parsing.
    pub head_only: bool,
    /// The path without the query (`?seconds=30` is accepted and ignored).
    pub path: String,
    pub accept: Option<String>,
}

/// Why a request gets an error status instead of a page.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    BadRequest,
    MethodNotAllowed,
    TooLarge,
}

impl Refused {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Refused::BadRequest => (400, "Bad Request"),
            Refused::MethodNotAllowed => (405, "Method Not Allowed"),
            Refused::TooLarge => (431, "Request Header Fields Too Large"),
        }
    }
}

/// The length of the request head in `buf` (through the blank line), once it is all there.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a request head (as `head_len` delimits it).
pub fn parse(head: &[u8]) -> Result<Request, Refused> {
    let text = std::str::from_utf8(head).map_err(|_| Refused::BadRequest)?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Refused::BadRequest);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refused::MethodNotAllowed),
    };
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, value)| value.trim().to_string());
    Ok(Request {
        head_only,
        path: target.split('?').next().unwrap_or("/").to_string(),
        accept,
    })
}

/// A response's status line and headers; `extra` lines end with `\r\n`.
pub fn response_head(status: (u16, &str), content_type: &str, extra: &str, len: usize) -> String {
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\
         {extra}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        status.0, status.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_scrapers_send() {
        let head =
            b"GET /debug/pprof/heap?seconds=30 HTTP/1.1\r\nHost: x\r\nACCEPT: text/plain\r\n\r\n";
        assert_eq!(head_len(head), Some(head.len()));
        assert_eq!(
            parse(head),
            Ok(Request {
                head_only: false,
                path: "/debug/pprof/heap".into(),
                accept: Some("text/plain".into()),
            })
        );
        assert!(parse(b"HEAD / HTTP/1.0\r\n\r\n").unwrap().head_only);
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost"), None);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\n\r\n"),
            Err(Refused::MethodNotAllowed)
        );
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
            b"",
        ] {
            assert_eq!(parse(bad), Err(Refused::BadRequest), "{bad:?}");
        }
    }
}
