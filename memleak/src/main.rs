mod model;
mod procmaps;
mod python;
mod symbolize;

fn main() {}
