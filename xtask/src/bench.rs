//! Benchmarks (filled in by the datapath benchmark).

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(value_enum)]
    pub suite: Suite,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    Datapath,
}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
