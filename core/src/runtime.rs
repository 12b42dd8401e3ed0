//! How every palaver binary runs: its allocator and its tokio runtime.
//!
//! The allocator is mimalloc, for every binary that links this crate (the
//! services, `palaver`, and the tests): a turn allocates many small,
//! short-lived buffers, where glibc's malloc showed up large in profiles
//! (BENCHMARKS.md, "Figures behind the code").
//!
//! One worker thread by default. A turn costs each service tens of
//! microseconds of CPU, while the GPU behind it spends seconds, so a replica
//! never needs many cores; what it does need is a short path. With more
//! workers, tokio wakes idle ones to share every burst of work, which costs
//! latency and CPU per reply. Serve more load with more replicas, or raise
//! `--worker-threads` for one replica on a many-core host. (linkerd2-proxy
//! makes the same choice for the same reason.)
//!
//! One worker means tokio's current-thread scheduler, not the multi-thread
//! one with a single worker: nothing is left to steal or hand over, and its
//! bookkeeping does not run on every wake (the figures: BENCHMARKS.md,
//! "Figures behind the code").

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
    /// Runs `main` to completion on a runtime of `worker_threads` workers:
    /// the calling thread itself when there is one.
    ///
    /// `main` is spawned rather than polled by `block_on`, so that with more
    /// workers it runs on a worker too: the gateway's MQTT loop, for one,
    /// then hands each message to a task on its own thread instead of waking
    /// another.
    pub fn run<F>(&self, main: F) -> std::io::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut builder = match self.worker_threads.get() {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut multi = tokio::runtime::Builder::new_multi_thread();
                multi.worker_threads(n);
                multi
            }
        };
        let runtime = builder.enable_all().build()?;
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
    use tokio::runtime::RuntimeFlavor;

    use super::RuntimeArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    fn parse(workers: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["x", "--worker-threads", workers])
    }

    #[test]
    fn zero_workers_are_refused() {
        assert!(parse("0").is_err());
    }

    #[test]
    fn one_worker_is_the_calling_thread_on_the_current_thread_scheduler() {
        let caller = std::thread::current().id();
        let (flavor, main, task) = parse("1")
            .unwrap()
            .runtime
            .run(async {
                let task = tokio::spawn(async { std::thread::current().id() });
                (
                    tokio::runtime::Handle::current().runtime_flavor(),
                    std::thread::current().id(),
                    task.await.unwrap(),
                )
            })
            .unwrap();
        assert_eq!(flavor, RuntimeFlavor::CurrentThread);
        assert_eq!((main, task), (caller, caller));
    }

    #[test]
    fn more_workers_run_main_on_one_of_them() {
        let caller = std::thread::current().id();
        let (flavor, main) = parse("2")
            .unwrap()
            .runtime
            .run(async {
                (
                    tokio::runtime::Handle::current().runtime_flavor(),
                    std::thread::current().id(),
                )
            })
            .unwrap();
        assert_eq!(flavor, RuntimeFlavor::MultiThread);
        assert_ne!(main, caller, "main ran on the calling thread");
    }
}
