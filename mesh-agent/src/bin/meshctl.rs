//! `meshctl`: the operator's command line for the Agent Mesh control plane in etcd (apply,
//! get, delete, validate, agents, check, nodes). The logic lives in
//! `mesh_agent::control::ctl`; this is the process around it.

use std::process::ExitCode;

use clap::Parser;
use mesh_agent::control::ctl::{self, Meshctl};

fn main() -> ExitCode {
    // Usage errors exit with code 2 (clap's default).
    let cli = Meshctl::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(ctl::execute(cli, &mut stdout)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
