//! Where the generator publishes: straight into Redis (pipelined `PUBLISH`, what an
//! application's `Redis::publish` does), or through the nodes' HTTP API (`POST /api/publish`,
//! what an application without Redis access does), round-robin over the nodes.

use anyhow::Context;
use futures_util::future::join_all;
use reqwest::header::CONTENT_TYPE;

use crate::{PublishVia, RunArgs};

/// One stamped message.
pub struct Message<'a> {
    /// The broker channel (for Redis).
    pub channel: &'a str,
    /// The target user (for the API); `None` for the broadcast topic.
    pub user: Option<String>,
    /// The stamp, a JSON object: published as is, and the `data` of an API publish.
    pub payload: String,
    /// Whether it counts towards the expected deliveries.
    pub counted: bool,
}

pub enum Sink {
    Redis(redis::Connection),
    Api(Api),
}

pub struct Api {
    /// The publishing thread's own runtime (the thread sleeps between ticks, so it cannot
    /// share the clients' runtime).
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    urls: Vec<String>,
    key: String,
    next: usize,
}

impl Sink {
    pub fn open(args: &RunArgs) -> anyhow::Result<Self> {
        Ok(match args.publish_via {
            PublishVia::Redis => Self::Redis(
                redis::Client::open(args.redis_url.as_str())
                    .context("redis url")?
                    .get_connection()
                    .context("connecting to Redis")?,
            ),
            PublishVia::Api => {
                anyhow::ensure!(!args.api_urls.is_empty(), "--publish-via api needs --api-url");
                Self::Api(Api {
                    runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
                    client: reqwest::Client::new(),
                    urls: args.api_urls.iter().map(|u| format!("{}/api/publish", u.trim_end_matches('/'))).collect(),
                    key: args.api_key.clone().context("--publish-via api needs --api-key")?,
                    next: 0,
                })
            }
        })
    }

    /// Publishes `batch` and returns how many counted messages were refused (API answers other
    /// than 200). A Redis error ends the run: a pipeline fails as a whole.
    pub fn send(&mut self, batch: &[Message<'_>]) -> anyhow::Result<u64> {
        match self {
            Self::Redis(conn) => {
                let mut pipe = redis::pipe();
                for m in batch {
                    pipe.cmd("PUBLISH").arg(m.channel).arg(&m.payload).ignore();
                }
                pipe.query::<()>(conn).context("PUBLISH pipeline")?;
                Ok(0)
            }
            Self::Api(api) => {
                let requests = batch.iter().map(|m| {
                    let body = match &m.user {
                        Some(user) => format!(r#"{{"user":"{user}","data":{}}}"#, m.payload),
                        None => format!(r#"{{"channel":"all","data":{}}}"#, m.payload),
                    };
                    api.next += 1;
                    let url = &api.urls[api.next % api.urls.len()];
                    let request = api.client.post(url).bearer_auth(&api.key).header(CONTENT_TYPE, "application/json");
                    async move { request.body(body).send().await.is_ok_and(|r| r.status().is_success()) }
                });
                let sent = api.runtime.block_on(join_all(requests));
                Ok(batch.iter().zip(sent).filter(|(m, ok)| m.counted && !ok).count() as u64)
            }
        }
    }
}
