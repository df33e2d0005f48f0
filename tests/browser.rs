//! The browser side in a real browser: headless Chromium driven by Playwright (tests/browser).
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci --prefix tests/browser` (`.ci/run` installs
//! them). Without them the tests say so and pass locally; under CI (`CI` set) they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::TestNode;
use common::proxy::Blackhole;

/// The scripts' folder and the Chromium binary, or `None` (outside CI) when they are missing.
fn prerequisites() -> Option<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = dir.join("node_modules/playwright-core").exists() && Path::new(&chromium).exists();
    if !ready {
        assert!(std::env::var_os("CI").is_none(), "browser test prerequisites missing under CI");
        eprintln!("SKIPPED: install chromium and run `npm ci --prefix tests/browser` to run the browser tests");
        return None;
    }
    Some((dir, chromium))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_a_sent_notification_in_its_badge() {
    let Some((dir, chromium)) = prerequisites() else { return };
    let node = TestNode::with(|s| s.demo.enabled = true).await;
    let base = format!("http://{}", node.public);
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo.png");
    let args = vec![base, screenshot.display().to_string()];
    common::run_node_script(dir.join("demo.mjs"), args, Some(chromium)).await;
    node.stop().await;
}

/// A connection that stays open but goes silent (a proxy that stops carrying the node's side):
/// pushnode.js pings it, hears nothing, drops it and reconnects, through the same proxy,
/// whose new connections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_drops_a_connection_gone_silent_and_reconnects() {
    let Some((dir, chromium)) = prerequisites() else { return };
    let node = TestNode::start().await;
    let proxy = std::sync::Arc::new(Blackhole::start(node.public).await);
    let args = [format!("http://{}", node.public), format!("ws://{}/ws", proxy.addr), node.token("9")];
    let frozen = proxy.clone();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(dir.join("liveness.mjs"))
            .args(&args)
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run node");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = String::new();
        // The script prints "connected" once the session is up and has kept up while quiet.
        for line in lines.by_ref() {
            let line = line.unwrap();
            stdout.push_str(&line);
            stdout.push('\n');
            if line == "connected" {
                frozen.freeze_existing();
                writeln!(child.stdin.as_mut().unwrap(), "frozen").unwrap();
                break;
            }
        }
        for line in lines {
            stdout.push_str(&line.unwrap());
            stdout.push('\n');
        }
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (child.wait().unwrap(), stdout, stderr)
    })
    .await
    .unwrap();
    assert!(status.success(), "browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("reconnected"), "{stdout}");
    eprint!("{stdout}");
    node.stop().await;
}

/// pusher-js and Laravel Echo as a Laravel page loads them (their browser builds), in
/// Chromium: a notification sent while the browser was closed reaches `.notification()`,
/// a private event arrives live, and presence shows a second user joining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_echo_in_chromium_gets_what_was_sent_while_the_browser_was_closed() {
    let Some((dir, chromium)) = prerequisites() else { return };
    let node = TestNode::with(|s| {
        s.pusher.apps = vec![pushnode::settings::PusherApp {
            id: "1".into(),
            key: "browser-key".into(),
            secret: "browser-secret-0123".into(),
            enable_client_messages: false,
            max_connections: 0,
        }];
        s.pusher.persist_notifications = true;
    })
    .await;
    let config = serde_json::json!({
        "base": format!("http://{}", node.public),
        "appId": "1", "key": "browser-key", "secret": "browser-secret-0123",
    });
    common::run_node_script(dir.join("pusher-browser.mjs"), vec![config.to_string()], Some(chromium)).await;
    node.stop().await;
}
