//! `palaver send`: one message, its reply on stdout — for scripts and tests.
//!
//! Exit codes: 0 a reply came; 1 an error reply came (`Error: …` or the
//! overload notice, printed to stderr); 2 no reply in time, or no connection.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{BrokerArgs, ClientError, Conversation, Extras, Reply};

/// Exit code of an error reply.
pub const EXIT_ERROR_REPLY: u8 = 1;
/// Exit code of a timeout or a failed connection.
pub const EXIT_NO_REPLY: u8 = 2;

/// Flags of `palaver send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Project to talk to: the first level of its topics.
    #[arg(long, default_value = "general")]
    pub project: String,

    /// Session to continue. Default: a new one, `send-<8 hex>`.
    #[arg(long)]
    pub session: Option<String>,

    /// New system prompt for the session, from this message on.
    #[arg(long)]
    pub system_prompt: Option<String>,

    /// Longest reply, in tokens (default: the project's).
    #[arg(long)]
    pub max_tokens: Option<u32>,

    /// Seconds to wait, connecting included, before exiting with code 2.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The message; `-` reads it from stdin.
    pub message: String,
}

/// Sends the message and prints the reply; see the module docs for the exit codes.
pub async fn run(args: SendArgs) -> ExitCode {
    match send(args).await {
        Ok(Reply::Answer(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Reply::Error(text)) => {
            eprintln!("{text}");
            ExitCode::from(EXIT_ERROR_REPLY)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_NO_REPLY)
        }
    }
}

async fn send(args: SendArgs) -> Result<Reply, ClientError> {
    let target = args.broker.target()?;
    let message = if args.message == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            ClientError::Connect(format!("cannot read the message from stdin: {e}"))
        })?;
        text
    } else {
        args.message
    };
    let session = args
        .session
        .unwrap_or_else(|| format!("send-{:08x}", rand::random::<u32>()));
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let deadline = Instant::now() + timeout;
    let extras = Extras {
        stream: false,
        system_prompt: args.system_prompt,
        max_tokens: args.max_tokens,
    };
    let mut conversation =
        Conversation::open(&target, &args.project, &session, "palaver-send", timeout).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let reply = conversation.ask(&message, &extras, left).await;
    conversation.close().await;
    reply
}
