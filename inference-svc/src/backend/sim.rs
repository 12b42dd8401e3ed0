//! The built-in simulator: replies like a model would (first token after a
//! delay, then words at a steady rate) so the whole stack runs on machines
//! without a GPU, and says plainly that the reply is simulated.

use std::time::Duration;

use tokio::time::{sleep_until, Instant};

use super::{Chunk, GenerateParams, TokenStream, Usage};
use crate::config::Config;

/// Longest quote of the user's message in a simulated reply.
const MAX_QUOTE_CHARS: usize = 200;

/// The simulator; one "token" is one word.
#[derive(Debug, Clone)]
pub struct SimBackend {
    ttft: Duration,
    /// Gap between words; `None` streams as fast as possible.
    per_token: Option<Duration>,
}

impl SimBackend {
    /// A simulator paced as `config` says.
    pub fn new(config: &Config) -> Self {
        let tps = config.sim_tokens_per_sec;
        let per_token = (tps > 0.0 && tps.is_finite()).then(|| Duration::from_secs_f64(1.0 / tps));
        Self {
            ttft: config.sim_ttft,
            per_token,
        }
    }

    /// Streams a simulated reply to `req`.
    pub fn generate(&self, req: GenerateParams) -> TokenStream {
        let text = reply_text(req.last_user_message().unwrap_or(""));
        let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        let limit = usize::try_from(req.max_tokens).unwrap_or(usize::MAX);
        let finish = if words.len() > limit {
            "length"
        } else {
            "stop"
        };
        let prompt_tokens = req
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum::<usize>();
        let (ttft, per_token) = (self.ttft, self.per_token);
        Box::pin(async_stream::stream! {
            // A fixed schedule from the start, so slow consumers do not make
            // the simulated model slower than configured.
            let start = Instant::now() + ttft;
            let mut sent = 0u32;
            for (i, word) in words.into_iter().take(limit).enumerate() {
                if let Some(gap) = per_token {
                    sleep_until(start + gap * u32::try_from(i).unwrap_or(u32::MAX)).await;
                } else {
                    sleep_until(start).await;
                }
                let delta = if i == 0 { word } else { format!(" {word}") };
                sent += 1;
                yield Ok(Chunk { delta, ..Chunk::default() });
            }
            sleep_until(start).await;
            yield Ok(Chunk {
                delta: String::new(),
                finish_reason: Some(finish.to_string()),
                usage: Some(Usage {
                    prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                    completion_tokens: sent,
                }),
            });
        })
    }
}

/// The simulated answer: labelled as such, quoting the user.
fn reply_text(user_message: &str) -> String {
    let one_line = user_message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut quote: String = one_line.chars().take(MAX_QUOTE_CHARS).collect();
    if one_line.chars().count() > MAX_QUOTE_CHARS {
        quote.push('…');
    }
    format!(
        "[simulated reply] You said: \"{quote}\". This answer comes from palaver's built-in \
         simulator, not from a language model; start inference-svc with --vllm-url to talk to a real one."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Message, Role};
    use futures::StreamExt;

    fn req(text: &str, max_tokens: u32) -> GenerateParams {
        GenerateParams {
            messages: vec![
                Message {
                    role: Role::System,
                    content: "be nice".into(),
                },
                Message {
                    role: Role::User,
                    content: text.into(),
                },
            ],
            temperature: 0.6,
            top_p: 0.9,
            max_tokens,
            request_id: "r".into(),
            affinity_key: String::new(),
            client: String::new(),
        }
    }

    fn sim(ttft_ms: u64, tps: f64) -> SimBackend {
        let mut c = Config::sim();
        c.sim_ttft = Duration::from_millis(ttft_ms);
        c.sim_tokens_per_sec = tps;
        SimBackend::new(&c)
    }

    #[tokio::test]
    async fn quotes_the_user_and_finishes() {
        let chunks: Vec<Chunk> = sim(0, 0.0)
            .generate(req("hello   there", 512))
            .map(|c| c.unwrap())
            .collect()
            .await;
        let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
        assert!(
            text.starts_with("[simulated reply] You said: \"hello there\"."),
            "{text}"
        );
        let last = chunks.last().unwrap();
        assert_eq!(last.finish_reason.as_deref(), Some("stop"));
        let usage = last.usage.unwrap();
        assert_eq!(usage.prompt_tokens, 4);
        assert_eq!(usage.completion_tokens as usize, chunks.len() - 1);
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.finish_reason.is_none()));
    }

    #[tokio::test]
    async fn honours_max_tokens() {
        let chunks: Vec<Chunk> = sim(0, 0.0)
            .generate(req("hi", 3))
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(chunks.len(), 4);
        let last = chunks.last().unwrap();
        assert_eq!(last.finish_reason.as_deref(), Some("length"));
        assert_eq!(last.usage.unwrap().completion_tokens, 3);
    }

    #[tokio::test]
    async fn paces_first_token_and_words() {
        let started = std::time::Instant::now();
        let mut s = sim(150, 20.0).generate(req("hi", 5));
        s.next().await.unwrap().unwrap();
        let first = started.elapsed();
        while s.next().await.is_some() {}
        let total = started.elapsed();
        assert!(
            first >= Duration::from_millis(150),
            "first token after {first:?}"
        );
        // ttft + 4 gaps of 50 ms = 350 ms; generous upper margin for a busy CI.
        assert!(
            total >= Duration::from_millis(350),
            "whole reply in {total:?}"
        );
        assert!(
            total < Duration::from_millis(1500),
            "whole reply in {total:?}"
        );
    }
}
