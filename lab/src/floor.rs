//! `palaver-lab floor`: what a turn's process hops cost on this machine when
//! nothing is done at any of them — the least any stack of palaver's shape
//! can take here, to hold palaver's own one-session latency against.
//!
//! A turn crosses fourteen hops between seven processes: the client
//! publishes to the broker, the broker delivers to the gateway, the gateway
//! calls session-svc, session-svc opens the turn in Redis and calls
//! inference-svc, inference-svc calls the backend, and the answer goes back
//! the same way with a second Redis call on it ([`ROUTE`]). `palaver-lab floor`
//! starts six relay processes (this same binary, `palaver-lab floor-relay`),
//! each a tokio program on the same runtime as palaver's services, and sends
//! a small frame along that route over loopback TCP: every relay forwards it
//! the moment it arrives, and the one standing for the backend first pauses
//! `--backend-ms`, as the fake vLLM does (same pause code). Closed loop, one
//! frame in flight, so it is the one-session points (P1', P1) with no
//! protocol, no parsing and no storage.
//!
//! It is a lower bound, not a model: palaver also sends acknowledgements
//! (MQTT PUBACKs, HTTP/2 window updates) off the critical path, and its
//! messages are larger.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

/// The processes a turn passes through; the client is the measuring process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Client,
    Broker,
    Gateway,
    Session,
    Redis,
    Inference,
    Backend,
}

/// The relays, one process each, in the order they are started.
const RELAYS: [Node; 6] = [
    Node::Broker,
    Node::Gateway,
    Node::Session,
    Node::Redis,
    Node::Inference,
    Node::Backend,
];

/// A turn's path: from the client to the backend and back, Redis once per
/// held phase (opening the turn before inference, ending it after).
pub const ROUTE: [Node; 15] = [
    Node::Client,
    Node::Broker,
    Node::Gateway,
    Node::Session,
    Node::Redis,
    Node::Session,
    Node::Inference,
    Node::Backend,
    Node::Inference,
    Node::Session,
    Node::Redis,
    Node::Session,
    Node::Gateway,
    Node::Broker,
    Node::Client,
];

/// Bytes of every frame: about a request's size on the wire.
const FRAME: usize = 128;
/// Where in a frame the fields are: the route position of its receiver,
/// the position that pauses, the pause in µs, then the route's ports.
const POS: usize = 0;
const PAUSE_AT: usize = 1;
const PAUSE_US: usize = 2;
const PORTS: usize = 6;

/// The start of the line a relay prints once it listens: `floor-relay ready port=N`.
const RELAY_READY: &str = "floor-relay ready";

/// Flags of `palaver-lab floor`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Pause at the backend's place in the route, in milliseconds, as the
    /// fake vLLM's --ttft (0: an instant backend, P1'; 100: P1).
    #[arg(long, default_value_t = 0.0, value_parser = palaver::fake_vllm::parse_millis)]
    pub backend_ms: f64,

    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Warm-up before the measured window, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// A name for this run, copied into the output.
    #[arg(long)]
    pub label: Option<String>,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the measurement and prints the result; exit 2 when it could not run.
pub async fn run(args: FloorArgs) -> ExitCode {
    let positive = args.duration > 0.0 && args.duration.is_finite();
    let at_least_zero = args.warmup >= 0.0 && args.warmup.is_finite();
    if !(positive && at_least_zero) {
        eprintln!("palaver floor: --duration must be above 0 and --warmup at least 0 seconds");
        return ExitCode::from(2);
    }
    match measure(&args).await {
        Ok(samples) => {
            let report = FloorReport {
                label: args.label.clone(),
                backend_ms: args.backend_ms,
                duration: args.duration,
                samples,
            };
            if args.json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("palaver floor: {e}");
            ExitCode::from(2)
        }
    }
}

/// Starts the relays, sends frames along [`ROUTE`] for warm-up plus
/// duration, and returns the sorted round trips of the measured window, in ns.
async fn measure(args: &FloorArgs) -> io::Result<Vec<u64>> {
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut ports: HashMap<Node, u16> = HashMap::new();
    for node in RELAYS {
        let (child, port) = start_relay(&me).await?;
        children.push(child);
        ports.insert(node, port);
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    ports.insert(Node::Client, listener.local_addr()?.port());

    let mut frame = [0u8; FRAME];
    frame[POS] = 1;
    frame[PAUSE_AT] = position(Node::Backend);
    let pause_us = (args.backend_ms * 1000.0).round() as u32;
    frame[PAUSE_US..PAUSE_US + 4].copy_from_slice(&pause_us.to_le_bytes());
    for (i, node) in ROUTE.iter().enumerate() {
        let at = PORTS + 2 * i;
        frame[at..at + 2].copy_from_slice(&ports[node].to_le_bytes());
    }

    let mut out = connect(ports[&ROUTE[1]]).await?;
    out.write_all(&frame).await?;
    let (mut back, _) = listener.accept().await?;
    back.set_nodelay(true)?;
    let mut echo = [0u8; FRAME];
    back.read_exact(&mut echo).await?;

    let warm_until = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = warm_until + Duration::from_secs_f64(args.duration);
    let mut samples = Vec::new();
    loop {
        let start = Instant::now();
        if start >= end {
            break;
        }
        out.write_all(&frame).await?;
        back.read_exact(&mut echo).await?;
        if start >= warm_until {
            samples.push(start.elapsed().as_nanos() as u64);
        }
    }
    drop(children);
    samples.sort_unstable();
    Ok(samples)
}

/// The route position of `node`'s first visit.
fn position(node: Node) -> u8 {
    ROUTE.iter().position(|n| *n == node).unwrap_or(0) as u8
}

/// Starts one relay process and waits for its port. It dies with us: it is
/// killed on drop and exits by itself when its stdin closes.
async fn start_relay(me: &std::path::Path) -> io::Result<(Child, u16)> {
    let mut child = Command::new(me)
        .arg("floor-relay")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no relay stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| io::Error::other("a relay did not start within 10 s"))??
        .unwrap_or_default();
    let port = line
        .strip_prefix(RELAY_READY)
        .and_then(|rest| rest.trim().strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected relay output {line:?}")))?;
    Ok((child, port))
}

async fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `palaver-lab floor-relay`: forwards every frame to the next port of its
/// route, pausing first where the frame says so. Runs until stdin closes.
pub async fn relay() -> ExitCode {
    match serve_relay().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palaver-lab floor-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_relay() -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    println!("{RELAY_READY} port={}", listener.local_addr()?.port());
    // Outgoing connections, one per next hop, opened on first use.
    let peers: Arc<Mutex<HashMap<u16, OwnedWriteHalf>>> = Arc::default();
    let (failed_tx, mut failed) = mpsc::channel::<io::Error>(1);
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                stream.set_nodelay(true)?;
                let peers = peers.clone();
                let failed_tx = failed_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward(stream, peers).await {
                        let _ = failed_tx.send(e).await;
                    }
                });
            }
            Some(e) = failed.recv() => return Err(e),
            read = stdin.read(&mut sink) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return Ok(());
                }
            }
        }
    }
}

/// Reads frames from one incoming connection and sends each on.
async fn forward(
    stream: TcpStream,
    peers: Arc<Mutex<HashMap<u16, OwnedWriteHalf>>>,
) -> io::Result<()> {
    let (mut read, _write) = stream.into_split();
    let mut frame = [0u8; FRAME];
    loop {
        match read.read_exact(&mut frame).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let pos = frame[POS];
        if pos == frame[PAUSE_AT] {
            let us =
                u32::from_le_bytes(frame[PAUSE_US..PAUSE_US + 4].try_into().unwrap_or_default());
            palaver_testkit::pause::pause(Duration::from_micros(us.into())).await;
        }
        let next = usize::from(pos) + 1;
        if next >= ROUTE.len() {
            return Err(io::Error::other("a frame went past the end of its route"));
        }
        frame[POS] = next as u8;
        let at = PORTS + 2 * next;
        let port = u16::from_le_bytes([frame[at], frame[at + 1]]);
        let mut peers = peers.lock().await;
        let out = match peers.entry(port) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(connect(port).await?.into_split().1)
            }
        };
        out.write_all(&frame).await?;
    }
}

/// The result of one run.
struct FloorReport {
    label: Option<String>,
    /// The backend's pause, ms, as given.
    backend_ms: f64,
    /// The measured window, s.
    duration: f64,
    /// Sorted round trips, ns.
    samples: Vec<u64>,
}

impl FloorReport {
    fn to_json(&self) -> Value {
        let latency = palaver::bench::latency_json(&self.samples);
        json!({
            "label": self.label,
            "hops": ROUTE.len() - 1,
            "processes": RELAYS.len() + 1,
            "backend_ms": self.backend_ms,
            "duration_s": self.duration,
            "round_trips": self.samples.len(),
            "latency_ms": latency,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "palaver floor{}: {} hops between {} processes, backend pause {:.3} ms, \
             {} round trips in {:.1} s\n\n  latency (ms, round trip)\n",
            self.label
                .as_deref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default(),
            ROUTE.len() - 1,
            RELAYS.len() + 1,
            self.backend_ms,
            self.samples.len(),
            self.duration,
        );
        palaver::bench::latency_rows(&self.samples, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_is_a_turn_there_and_back() {
        assert_eq!(ROUTE.first(), Some(&Node::Client));
        assert_eq!(ROUTE.last(), Some(&Node::Client));
        // The way back is the way there, reversed.
        let there = &ROUTE[..=position(Node::Backend) as usize];
        let back: Vec<Node> = ROUTE[position(Node::Backend) as usize..]
            .iter()
            .rev()
            .copied()
            .collect();
        assert_eq!(there, &back[..]);
        // Every relay is on it, and fits a frame.
        assert!(RELAYS.iter().all(|r| ROUTE.contains(r)));
        assert!(PORTS + 2 * ROUTE.len() <= FRAME);
    }
}
