//! The page's table of stacks (class, bytes, rate, deciding frame), sortable by any column
//! with a click: a few lines of inline script, so the page stays one file.

use std::fmt::Write;

use crate::{
    analysis::{Analysis, Trend},
    report::format::{bytes, escape, frame_label, signed_bytes},
};

/// Rows at most: the named stacks come first, then the largest.
const MAX_ROWS: usize = 500;

/// Sorts the table by the clicked column (numbers by `data-v`), again to reverse.
pub const SCRIPT: &str = "document.querySelectorAll('#stacks th').forEach(function(th,i){\
th.addEventListener('click',function(){var body=th.closest('table').tBodies[0];\
var num=th.hasAttribute('data-num');var dir=th.getAttribute('data-dir')==='down'?1:-1;\
th.setAttribute('data-dir',dir===1?'up':'down');var rows=Array.from(body.rows);\
rows.sort(function(a,b){var x=a.cells[i],y=b.cells[i];\
var u=num?parseFloat(x.getAttribute('data-v')):x.textContent;\
var v=num?parseFloat(y.getAttribute('data-v')):y.textContent;\
return (u<v?-1:u>v?1:0)*dir;});rows.forEach(function(r){body.appendChild(r);});});});";

/// The table, in report order (named first).
pub fn stacks(a: &Analysis) -> String {
    let mut html = String::from(
        "<table id=\"stacks\"><thead><tr><th>class</th><th data-num>bytes</th>\
         <th data-num>rate/min</th><th>deciding frame</th></tr></thead><tbody>\n",
    );
    for s in a.stacks.iter().take(MAX_ROWS) {
        // Only a growing stack has a rate: held memory is never extrapolated.
        let rate = match (s.trend, s.fit) {
            (Trend::Growing, Some(f)) => (f.slope_per_min, signed_bytes(f.slope_per_min)),
            _ => (0.0, "-".into()),
        };
        let frame = s
            .info
            .deciding()
            .map_or(format!("stack {}", s.stack_id), frame_label);
        let named = if s.named { " class=\"named\"" } else { "" };
        let _ = writeln!(
            html,
            "<tr{named}><td>{}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td>\
             <td>{}</td></tr>",
            s.trend.name(),
            s.final_bytes(),
            bytes(s.final_bytes()),
            rate.0,
            rate.1,
            escape(&frame)
        );
    }
    html.push_str("</tbody></table>");
    if a.stacks.len() > MAX_ROWS {
        let _ = write!(
            html,
            "<p>{} more stacks in --json.</p>",
            a.stacks.len() - MAX_ROWS
        );
    }
    html
}
