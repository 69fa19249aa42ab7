mod model;
mod procmaps;
mod symbolize;

fn main() {}
