mod capture;
mod model;
mod proc_stats;
mod procmaps;
mod report;
mod symbolize;

fn main() {}
