//! `lazypull-linkem`: emulates a wide-area link between registry clients and a registry, for
//! `make bench`.
//!
//! netem is not available on the benchmark machines, so a link is built from two parts:
//! * **bandwidth**: the registry runs in a network namespace whose loopback has a `tbf` qdisc
//!   (set up by `scripts/bench-coldstart.sh`); every byte the registry sends crosses it;
//! * **latency**: this relay, listening on the host's 127.0.0.1, opens its upstream connections
//!   *inside* that namespace (from a thread that has `setns`'d into it) and holds every chunk of
//!   data for half the round-trip time in each direction. Chunks are timestamped on arrival and
//!   released in order, so the delay does not throttle throughput (a pipe, not stop-and-wait);
//!   a new connection first waits one round trip, like a TCP handshake would.
//!
//! All traffic stays on loopback interfaces (the host's and the namespace's).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    /// Address to listen on (host namespace).
    #[arg(long)]
    listen: SocketAddr,
    /// Registry address, as seen inside the namespace.
    #[arg(long)]
    upstream: SocketAddr,
    /// Network namespace (`ip netns` name) the upstream lives in; none: this namespace.
    #[arg(long)]
    netns: Option<String>,
    /// Round-trip time to add, in milliseconds (half per direction).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
}

type ConnectRequest = oneshot::Sender<std::io::Result<std::net::TcpStream>>;

/// A thread inside the namespace that makes the upstream connections.
fn spawn_connector(netns: Option<String>, upstream: SocketAddr) -> Result<std::sync::mpsc::Sender<ConnectRequest>> {
    let (tx, rx) = std::sync::mpsc::channel::<ConnectRequest>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let path = format!("/run/netns/{ns}");
            let entered = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}")).and_then(|f| {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                    0 => Ok(()),
                    _ => Err(format!("setns {path}: {}", std::io::Error::last_os_error())),
                }
            });
            let failed = entered.is_err();
            let _ = ready_tx.send(entered);
            if failed {
                return;
            }
        } else {
            let _ = ready_tx.send(Ok(()));
        }
        for reply in rx {
            let _ = reply.send(std::net::TcpStream::connect(upstream));
        }
    });
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(tx),
        Ok(Err(e)) => bail!("entering the namespace: {e}"),
        Err(_) => bail!("connector thread died"),
    }
}

/// Copies `from` → `to`, each chunk released `delay` after it arrived.
async fn delayed_pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        loop {
            let mut buf = vec![0u8; 64 << 10];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now() + delay, buf)).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn relay(client: TcpStream, connector: std::sync::mpsc::Sender<ConnectRequest>, rtt: Duration) -> Result<()> {
    let (reply_tx, reply_rx) = oneshot::channel();
    connector.send(reply_tx).context("connector gone")?;
    let upstream = reply_rx.await.context("connector gone")?.context("connecting upstream")?;
    upstream.set_nonblocking(true)?;
    let upstream = TcpStream::from_std(upstream)?;
    upstream.set_nodelay(true)?;
    client.set_nodelay(true)?;
    tokio::time::sleep(rtt).await; // the handshake's round trip
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::join!(delayed_pipe(cr, uw, rtt / 2), delayed_pipe(ur, cw, rtt / 2));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let connector = spawn_connector(args.netns.clone(), args.upstream)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let rtt = Duration::from_secs_f64(args.rtt_ms.max(0.0) / 1000.0);
    eprintln!("linkem: {} -> {} (netns {:?}), rtt {:?}", args.listen, args.upstream, args.netns, rtt);
    loop {
        let (client, _) = listener.accept().await?;
        let connector = connector.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(client, connector, rtt).await {
                eprintln!("linkem: {e:#}");
            }
        });
    }
}
