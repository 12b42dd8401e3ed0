//! Real peers for palaver's tests and benchmarks.
//!
//! - [`process`]: `redis-server` and `mosquitto` started on free loopback
//!   ports and killed on drop — integration tests use the real thing, never
//!   a mock;
//! - `fake_vllm`: an OpenAI-compatible HTTP server with configurable latency
//!   that counts requests in flight;
//! - [`llama_server`]: llama.cpp's `llama-server` with a real (small) model,
//!   for the real-model tests and `palaver up --model-file`;
//! - [`mqtt`]: a test client that queues what the broker delivers;
//! - [`link`]: a TCP link that a test can cut and restore;
//! - [`pause`]: sleeping a given time and no longer, for the fake's latency.

pub mod fake_vllm;
pub mod link;
pub mod llama_server;
pub mod mqtt;
pub mod pause;
pub mod process;
