//! How every report writes a figure or a frame: sizes, rates, durations, frame labels. One
//! place, so the terminal, the HTML page and the status line read alike.

use std::fmt::Write;

use crate::{
    analysis::Fit,
    model::{Frame, FrameKind},
};

/// `function+0x1a (file:line) [module]`, with what is known.
pub fn frame_label(f: &Frame) -> String {
    let mut s = match (&f.function, f.kind) {
        (Some(name), FrameKind::Python) => name.clone(),
        (Some(name), FrameKind::Native) => format!("{name}+{:#x}", f.function_offset),
        (None, _) => match &f.module {
            Some(m) => format!("{m}+{:#x}", f.module_offset),
            None => format!("{:#x}", f.addr),
        },
    };
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(s, " ({file}:{line})");
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    if let (Some(m), Some(_)) = (&f.module, &f.function) {
        let _ = write!(s, " [{m}]");
    }
    s
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// At most `width` characters, `...` marking a cut.
pub fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut t: String = s.chars().take(width.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// 1.5 MiB, 512 B.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// +1.5 MiB, -512 B.
pub fn signed_bytes(b: f64) -> String {
    let sign = if b < 0.0 { '-' } else { '+' };
    format!("{sign}{}", bytes(b.abs().round() as u64))
}

/// `+1.5 MiB/min (R² 0.98)`, or `no rate (not enough data)` when there is no line.
pub fn rate(fit: Option<Fit>) -> String {
    match fit {
        Some(f) => format!("{}/min (R² {:.2})", signed_bytes(f.slope_per_min), f.r2),
        None => "no rate (not enough data)".into(),
    }
}

/// 45s, 2m05s, 3h20m, 4d2h.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{:.1}s", seconds.max(0.0)),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Text safe inside HTML and SVG elements and attributes.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(signed_bytes(-1536.0), "-1.5 KiB");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(4.0 * 3600.0 + 120.0), "4h02m");
        assert_eq!(rate(None), "no rate (not enough data)");
    }
}
