//! The `pushnode` command: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use pushnode::api::PublishRequest;
use pushnode::auth::Authenticator;
use pushnode::{Listeners, Settings, logging};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

/// jemalloc: glibc's malloc spent about a tenth of the node's CPU on small per-message
/// allocations (consolidation, unlinking) under load; jemalloc's size classes avoid that
/// (figures in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's own figures for `/metrics` (`pushnode_allocator_*_bytes`). Its statistics are
/// cached until the epoch is advanced, which merges every arena's counters: once per scrape.
fn jemalloc_stats() -> Option<pushnode::metrics::AllocatorStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(pushnode::metrics::AllocatorStats {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

#[derive(Parser, Debug)]
#[command(name = "pushnode", version, about = "WebSocket push-notification node")]
struct Cli {
    /// Configuration file (TOML). Defaults to $PUSHNODE_CONFIG, then built-in defaults.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node (the default).
    Serve,
    /// Print a connection token signed with the configured auth.jwt_secret.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, such as 1h or 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A topic channel the token grants (exact name or prefix*); repeatable.
        #[arg(long = "channel")]
        channels: Vec<String>,
    },
    /// Send a notification through a running node's internal API.
    Publish(PublishArgs),
    /// Print the effective configuration, secrets redacted.
    Config,
}

#[derive(Args, Debug)]
struct PublishArgs {
    /// Notify this user.
    #[arg(long, group = "target")]
    user: Option<String>,
    /// Notify these users (comma-separated).
    #[arg(long, group = "target", value_delimiter = ',')]
    users: Option<Vec<String>>,
    /// Publish on this topic channel.
    #[arg(long, group = "target")]
    channel: Option<String>,
    /// Event name carried in the notification.
    #[arg(long)]
    event: Option<String>,
    /// Keep it in the users' inboxes until read.
    #[arg(long)]
    persist: bool,
    /// With --persist: a retry with the same key notifies once.
    #[arg(long, requires = "persist")]
    idempotency_key: Option<String>,
    /// Internal API base URL; defaults to http://<server.internal_addr>.
    #[arg(long)]
    url: Option<String>,
    /// API key; defaults to the first of auth.api_keys.
    #[arg(long, env = "PUSHNODE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The notification data: any JSON.
    data: String,
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Token { user, ttl, channels } => {
            if settings.auth.jwt_secret.is_empty() {
                bail!("auth.jwt_secret is not set: a token would not verify on any node");
            }
            let token = Authenticator::new(&settings.auth).issue(&user, ttl, channels)?;
            println!("{token}");
            Ok(())
        }
        Command::Publish(args) => publish(&settings, args),
        Command::Config => {
            print!("{}", settings.redacted_toml());
            Ok(())
        }
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    logging::init(&settings.log);
    pushnode::metrics::report_allocator(jemalloc_stats);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&settings)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        pushnode::run(listeners, settings, shutdown).await?;
        Ok(())
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    shutdown.cancel();
}

fn publish(settings: &Settings, args: PublishArgs) -> anyhow::Result<()> {
    let data = RawValue::from_string(args.data).context("DATA must be JSON")?;
    if usize::from(args.user.is_some()) + usize::from(args.users.is_some()) + usize::from(args.channel.is_some()) != 1 {
        bail!("give one of --user, --users, --channel");
    }
    let body = PublishRequest {
        user: args.user,
        users: args.users,
        channel: args.channel,
        data,
        event: args.event,
        persist: args.persist,
        idempotency_key: args.idempotency_key,
    };
    let url = args.url.unwrap_or_else(|| format!("http://{}", settings.server.internal_addr));
    let key = args.api_key.or_else(|| settings.auth.api_keys.first().cloned());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new().post(format!("{}/api/publish", url.trim_end_matches('/'))).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        println!("{text}");
        Ok(())
    })
}
