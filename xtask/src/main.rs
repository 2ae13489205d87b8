//! `cargo xtask`: the only entry points a newcomer needs. `setup` installs prerequisites,
//! `build` builds the agent (and its embedded eBPF object), `lint` runs fmt and clippy (the
//! eBPF crate on its own target), `test` runs lint, every test and a short fuzz run, `fuzz`
//! runs the fuzz targets longer, `demo` shows capture on
//! this machine, `bench` measures the datapath and the L7 path against reference proxies.
//!
//! This binary builds with nothing installed; `demo` and `bench` run `xtask-harness`, built
//! only after `setup` has installed what the workspace's crates need to build.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use xtask::{setup, util};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Agent Mesh project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install every prerequisite (Debian packages, nightly rust-src, bpf-linker, Python venv).
    Setup,
    /// Build the agent, the test binaries and the eBPF object (release with --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// cargo fmt --check, clippy -D warnings on the workspace and on the eBPF crate.
    Lint,
    /// Setup, lint, build, then every unit and end-to-end test (nextest).
    Test {
        /// Extra arguments for `cargo nextest run` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        nextest_args: Vec<String>,
    },
    /// Run every fuzz target (the test task runs each for 10 s).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Run the mesh on this machine: agent, a demo workload in a fresh cgroup, its captured
    /// traffic and counters; then clean up.
    Demo,
    /// Benchmarks (mesh path as a ratio to the direct path and to a reference proxy); see
    /// `cargo xtask bench --help`.
    #[command(disable_help_flag = true)]
    Bench {
        /// The suite and its options, passed on to the harness.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Runs `xtask-harness` (built now, when its prerequisites are installed) with `args`, and
/// fails as it fails.
fn harness(args: &[String]) -> anyhow::Result<()> {
    util::run(
        Command::new("cargo")
            .args(["run", "--quiet", "--package", "xtask-harness", "--"])
            .args(args),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => setup::run().and_then(|()| util::build(release)),
        Task::Lint => setup::run().and_then(|()| util::lint()),
        Task::Test { nextest_args } => setup::run().and_then(|()| util::test(&nextest_args)),
        Task::Demo => setup::run().and_then(|()| harness(&["demo".to_owned()])),
        Task::Fuzz { seconds } => setup::run().and_then(|()| util::fuzz(seconds)),
        Task::Bench { args } => setup::run().and_then(|()| {
            let mut harness_args = vec!["bench".to_owned()];
            harness_args.extend(args);
            harness(&harness_args)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
