//! `palaver chat`: an interactive terminal client on the MQTT wire protocol.
//!
//! Lines typed (or piped) on stdin are messages; a line starting with `/` is
//! a command:
//! - `/history`: the stored dialog, read from session-svc over gRPC
//!   (`GetHistory`; MQTT has no history topic);
//! - `/clear`: forget the messages (`<p>/clear_history/<sid>`), keep the prompt;
//! - `/prompt <text>`: a new system prompt *and* a fresh start, through the
//!   template topic with `reset: true` — the way existing clients change
//!   prompts, acknowledged by the gateway, and effective at once rather
//!   than with the next message;
//! - `/quit` (or end of input): leave.
//!
//! A line starting with `//` is sent as a message without its first `/`.
//!
//! Replies are streamed (`"stream": true`) and printed as they are written;
//! Ctrl-C while a reply is being written cancels that turn (Ctrl-C at the
//! prompt leaves).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use palaver_proto::session::v1::sessions_client::SessionsClient;
use palaver_proto::session::v1::{Role, SessionRef};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Endpoint;

use crate::client::{BrokerArgs, Conversation, Extras, Reply};

/// How long to wait for the connection and for control acknowledgements.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `palaver chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// Project to talk to: the first level of its topics (see the projects file).
    #[arg(long, default_value = "general")]
    pub project: String,

    /// Session to continue. Default: a new one, `chat-<8 hex>`, printed at the start.
    #[arg(long)]
    pub session: Option<String>,

    /// System prompt for the session, sent with the first message; the
    /// session keeps it afterwards.
    #[arg(long)]
    pub system_prompt: Option<String>,

    /// Seconds to wait for each reply before giving up on it.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,

    /// Wait for each whole reply instead of printing it as it is written.
    #[arg(long, env = "PALAVER_CHAT_NO_STREAM")]
    pub no_stream: bool,
    /// session-svc's gRPC address, for /history.
    #[arg(
        long,
        env = "PALAVER_SESSION_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub session_url: String,

    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// One line of input, understood.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Message(&'a str),
    History,
    Clear,
    Prompt(&'a str),
    Quit,
    Unknown(&'a str),
}

fn parse_line(line: &str) -> Option<Line<'_>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if let Some(literal) = line.strip_prefix("//") {
        return Some(Line::Message(literal.trim_start()).filter_empty());
    }
    let Some(command) = line.strip_prefix('/') else {
        return Some(Line::Message(line));
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .map_or((command, ""), |(n, r)| (n, r.trim()));
    Some(match name {
        "quit" | "exit" => Line::Quit,
        "history" => Line::History,
        "clear" => Line::Clear,
        "prompt" => Line::Prompt(rest),
        _ => Line::Unknown(line),
    })
}

impl Line<'_> {
    fn filter_empty(self) -> Self {
        match self {
            Line::Message("") => Line::Unknown("//"),
            other => other,
        }
    }
}

/// Runs the chat until `/quit` or end of input. Exit code 2 when the broker
/// cannot be reached at the start, else 0.
pub async fn run(args: ChatArgs) -> ExitCode {
    let target = match args.broker.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let session = args
        .session
        .clone()
        .unwrap_or_else(|| format!("chat-{:08x}", rand::random::<u32>()));
    let reply_timeout = Duration::from_secs(args.timeout_secs.max(1));
    let mut conversation = match Conversation::open(
        &target,
        &args.project,
        &session,
        "palaver-chat",
        CONTROL_TIMEOUT,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "palaver chat: project {}, session {} on {target}",
        args.project,
        conversation.session_id()
    );
    println!("Type a message, or /history, /clear, /prompt <text>, /quit.");

    let interactive = std::io::stdin().is_terminal();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // The prompt goes with messages until one is answered: the session
    // keeps it then.
    let mut extras = Extras {
        system_prompt: args.system_prompt.clone(),
        max_tokens: None,
        stream: !args.no_stream,
    };
    loop {
        if interactive {
            print!("> ");
            let _ = std::io::stdout().flush();
        }
        // Listening for Ctrl-C replaces its default (ending the process),
        // so at the prompt it has to end the chat here.
        let next = tokio::select! {
            next = lines.next_line() => next,
            _ = tokio::signal::ctrl_c() => Ok(None),
        };
        let line = match next {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                eprintln!("error: cannot read input: {e}");
                break;
            }
        };
        let Some(line) = parse_line(&line) else {
            continue;
        };
        match line {
            Line::Quit => break,
            Line::Message(text) => {
                let mut printed = String::new();
                let on_delta = |delta: &str| {
                    printed.push_str(delta);
                    print!("{delta}");
                    let _ = std::io::stdout().flush();
                };
                let cancel = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                let outcome = conversation
                    .ask_streaming(text, &extras, reply_timeout, on_delta, cancel)
                    .await;
                if !printed.is_empty() {
                    println!();
                }
                match outcome {
                    Ok(Reply::Answer(answer)) => {
                        extras.system_prompt = None;
                        // Printed already, unless the stream was cut short.
                        if answer != printed {
                            println!("{answer}");
                        }
                    }
                    Ok(Reply::Error(error)) => eprintln!("{error}"),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Line::History => match history(&args.session_url, &args.project, &session).await {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("error: {e}"),
            },
            Line::Clear => match conversation.clear_history(CONTROL_TIMEOUT).await {
                Ok(()) => println!("(history cleared)"),
                Err(e) => eprintln!("error: {e}"),
            },
            Line::Prompt("") => eprintln!("usage: /prompt <text>"),
            Line::Prompt(prompt) => match conversation.set_prompt(prompt, CONTROL_TIMEOUT).await {
                Ok(()) => {
                    extras.system_prompt = None;
                    println!("(system prompt set; history cleared)");
                }
                Err(e) => eprintln!("error: {e}"),
            },
            Line::Unknown(what) => eprintln!(
                "unknown command {what:?}: use /history, /clear, /prompt <text>, /quit (// sends a line starting with /)"
            ),
        }
    }
    conversation.close().await;
    ExitCode::SUCCESS
}

/// The session's stored dialog, one `role: text` line per message.
async fn history(url: &str, project: &str, session_id: &str) -> Result<String, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!("cannot reach session-svc at {url} (set --session-url): {e}")
    };
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| unreachable(&e))?
        .connect_timeout(CONTROL_TIMEOUT)
        .timeout(CONTROL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(&e))?;
    let history = SessionsClient::new(channel)
        .get_history(SessionRef {
            project: project.to_owned(),
            session_id: session_id.to_owned(),
        })
        .await
        .map_err(|status| format!("session-svc: {}", status.message()))?
        .into_inner();
    let mut out = format!("system: {}", history.system_prompt);
    if history.messages.is_empty() {
        out.push_str("\n(no messages yet)");
    }
    for m in history.messages {
        let role = match Role::try_from(m.role) {
            Ok(Role::User) => "user",
            Ok(Role::Assistant) => "assistant",
            Ok(Role::System) => "system",
            _ => "?",
        };
        out.push_str(&format!("\n{role}: {}", m.content));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_commands() {
        assert_eq!(parse_line("   "), None);
        assert_eq!(parse_line(" hi there "), Some(Line::Message("hi there")));
        assert_eq!(parse_line("/quit"), Some(Line::Quit));
        assert_eq!(parse_line("/history"), Some(Line::History));
        assert_eq!(parse_line("/clear"), Some(Line::Clear));
        assert_eq!(
            parse_line("/prompt  Be brief. "),
            Some(Line::Prompt("Be brief."))
        );
        assert_eq!(parse_line("/prompt"), Some(Line::Prompt("")));
        assert_eq!(parse_line("/nope x"), Some(Line::Unknown("/nope x")));
        assert_eq!(
            parse_line("//etc is a folder"),
            Some(Line::Message("etc is a folder"))
        );
        assert_eq!(parse_line("//"), Some(Line::Unknown("//")));
    }
}
