mod model;
mod placement;
mod procmaps;
mod symbolize;

fn main() {}
