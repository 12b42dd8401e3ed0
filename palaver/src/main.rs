//! `palaver`: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand};
use palaver::{bench, chat, fake_vllm, health, logging, send, up};

/// palaver: MQTT clients chat with an LLM.
#[derive(Debug, clap::Parser)]
#[command(name = "palaver", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    runtime: palaver_core::runtime::RuntimeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole stack in this process: MQTT broker, session-svc,
    /// inference-svc (simulator unless --vllm-url) and gateway.
    // Boxed: its flags outweigh every other subcommand's.
    Up(Box<up::UpArgs>),
    /// Chat with a project from the terminal (stdin may be a pipe).
    Chat(chat::ChatArgs),
    /// Send one message and print the reply; exit 0 reply, 1 error reply, 2 timeout or no connection.
    Send(send::SendArgs),
    /// Probe a running service (gRPC health or an HTTP URL such as the
    /// gateway's /readyz): exit 0 healthy, 1 not, for container healthchecks.
    Health(health::HealthArgs),
    /// Load-test a running stack over MQTT: N sessions, closed or open loop;
    /// prints throughput, errors by kind and end-to-end latency percentiles.
    Bench(bench::BenchArgs),
    /// Serve a fake OpenAI-compatible vLLM with a fixed latency, for benchmarks.
    FakeVllm(fake_vllm::FakeVllmArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some((_, sub)) = matches.subcommand() {
        match &mut cli.command {
            Command::Chat(a) => a.broker.prefer_typed_flags(sub),
            Command::Send(a) => a.broker.prefer_typed_flags(sub),
            Command::Bench(a) => a.broker.prefer_typed_flags(sub),
            _ => {}
        }
    }
    match cli.runtime.run(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("palaver: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Up(args) => {
            // One tracer provider per service: each span keeps its service.
            let services = [gateway::TRACED, session_svc::TRACED, inference_svc::TRACED];
            let traces =
                match palaver_core::telemetry::init(&args.otlp, &services, logging::UP_FILTER) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("palaver up: {e}");
                        return ExitCode::FAILURE;
                    }
                };
            let outcome = up::run(*args).await;
            if let Some(t) = traces {
                t.shutdown().await;
            }
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("palaver up: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Chat(args) => {
            logging::init(logging::CLIENT_FILTER);
            chat::run(args).await
        }
        Command::Send(args) => {
            logging::init(logging::CLIENT_FILTER);
            send::run(args).await
        }
        Command::Health(args) => health::run(args).await,
        Command::Bench(args) => {
            logging::init(logging::CLIENT_FILTER);
            bench::run(args).await
        }
        Command::FakeVllm(args) => {
            logging::init(logging::CLIENT_FILTER);
            fake_vllm::run(args).await
        }
    }
}
