//! `enbd-faultproxy`: the fault-injection TCP proxy as a program, for scripts and the VM
//! suite. Prints `listening ADDR` once ready, then takes one command per line on stdin (and,
//! with `--control`, on TCP connections to that address) and answers each with one line.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use enbd_e2e::faultproxy::{Command, FaultProxy};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "enbd-faultproxy",
    about = "TCP proxy that resets, stalls, delays and refuses connections on command",
    after_help = "Commands: reset [ID] | close [ID] | stall | resume | delay MS | refuse on|off | upstream IP:PORT | list"
)]
struct Cli {
    /// Address to accept clients on (port 0 picks one; the chosen address is printed).
    #[arg(long, env = "ENBD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to forward connections.
    #[arg(long, env = "ENBD_UPSTREAM")]
    upstream: SocketAddr,
    /// Optional TCP address that also accepts command lines.
    #[arg(long, env = "ENBD_CONTROL")]
    control: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let proxy = Arc::new(
        FaultProxy::start(cli.listen, cli.upstream)
            .await
            .with_context(|| format!("listening on {}", cli.listen))?,
    );
    if let Some(addr) = cli.control {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("control listener on {addr}"))?;
        println!("control {}", listener.local_addr()?);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let (r, w) = sock.into_split();
                    let _ = command_loop(&proxy, BufReader::new(r), w).await;
                });
            }
        });
    }
    println!("listening {}", proxy.local_addr());
    // stdin closing (e.g. the script that started us exited) ends the proxy only when there
    // is no control port to keep it useful.
    command_loop(
        &proxy,
        BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
    )
    .await?;
    if cli.control.is_some() {
        std::future::pending::<()>().await;
    }
    Ok(())
}

async fn command_loop<R, W>(
    proxy: &FaultProxy,
    reader: BufReader<R>,
    mut out: W,
) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = reader.lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match line.parse::<Command>() {
            Ok(cmd) => proxy.apply(&cmd),
            Err(e) => format!("err {e}"),
        };
        out.write_all(answer.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    Ok(())
}
