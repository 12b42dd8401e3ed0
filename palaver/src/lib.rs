//! The `palaver` command: the whole stack in one process (`palaver up`), a
//! terminal chat client (`palaver chat`) and a one-shot client for scripts
//! (`palaver send`).
//!
//! Modules, one per concern:
//! - [`up`]: starts broker, session-svc, inference-svc and gateway together;
//! - [`model_server`]: `llama-server` as `palaver up`'s supervised child (`--model-file`);
//! - [`broker`]: the embedded MQTT broker (rumqttd);
//! - [`client`]: the client side of the MQTT wire protocol;
//! - [`chat`], [`send`]: the two clients built on it;
//! - [`health`]: one probe of a running service (`palaver health`), for healthchecks;
//! - [`bench`]: the MQTT load generator (`palaver bench`);
//! - [`fake_vllm`]: the test suite's fake vLLM as a process (`palaver fake-vllm`);
//! - [`logging`]: where logs go and how much of them.
//!
//! Tools that measure the benchmark machine rather than palaver live in the
//! `palaver-lab` crate (`lab/`), which is not installed with palaver.

pub mod bench;
pub mod broker;
pub mod chat;
pub mod client;
pub mod fake_vllm;
pub mod health;
pub mod logging;
pub mod model_server;
pub mod send;
pub mod up;
