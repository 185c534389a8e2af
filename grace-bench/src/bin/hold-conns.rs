//! `hold-conns --addr 127.0.0.1:PORT --conns 10000`
//!
//! Opens N keep-alive HTTP/1.1 connections, sends one `GET /` on each and reads the whole
//! response, so that every connection is idle on the server. Then prints
//! `established N` on stdout and holds the connections until stdin closes or it is killed.
//!
//! With `--quiet`, the held sockets are taken out of tokio's epoll set once established, so
//! the holder sleeps through the server closing them: nothing in this process wakes up to
//! compete with the server for a CPU (the kernel still answers the server's FINs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Hold N idle keep-alive HTTP/1.1 connections to a server")]
struct Args {
    /// Server address.
    #[arg(long)]
    addr: SocketAddr,
    /// How many connections to open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Hold the sockets outside epoll once established (see above).
    #[arg(long)]
    quiet: bool,
    /// How many connections are opened at the same time.
    #[arg(long, default_value_t = 128)]
    parallel: usize,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Connects, sends one request and reads its response (status 200, `Content-Length` body).
async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST).await?;
    let mut buf = Vec::with_capacity(256);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the response ended");
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("unexpected response: {head}");
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        if buf.len() >= end + 4 + len {
            return Ok(s);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    grace_bench::raise_nofile()?;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.parallel.max(1) {
        let next = Arc::clone(&next);
        let (addr, total) = (args.addr, args.conns);
        workers.spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                held.push(open(addr).await?);
            }
            anyhow::Ok(held)
        });
    }
    let mut held = Vec::with_capacity(args.conns);
    while let Some(result) = workers.join_next().await {
        held.extend(result??);
    }
    // Deregistered from epoll: plain descriptors that nothing polls.
    let quiet: Vec<std::net::TcpStream> = if args.quiet {
        held.drain(..)
            .map(|s| s.into_std())
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    println!("established {}", held.len() + quiet.len());
    eprintln!(
        "hold-conns: {} connections in {:?}",
        held.len(),
        started.elapsed()
    );
    // Hold until stdin closes (the harness exits) or we are killed.
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    drop(held);
    drop(quiet);
    Ok(())
}
