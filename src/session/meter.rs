//! `Metered`: the client's socket as tungstenite reads it, with every WebSocket frame counted
//! against the session's frame budget (`limits.client_frames_per_second`) as it arrives.
//!
//! Counting happens here, below tungstenite, because tungstenite answers pings and gathers
//! continuation frames itself: a flood of pings, pongs or empty continuation frames would never
//! reach the session as messages, yet each costs a parse (and a ping a pong). Only frame
//! headers are followed (2 to 14 bytes each, then the payload length is skipped); tungstenite
//! still does all the parsing and checking. When the budget runs out, the read fails with
//! [`FrameFlood`], and from then on bytes pass uncounted so the session can close with 4003
//! and linger.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::rate::TokenBucket;

/// The error a [`Metered`] read fails with when the client sent too many frames.
#[derive(Debug, thiserror::Error)]
#[error("too many client frames per second")]
pub struct FrameFlood;

impl FrameFlood {
    /// Whether `error` is this one.
    pub fn is(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|inner| inner.is::<FrameFlood>())
    }
}

/// A socket whose incoming WebSocket frames are counted.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    rate: f64,
    bucket: TokenBucket,
    frames: FrameCounter,
    /// The budget ran out: stop counting.
    tripped: bool,
}

impl<S> Metered<S> {
    pub fn new(inner: S, frames_per_second: u32) -> Self {
        Self {
            inner,
            rate: f64::from(frames_per_second),
            bucket: TokenBucket::new(),
            frames: FrameCounter::default(),
            tripped: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.tripped || !matches!(result, Poll::Ready(Ok(()))) {
            return result;
        }
        let started = this.frames.feed(&buf.filled()[before..]);
        if started > 0 {
            let now = Instant::now();
            for _ in 0..started {
                if !this.bucket.take(this.rate, now) {
                    this.tripped = true;
                    return Poll::Ready(Err(io::Error::other(FrameFlood)));
                }
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Follows frame boundaries in a client's byte stream (RFC 6455 5.2): a 2-byte header, then a
/// 2- or 8-byte extended length, then a 4-byte mask if the mask bit is set, then the payload.
#[derive(Debug, Default)]
struct FrameCounter {
    header: [u8; 14],
    /// Header bytes gathered so far.
    have: u8,
    /// Payload bytes of the current frame still to skip.
    payload_left: u64,
}

impl FrameCounter {
    /// Consumes `bytes`; returns how many frames began in them (a frame counts once its whole
    /// header has arrived).
    fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut started = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left).unwrap_or(usize::MAX).min(bytes.len());
                bytes = &bytes[skip..];
                self.payload_left -= skip as u64;
                continue;
            }
            let need = self.header_len();
            let take = (need - usize::from(self.have)).min(bytes.len());
            let have = usize::from(self.have);
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            self.have += take as u8;
            bytes = &bytes[take..];
            // The length may have grown now that the second byte is known.
            if usize::from(self.have) == self.header_len() {
                started += 1;
                self.payload_left = self.payload_len();
                self.have = 0;
            }
        }
        started
    }

    /// Header length as far as it is known (2 until the second byte has arrived).
    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let second = self.header[1];
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn payload_len(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
            n => u64::from(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask = if masked { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(mask | n as u8),
            n if n <= 0xffff => {
                f.push(mask | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    #[test]
    fn counts_frames_of_every_length_form_across_any_split() {
        let mut stream = Vec::new();
        for (opcode, len, masked) in
            [(0x9, 0, true), (0x1, 5, true), (0x0, 0, true), (0x2, 300, true), (0x1, 70_000, false)]
        {
            stream.extend(frame(opcode, len, masked));
        }
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let mut counter = FrameCounter::default();
            let counted: usize = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(counted, 5, "chunks of {chunk}");
            assert_eq!((counter.have, counter.payload_left), (0, 0));
        }
    }

    #[test]
    fn a_header_counts_before_its_payload_arrives() {
        let mut counter = FrameCounter::default();
        let f = frame(0x1, 1000, true);
        assert_eq!(counter.feed(&f[..8]), 1);
        assert_eq!(counter.feed(&f[8..]), 0);
        assert_eq!(counter.feed(&frame(0x0, 0, true)), 1);
    }
}
