//! The `pushnode` binary as an operator uses it: configuration errors, `token`, `config`, and
//! `serve` + `publish` + SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{API_KEY, Client, SECRET};
use futures_util::future::join_all;

fn pushnode() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushnode"));
    command.env_remove("PUSHNODE_CONFIG").env("RUST_BACKTRACE", "0");
    command
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn unknown_keys_and_bad_values_stop_the_start_naming_the_key() {
    let out = pushnode().env("PUSHNODE__SERVER__PUBLIK_ADDR", "x").arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("publik_addr"), "{out:?}");

    let out = pushnode().env("PUSHNODE__LIMITS__MAX_CONNECTIONS", "many").arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_connections"), "{out:?}");

    let dir = std::env::temp_dir().join(format!("pushnode-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[session]\nheartbeat_interval = \"5s\"\nheartbeat_timeout = \"1s\"\n").unwrap();
    let out = pushnode().arg("--config").arg(&file).arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session.heartbeat_timeout"), "{out:?}");

    let out = pushnode().arg("--config").arg(dir.join("missing.toml")).arg("config").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"), "{out:?}");
}

#[test]
fn config_prints_the_effective_settings_with_secrets_redacted() {
    let out = pushnode()
        .env("PUSHNODE__AUTH__JWT_SECRET", SECRET)
        .env("PUSHNODE__AUTH__API_KEYS", API_KEY)
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("public_addr = \"127.0.0.1:9501\""), "{text}");
    assert!(!text.contains(SECRET) && !text.contains(API_KEY), "{text}");
    assert!(text.contains("<redacted>"));

    // Every Redis URL form hides its password.
    for url in ["redis+unix:///run/redis.sock?db=1&pass=hunter2", "rediss://default:hunter2@redis:6380"] {
        let out = pushnode().env("PUSHNODE__BROKER__REDIS_URL", url).arg("config").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains("hunter2") && text.contains("<redacted>"), "{text}");
    }
}

#[test]
fn an_all_digit_secret_from_the_environment_signs_as_written() {
    let digits = "01234567890123456789012345678901234";
    let out = pushnode().env("PUSHNODE__AUTH__JWT_SECRET", digits).args(["token", "--user", "9"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = pushnode::auth::Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: digits.into(),
        ..Default::default()
    });
    assert_eq!(auth.verify(token.trim()).unwrap().user.as_ref(), "9");
}

#[test]
fn token_requires_a_secret_and_prints_a_verifiable_token() {
    let out = pushnode().args(["token", "--user", "42"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));

    let out = pushnode()
        .env("PUSHNODE__AUTH__JWT_SECRET", SECRET)
        .args(["token", "--user", "42", "--ttl", "5m", "--channel", "news"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = pushnode::auth::Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: SECRET.into(),
        ..Default::default()
    });
    let identity = auth.verify(token.trim()).unwrap();
    assert_eq!((identity.user.as_ref(), identity.channels), ("42", vec!["news".to_owned()]));
}

/// A `pushnode serve` child, killed if the test fails before it is waited for (a failing test
/// must not leave a node running).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn serve_then_publish_from_the_cli_then_sigterm_exits_zero() {
    let (public, internal) = (free_port(), free_port());
    let mut child = KillOnDrop(Some(
        pushnode()
            .env("PUSHNODE__SERVER__PUBLIC_ADDR", format!("127.0.0.1:{public}"))
            .env("PUSHNODE__SERVER__INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
            .env("PUSHNODE__SERVER__DRAIN_PERIOD", "200ms")
            .env("PUSHNODE__AUTH__JWT_SECRET", SECRET)
            .env("PUSHNODE__AUTH__API_KEYS", API_KEY)
            .env("PUSHNODE__DEMO__ENABLED", "false")
            .env("PUSHNODE__LOG__FORMAT", "json")
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));

    let auth = pushnode::auth::Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: SECRET.into(),
        ..Default::default()
    });
    let url =
        format!("ws://127.0.0.1:{public}/ws?token={}", auth.issue("42", Duration::from_secs(60), vec![]).unwrap());
    let deadline = Instant::now() + common::WAIT;
    let mut client = loop {
        match Client::connect(&url).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("node never came up: {e}"),
        }
    };
    assert_eq!(client.next_json().await["type"], "welcome");

    let out = pushnode()
        .env("PUSHNODE__SERVER__INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
        .env("PUSHNODE__AUTH__API_KEYS", API_KEY)
        .args(["publish", "--user", "42", "--event", "hello", r#"{"cnt":3}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let n = client.next_json().await;
    assert_eq!((n["event"].as_str(), n["data"]["cnt"].as_u64()), (Some("hello"), Some(3)));

    let pid = child.0.as_ref().unwrap().id();
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(client.close_code().await, 4000);
    let exited = child.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || exited.wait_with_output()).await.unwrap().unwrap();
    assert!(exit.status.success(), "{exit:?}");
    let logs = String::from_utf8_lossy(&exit.stderr);
    assert!(logs.contains("\"pushnode stopped\""), "{logs}");
    assert!(!logs.contains(SECRET) && !logs.contains(API_KEY), "a secret reached the logs");
}

/// Heap figures from a `pushnode serve` child's `/metrics`: (allocated, resident, sessions).
async fn heap(internal: u16) -> (f64, f64, f64) {
    let text = reqwest::get(format!("http://127.0.0.1:{internal}/metrics")).await.unwrap().text().await.unwrap();
    let allocated = common::metric(&text, "pushnode_allocator_allocated_bytes");
    let resident = common::metric(&text, "pushnode_allocator_resident_bytes");
    (allocated, resident, common::metric(&text, "pushnode_connections"))
}

/// Opens `n` sessions of users `heap<round>-<i>`, each welcomed, replayed the `replayed`
/// persisted notifications (of ~300 bytes) published to it before it connected, sent `queued`
/// persisted notifications while connected (published concurrently) and one live notification;
/// measures the live heap; closes them all and waits until the node has let them go. Returns
/// the live heap before the round and while its sessions were open.
async fn sessions_come_and_go(
    public: u16,
    internal: u16,
    n: usize,
    round: usize,
    replayed: usize,
    queued: usize,
) -> (f64, f64) {
    let auth = pushnode::auth::Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: SECRET.into(),
        ..Default::default()
    });
    let http = reqwest::Client::new();
    let publish = |body: serde_json::Value| {
        let request = http.post(format!("http://127.0.0.1:{internal}/api/publish")).bearer_auth(API_KEY).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{response:?}");
        }
    };
    let users: Vec<String> = (0..n).map(|i| format!("heap{round}-{i}")).collect();
    for k in 0..replayed {
        publish(serde_json::json!({ "users": users, "persist": true, "data": { "k": k, "pad": "p".repeat(300) } }))
            .await;
    }
    let before = heap(internal).await.0;
    let mut clients = Vec::with_capacity(n);
    for user in &users {
        let token = auth.issue(user, Duration::from_secs(60), vec![]).unwrap();
        let mut client = Client::connect(&format!("ws://127.0.0.1:{public}/ws?token={token}")).await.unwrap();
        assert_eq!(client.next_json().await["type"], "welcome");
        for k in 0..replayed {
            assert_eq!(client.next_json().await["data"]["k"], k, "replay of {user}");
        }
        clients.push(client);
    }
    // One request names at most 1,000 users.
    join_all((0..queued).flat_map(|q| {
        users
            .chunks(1000)
            .map(move |some| publish(serde_json::json!({ "users": some, "persist": true, "data": { "q": q } })))
    }))
    .await;
    for client in &mut clients {
        let mut got = Vec::with_capacity(queued);
        for _ in 0..queued {
            got.push(client.next_json().await["data"]["q"].as_u64().unwrap() as usize);
        }
        got.sort_unstable();
        assert!(got.iter().copied().eq(0..queued), "queued notifications received: {got:?}");
    }
    for (i, user) in users.iter().enumerate() {
        publish(serde_json::json!({ "user": user, "data": { "n": i } })).await;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(client.next_json().await["data"]["n"], i);
    }
    let (open, _, sessions) = heap(internal).await;
    assert_eq!(sessions, n as f64);
    drop(clients);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let open = heap(internal).await.2;
        if open == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "pushnode_connections still {open} 10 s after every client left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The users' channels are let go after the unsubscribe delay (50 ms here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    (before, open)
}

/// `pushnode serve` on free ports with the test secret and key, a 50 ms unsubscribe delay and
/// `env`; returns once it is ready.
async fn serve_child(env: &[(&str, &str)]) -> (KillOnDrop, u16, u16) {
    let (public, internal) = (free_port(), free_port());
    let child = KillOnDrop(Some(
        pushnode()
            .env("PUSHNODE__SERVER__PUBLIC_ADDR", format!("127.0.0.1:{public}"))
            .env("PUSHNODE__SERVER__INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
            .env("PUSHNODE__AUTH__JWT_SECRET", SECRET)
            .env("PUSHNODE__AUTH__API_KEYS", API_KEY)
            .env("PUSHNODE__DEMO__ENABLED", "false")
            .env("PUSHNODE__BROKER__UNSUBSCRIBE_DELAY", "50ms")
            .envs(env.iter().copied())
            .arg("serve")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + common::WAIT;
    while reqwest::get(format!("http://127.0.0.1:{internal}/readyz")).await.is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, public, internal)
}

#[tokio::test]
async fn the_binary_reports_its_heap_and_sessions_that_leave_leave_nothing_behind() {
    let (_child, public, internal) = serve_child(&[]).await;
    let (allocated, resident, _) = heap(internal).await;
    assert!(allocated > 0.0 && allocated <= resident, "allocated {allocated}, resident {resident}");

    // The first round grows what grows once (maps' capacity, the runtime's task slabs); after
    // it, each round of new sessions must give back what it took. The allocator's thread
    // caches count as allocated and move the figure by up to ~150 KB either way (seen: -73 to
    // +28 bytes per session over two rounds), so the bar is an eighth of what an open session
    // holds, kept by every session of two rounds: a session's state left behind (its entry,
    // task, buffers or channel) fails it many times over.
    const N: usize = 1000;
    sessions_come_and_go(public, internal, N, 0, 0, 0).await;
    let (_, open) = sessions_come_and_go(public, internal, N, 1, 0, 0).await;
    let first = heap(internal).await.0;
    let per_session = (open - first) / N as f64;
    assert!(per_session > 256.0, "{N} open sessions took only {per_session:.0} bytes each");
    for round in 2..=3 {
        sessions_come_and_go(public, internal, N, round, 0, 0).await;
    }
    let last = heap(internal).await.0;
    let kept = (last - first) / (2 * N) as f64;
    assert!(
        kept < per_session / 8.0,
        "the heap grew by {kept:.0} bytes per session over two rounds (an open session holds {per_session:.0}): \
         {first} bytes after the first round, {last} after the third"
    );
}

/// How many bytes more of live heap each of `n` open sessions holds after `replayed` and
/// `queued` notifications (see [`sessions_come_and_go`]) than each of `n` that had none, on a
/// node with its inbox in Redis (so that its heap holds sessions only). Compared open with
/// open: the heap between rounds includes what the allocator's thread caches hold of the last
/// round's sessions, which would blur "before" to "open". Returns (more, plain heap, heap).
async fn heap_more_per_session(n: usize, replayed: usize, queued: usize) -> (f64, f64, f64) {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let (_child, public, internal) =
        serve_child(&[("PUSHNODE__BROKER__KIND", "redis"), ("PUSHNODE__BROKER__REDIS_URL", &url)]).await;
    sessions_come_and_go(public, internal, n, 0, replayed, queued).await;
    let (_, plain) = sessions_come_and_go(public, internal, n, 1, 0, 0).await;
    let (_, with) = sessions_come_and_go(public, internal, n, 2, replayed, queued).await;
    ((with - plain) / n as f64, plain, with)
}

#[tokio::test]
async fn a_session_holds_no_more_heap_after_a_replay_than_without_one() {
    // Twenty notifications of ~300 bytes: a batch of ~8 KB on every session's socket at its
    // connect. Before session frames bypassed tungstenite's write buffer, each idle session
    // kept that buffer's capacity for good (about 8 KB more per session).
    const N: usize = 300;
    const REPLAYED: usize = 20;
    let (more, plain, replayed) = heap_more_per_session(N, REPLAYED, 0).await;
    assert!(
        more < 1024.0,
        "{N} sessions that were replayed {REPLAYED} notifications hold {more:.0} bytes more each than {N} that were not \
         ({replayed} bytes against {plain})"
    );
}

#[tokio::test]
async fn a_session_holds_no_more_heap_after_queued_frames_than_without_them() {
    // Persisted notifications to sessions that de-duplicate them by id are always queued
    // (fan-out does not write them itself), so each passes through the session's outbox queue
    // and its batch. Before both gave their memory back after every batch, a session kept the
    // capacity of its largest burst in each (four frames at least, ~80 bytes a frame) for
    // good: 833-868 bytes more per session here (against 21-212 after), ~600 on average in a
    // soak's heap profile. 2,000 sessions, so that the thread caches' noise (up to ~350 KB)
    // stays well under the bar per session.
    const N: usize = 2000;
    const QUEUED: usize = 16;
    let (more, plain, queued) = heap_more_per_session(N, 0, QUEUED).await;
    assert!(
        more < 512.0,
        "{N} sessions that were sent {QUEUED} queued notifications hold {more:.0} bytes more each than {N} that were \
         not ({queued} bytes against {plain})"
    );
}
