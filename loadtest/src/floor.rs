//! The machine's floor: how many small writes per CPU-second loopback TCP takes. One thread
//! writes `size`-byte messages round-robin to `connections` sockets (as fan-out does); other
//! threads drain them. Only the writing thread's CPU time counts.
//!
//! By default the writer writes as fast as it can and two threads drain the sockets by
//! polling them, so no write has to wake a reader: the cost of the write alone. With `--rate`
//! the writer writes that many per second in 1 ms ticks (sleeping in between, as a node
//! between a publisher's pipelines) and the sockets are read by tasks of a two-thread tokio
//! runtime that sleep in `epoll_wait` when there is nothing to read, as a load generator's
//! (and a browser's) do. On loopback, waking the reader is done by the writing thread inside
//! its `write`, so this "paced floor" is what one delivery costs a node in `loadtest/run.sh
//! unicast` at that rate before the node does anything of its own.
//!
//! `--vectored` writes each message as two pieces (a 2-byte frame header and the rest) with one
//! `writev`, as fan-out did before it copied small frames into one buffer: the difference is
//! the kernel's vectored-write path alone.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Bytes per write (a small notification frame).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Writes per second in 1 ms ticks, read by sleeping (epoll) readers; 0: as fast as
    /// possible, read by polling threads.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Write each message with `writev` in two pieces (2 bytes, then the rest) instead of `send`.
    #[arg(long)]
    pub vectored: bool,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct FloorReport {
    connections: usize,
    rate: u64,
    size: usize,
    vectored: bool,
    writes: u64,
    seconds: f64,
    writer_cpu_seconds: f64,
    writes_per_cpu_second: f64,
    writes_per_second: f64,
}

/// One message: with `send`, or with `writev` in two pieces.
fn write_message(mut w: impl Write, message: &[u8], vectored: bool) -> std::io::Result<()> {
    if !vectored || message.len() < 3 {
        return w.write_all(message);
    }
    let (head, body) = message.split_at(2);
    let n = w.write_vectored(&[IoSlice::new(head), IoSlice::new(body)])?;
    // Blocking sockets: a short write only when the buffer filled; finish it plainly.
    if n < message.len() { w.write_all(&message[n..]) } else { Ok(()) }
}

/// CPU time of the calling thread, from /proc/thread-self/stat.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    ticks as f64 / 100.0
}

pub fn run(args: &FloorArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(args.connections);
    let mut readers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let w = TcpStream::connect(addr)?;
        w.set_nodelay(true)?;
        writers.push(w);
        readers.push(listener.accept()?.0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut drains = Vec::new();
    let mut epoll_readers = None;
    if args.rate == 0 {
        // Two drain threads, like clients reading on the other core.
        for chunk in split(readers, 2) {
            let stop = stop.clone();
            drains.push(std::thread::spawn(move || drain(chunk, &stop)));
        }
    } else {
        epoll_readers = Some(read_sleeping(readers)?);
    }
    let message = vec![b'x'; args.size];
    let started = Instant::now();
    let cpu_start = thread_cpu_seconds();
    let mut writes = 0u64;
    if args.rate == 0 {
        while started.elapsed() < args.duration {
            for w in &mut writers {
                write_message(w, &message, args.vectored)?;
                writes += 1;
            }
        }
    } else {
        let tick = Duration::from_millis(1);
        let mut next = started;
        let mut ring = writers.iter().cycle();
        let mut owed = 0.0f64;
        while started.elapsed() < args.duration {
            owed += args.rate as f64 / 1000.0;
            while owed >= 1.0 {
                if let Some(mut w) = ring.next() {
                    write_message(&mut w, &message, args.vectored)?;
                }
                writes += 1;
                owed -= 1.0;
            }
            next += tick;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let cpu = thread_cpu_seconds() - cpu_start;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    drop(writers);
    for d in drains {
        let _ = d.join();
    }
    if let Some(runtime) = epoll_readers {
        runtime.shutdown_background();
    }
    let report = FloorReport {
        connections: args.connections,
        rate: args.rate,
        size: args.size,
        vectored: args.vectored,
        writes,
        seconds,
        writer_cpu_seconds: cpu,
        writes_per_cpu_second: writes as f64 / cpu.max(1e-9),
        writes_per_second: writes as f64 / seconds,
    };
    let paced = if args.rate > 0 { format!(" paced at {}/s to sleeping readers", args.rate) } else { String::new() };
    let how = if args.vectored { " (writev, 2 pieces)" } else { "" };
    println!(
        "floor{paced}{how}: {} writes of {} bytes to {} sockets in {:.2} s; writer CPU {:.2} s: {:.0} writes per CPU-second ({:.0}/s wall)",
        report.writes,
        report.size,
        report.connections,
        report.seconds,
        report.writer_cpu_seconds,
        report.writes_per_cpu_second,
        report.writes_per_second
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn split(mut v: Vec<TcpStream>, parts: usize) -> Vec<Vec<TcpStream>> {
    let size = v.len().div_ceil(parts.max(1)).max(1);
    let mut out = Vec::new();
    while !v.is_empty() {
        let rest = v.split_off(size.min(v.len()));
        out.push(v);
        v = rest;
    }
    out
}

/// Reads every socket in a task of a two-thread tokio runtime: readers that sleep in
/// `epoll_wait` while nothing arrives. Shut down by the caller.
fn read_sleeping(readers: Vec<TcpStream>) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_io().build()?;
    for socket in readers {
        socket.set_nonblocking(true)?;
        runtime.spawn(async move {
            use tokio::io::AsyncReadExt;
            let Ok(mut socket) = tokio::net::TcpStream::from_std(socket) else { return };
            let mut buf = [0u8; 4096];
            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
    Ok(runtime)
}

/// Reads every socket non-blockingly until told to stop.
fn drain(mut sockets: Vec<TcpStream>, stop: &AtomicBool) {
    for s in &sockets {
        let _ = s.set_nonblocking(true);
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Acquire) {
        let mut idle = true;
        for s in &mut sockets {
            if let Ok(n) = s.read(&mut buf)
                && n > 0
            {
                idle = false;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
