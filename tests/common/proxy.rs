//! A TCP proxy that can black-hole the connections it carries: they stay open but deliver
//! nothing more, which is how a subscriber dies silently behind a broken network path.
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
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flags: Arc<Mutex<Vec<watch::Sender<bool>>>> = Arc::default();
        let task = tokio::spawn({
            let flags = flags.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else { continue };
                    let (frozen_tx, frozen_rx) = watch::channel(false);
                    flags.lock().unwrap().push(frozen_tx);
                    tokio::spawn(carry(client, server, frozen_rx));
                }
            }
        });
        Self { addr, flags, task }
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
