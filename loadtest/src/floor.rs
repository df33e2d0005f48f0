//! The machine's floor: how many small writes per CPU-second loopback TCP takes. One thread
//! writes `size`-byte messages round-robin to `connections` sockets (as fan-out does); other
//! threads drain them. Only the writing thread's CPU time counts.

use std::io::{Read, Write};
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
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct FloorReport {
    connections: usize,
    size: usize,
    writes: u64,
    seconds: f64,
    writer_cpu_seconds: f64,
    writes_per_cpu_second: f64,
    writes_per_second: f64,
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
    // Two drain threads, like clients reading on the other core.
    let stop = Arc::new(AtomicBool::new(false));
    let mut drains = Vec::new();
    for chunk in split(readers, 2) {
        let stop = stop.clone();
        drains.push(std::thread::spawn(move || drain(chunk, &stop)));
    }
    let message = vec![b'x'; args.size];
    let started = Instant::now();
    let cpu_start = thread_cpu_seconds();
    let mut writes = 0u64;
    while started.elapsed() < args.duration {
        for w in &mut writers {
            w.write_all(&message)?;
            writes += 1;
        }
    }
    let cpu = thread_cpu_seconds() - cpu_start;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    drop(writers);
    for d in drains {
        let _ = d.join();
    }
    let report = FloorReport {
        connections: args.connections,
        size: args.size,
        writes,
        seconds,
        writer_cpu_seconds: cpu,
        writes_per_cpu_second: writes as f64 / cpu.max(1e-9),
        writes_per_second: writes as f64 / seconds,
    };
    println!(
        "floor: {} writes of {} bytes to {} sockets in {:.2} s; writer CPU {:.2} s: {:.0} writes per CPU-second ({:.0}/s wall)",
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
