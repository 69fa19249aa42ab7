//! `--pprof`: a gzipped profile.proto heap profile, the format `go tool pprof`, Pyroscope and
//! jemalloc's tools read. The messages are declared here with prost's derive (a dozen fields
//! of the stable profile.proto schema) rather than generated, so the build needs no protoc.
//!
//! Sample types: `inuse_objects/count, inuse_space/bytes` (what each stack holds at the end,
//! the default) and `alloc_objects/count, alloc_space/bytes`. The tracer keeps no per-stack
//! running total of allocations, so the alloc_* values are the largest outstanding amount seen
//! at any interval: a lower bound of what the stack allocated (said in the profile's comments).

use std::{collections::HashMap, io::Write, path::Path};

use anyhow::{Context, Result};
use flate2::{Compression, write::GzEncoder};
use prost::Message;

use crate::{
    analysis::{Analysis, StackTrend},
    model::{Frame, FrameKind},
    proc_stats::ProcessContext,
};

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Innermost first: every line but the last was inlined into the next.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Builds the profile: strings, functions and locations are interned as they come.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    locations: HashMap<Vec<(u64, i64, i64)>, u64>,
    /// Index in the context's objects → mapping id.
    mappings: HashMap<usize, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn value_type(&mut self, t: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(t),
            unit: self.string(unit),
        }
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let name = match &f.function {
            Some(n) => n.clone(),
            None => match &f.module {
                Some(m) => format!("{m}+{:#x}", f.module_offset),
                None => format!("{:#x}", f.addr),
            },
        };
        let key = (
            self.string(&name),
            self.string(f.file.as_deref().unwrap_or("")),
        );
        let next = self.profile.function.len() as u64 + 1;
        let id = *self.functions.entry(key).or_insert(next);
        if id == next {
            self.profile.function.push(Function {
                id,
                name: key.0,
                system_name: key.0,
                filename: key.1,
            });
        }
        id
    }

    fn mapping(&mut self, ctx: &ProcessContext, addr: u64) -> u64 {
        let Some(index) = ctx
            .objects
            .iter()
            .position(|o| o.start <= addr && addr < o.end)
        else {
            return 0;
        };
        if let Some(&id) = self.mappings.get(&index) {
            return id;
        }
        let o = &ctx.objects[index];
        let id = self.profile.mapping.len() as u64 + 1;
        let m = Mapping {
            id,
            memory_start: o.start,
            memory_limit: o.end,
            file_offset: o.file_offset,
            filename: self.string(&o.path),
            build_id: self.string(o.build_id.as_deref().unwrap_or("")),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        };
        self.profile.mapping.push(m);
        self.mappings.insert(index, id);
        id
    }

    /// One location: a native address with the functions inlined at it, or a Python frame.
    fn location(&mut self, ctx: &ProcessContext, group: &[Frame]) -> u64 {
        let outer = &group[group.len() - 1];
        let lines: Vec<Line> = group
            .iter()
            .map(|f| Line {
                function_id: self.function(f),
                line: f.line.unwrap_or(0) as i64,
            })
            .collect();
        let address = if outer.kind == FrameKind::Native {
            outer.addr
        } else {
            0
        };
        let key: Vec<(u64, i64, i64)> = lines
            .iter()
            .map(|l| (address, l.function_id as i64, l.line))
            .collect();
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let mapping_id = if address != 0 {
            self.mapping(ctx, address)
        } else {
            0
        };
        self.profile.location.push(Location {
            id,
            mapping_id,
            address,
            line: lines,
        });
        self.locations.insert(key, id);
        id
    }

    fn sample(&mut self, ctx: &ProcessContext, s: &StackTrend) {
        let mut ids = Vec::new();
        let mut start = 0;
        let frames = &s.info.frames;
        for (i, f) in frames.iter().enumerate() {
            // An inlined frame shares its location with the frames up to the next real one.
            if !f.inlined || i + 1 == frames.len() {
                ids.push(self.location(ctx, &frames[start..=i]));
                start = i + 1;
            }
        }
        let peak_count = s.counts.iter().copied().max().unwrap_or(0);
        let mut label = vec![
            Label {
                key: self.string("trend"),
                str: self.string(s.trend.name()),
                num: 0,
            },
            Label {
                key: self.string("stack_id"),
                str: 0,
                num: s.stack_id,
            },
        ];
        // The process whose stack it is (none for the kernel's).
        if s.info.pid != 0 {
            label.push(Label {
                key: self.string("pid"),
                str: 0,
                num: i64::from(s.info.pid),
            });
        }
        self.profile.sample.push(Sample {
            location_id: ids,
            value: vec![
                peak_count as i64,
                s.peak_bytes as i64,
                s.final_count() as i64,
                s.final_bytes() as i64,
            ],
            label,
        });
    }
}

/// The profile of the whole run: one sample per stack that held anything.
pub fn profile(a: &Analysis) -> Profile {
    let timeline = a.timeline;
    let mut b = Builder::default();
    b.string("");
    b.profile.sample_type = vec![
        b.value_type("alloc_objects", "count"),
        b.value_type("alloc_space", "bytes"),
        b.value_type("inuse_objects", "count"),
        b.value_type("inuse_space", "bytes"),
    ];
    b.profile.default_sample_type = b.string("inuse_space");
    b.profile.period_type = Some(b.value_type("space", "bytes"));
    b.profile.period = 1;
    b.profile.comment = vec![
        b.string(&format!("memleak pid {}", timeline.pid())),
        b.string(
            "alloc_* = the largest outstanding amount seen at any interval \
             (a lower bound of what was allocated)",
        ),
    ];
    if let Some(last) = timeline.last() {
        b.profile.time_nanos = ((last.unix_time - last.elapsed_s) * 1e9) as i64;
        b.profile.duration_nanos = (last.elapsed_s * 1e9) as i64;
    }
    for s in a.stacks.iter().filter(|s| s.peak_bytes > 0) {
        b.sample(&timeline.context, s);
    }
    b.profile
}

/// The profile, encoded and gzipped: the bytes of a `.pb.gz` file and of `/debug/pprof/heap`.
pub fn gzipped(a: &Analysis) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(&profile(a).encode_to_vec());
    gz.finish().unwrap_or_default()
}

pub fn write(a: &Analysis, path: &Path) -> Result<()> {
    std::fs::write(path, gzipped(a)).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::{
        analysis::{
            analyze,
            tests::{MIB, cache, churn, frame, leak, timeline},
        },
        stacks::StackInfo,
    };

    fn read(path: &Path) -> Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        Profile::decode(&*raw).unwrap()
    }

    #[test]
    fn profile_decodes_and_inuse_adds_up() {
        let t = timeline(&[leak(1), cache(2), churn(3)], 2.0, 12);
        let path = std::env::temp_dir().join(format!("memleak-{}.pb.gz", std::process::id()));
        write(&t.analyze(), &path).unwrap();
        let p = read(&path);
        std::fs::remove_file(&path).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<String> = p
            .sample_type
            .iter()
            .map(|v| format!("{}/{}", s(v.r#type), s(v.unit)))
            .collect();
        assert_eq!(
            types,
            [
                "alloc_objects/count",
                "alloc_space/bytes",
                "inuse_objects/count",
                "inuse_space/bytes"
            ]
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        let last = t.timeline.last().unwrap();
        let inuse: i64 = p.sample.iter().map(|x| x.value[3]).sum();
        assert_eq!(inuse as u64, last.total_bytes);
        let objects: i64 = p.sample.iter().map(|x| x.value[2]).sum();
        assert_eq!(objects as u64, last.total_count);
        // The churn stack held 3 MiB at its peak, less at the end.
        let by_id = |id| {
            p.sample
                .iter()
                .find(|x| {
                    x.label
                        .iter()
                        .any(|l| s(l.key) == "stack_id" && l.num == id)
                })
                .unwrap()
        };
        assert_eq!(by_id(3).value[1], 3 * MIB as i64);
        // The leak's path, innermost first, resolves through locations and functions.
        let leak = by_id(1);
        let names: Vec<&str> = leak
            .location_id
            .iter()
            .map(|id| {
                let loc = &p.location[*id as usize - 1];
                assert_eq!(loc.id, *id);
                let f = &p.function[loc.line[0].function_id as usize - 1];
                s(f.name)
            })
            .collect();
        assert_eq!(names, ["malloc", "leak_one", "main"]);
        assert_eq!(p.duration_nanos, 22_000_000_000);
    }

    #[test]
    fn native_frames_get_their_mapping_and_build_id() {
        let mut t = crate::timeline::Timeline::new(
            crate::proc_stats::ProcessContext::read(std::process::id()),
            1.0,
        );
        let here = Frame {
            addr: native_frames_get_their_mapping_and_build_id as fn() as usize as u64,
            ..frame("here", "/src/x.c", 1, "memleak")
        };
        let inlined = Frame {
            inlined: true,
            ..here.clone()
        };
        let mut run = timeline(&[leak(1)], 1.0, 3);
        let snapshot = run.timeline.snapshots.pop().unwrap();
        let frames = vec![inlined, here];
        run.table
            .insert(1, StackInfo::new(frames, false, 0, Default::default()));
        t.push(snapshot, None);
        let p = profile(&analyze(&t, &run.table));
        assert_eq!(
            p.sample[0].location_id.len(),
            1,
            "inlined frame shares a location"
        );
        let loc = &p.location[0];
        assert_eq!(loc.line.len(), 2);
        let m = &p.mapping[loc.mapping_id as usize - 1];
        assert!(m.memory_start <= loc.address && loc.address < m.memory_limit);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(p.string_table[m.filename as usize], exe.to_str().unwrap());
        assert_eq!(
            p.string_table[m.build_id as usize].len(),
            40,
            "a GNU build-id"
        );
    }
}
