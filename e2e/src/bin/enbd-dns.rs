//! `enbd-dns`: the cluster DNS of the real-cluster harness (e2e/cluster/). CoreDNS cannot be
//! built offline here; this answers what the chart and the tests need — A records for
//! Services and for the pods of headless Services (see `enbd_e2e::dns`) — from Services and
//! EndpointSlices watched with kube-rs. Authoritative for the cluster domain, NXDOMAIN for
//! everything else (the cluster has no upstream resolver). UDP and TCP on one address.
//!
//! Credentials: the usual kubeconfig lookup (KUBECONFIG, ~/.kube/config, in-cluster).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use enbd_e2e::dns::{UDP_LIMIT, Zone, answer};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Parser, Debug)]
#[command(about = "Cluster DNS for the ENBD test cluster (Services and headless StatefulSet pods)")]
struct Args {
    /// UDP and TCP address to answer on.
    #[arg(long, default_value = "10.88.0.1:53")]
    listen: SocketAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
}

/// The watched objects; a zone is built from them for every query (a test cluster holds a
/// few dozen Services: cheaper than keeping an index in step).
struct Cluster {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    domain: String,
}

impl Cluster {
    fn zone(&self) -> Zone {
        let services: Vec<Service> = self
            .services
            .state()
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let slices: Vec<EndpointSlice> =
            self.slices.state().iter().map(|s| (**s).clone()).collect();
        Zone::build(&self.domain, &services, &slices)
    }
}

fn watch<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watch error (retrying)");
            }
        }
    });
    reader
}

async fn serve_udp(socket: UdpSocket, cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await.context("udp receive")?;
        match answer(&cluster.zone(), &buf[..n], UDP_LIMIT) {
            Ok(resp) => {
                if let Err(e) = socket.send_to(&resp, peer).await {
                    tracing::debug!(%peer, error = %e, "udp send");
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "dropped"),
        }
    }
}

/// One TCP connection: length-prefixed queries until the client closes.
async fn serve_tcp_conn(mut conn: TcpStream, cluster: Arc<Cluster>) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut query).await?;
        let Ok(resp) = answer(&cluster.zone(), &query, usize::from(u16::MAX)) else {
            return Ok(());
        };
        let Ok(resp_len) = u16::try_from(resp.len()) else {
            return Ok(());
        };
        conn.write_all(&resp_len.to_be_bytes()).await?;
        conn.write_all(&resp).await?;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let client = Client::try_default().await.context("kubeconfig")?;
    let cluster = Arc::new(Cluster {
        services: watch(Api::<Service>::all(client.clone())),
        slices: watch(Api::<EndpointSlice>::all(client)),
        domain: args.domain.clone(),
    });
    // No answers before the first list: an early NXDOMAIN would be cached by nobody, but a
    // test would see it fail.
    cluster
        .services
        .wait_until_ready()
        .await
        .context("services watch")?;
    cluster
        .slices
        .wait_until_ready()
        .await
        .context("endpointslices watch")?;
    let udp = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("bind udp {}", args.listen))?;
    let tcp = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind tcp {}", args.listen))?;
    tracing::info!(listen = %args.listen, domain = %args.domain, "enbd-dns serving");
    let udp_task = tokio::spawn(serve_udp(udp, cluster.clone()));
    loop {
        tokio::select! {
            accepted = tcp.accept() => {
                let (conn, peer) = accepted.context("tcp accept")?;
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp_conn(conn, cluster).await {
                        tracing::debug!(%peer, error = %e, "tcp connection");
                    }
                });
            }
            done = tokio::signal::ctrl_c() => {
                done.context("signal")?;
                udp_task.abort();
                return Ok(());
            }
        }
    }
}
