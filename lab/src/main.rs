//! `palaver-lab`: measures the machine a benchmark runs on, not palaver:
//! the floor a turn's process hops set (`floor`) and what a cache line costs
//! after the process sat idle (`idle-memory`); and an OTLP receiver that
//! only counts (`otlp-sink`), to measure what tracing costs. `lab/bench-vm.sh` runs them
//! beside palaver's own figures; they are not part of the installed CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod floor;
mod idle_memory;
mod otlp_sink;

/// palaver-lab: what the benchmark machine itself costs.
#[derive(Debug, Parser)]
#[command(name = "palaver-lab", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    runtime: palaver_core::runtime::RuntimeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time a turn's fourteen process hops with no work at any of them, on
    /// relay processes over loopback: the floor for one-session latency here.
    Floor(floor::FloorArgs),
    /// Time reading memory right after sleeping: what a cache line costs
    /// here once the process sat idle, as a service does during inference.
    IdleMemory(idle_memory::IdleMemoryArgs),
    /// Receive OTLP traces and only count them: the far end for measuring
    /// what tracing costs palaver (`lab/bench-tracing.sh`).
    OtlpSink(otlp_sink::OtlpSinkArgs),
    /// One relay of `palaver-lab floor` (started by it).
    #[command(hide = true)]
    FloorRelay,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = async move {
        match cli.command {
            Command::Floor(args) => floor::run(args).await,
            Command::FloorRelay => floor::relay().await,
            Command::IdleMemory(args) => idle_memory::run(args).await,
            Command::OtlpSink(args) => otlp_sink::run(args).await,
        }
    };
    match cli.runtime.run(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("palaver-lab: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
