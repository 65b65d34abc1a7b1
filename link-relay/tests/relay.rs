//! The relay over real sockets on 127.0.0.1: delay, integrity and order, the buffer bound, an
//! unreachable upstream, silent stalls, stopping, and the binary.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use link_relay::{Config, Handle, DEFAULT_MAX_BUFFER};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, RwLock};
use tokio::time::{timeout, Instant};

const MIB: usize = 1024 * 1024;

/// The machine has two cores: tests that measure latency hold this exclusively, so that the bulk
/// transfers of other tests (which share it) cannot inflate what they measure.
static CPU: RwLock<()> = RwLock::const_new(());

async fn start_relay(upstream: SocketAddr, delay_ms: u64, max_buffer: usize) -> Handle {
    link_relay::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_string(),
        delay: Duration::from_millis(delay_ms),
        max_buffer,
    })
    .await
    .expect("relay starts")
}

/// Echoes every connection on `listener` until the test's runtime ends.
fn serve_echo(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_echo(listener);
    addr
}

/// Times `n` round trips of a small message through `addr`, on one connection.
async fn round_trips(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut back = [0u8; 32];
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let message = [i as u8; 32];
        let start = Instant::now();
        stream.write_all(&message).await.unwrap();
        stream.read_exact(&mut back).await.unwrap();
        rtts.push(start.elapsed());
        assert_eq!(back, message);
    }
    rtts
}

fn median(rtts: &[Duration]) -> Duration {
    let mut sorted = rtts.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// splitmix64: a seeded stream that is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes `data` in pieces of 1 to 100 000 bytes.
async fn write_in_random_pieces(to: &mut (impl AsyncWrite + Unpin), data: &[u8], seed: u64) {
    let mut rng = Rng(seed);
    let mut at = 0;
    while at < data.len() {
        let n = (1 + (rng.next() % 100_000) as usize).min(data.len() - at);
        to.write_all(&data[at..at + n]).await.unwrap();
        at += n;
    }
}

/// Reads to EOF; returns the byte count and SHA-256 of what was read.
async fn count_and_hash(from: &mut (impl AsyncRead + Unpin)) -> (usize, Vec<u8>) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut count = 0;
    loop {
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            return (count, hasher.finalize().to_vec());
        }
        hasher.update(&buf[..n]);
        count += n;
    }
}

fn digest(data: &[u8]) -> (usize, Vec<u8>) {
    (data.len(), Sha256::digest(data).to_vec())
}

#[tokio::test]
async fn round_trip_gains_twice_the_delay() {
    let _cpu = CPU.write().await;
    timeout(Duration::from_secs(20), async {
        let echo = echo_server().await;

        let relay = start_relay(echo, 40, DEFAULT_MAX_BUFFER).await;
        let rtts = round_trips(relay.addr, 20).await;
        assert!(rtts.iter().all(|rtt| *rtt >= Duration::from_millis(80)), "a round trip under 2 × 40 ms: {rtts:?}");
        assert!(median(&rtts) < Duration::from_millis(110), "median over 80 + 30 ms: {rtts:?}");
        relay.stop().await;

        let plain = start_relay(echo, 0, DEFAULT_MAX_BUFFER).await;
        let rtts = round_trips(plain.addr, 20).await;
        assert!(median(&rtts) < Duration::from_millis(20), "delay 0 is not a plain relay: {rtts:?}");
        plain.stop().await;
    })
    .await
    .expect("finished within 20 s");
}

#[tokio::test]
async fn client_to_upstream_keeps_every_byte_in_order() {
    let _cpu = CPU.read().await;
    timeout(Duration::from_secs(60), async {
        let data = Rng(1).bytes(16 * MIB);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let received = count_and_hash(&mut stream).await;
            stream.shutdown().await.unwrap();
            received
        });
        let relay = start_relay(upstream, 5, DEFAULT_MAX_BUFFER).await;

        let mut client = TcpStream::connect(relay.addr).await.unwrap();
        write_in_random_pieces(&mut client, &data, 2).await;
        client.shutdown().await.unwrap();
        // The sink only returns once it has seen EOF, so this also proves the half-close arrived.
        assert_eq!(sink.await.unwrap(), digest(&data));
        // And the sink's own half-close comes back to the client.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(relay.stats().bytes_to_upstream, data.len() as u64);
        assert_eq!(relay.stats().connections, 1);
        relay.stop().await;
    })
    .await
    .expect("finished within 60 s");
}

#[tokio::test]
async fn upstream_to_client_keeps_every_byte_in_order() {
    let _cpu = CPU.read().await;
    timeout(Duration::from_secs(60), async {
        let data = Rng(3).bytes(16 * MIB);
        let expected = digest(&data);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let source = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            write_in_random_pieces(&mut stream, &data, 4).await;
            stream.shutdown().await.unwrap();
            // Waits for the client's half-close to come through before closing.
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            rest.len()
        });
        let relay = start_relay(upstream, 5, DEFAULT_MAX_BUFFER).await;

        let mut client = TcpStream::connect(relay.addr).await.unwrap();
        assert_eq!(count_and_hash(&mut client).await, expected);
        client.shutdown().await.unwrap();
        assert_eq!(source.await.unwrap(), 0);
        assert_eq!(relay.stats().bytes_to_client, expected.0 as u64);
        relay.stop().await;
    })
    .await
    .expect("finished within 60 s");
}

#[tokio::test]
async fn queue_stays_bounded_while_upstream_stalls() {
    let _cpu = CPU.read().await;
    timeout(Duration::from_secs(60), async {
        let data = Rng(5).bytes(32 * MIB);
        let expected = digest(&data);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            count_and_hash(&mut stream).await
        });
        let relay = start_relay(upstream, 5, MIB).await;

        let mut client = TcpStream::connect(relay.addr).await.unwrap();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        assert_eq!(sink.await.unwrap(), expected);
        let _client = writer.await.unwrap();
        let stats = relay.stats();
        assert!(stats.max_queued <= MIB + 64 * 1024, "queued more than the bound: {stats:?}");
        // Otherwise the stall never pushed back on the relay and the bound was not exercised.
        assert!(stats.max_queued >= MIB / 2, "the queue never filled: {stats:?}");
        assert_eq!(stats.bytes_to_upstream, expected.0 as u64);
        relay.stop().await;
    })
    .await
    .expect("finished within 60 s");
}

#[tokio::test]
async fn unreachable_upstream_closes_the_client_and_relay_recovers() {
    timeout(Duration::from_secs(20), async {
        // A port that was free a moment ago, so connecting to it is refused.
        let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let relay = start_relay(upstream, 5, DEFAULT_MAX_BUFFER).await;

        let mut client = TcpStream::connect(relay.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = timeout(Duration::from_secs(2), client.read(&mut buf)).await.expect("client closed within 2 s");
        assert!(matches!(read, Ok(0) | Err(_)), "client got data: {read:?}");
        assert_eq!(relay.stats().upstream_failures, 1);

        serve_echo(TcpListener::bind(upstream).await.unwrap());
        let rtts = round_trips(relay.addr, 1).await;
        assert!(rtts[0] >= Duration::from_millis(10));
        let stats = relay.stats();
        assert_eq!((stats.connections, stats.upstream_failures), (2, 1));
        relay.stop().await;
    })
    .await
    .expect("finished within 20 s");
}

/// An upstream that hands each accepted connection to the test, to drive its server side.
async fn upstream_server() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            if sender.send(stream).is_err() {
                return;
            }
        }
    });
    (addr, receiver)
}

/// Connects a client through the relay and returns it with the upstream's side of the
/// connection, after one message each way got through.
async fn relayed_pair(relay: SocketAddr, accepted: &mut mpsc::UnboundedReceiver<TcpStream>) -> (TcpStream, TcpStream) {
    let mut client = TcpStream::connect(relay).await.unwrap();
    client.set_nodelay(true).unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut server = accepted.recv().await.unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    server.write_all(b"world").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"world");
    (client, server)
}

/// What a read on `stream` gives within `within`: None when it is still waiting, which is what a
/// silently stalled connection must show (data or EOF would both be wrong).
async fn read_within(stream: &mut TcpStream, within: Duration) -> Option<std::io::Result<usize>> {
    let mut buf = [0u8; 1024];
    timeout(within, stream.read(&mut buf)).await.ok()
}

#[tokio::test]
async fn stall_silences_open_connections_and_relays_new_ones() {
    let _cpu = CPU.read().await;
    timeout(Duration::from_secs(30), async {
        let (upstream, mut accepted) = upstream_server().await;
        let relay = start_relay(upstream, 5, MIB).await;
        let (mut old_client, mut old_server) = relayed_pair(relay.addr, &mut accepted).await;
        let before = relay.stats();

        assert_eq!(relay.stall_existing().await, 1);
        old_client.write_all(b"lost to the upstream").await.unwrap();
        old_server.write_all(b"lost to the client").await.unwrap();
        // Neither data nor EOF (nor a reset) on either side.
        let (to_server, to_client) = tokio::join!(
            read_within(&mut old_server, Duration::from_millis(500)),
            read_within(&mut old_client, Duration::from_millis(500)),
        );
        assert!(to_server.is_none(), "the upstream's side of a stalled connection read {to_server:?}");
        assert!(to_client.is_none(), "the client's side of a stalled connection read {to_client:?}");
        let after = relay.stats();
        assert_eq!(
            (after.bytes_to_upstream, after.bytes_to_client),
            (before.bytes_to_upstream, before.bytes_to_client)
        );
        assert_eq!(after.stalled, 1);

        // The relay no longer reads the stalled connection, so flow control pushes back on a
        // writer instead of the relay buffering: far more than any socket buffers never goes out.
        let flood = vec![7u8; 64 * MIB];
        let pushed = timeout(Duration::from_secs(2), old_client.write_all(&flood)).await;
        assert!(pushed.is_err(), "64 MiB written into a stalled connection without push-back");

        // A connection accepted after the stall is relayed normally, both ways.
        let (mut new_client, mut new_server) = relayed_pair(relay.addr, &mut accepted).await;
        let data = Rng(7).bytes(MIB);
        new_client.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        new_server.read_exact(&mut got).await.unwrap();
        assert!(got == data, "the new connection corrupted data");

        // A second stall counts only the connection opened since the first; the old one is still
        // silent rather than closed.
        assert_eq!(relay.stall_existing().await, 1);
        assert_eq!(relay.stall_existing().await, 0);
        assert_eq!(relay.stats().stalled, 2);
        assert!(read_within(&mut old_server, Duration::from_millis(100)).await.is_none());

        // Stopping the relay closes the stalled connections too.
        relay.stop().await;
        for stream in [&mut old_client, &mut old_server, &mut new_client, &mut new_server] {
            let mut buf = vec![0u8; 64 * 1024];
            // A stalled socket may still hold bytes the relay never read: read past them.
            let end = timeout(Duration::from_secs(5), async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(end.is_ok(), "a stalled connection still open 5 s after stop");
        }
    })
    .await
    .expect("finished within 30 s");
}

#[tokio::test]
async fn stop_closes_connections_and_the_listener() {
    timeout(Duration::from_secs(20), async {
        let echo = echo_server().await;
        let relay = start_relay(echo, 5, DEFAULT_MAX_BUFFER).await;
        let addr = relay.addr;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();

        relay.stop().await;
        let read = timeout(Duration::from_secs(2), client.read(&mut back)).await.expect("client closed within 2 s");
        assert!(matches!(read, Ok(0) | Err(_)), "client got data: {read:?}");
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after stop");
    })
    .await
    .expect("finished within 20 s");
}

#[tokio::test]
async fn start_rejects_a_bad_config() {
    timeout(Duration::from_secs(20), async {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for upstream in ["nonsense", "host:", ":80", "127.0.0.1:0", "127.0.0.1:99999"] {
            let config = Config::new(listen, upstream, Duration::ZERO);
            let err = link_relay::start(config).await.err().expect("bad upstream refused");
            assert!(err.to_string().contains(upstream), "{err}");
        }
        let mut config = Config::new(listen, "127.0.0.1:9", Duration::ZERO);
        config.max_buffer = 0;
        assert!(link_relay::start(config).await.is_err());
    })
    .await
    .expect("finished within 20 s");
}

/// Kills the child if a test fails before it exits on its own.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn relay_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_link-relay"));
    for var in ["LINK_RELAY_LISTEN", "LINK_RELAY_UPSTREAM", "LINK_RELAY_DELAY_MS", "LINK_RELAY_MAX_BUFFER"] {
        command.env_remove(var);
    }
    command
}

#[tokio::test]
async fn binary_prints_its_address_relays_and_exits_on_sigterm() {
    let _cpu = CPU.write().await;
    timeout(Duration::from_secs(30), async {
        let echo = echo_server().await;
        let mut child = Child(
            relay_command()
                .args(["--listen", "127.0.0.1:0", "--upstream", &echo.to_string()])
                .env("LINK_RELAY_DELAY_MS", "20.5")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let addr: SocketAddr = line
            .strip_prefix("link-relay listening on ")
            .and_then(|rest| rest.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));

        let rtts = round_trips(addr, 1).await;
        assert!(rtts[0] >= Duration::from_millis(41), "{rtts:?}");

        let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "exit after SIGTERM: {status}");
    })
    .await
    .expect("finished within 30 s");
}

#[tokio::test]
async fn binary_stalls_open_connections_on_sigusr1() {
    timeout(Duration::from_secs(30), async {
        let (upstream, mut accepted) = upstream_server().await;
        let mut child = Child(
            relay_command()
                .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.to_string(), "--delay-ms", "0"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let stderr = child.0.stderr.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let addr: SocketAddr = line
            .strip_prefix("link-relay listening on ")
            .and_then(|rest| rest.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        // Every stderr line, as it comes.
        let (lines_sender, mut lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_sender.send(line);
            }
        });

        let (mut old_client, mut old_server) = relayed_pair(addr, &mut accepted).await;
        let killed = Command::new("kill").args(["-USR1", &child.0.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let logged = timeout(Duration::from_secs(5), async {
            while let Some(line) = lines.recv().await {
                if line.contains("SIGUSR1") {
                    return line;
                }
            }
            panic!("stderr closed before the stall was logged");
        })
        .await
        .expect("the stall logged within 5 s");
        assert!(logged.contains("stalled 1 "), "{logged}");
        assert!(child.0.try_wait().unwrap().is_none(), "the relay exited on SIGUSR1");

        old_client.write_all(b"lost").await.unwrap();
        old_server.write_all(b"lost").await.unwrap();
        let (to_server, to_client) = tokio::join!(
            read_within(&mut old_server, Duration::from_millis(500)),
            read_within(&mut old_client, Duration::from_millis(500)),
        );
        assert!(to_server.is_none() && to_client.is_none(), "a stalled connection read {to_server:?} {to_client:?}");
        relayed_pair(addr, &mut accepted).await;
    })
    .await
    .expect("finished within 30 s");
}

/// Runs the binary to completion; returns its exit code and stderr.
async fn run_failing(args: &[&str]) -> (Option<i32>, String) {
    let mut command = relay_command();
    command.args(args).stdout(Stdio::null());
    let output = timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || command.output().unwrap()))
        .await
        .expect("exited within 20 s")
        .unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn binary_reports_bad_input() {
    let (code, stderr) = run_failing(&["--listen", "127.0.0.1:0", "--delay-ms", "5"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--upstream"), "{stderr}");

    let (code, stderr) = run_failing(&["--listen", "nowhere", "--upstream", "127.0.0.1:9", "--delay-ms", "5"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("nowhere"), "{stderr}");

    let (code, stderr) = run_failing(&["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--delay-ms=-3"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("-3") && stderr.contains("0 or more"), "{stderr}");

    let (code, stderr) = run_failing(&["--listen", "127.0.0.1:0", "--upstream", "nonsense", "--delay-ms", "5"]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("nonsense"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_failing(&["--listen", &taken, "--upstream", "127.0.0.1:9", "--delay-ms", "5"]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&taken), "{stderr}");
}
