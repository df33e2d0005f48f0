//! Criterion benchmarks of the hot paths that need no sockets or Redis: hub fan-out, frame
//! encoding and token verification. Run: `cargo bench --bench hub`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pushnode::auth::Authenticator;
use pushnode::hub::{Hub, LocalSession, Registration};
use pushnode::outbox::Outbox;
use pushnode::protocol::{Delivery, Envelope, Format};
use serde_json::value::RawValue;

fn payload() -> Bytes {
    let data = RawValue::from_string(r#"{"title":"New comment","body":"Someone replied to your post","cnt":3}"#.into())
        .expect("valid JSON");
    Envelope::new("bench-1", Some("comment"), &data).encode()
}

/// Fan-out of one message to N local sessions of one channel. Outboxes are drained after
/// each delivery so they never fill (the writer's side is not measured here).
fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_fanout");
    let payload = payload();
    for sessions in [1usize, 1_000, 10_000] {
        let hub = Hub::new("bench", false);
        let channel: Arc<str> = "pushnode:topic:all".into();
        let registrations: Vec<Registration> = (0..sessions)
            .map(|i| {
                let s =
                    LocalSession::new(hub.next_session_id(), format!("u{i}").into(), Format::Json, Outbox::new(1024));
                let mut registration = hub.register(Arc::new(s), 1).expect("one session per user");
                registration.join_topic(channel.clone(), "all".into());
                registration
            })
            .collect();
        let mut batch = Vec::new();
        group.throughput(Throughput::Elements(sessions as u64));
        group.bench_with_input(BenchmarkId::from_parameter(sessions), &sessions, |b, _| {
            b.iter(|| {
                let fanout = hub.deliver(&channel, &payload);
                for s in &registrations {
                    s.outbox.drain_into(&mut batch);
                    batch.clear();
                }
                fanout
            })
        });
    }
    group.finish();
}

/// 10,000 sessions of one channel leave it, in a shuffled order (as a drain or a mass
/// disconnect does): the cost of membership removal under the channel's map shard lock.
fn leave(c: &mut Criterion) {
    const SESSIONS: usize = 10_000;
    let mut group = c.benchmark_group("hub_leave");
    group.throughput(Throughput::Elements(SESSIONS as u64));
    group.bench_function(BenchmarkId::from_parameter(SESSIONS), |b| {
        b.iter_batched(
            || {
                let hub = Hub::new("bench", false);
                let channel: Arc<str> = "pushnode:topic:all".into();
                let mut registrations: Vec<Registration> = (0..SESSIONS)
                    .map(|i| {
                        let s = LocalSession::new(
                            hub.next_session_id(),
                            format!("u{i}").into(),
                            Format::Json,
                            Outbox::new(16),
                        );
                        let mut registration = hub.register(Arc::new(s), 1).expect("one session per user");
                        registration.join_topic(channel.clone(), "all".into());
                        registration
                    })
                    .collect();
                fastrand::Rng::with_seed(7).shuffle(&mut registrations);
                registrations
            },
            |mut registrations| {
                for registration in &mut registrations {
                    registration.leave_topic("all");
                }
                // Dropped outside the measurement: unregistering is not leaving.
                registrations
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let payload = payload();
    let foreign = Bytes::from_static(br#"{"cnt":5}"#);
    let mut group = c.benchmark_group("frame_encoding");
    let id = || "n-1".to_owned();
    group.bench_function("envelope_json", |b| {
        b.iter(|| Delivery::decode(&payload, None).frame(Format::Json, &id).map(|f| f.len()))
    });
    group.bench_function("foreign_raw", |b| {
        b.iter(|| Delivery::decode(&foreign, None).frame(Format::Raw, &id).map(|f| f.len()))
    });
    group.bench_function("foreign_json", |b| {
        b.iter(|| Delivery::decode(&foreign, None).frame(Format::Json, &id).map(|f| f.len()))
    });
    group.finish();
}

fn tokens(c: &mut Criterion) {
    let auth = Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: "bench-secret-bench-secret-bench-secret".into(),
        ..Default::default()
    });
    let token = auth.issue("42", Duration::from_secs(3600), vec!["news".into()]).expect("token");
    c.bench_function("token_verify", |b| b.iter(|| auth.verify(&token).expect("valid")));
}

criterion_group!(benches, fanout, leave, encoding, tokens);
criterion_main!(benches);
