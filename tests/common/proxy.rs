//! A TCP proxy that can black-hole the connections it carries: they stay open but deliver
//! nothing more, which is how a subscriber dies silently behind a broken network path. It can
//! also hold new connections (accepted, never carried) for as long as a test needs Redis to
//! look unreachable to a reconnecting node, while its connections that are up keep working.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Blackhole {
    pub addr: SocketAddr,
    /// One flag per connection carried so far; `true` stops its upstream-to-client direction.
    flags: Arc<Mutex<Vec<watch::Sender<bool>>>>,
    /// `true`: new connections are accepted but not carried until it turns `false`.
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flags: Arc<Mutex<Vec<watch::Sender<bool>>>> = Arc::default();
        let hold = watch::Sender::new(false);
        let task = tokio::spawn({
            let flags = flags.clone();
            let hold = hold.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let flags = flags.clone();
                    let mut held = hold.subscribe();
                    tokio::spawn(async move {
                        // A held connection waits here; its client gives up on its own.
                        if held.wait_for(|held| !held).await.is_err() {
                            return;
                        }
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let (frozen_tx, frozen_rx) = watch::channel(false);
                        flags.lock().unwrap().push(frozen_tx);
                        carry(client, server, frozen_rx).await;
                    });
                }
            }
        });
        Self { addr, flags, hold, task }
    }

    /// While `true`, new connections are accepted but get no answer (Redis looks unreachable
    /// to whoever connects); connections already carried are not affected.
    pub fn hold_new(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    /// Every connection carried so far goes silent towards its client; new ones work.
    pub fn freeze_existing(&self) {
        for flag in self.flags.lock().unwrap().iter() {
            let _ = flag.send(true);
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn carry(client: TcpStream, server: TcpStream, mut frozen: watch::Receiver<bool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = server_read.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if *frozen.borrow() || client_write.write_all(&buf[..n]).await.is_err() {
                        // Black-holed: swallow what arrives and keep the connection open.
                        if *frozen.borrow() { continue; }
                        break;
                    }
                }
            },
            _ = frozen.changed() => {}
        }
    }
    up.abort();
}
