//! Criterion benchmarks of the durable inbox: append (persist + publish), state (unread count
//! and newest id), list (a replay page of 50 unread out of 200) and marking one read, on the memory store and on a real
//! `redis-server` (its Redis Functions library, one FCALL per operation over loopback).
//! Run: `cargo bench --bench inbox`. The Redis group starts its own `redis-server` on a free
//! port and is skipped, with a note, where none is installed.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use pushnode::broker::Broker;
use pushnode::channel::ChannelNames;
use pushnode::hub::Hub;
use pushnode::inbox::{Inbox, ReadScope};
use pushnode::redis_link::RedisLink;
use pushnode::settings::{BrokerKind, Settings};
use serde_json::value::RawValue;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Notifications stored per user before state/list/read are measured (the default retention
/// is 200 per user).
const STORED: usize = 200;

struct Bench {
    runtime: Runtime,
    inbox: Inbox,
    stop: CancellationToken,
}

impl Bench {
    fn new(settings: &Settings) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let link = RedisLink::from_settings(&settings.broker).expect("broker settings");
        let hub = Hub::new("bench", link.is_some());
        let names = ChannelNames::new(
            &settings.broker.user_channel,
            &settings.broker.topic_channel,
            link.as_ref().is_some_and(RedisLink::is_cluster),
        );
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let inbox = runtime.block_on(async {
            // The broker's subscriber advances the link's epoch, which loads the inbox functions.
            Broker::start(&settings.broker, link.clone(), hub.subscriptions(), &tracker, stop.clone());
            let inbox = Inbox::new(&settings.inbox, link, hub, names);
            tracker.spawn(inbox.clone().run(stop.clone()));
            inbox
        });
        Self { runtime, inbox, stop }
    }

    /// Fills `user`'s inbox with `STORED` notifications.
    fn fill(&self, user: &str, data: &RawValue) {
        self.runtime.block_on(async {
            for _ in 0..STORED {
                self.inbox.append(user, Some("comment"), data, None).await.expect("append");
            }
        });
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn data() -> Box<RawValue> {
    RawValue::from_string(r#"{"title":"New comment","body":"Someone replied to your post","cnt":3}"#.into())
        .expect("valid JSON")
}

fn operations(c: &mut Criterion, group_name: &str, bench: &Bench) {
    let data = data();
    let mut group = c.benchmark_group(group_name);
    let rt = &bench.runtime;
    let inbox = &bench.inbox;
    let mut n = 0u64;
    group.bench_function("append", |b| {
        b.iter(|| {
            n += 1;
            // Spread over users so no single inbox is trimmed on every call.
            let user = format!("append-{}", n % 1000);
            rt.block_on(inbox.append(&user, Some("comment"), &data, None)).expect("append")
        });
    });
    bench.fill("reader", &data);
    group.bench_function("state", |b| b.iter(|| rt.block_on(inbox.state("reader")).expect("state")));
    group.bench_function("list_50_unread", |b| {
        b.iter(|| rt.block_on(inbox.list("reader", None, 50, true)).expect("list"));
    });
    // Marking one notification read (what a client's `read` frame does); the setup appends
    // the notification to be read and is not timed.
    group.bench_function("mark_read_one", |b| {
        b.iter_batched(
            || rt.block_on(inbox.append("reader", Some("comment"), &data, None)).expect("append").id,
            |id| rt.block_on(inbox.mark_read("reader", &ReadScope::Ids(vec![id]))).expect("read"),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn memory(c: &mut Criterion) {
    let bench = Bench::new(&Settings::default());
    operations(c, "inbox_memory", &bench);
}

/// A throwaway `redis-server` on a free loopback port.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Self { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("inbox_redis: skipped, no redis-server could be started");
        return;
    };
    let mut settings = Settings::default();
    settings.broker.kind = BrokerKind::Redis;
    settings.broker.redis_url = format!("redis://127.0.0.1:{}", server.port);
    let bench = Bench::new(&settings);
    // Wait until the broker is connected and the function library answers.
    bench.runtime.block_on(async {
        for _ in 0..500 {
            if bench.inbox.state("warmup").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the Redis inbox never answered");
    });
    operations(c, "inbox_redis", &bench);
    drop(bench);
    drop(server);
}

criterion_group!(benches, memory, redis);
criterion_main!(benches);
