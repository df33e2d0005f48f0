//! Where the generator publishes: straight into Redis (pipelined `PUBLISH`, what an
//! application's `Redis::publish` does), or through the nodes' HTTP API (`POST /api/publish`,
//! what an application without Redis access does), round-robin over the nodes.

use anyhow::Context;
use futures_util::future::join_all;
use reqwest::header::CONTENT_TYPE;

use crate::{Format, PublishVia, RunArgs};

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
    /// With `pusher`, each stamp goes out as a pushnode envelope with an event name, what a
    /// Pusher channel's sessions need.
    Redis {
        conn: redis::Connection,
        pusher: bool,
    },
    Api(Api),
    PusherApi(Api),
}

pub struct Api {
    /// The publishing thread's own runtime (the thread sleeps between ticks, so it cannot
    /// share the clients' runtime).
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    urls: Vec<String>,
    key: String,
    /// Pusher: the app's secret, and the id in the path.
    secret: String,
    app_id: String,
    next: usize,
}

impl Sink {
    pub fn open(args: &RunArgs) -> anyhow::Result<Self> {
        let pusher = args.format == Format::Pusher;
        Ok(match args.publish_via {
            PublishVia::Redis => Self::Redis {
                conn: redis::Client::open(args.redis_url.as_str())
                    .context("redis url")?
                    .get_connection()
                    .context("connecting to Redis")?,
                pusher,
            },
            PublishVia::Api => {
                anyhow::ensure!(!args.api_urls.is_empty(), "--publish-via api needs --api-url");
                let path = if pusher { format!("/apps/{}/events", args.pusher_app_id) } else { "/api/publish".into() };
                let api = Api {
                    runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
                    client: reqwest::Client::new(),
                    urls: args.api_urls.iter().map(|u| format!("{}{path}", u.trim_end_matches('/'))).collect(),
                    key: if pusher {
                        args.pusher_key.clone()
                    } else {
                        args.api_key.clone().context("--publish-via api needs --api-key")?
                    },
                    secret: args.pusher_secret.clone(),
                    app_id: args.pusher_app_id.clone(),
                    next: 0,
                };
                if pusher { Self::PusherApi(api) } else { Self::Api(api) }
            }
        })
    }

    /// Publishes `batch` and returns how many counted messages were refused (API answers other
    /// than 200). A Redis error ends the run: a pipeline fails as a whole.
    pub fn send(&mut self, batch: &[Message<'_>]) -> anyhow::Result<u64> {
        match self {
            Self::Redis { conn, pusher } => {
                let mut pipe = redis::pipe();
                for m in batch {
                    if *pusher {
                        let envelope =
                            format!(r#"{{"pushnode":1,"id":"lt","event":"lt","ts":0,"data":{}}}"#, m.payload);
                        pipe.cmd("PUBLISH").arg(m.channel).arg(envelope).ignore();
                    } else {
                        pipe.cmd("PUBLISH").arg(m.channel).arg(&m.payload).ignore();
                    }
                }
                pipe.query::<()>(conn).context("PUBLISH pipeline")?;
                Ok(0)
            }
            Self::PusherApi(api) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let requests = batch.iter().map(|m| {
                    let channel = match &m.user {
                        Some(user) => format!("{}{user}", pushnode::protocol::pusher::USER_CHANNEL_PREFIX),
                        None => "all".to_owned(),
                    };
                    let body = serde_json::json!({ "name": "lt", "channel": channel, "data": m.payload }).to_string();
                    let path = format!("/apps/{}/events", api.app_id);
                    let query =
                        pushnode::pusher::api::signed_query(&api.key, &api.secret, "POST", &path, body.as_bytes(), now);
                    api.next += 1;
                    let url = format!("{}?{query}", api.urls[api.next % api.urls.len()]);
                    let request = api.client.post(url).header(CONTENT_TYPE, "application/json");
                    async move { request.body(body).send().await.is_ok_and(|r| r.status().is_success()) }
                });
                let sent = api.runtime.block_on(join_all(requests));
                Ok(batch.iter().zip(sent).filter(|(m, ok)| m.counted && !ok).count() as u64)
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
