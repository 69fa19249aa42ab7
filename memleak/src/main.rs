mod model;
mod procmaps;
mod symbolize;
mod unwind;

fn main() {}
