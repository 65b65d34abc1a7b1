//! A TCP relay that delivers every chunk it reads exactly `delay` later, in each direction, in
//! order, with bounded buffering.
//!
//! The lab kernel has tbf/htb qdiscs (rate) but no netem (delay), so the one-way latency between
//! the edge and cloud namespaces is added here, in user space: the edge connects to the relay on
//! loopback, and the relay connects across the rate-shaped veth pair to the cloud server.
//!
//! What this does not emulate: the TCP handshake is not delayed (a client's connect completes at
//! once against the relay), so a new connection's first exchange is 2 × delay shorter than on a real
//! link; and a direction carries at most `max_buffer` bytes per `delay`, the relay's in-flight
//! window, which should stay well above the shaped rate × delay.
//!
//! For fault injection, [`Handle::stall_existing`] makes the connections open at that moment go
//! silent, as a NAT timeout or a Wi-Fi drop does to a TCP connection: no FIN, no RST, the bytes
//! just stop arriving, while connections accepted afterwards are relayed normally. It tests what
//! only an end-to-end liveness check (an HTTP/2 PING with a timeout) can notice.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Largest read, hence the largest chunk queued at once.
pub const CHUNK: usize = 64 * 1024;

/// Default for [`Config::max_buffer`].
pub const DEFAULT_MAX_BUFFER: usize = 8 * 1024 * 1024;

/// Every chunk also costs this much of the buffer budget, so that a flood of tiny reads cannot hold
/// far more memory (allocations, queue nodes) than the bytes it carries.
const CHUNK_OVERHEAD: usize = 64;

/// What to relay, where, and with how much delay.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address clients connect to (port 0 picks a free one; see [`Handle::addr`]).
    pub listen: SocketAddr,
    /// Server each connection is relayed to, as `host:port`; resolved again for every connection.
    pub upstream: String,
    /// One-way delay added to each direction (zero: a plain relay).
    pub delay: Duration,
    /// Most bytes queued per direction per connection; when full, the relay stops reading from
    /// that sender, so TCP flow control pushes back on it instead of the relay growing.
    pub max_buffer: usize,
}

impl Config {
    /// A config with the default buffer bound.
    pub fn new(listen: SocketAddr, upstream: impl Into<String>, delay: Duration) -> Self {
        Config { listen, upstream: upstream.into(), delay, max_buffer: DEFAULT_MAX_BUFFER }
    }
}

/// Counters since [`start`], over all connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client connections accepted.
    pub connections: u64,
    /// Accepted connections closed because the upstream could not be reached.
    pub upstream_failures: u64,
    /// Bytes delivered from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered from the upstream to clients.
    pub bytes_to_client: u64,
    /// Most payload bytes ever queued at once in one direction of one connection.
    pub max_queued: usize,
    /// Connections silenced by [`Handle::stall_existing`], in all.
    pub stalled: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    upstream_failures: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    max_queued: AtomicUsize,
    stalled: AtomicU64,
}

/// A stall request: the connection answers on the enclosed sender once it has stopped relaying.
type StallRequest = oneshot::Sender<()>;

/// The connections still relaying, by accept order, each with the means to stall it. A
/// connection leaves when it ends or when it is stalled, so a second stall only counts the
/// connections accepted since the first.
#[derive(Default)]
struct Relaying {
    next_id: AtomicU64,
    stall: Mutex<HashMap<u64, oneshot::Sender<StallRequest>>>,
}

impl Relaying {
    fn register(self: &Arc<Self>) -> (Registration, oneshot::Receiver<StallRequest>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.stall.lock().expect("no code panics while holding the registry").insert(id, sender);
        (Registration { id, relaying: self.clone() }, receiver)
    }
}

/// Takes its connection out of [`Relaying`] when the connection's task ends, however it ends.
struct Registration {
    id: u64,
    relaying: Arc<Relaying>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.relaying.stall.lock().expect("no code panics while holding the registry").remove(&self.id);
    }
}

/// A running relay. Dropping it also stops the relay, without waiting for it.
pub struct Handle {
    /// The address actually bound (the chosen port when [`Config::listen`] had port 0).
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    relaying: Arc<Relaying>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops accepting, closes every relayed connection (dropping what is still queued), stalled
    /// ones included, and waits until that is done.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            connections: c.connections.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
            bytes_to_upstream: c.to_upstream.load(Ordering::Relaxed),
            bytes_to_client: c.to_client.load(Ordering::Relaxed),
            max_queued: c.max_queued.load(Ordering::Relaxed),
            stalled: c.stalled.load(Ordering::Relaxed),
        }
    }

    /// Silently stalls every connection open now, in both directions, as a NAT timeout or a
    /// Wi-Fi drop would: its sockets stay open (no FIN, no RST) but nothing more is delivered, and
    /// what was queued for delay is dropped. Connections accepted afterwards are relayed normally.
    /// Returns how many connections it stalled (those stalled before are not counted again), once
    /// every one of them has stopped relaying, so nothing written after this returns gets through.
    ///
    /// A stalled connection is no longer read, so TCP flow control pushes back on its senders
    /// once the socket buffers are full and it holds bounded memory. Its two sockets stay open
    /// until [`Handle::stop`]. Unlike a real black hole, the relay's kernel still acknowledges
    /// what fits in those buffers, so TCP keepalive probes keep succeeding: only an end-to-end
    /// check, such as an HTTP/2 PING with a timeout, notices the stall.
    pub async fn stall_existing(&self) -> usize {
        let open = std::mem::take(&mut *self.relaying.stall.lock().expect("no code panics while holding the registry"));
        let mut acknowledgements = Vec::with_capacity(open.len());
        for stall in open.into_values() {
            let (ack, acknowledged) = oneshot::channel();
            // A send fails only when the connection ended meanwhile: nothing left to stall.
            if stall.send(ack).is_ok() {
                acknowledgements.push(acknowledged);
            }
        }
        let mut stalled = 0;
        for acknowledged in acknowledgements {
            // An error means the connection ended before it saw the request.
            if acknowledged.await.is_ok() {
                stalled += 1;
            }
        }
        self.counters.stalled.fetch_add(stalled as u64, Ordering::Relaxed);
        debug!("stalled {stalled} connections");
        stalled
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays free for the
/// listening line that scripts read.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Checks the config, binds [`Config::listen`] and relays connections in the background until
/// [`Handle::stop`]. Errors name the value at fault: an upstream that is not `host:port` or does
/// not resolve, a zero or oversized `max_buffer`, or an address that cannot be bound.
pub async fn start(config: Config) -> io::Result<Handle> {
    check_upstream(&config.upstream).await?;
    if config.max_buffer == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "max buffer must be at least 1 byte"));
    }
    if config.max_buffer > Semaphore::MAX_PERMITS {
        let message = format!("max buffer {} exceeds {} bytes", config.max_buffer, Semaphore::MAX_PERMITS);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr()?;
    info!(
        "relaying {addr} -> {} with {} ms one-way delay, {} bytes buffered per direction",
        config.upstream,
        config.delay.as_secs_f64() * 1e3,
        config.max_buffer
    );
    let counters = Arc::new(Counters::default());
    let relaying = Arc::new(Relaying::default());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, Arc::new(config), counters.clone(), relaying.clone(), stopped));
    Ok(Handle { addr, counters, relaying, stop, task })
}

/// Fails early on a malformed or unresolvable upstream rather than on every connection later.
async fn check_upstream(upstream: &str) -> io::Result<()> {
    let well_formed = upstream
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !well_formed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("upstream {upstream:?} is not HOST:PORT (port 1 to 65535)"),
        ));
    }
    let mut addrs = tokio::net::lookup_host(upstream)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve upstream {upstream:?}: {e}")))?;
    if addrs.next().is_none() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("upstream {upstream:?} has no address")));
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<Config>,
    counters: Arc<Counters>,
    relaying: Arc<Relaying>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Either a stop request or the handle being dropped.
            _ = &mut stopped => break,
            // Reap finished connections so the set does not grow with every client ever seen.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    // Registered before anything else can happen, so that a stall from now on
                    // reaches this connection.
                    let (registration, stall) = relaying.register();
                    connections.spawn(relay_connection(
                        client,
                        peer,
                        config.clone(),
                        counters.clone(),
                        registration,
                        stall,
                    ));
                }
                Err(e) => {
                    // Typically out of file descriptors: pause so that open connections can finish
                    // and free some, instead of spinning on an error that repeats at once.
                    warn!("accept on {} failed: {e}", config.listen);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Relays one connection until it ends, or until it is stalled: then it holds both sockets
/// without reading or writing until the relay stops and the task is aborted.
async fn relay_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    counters: Arc<Counters>,
    registration: Registration,
    mut stall: oneshot::Receiver<StallRequest>,
) {
    // Owned here rather than by the relaying future: a stall drops that future, and the sockets
    // must outlive it, or closing them would send the FIN a silent stall must not send.
    let mut upstream = None;
    let relaying = relay(&mut client, &mut upstream, peer, &config, &counters);
    let ack = tokio::select! {
        // Checked first on every wake-up, so that no byte is relayed once a stall was requested.
        biased;
        // Only a request stalls: an error just means the relay stopped, and the task is aborted.
        Ok(ack) = &mut stall => ack,
        result = relaying => {
            match result {
                Ok(()) => debug!("connection from {peer} closed"),
                Err(e) => debug!("connection from {peer} ended: {e}"),
            }
            return;
        }
    };
    // Dropping the relaying future dropped what it had queued; only the sockets remain.
    drop(registration);
    let _ = ack.send(());
    debug!("connection from {peer} stalled");
    let _held = (client, upstream);
    std::future::pending::<()>().await;
}

/// Connects to the upstream (kept in `upstream`) and relays both directions until both have
/// ended, or until the first error.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut Option<TcpStream>,
    peer: SocketAddr,
    config: &Config,
    counters: &Counters,
) -> io::Result<()> {
    let upstream = match TcpStream::connect(config.upstream.as_str()).await {
        Ok(stream) => upstream.insert(stream),
        Err(e) => {
            counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
            warn!("cannot connect to upstream {}: {e}; closing client {peer}", config.upstream);
            return Ok(());
        }
    };
    // Small RPC frames must not also wait for Nagle's algorithm on top of the emulated delay.
    for stream in [&*client, &*upstream] {
        if let Err(e) = stream.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY for {peer}: {e}");
        }
    }
    debug!("relaying {peer} to {}", config.upstream);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    // An error in either direction ends both; the caller then drops, and so closes, both sockets.
    tokio::try_join!(
        relay_direction(client_read, upstream_write, config, counters, &counters.to_upstream),
        relay_direction(upstream_read, client_write, config, counters, &counters.to_client),
    )
    .map(|_| ())
}

struct Chunk {
    due: Instant,
    data: Vec<u8>,
    /// Returns the chunk's share of the buffer budget when the chunk is dropped after writing.
    _budget: OwnedSemaphorePermit,
}

/// Copies `from` to `to`, delivering each chunk `config.delay` after it was read. Returns once
/// `from` reached EOF and everything read was written and `to` shut down (so a half-close reaches
/// the other side), or at the first error.
async fn relay_direction(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    config: &Config,
    counters: &Counters,
    delivered: &AtomicU64,
) -> io::Result<()> {
    let budget = Arc::new(Semaphore::new(config.max_buffer));
    let queued = AtomicUsize::new(0);
    let queued = &queued;
    // Unbounded in chunks, but each queued chunk holds budget permits, so bounded in bytes.
    let (sender, mut receiver) = mpsc::unbounded_channel::<Chunk>();

    let read = async move {
        let mut buf = vec![0u8; CHUNK.min(config.max_buffer)];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // Dropping the sender lets the writer drain the queue and then half-close.
                return Ok::<_, io::Error>(());
            }
            // Stamped before waiting for budget: the delay counts from when the bytes reached the
            // relay, as on a link where they would already be on the wire.
            let due = Instant::now() + config.delay;
            let cost = (n + CHUNK_OVERHEAD).min(config.max_buffer);
            let permit = budget.clone().acquire_many_owned(cost as u32).await.expect("the budget is never closed");
            let now_queued = queued.fetch_add(n, Ordering::Relaxed) + n;
            counters.max_queued.fetch_max(now_queued, Ordering::Relaxed);
            // Copied out so that a small read holds a small allocation, not the whole read buffer.
            let chunk = Chunk { due, data: buf[..n].to_vec(), _budget: permit };
            if sender.send(chunk).is_err() {
                // The writer stopped, which it only does on an error that ends the connection.
                return Ok(());
            }
        }
    };

    let write = async {
        while let Some(chunk) = receiver.recv().await {
            // A due time already past (always so with zero delay) must not cost a timer tick.
            if chunk.due > Instant::now() {
                tokio::time::sleep_until(chunk.due).await;
            }
            to.write_all(&chunk.data).await?;
            delivered.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            queued.fetch_sub(chunk.data.len(), Ordering::Relaxed);
        }
        to.shutdown().await
    };

    tokio::try_join!(read, write).map(|_| ())
}
