//! Outputs, all fed by the data model in `crate::model`.

pub mod folded;
pub mod format;
pub mod html;
pub mod json;
pub mod live;
pub mod metrics;
pub mod pprof;
pub mod summary;
pub mod text;
