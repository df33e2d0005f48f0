//! pushnode load generator: opens many WebSocket connections over several loopback source
//! addresses, publishes stamped messages through Redis (or the node's API), and reports
//! delivered/s, loss, duplicates, misrouted messages, latency percentiles, connect figures and
//! the node's own RSS and CPU time. `floor` measures how many small loopback TCP writes one
//! CPU-second takes on this machine, the ceiling any server here works under.
//!
//! Run `pushnode-loadtest --help`; `loadtest/run.sh` drives whole scenarios.

mod clients;
mod floor;
mod publish;
mod report;
mod sink;
mod soak;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "pushnode-loadtest", about = "Load generator for pushnode")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario against running nodes.
    Run(Box<RunArgs>),
    /// Measure loopback TCP: small writes per CPU-second of the writing thread.
    Floor(floor::FloorArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect and hold; report the node's RSS per connection.
    Idle,
    /// One user per message, through Redis.
    Unicast,
    /// Every connection joins one topic channel; each message reaches all of them.
    Broadcast,
    /// All connections at once.
    Storm,
    /// Connections leave and come back continuously.
    Churn,
    /// Unicast while a share of the clients stop reading.
    Slow,
    /// CLIENT KILL TYPE pubsub with every user subscribed; time until all channels are back.
    Resubscribe,
    /// Long steady run (JSON sessions): live unicast at --rate through Redis, persisted
    /// notifications at --persist-rate through the API, reconnect churn, a timeline every
    /// 10 s; `loadtest/run.sh soak` adds the faults. Checks every persisted notification
    /// reached its device exactly once after de-duplication by id.
    Soak,
}

/// The session format the clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Live payloads byte for byte; a connection counts as open at the 101.
    Raw,
    /// pushnode's frames: a connection counts as open at its welcome (token checked, Redis
    /// subscription confirmed, inbox state read and replayed), notifications are envelopes.
    Json,
    /// The Pusher protocol at `/app/<key>`: a connection counts as open once signed in as its
    /// user (unicast, idle) or subscribed to the public channel `all` (broadcast); messages
    /// are Pusher events on `#server-to-user-<user>` or `all`.
    Pusher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// Pipelined PUBLISH into Redis.
    Redis,
    /// POST /api/publish on the nodes (round-robin).
    Api,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// WebSocket URL of a node; repeat for several nodes (connections are spread over them).
    #[arg(long = "url", default_value = "ws://127.0.0.1:9501/ws")]
    pub urls: Vec<String>,
    /// Sign connection tokens with this secret; without it, connect with ?uid= (insecure mode).
    #[arg(long, env = "PUSHNODE__AUTH__JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Local source addresses to spread connections over (each gives ~28k ports).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<IpAddr>,
    /// First user index (users are lt<offset>, lt<offset+1>, ...), so several processes can share a node.
    #[arg(long, default_value_t = 0)]
    pub user_offset: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 500)]
    pub connect_concurrency: usize,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, default_value = "pushnode:user:{user}")]
    pub user_channel: String,
    #[arg(long, default_value = "pushnode:topic:{topic}")]
    pub topic_channel: String,
    /// Session format: `raw` (what the documented figures use unless they say otherwise) or
    /// `json` (the browser client's; connect figures then run to the welcome frame).
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Publish straight into Redis, or through the nodes' HTTP API.
    #[arg(long, value_enum, default_value_t = PublishVia::Redis)]
    pub publish_via: PublishVia,
    /// Internal (API) base URL of a node, e.g. http://127.0.0.1:9502; repeat for several nodes.
    #[arg(long = "api-url")]
    pub api_urls: Vec<String>,
    /// API key for --publish-via api.
    #[arg(long, env = "PUSHNODE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Messages per second to publish (0: as fast as the pipeline allows).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// With --rate, publish one pipeline this often (its share of the rate).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub publish_tick: Duration,
    /// Measurement time.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time before measuring (traffic runs, figures are not recorded).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// PIDs of the node processes, for RSS and CPU time from /proc.
    #[arg(long = "node-pid")]
    pub node_pids: Vec<u32>,
    /// Share of clients that stop reading (slow scenario).
    #[arg(long, default_value_t = 0.01)]
    pub slow_fraction: f64,
    /// Connections closed and reopened per second (churn scenario).
    #[arg(long, default_value_t = 500)]
    pub churn_per_second: usize,
    /// Soak: persisted notifications per second through the API (0: a twentieth of --rate).
    #[arg(long, default_value_t = 0.0)]
    pub persist_rate: f64,
    /// Soak: share of the connections that reconnect every minute, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub churn_percent_per_minute: f64,
    /// Soak: write the timeline (CSV, a line every 10 s) here.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Connections on the nodes from all generators together, for RSS per connection when
    /// several generators share the nodes (defaults to this generator's --connections).
    #[arg(long)]
    pub total_connections: Option<usize>,
    /// --format pusher: the app's id, key and secret (signins, and API publishes).
    #[arg(long, default_value = "1")]
    pub pusher_app_id: String,
    #[arg(long, default_value = "loadtest-key")]
    pub pusher_key: String,
    #[arg(long, default_value = "loadtest-pusher-secret", hide_default_value = true)]
    pub pusher_secret: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Floor(args) => floor::run(&args),
        Command::Run(args) => {
            if args.scenario == Scenario::Broadcast && args.jwt_secret.is_none() && args.format != Format::Pusher {
                bail!("broadcast needs --jwt-secret: topic channels are granted by the token");
            }
            if args.scenario == Scenario::Soak && args.format != Format::Json {
                bail!("soak needs --format json: persisted notifications come with inbox ids");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = runtime.block_on(run(*args.clone()))?;
            println!("{}", report.summary());
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if report.soak.as_ref().is_some_and(|s| !s.passed()) {
                bail!("the soak failed its checks (see above)");
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<report::Report> {
    let mut report = report::Report::new(&args);
    let nodes = report::NodeProbe::new(&args.node_pids);
    report.node_before = nodes.sample();

    let fleet = clients::Fleet::new(&args)?;
    let connect = fleet.connect_all(args.connect_concurrency).await;
    report.connect = Some(connect);
    // Let the node settle its subscriptions and allocations before measuring memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.node_connected = nodes.sample();

    match args.scenario {
        Scenario::Idle => {
            tokio::time::sleep(args.duration).await;
            report.node_after = nodes.sample();
            report.still_connected = Some(fleet.connected());
        }
        Scenario::Storm => {
            report.node_after = nodes.sample();
        }
        Scenario::Unicast | Scenario::Slow | Scenario::Broadcast => {
            if args.scenario == Scenario::Slow {
                fleet.stall(args.slow_fraction);
            }
            let traffic = publish::run(&args, &fleet, &nodes).await?;
            report.traffic = Some(traffic);
            report.node_after = nodes.sample();
            report.still_connected = Some(fleet.connected());
        }
        Scenario::Churn => {
            report.churn = Some(fleet.churn(args.churn_per_second, args.duration).await);
            report.node_after = nodes.sample();
            report.still_connected = Some(fleet.connected());
        }
        Scenario::Resubscribe => {
            report.resubscribe_seconds = Some(publish::resubscribe(&args, &fleet).await?);
            report.node_after = nodes.sample();
        }
        Scenario::Soak => {
            report.soak = Some(soak::run(&args, &fleet).await?);
            report.node_after = nodes.sample();
            report.still_connected = Some(fleet.connected());
        }
    }
    fleet.close();
    Ok(report)
}
