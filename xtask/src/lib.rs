//! The project tasks that must run on a machine with nothing installed yet: installing the
//! prerequisites (`setup`) and the build, lint, test and fuzz tasks (`util`). The demo and
//! the benchmarks need the workspace's own crates (which need protoc), so they live in
//! `xtask-harness`, which `cargo xtask` runs once `setup` is done.

pub mod setup;
pub mod util;
