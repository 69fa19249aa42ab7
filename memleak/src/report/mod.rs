//! Output formats. (Temporary module list of the `report` branch; the lead's mod.rs adds `text`.)

pub mod folded;
pub mod html;
pub mod json;
pub mod live;
pub mod pprof;
pub mod summary;
