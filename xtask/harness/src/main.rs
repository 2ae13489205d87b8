//! `xtask-harness`: the tasks of `cargo xtask` that need the workspace's own crates (the test
//! harness, etcd's client): `demo` runs the mesh on this machine, `bench` measures the
//! datapath, the L7 path and the control plane against reference proxies. `cargo xtask` runs
//! it after `setup`; run directly, it assumes the prerequisites are installed.

mod bench;
mod bench_control;
mod bench_l7;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Agent Mesh demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the mesh on this machine: agent, a demo workload in a fresh cgroup, its captured
    /// traffic and counters; then clean up.
    Demo,
    /// Benchmarks (mesh path as a ratio to the direct path and to a reference proxy).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
