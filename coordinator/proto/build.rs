//! Generates the schema's Rust types from `proto/*.proto` with prost-build,
//! parsing the files with protox (a Rust protobuf compiler), so building
//! needs no `protoc`.

use std::path::Path;

/// The schema's files, in dependency order.
const FILES: [&str; 6] = [
    "common.proto",
    "volume.proto",
    "cluster.proto",
    "host.proto",
    "wire.proto",
    "log.proto",
];

/// Fields that carry bulk data: generated as `bytes::Bytes`, so a frame
/// decoded from a `Bytes` buffer shares it instead of copying the payload.
const BULK: [&str; 4] = [
    ".csv.BlockOp.data",
    ".csv.BlockData.data",
    ".csv.FileOp.data",
    ".csv.FileReply.data",
];

/// Large, rare variants of command oneofs, boxed so that every command
/// (and every Raft event carrying one) stays small.
const BOXED: [&str; 2] = [
    ".csv.ClusterOp.op.set_schedule",
    ".csv.ClusterOp.op.schedule_state",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new("proto");
    for f in FILES {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let fds = protox::compile(FILES, [dir])?;
    prost_build::Config::new()
        .bytes(BULK)
        .boxed(BOXED[0])
        .boxed(BOXED[1])
        .compile_fds(fds)?;
    Ok(())
}
