//! The demo page in a real browser: headless Chromium driven by Playwright (tests/browser).
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci --prefix tests/browser` (`.ci/run` installs
//! them). Without them the test says so and passes locally; under CI (`CI` set) it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_a_sent_notification_in_its_badge() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = dir.join("node_modules/playwright-core").exists() && Path::new(&chromium).exists();
    if !ready {
        assert!(std::env::var_os("CI").is_none(), "browser test prerequisites missing under CI");
        eprintln!("SKIPPED: install chromium and run `npm ci --prefix tests/browser` to run the browser test");
        return;
    }
    let node = TestNode::with(|s| s.demo.enabled = true).await;
    let base = format!("http://{}", node.public);
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo.png");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(dir.join("demo.mjs")).arg(&base).arg(&screenshot).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("cannot run node");
    assert!(
        output.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    node.stop().await;
}
