//! `Wire`: a session's TCP socket, shared between the session's task (which reads and writes it
//! through tungstenite) and fan-out, which may write a ready frame itself.
//!
//! Waking a session's task to write one small frame costs several times the write: at a paced
//! unicast rate most of a node's CPU went to tasks and threads waking and sleeping, not to the
//! sockets (see `docs/benchmarks.md`). So when a session's task is parked with nothing queued,
//! fan-out writes the frame straight into the socket ([`Wire::try_frame`]), without blocking:
//! either the kernel takes bytes, or the frame goes to the outbox as before.
//!
//! Two writers on one byte stream must never interleave inside a frame. Every write, the
//! session's and fan-out's, takes this wire's lock, and fan-out writes only at a frame
//! boundary:
//! - tungstenite hands the socket its whole write buffer every time, and that buffer always
//!   holds whole frames (tungstenite 0.30 `FrameCodec::write_out_buffer`); the session's own
//!   batches and replies, encoded with [`put_frame`] and written past tungstenite's buffer
//!   (which would keep their size for good), go the same way: whole frames, the rest of a
//!   partly taken write next. So the socket is at a boundary after any write the kernel took
//!   whole, and inside a frame after one it took in part, until the rest follows;
//! - a frame fan-out wrote in part leaves its remainder here (`tail`), and every later write
//!   (the session's flush, or its next frames) sends the tail first;
//! - once the session has read client bytes, fan-out keeps off until the session parks again
//!   ([`Wire::parked`]): tungstenite may be answering them, and its echo of a client's close
//!   frame must be the last frame on the socket.
//!
//! Which frames may be written this way (ordering with the session's own frames, replays and
//! de-duplication) is the outbox's business ([`crate::outbox::Outbox::offer`]); this module only
//! keeps the bytes whole.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::protocol::WireFrame;

/// The longest header of an unmasked frame: 2 bytes and an 8-byte length.
pub const MAX_HEADER: usize = 10;

/// Frames up to this size are copied into one buffer on the stack and written with `send`;
/// larger ones go out with `writev` (header and payload where they are). One contiguous write
/// skips the kernel's vectored-write path (`do_writev`, `vfs_writev`): 0.2 µs less per write on
/// the loopback floor (`docs/benchmarks.md`, session 10), and a notification is usually far
/// smaller than this.
const INLINE_FRAME: usize = 1024;

/// Appends `payload` to `out` as one unmasked WebSocket frame (a server's) of kind `opcode`.
pub fn put_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let head = FrameHeader { opcode, ..FrameHeader::default() };
    out.reserve(MAX_HEADER + payload.len());
    // Formatting into a vector cannot fail: the length always fits the 64-bit form.
    let _ = head.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A session's socket. Shared (`Arc`) by the session's stream ([`WireIo`]) and its place in the
/// hub.
#[derive(Debug)]
pub struct Wire {
    socket: TcpStream,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last write the kernel took in part: the socket is inside a frame of tungstenite's.
    mid_frame: bool,
    /// The session read client bytes and has not parked since: its answer to them (a close
    /// frame's echo, which must be the last frame) may be on its way.
    reading: bool,
    /// The rest of a frame fan-out wrote in part; it goes out before anything else.
    tail: Option<Box<[u8]>>,
}

/// What [`Wire::try_frame`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The whole frame is in the kernel's send buffer.
    All,
    /// Part of it is; the rest waits in the wire for the session's next flush.
    Part,
    /// Nothing was written: the socket is busy, full or broken. Queue the frame instead.
    Nothing,
}

impl Wire {
    pub fn new(socket: TcpStream) -> Arc<Self> {
        Arc::new(Self { socket, state: Mutex::new(State::default()) })
    }

    /// Writes `frame` as one unmasked WebSocket frame (a server's), if the socket is at a frame
    /// boundary and takes at least part of it now. Never waits.
    pub fn try_frame(&self, frame: &WireFrame) -> Sent {
        let (opcode, payload): (_, &[u8]) = match frame {
            WireFrame::Text(text) => (Data::Text, text.as_bytes()),
            WireFrame::Binary(bytes) => (Data::Binary, bytes),
            // Pings are the session's (their form depends on the protocol).
            WireFrame::Ping => return Sent::Nothing,
        };
        let mut header = [0u8; MAX_HEADER];
        let header_len = {
            let mut out = &mut header[..];
            let head = FrameHeader { opcode: OpCode::Data(opcode), ..FrameHeader::default() };
            if head.format(payload.len() as u64, &mut out).is_err() {
                return Sent::Nothing;
            }
            MAX_HEADER - out.len()
        };
        let total = header_len + payload.len();
        let mut inline = [0u8; INLINE_FRAME];
        let (header, payload): (&[u8], &[u8]) = if total <= INLINE_FRAME {
            inline[..header_len].copy_from_slice(&header[..header_len]);
            inline[header_len..total].copy_from_slice(payload);
            (&inline[..total], &[])
        } else {
            (&header[..header_len], payload)
        };

        let mut state = self.state.lock();
        if state.mid_frame || state.reading || state.tail.is_some() {
            return Sent::Nothing;
        }
        let written = if payload.is_empty() {
            self.socket.try_write(header)
        } else {
            self.socket.try_write_vectored(&[IoSlice::new(header), IoSlice::new(payload)])
        };
        match written {
            Ok(n) if n == total => Sent::All,
            Ok(0) | Err(_) => Sent::Nothing,
            Ok(n) => {
                let mut rest = Vec::with_capacity(total - n);
                if n < header.len() {
                    rest.extend_from_slice(&header[n..]);
                    rest.extend_from_slice(payload);
                } else {
                    rest.extend_from_slice(&payload[n - header.len()..]);
                }
                state.tail = Some(rest.into_boxed_slice());
                Sent::Part
            }
        }
    }

    /// The session parked again after reading: fan-out may write (if the outbox lets it).
    pub fn parked(&self) {
        self.state.lock().reading = false;
    }

    /// Whether a frame written in part by fan-out still has bytes to send.
    pub fn has_tail(&self) -> bool {
        self.state.lock().tail.is_some()
    }

    /// Sends the tail, if any. Ready once it is all written.
    fn poll_tail(&self, state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(tail) = &state.tail {
            ready!(self.socket.poll_write_ready(cx))?;
            match self.socket.try_write(tail) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) if n == tail.len() => state.tail = None,
                Ok(n) => state.tail = Some(tail[n..].into()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The session's stream over a [`Wire`]: what tungstenite reads and writes. `prefix` holds
/// bytes the HTTP server had read past the upgrade request; they are read first.
#[derive(Debug)]
pub struct WireIo {
    wire: Arc<Wire>,
    prefix: Bytes,
}

impl WireIo {
    pub fn new(wire: Arc<Wire>, prefix: Bytes) -> Self {
        // Copied (usually: nothing): the HTTP server's bytes are a view into its whole read
        // buffer, which would otherwise stay allocated for the connection's life.
        Self { wire, prefix: Bytes::copy_from_slice(&prefix) }
    }

    pub fn wire(&self) -> &Arc<Wire> {
        &self.wire
    }
}

impl AsyncRead for WireIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            self.wire.state.lock().reading = true;
            return Poll::Ready(Ok(()));
        }
        let socket = &self.wire.socket;
        loop {
            ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    // Before tungstenite sees the bytes (and perhaps echoes a close): fan-out
                    // writes nothing more until the session has handled them and parks.
                    self.wire.state.lock().reading = true;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WireIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let wire = &self.wire;
        let mut state = wire.state.lock();
        ready!(wire.poll_tail(&mut state, cx))?;
        loop {
            ready!(wire.socket.poll_write_ready(cx))?;
            match wire.socket.try_write(buf) {
                Ok(n) => {
                    state.mid_frame = n < buf.len();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let wire = &self.wire;
        let mut state = wire.state.lock();
        wire.poll_tail(&mut state, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let wire = &self.wire;
        {
            let mut state = wire.state.lock();
            ready!(wire.poll_tail(&mut state, cx))?;
            // Nothing more from fan-out: the session is closing.
            state.mid_frame = true;
        }
        Poll::Ready(socket2::SockRef::from(&wire.socket).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    /// A connected pair: the server side as a wire, the client side as a plain socket.
    async fn pair() -> (Arc<Wire>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Wire::new(accepted.unwrap().0), client.unwrap())
    }

    fn text(s: &str) -> WireFrame {
        WireFrame::text(s.to_owned())
    }

    async fn client_ws(client: TcpStream) -> WebSocketStream<TcpStream> {
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    async fn next_text(ws: &mut WebSocketStream<TcpStream>) -> String {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        message.into_text().unwrap().to_string()
    }

    #[tokio::test]
    async fn direct_frames_and_the_sessions_frames_arrive_whole_and_in_order() {
        let (wire, client) = pair().await;
        let mut server =
            WebSocketStream::from_raw_socket(WireIo::new(wire.clone(), Bytes::new()), Role::Server, None).await;
        let mut client = client_ws(client).await;
        assert_eq!(wire.try_frame(&text("one")), Sent::All);
        server.send(Message::text("two")).await.unwrap();
        let long = "x".repeat(70_000); // a 64-bit length in the header
        assert_eq!(wire.try_frame(&text(&long)), Sent::All);
        // The largest frame copied into one buffer, and the smallest written in two pieces.
        let inline = "i".repeat(INLINE_FRAME - 4);
        let vectored = "v".repeat(INLINE_FRAME - 3);
        assert_eq!(wire.try_frame(&text(&inline)), Sent::All);
        assert_eq!(wire.try_frame(&text(&vectored)), Sent::All);
        assert_eq!(wire.try_frame(&WireFrame::Binary(Bytes::from_static(b"\x00\x01"))), Sent::All);
        server.send(Message::text("three")).await.unwrap();
        assert_eq!(next_text(&mut client).await, "one");
        assert_eq!(next_text(&mut client).await, "two");
        assert_eq!(next_text(&mut client).await, long);
        assert_eq!(next_text(&mut client).await, inline);
        assert_eq!(next_text(&mut client).await, vectored);
        let binary = client.next().await.unwrap().unwrap();
        assert_eq!(binary, Message::Binary(Bytes::from_static(b"\x00\x01")));
        assert_eq!(next_text(&mut client).await, "three");
        assert_eq!(wire.try_frame(&WireFrame::Ping), Sent::Nothing, "pings are the session's");
    }

    #[tokio::test]
    async fn a_full_socket_takes_part_of_a_frame_and_the_next_write_sends_the_rest_first() {
        fill_take_part_and_finish(50_000).await; // header and payload in two pieces
    }

    #[tokio::test]
    async fn a_full_socket_takes_part_of_a_small_frame_and_the_next_write_sends_the_rest_first() {
        fill_take_part_and_finish(1_000).await; // copied into one buffer
    }

    /// Fills the socket with `size`-byte text frames until the kernel takes only part of one,
    /// then checks the session's next write sends that frame's rest before its own bytes.
    async fn fill_take_part_and_finish(size: usize) {
        assert!((126..=u16::MAX as usize).contains(&size), "a 4-byte header");
        let (wire, mut client) = pair().await;
        let mut io = WireIo::new(wire.clone(), Bytes::new());
        // Fill the socket until it takes only part of a frame (the client reads nothing yet).
        let chunk = "y".repeat(size);
        let mut direct = 0;
        let outcome = loop {
            match wire.try_frame(&text(&chunk)) {
                Sent::All => direct += 1,
                other => break other,
            }
        };
        assert_eq!(outcome, Sent::Part, "a socket filling up takes part of a frame before none");
        assert!(wire.has_tail());
        assert_eq!(wire.try_frame(&text("later")), Sent::Nothing, "no frame may start inside another");
        // The session's next write waits for room, sends the tail, then its own bytes.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        let own = [0x81, 3, b'e', b'n', b'd'];
        io.write_all(&own).await.unwrap();
        assert!(!wire.has_tail());
        io.shutdown().await.unwrap();
        drop(io);
        drop(wire);
        let all = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap();
        // Every frame whole: `direct + 1` frames of `size` bytes (4-byte headers), then ours.
        let frame_len = 4 + chunk.len();
        assert_eq!(all.len(), (direct + 1) * frame_len + own.len());
        let [hi, lo] = (size as u16).to_be_bytes();
        for k in 0..=direct {
            let frame = &all[k * frame_len..(k + 1) * frame_len];
            assert_eq!(&frame[..4], &[0x81, 126, hi, lo]);
            assert!(frame[4..].iter().all(|&b| b == b'y'));
        }
        assert_eq!(&all[all.len() - own.len()..], &own);
    }

    #[tokio::test]
    async fn a_write_the_kernel_took_in_part_keeps_fan_out_away_until_its_rest_is_written() {
        let (wire, mut client) = pair().await;
        let mut io = WireIo::new(wire.clone(), Bytes::new());
        let big = vec![0x82u8; 8 << 20];
        // The session's write of more than the socket holds is taken in part.
        let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &big)).await.unwrap();
        assert!(n < big.len());
        assert_eq!(wire.try_frame(&text("between")), Sent::Nothing);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0;
            while total < 8 << 20 {
                total += client.read(&mut sink).await.unwrap();
            }
            client
        });
        io.write_all(&big[n..]).await.unwrap();
        let _client = drain.await.unwrap();
        assert_eq!(wire.try_frame(&text("after")), Sent::All, "whole again: fan-out may write");
    }

    #[tokio::test]
    async fn after_reading_client_bytes_fan_out_waits_until_the_session_parks() {
        let (wire, mut client) = pair().await;
        let mut io = WireIo::new(wire.clone(), Bytes::new());
        client.write_all(b"\x88\x80abcd").await.unwrap(); // a masked close frame
        let mut got = [0u8; 6];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(wire.try_frame(&text("after the close?")), Sent::Nothing);
        wire.parked();
        assert_eq!(wire.try_frame(&text("parked")), Sent::All);
    }

    #[tokio::test]
    async fn the_http_servers_read_buffer_is_not_kept_for_the_connections_life() {
        let (wire, _client) = pair().await;
        let buffer = Bytes::from(vec![0u8; 8192]);
        let io = WireIo::new(wire, buffer.slice(8192..));
        assert!(buffer.is_unique(), "an empty view must not keep the 8 KiB buffer alive");
        drop(io);
    }

    #[tokio::test]
    async fn bytes_read_past_the_upgrade_are_read_first() {
        let (wire, mut client) = pair().await;
        let mut io = WireIo::new(wire, Bytes::from_static(b"early "));
        client.write_all(b"later").await.unwrap();
        let mut got = vec![0u8; 11];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"early later");
    }
}
