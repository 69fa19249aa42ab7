//! Outputs, all fed by the data model in `crate::model`.

pub mod json;
pub mod text;
