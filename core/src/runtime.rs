//! How every palaver binary runs: its allocator and its tokio runtime.
//!
//! The allocator is mimalloc, for every binary that links this crate (the
//! services, `palaver`, and the tests): a turn allocates many small,
//! short-lived buffers, and under load glibc's malloc, free and arena
//! upkeep took a sixth of session-svc's and inference-svc's CPU (perf).
//!
//! One worker thread by default. A turn costs each service tens of
//! microseconds of CPU, while the GPU behind it spends seconds, so a replica
//! never needs many cores; what it does need is a short path. With more
//! workers, tokio wakes idle ones to share every burst of work: on the
//! 2-core benchmark machine that doubled the context switches per turn, and
//! cost 13 % of one session's latency and 18 % more CPU per reply. Serve
//! more load with more replicas, or raise `--worker-threads` for one replica
//! on a many-core host. (linkerd2-proxy makes the same choice for the same
//! reason.)

use std::future::Future;
use std::num::NonZeroUsize;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runtime flags shared by the binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Threads running the service's tasks (blocking work has its own pool).
    /// One is the lowest latency and CPU per turn; add threads only for a
    /// replica that serves thousands of turns per second on a many-core host.
    #[arg(
        long,
        env = "PALAVER_WORKER_THREADS",
        default_value = "1",
        global = true
    )]
    pub worker_threads: NonZeroUsize,
}

impl RuntimeArgs {
    /// Runs `main` to completion on a runtime of `worker_threads` workers.
    ///
    /// `main` is spawned rather than polled by `block_on`, so that it runs on
    /// a worker too: the gateway's MQTT loop, for one, then hands each
    /// message to a task on its own thread instead of waking another.
    pub fn run<F>(&self, main: F) -> std::io::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_threads.get())
            .enable_all()
            .build()?;
        let main = runtime.spawn(main);
        match runtime.block_on(main) {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::RuntimeArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    #[test]
    fn zero_workers_are_refused_and_main_runs_on_a_worker() {
        assert!(Cli::try_parse_from(["x", "--worker-threads", "0"]).is_err());
        for n in ["1", "2"] {
            let cli = Cli::try_parse_from(["x", "--worker-threads", n]).unwrap();
            let caller = std::thread::current().id();
            let ran_on = cli
                .runtime
                .run(async { std::thread::current().id() })
                .unwrap();
            assert_ne!(
                ran_on, caller,
                "{n} worker(s): main ran on the calling thread"
            );
        }
    }
}
