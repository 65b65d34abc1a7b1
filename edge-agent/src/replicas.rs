//! The cloud tier as the edge sees it: one or more `cloud-server` replicas, named by a list of
//! addresses (`a:50051,b:50051`) or by a DNS name that resolves to several (a Kubernetes headless
//! Service), re-resolved every `--resolve-interval-s`.
//!
//! gRPC keeps one HTTP/2 connection per address, so a plain Service address would pin every
//! forward of an edge to one pod; the edge balances itself instead. Each replica has its own
//! channel, and on it:
//!
//! * a `grpc.health.v1` Watch stream: forwards go only to replicas that report SERVING, and a
//!   replica whose stream breaks (killed, partitioned, restarting) gets none until it reports
//!   SERVING again (the stream is re-opened at least every second);
//! * a model check (`Control.Describe`) each time it reports SERVING: a replica serving another
//!   model than this edge's head (a rolling update half done) is refused, with one log line;
//! * its own backoff after failed forwards, and its own metrics (`endpoint` label).
//!
//! A batch goes to the usable replica with the fewest forwards in flight (round robin among
//! equals); [`crate::forward`] retries a failed forward once on another replica.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::DescribeRequest;
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_serving::telemetry;
use classynet_serving::wire::Metered;
use tokio::sync::{watch, Notify};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::cloud_client::{Backoff, Dialer, BACKOFF_MIN};
use crate::config::Config;

/// The service whose health decides whether a replica gets forwards.
const HEALTH_SERVICE: &str = "inference.GRPCInferenceService";
/// Longest wait between two attempts to open a replica's health stream: a restarted replica gets
/// forwards again within about this long after it reports SERVING.
const HEALTH_RETRY_MAX: Duration = Duration::from_secs(1);
/// How often the health stream of a replica that reports NOT_SERVING is re-opened.
const RECHECK_NOT_SERVING: Duration = Duration::from_secs(2);
/// Longest the opening of a health stream or a model check may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// While a DNS name resolves to nothing, how often to try again.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// One `--server` entry: a host (name or address literal) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    fn literal(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `--server`: `host:port`, a comma-separated list of them, each optionally with an
/// `http://` or `https://` prefix (TLS follows `--tls-ca`, not the prefix).
pub(crate) fn parse_targets(server: &str) -> anyhow::Result<Vec<Target>> {
    let mut out: Vec<Target> = Vec::new();
    for item in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let rest = match item.split_once("://") {
            Some(("http" | "https", rest)) => rest,
            Some((scheme, _)) => {
                anyhow::bail!(
                    "--server {item}: scheme {scheme:?} is not supported (expected host:port, or http:// or https://)"
                )
            }
            None => item,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
            anyhow::anyhow!("--server {item}: expected host:port (several: a:50051,b:50051), found no port")
        })?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6,
            None if host.contains(':') => {
                anyhow::bail!("--server {item}: write an IPv6 address in brackets, as [::1]:50051")
            }
            None => host,
        };
        anyhow::ensure!(!host.is_empty(), "--server {item}: the host is empty (expected host:port)");
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow::anyhow!("--server {item}: port {port:?} is not a number from 1 to 65535"))?;
        let t = Target { host: host.to_string(), port };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "--server is empty: expected host:port, a comma-separated list of them, or a DNS name with several addresses"
    );
    Ok(out)
}

/// Every address the targets stand for now, each with the target it came from, and what failed
/// to resolve.
pub(crate) async fn resolve(targets: &[Target]) -> (Vec<(Target, SocketAddr)>, Vec<String>) {
    let mut found: Vec<(Target, SocketAddr)> = Vec::new();
    let mut failed = Vec::new();
    for t in targets {
        if let Some(ip) = t.literal() {
            found.push((t.clone(), SocketAddr::new(ip, t.port)));
            continue;
        }
        match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
            Ok(addrs) => {
                let before = found.len();
                for a in addrs {
                    if !found.iter().any(|(_, b)| *b == a) {
                        found.push((t.clone(), a));
                    }
                }
                if found.len() == before {
                    failed.push(format!("{t}: no addresses"));
                }
            }
            Err(e) => failed.push(format!("{t}: {e}")),
        }
    }
    (found, failed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Not heard yet: usable when no replica is known to be healthy.
    Unknown,
    Serving,
    /// Reported NOT_SERVING, or its health stream is gone.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ModelCheck {
    Unchecked,
    Same,
    /// Serves another model: no forwards, with the reason.
    Other(String),
}

struct ReplicaState {
    health: Health,
    model: ModelCheck,
    /// While set and in the future, forwards failed here: skip it.
    down_until: Option<Instant>,
    backoff: Backoff,
    /// Changes whenever the replica is marked down or up again. A forward remembers it when sent:
    /// its failure counts only if nothing changed meanwhile, so the several forwards in flight
    /// when a replica dies (the pipeline keeps two or three) double the backoff once, not each.
    generation: u64,
}

/// One cloud replica: its channel and what the edge knows of it.
pub(crate) struct Replica {
    pub(crate) addr: SocketAddr,
    /// The `--server` entry it came from.
    target: Target,
    /// The address and the `--server` entry it came from, for logs.
    pub(crate) label: String,
    pub(crate) channel: Channel,
    outstanding: AtomicUsize,
    /// Forwards this replica answered.
    answered: AtomicU64,
    state: Mutex<ReplicaState>,
    retired: watch::Sender<bool>,
}

/// Rank of a replica for the next forward: 0 healthy and checked, 1 not heard from yet.
type Tier = u8;

impl Replica {
    fn state(&self) -> std::sync::MutexGuard<'_, ReplicaState> {
        self.state.lock().expect("no code panics while holding a replica's state")
    }

    fn endpoint_label(&self) -> String {
        self.addr.to_string()
    }

    fn tier(&self, now: Instant) -> Option<Tier> {
        let s = self.state();
        if matches!(s.model, ModelCheck::Other(_)) || s.health == Health::Down {
            return None;
        }
        if matches!(s.down_until, Some(t) if now < t) {
            return None;
        }
        Some(if s.health == Health::Serving && s.model == ModelCheck::Same { 0 } else { 1 })
    }

    fn publish(&self) {
        let up = self.tier(Instant::now()).is_some();
        metrics::gauge!(telemetry::CLOUD_ENDPOINT_UP, "side" => "edge", "endpoint" => self.endpoint_label())
            .set(if up { 1.0 } else { 0.0 });
    }

    /// An inference client on this replica's channel that counts what each call sends.
    pub(crate) fn client(&self) -> GrpcInferenceServiceClient<Metered<Channel>> {
        GrpcInferenceServiceClient::new(Metered(self.channel.clone())).max_decoding_message_size(usize::MAX)
    }

    /// The generation a forward sent now carries.
    pub(crate) fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Counts a forward in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        let n = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!(telemetry::CLOUD_OUTSTANDING, "side" => "edge", "endpoint" => self.endpoint_label())
            .set(n as f64);
        InFlight(self.clone())
    }

    /// A forward sent at `generation` failed on the link: skip this replica for a while.
    pub(crate) fn failed(&self, generation: u64) {
        metrics::counter!(telemetry::CLOUD_FORWARDS, "side" => "edge", "endpoint" => self.endpoint_label(),
            "outcome" => "failed")
        .increment(1);
        {
            let mut s = self.state();
            if s.generation != generation {
                return; // this outage is already being waited out
            }
            let wait = s.backoff.wait();
            s.down_until = Some(Instant::now() + wait);
            s.generation += 1;
        }
        self.publish();
    }

    pub(crate) fn succeeded(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CLOUD_FORWARDS, "side" => "edge", "endpoint" => self.endpoint_label(),
            "outcome" => "ok")
        .increment(1);
        let changed = {
            let mut s = self.state();
            let changed = s.down_until.is_some();
            if changed {
                s.down_until = None;
                s.backoff.reset();
                s.generation += 1;
            }
            changed
        };
        if changed {
            self.publish();
        }
    }

    /// The replica serves another model than this edge's head: no more forwards until it
    /// restarts (its health stream breaks) and a new check passes.
    pub(crate) fn refuse(&self, why: String) {
        metrics::counter!(telemetry::CLOUD_FORWARDS, "side" => "edge", "endpoint" => self.endpoint_label(),
            "outcome" => "refused")
        .increment(1);
        let first = {
            let mut s = self.state();
            let first = !matches!(s.model, ModelCheck::Other(_));
            s.model = ModelCheck::Other(why.clone());
            first
        };
        if first {
            tracing::error!(replica = %self.label, "refusing this cloud replica, no forwards go there: {why}");
        }
        self.publish();
    }

    /// Forwards in flight here now.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }
}

/// A forward in flight to a replica (see [`Replica::begin`]).
pub(crate) struct InFlight(Arc<Replica>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.0.outstanding.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(telemetry::CLOUD_OUTSTANDING, "side" => "edge", "endpoint" => self.0.endpoint_label())
            .set(n as f64);
    }
}

/// Every cloud replica this edge knows, and how to pick one.
pub(crate) struct CloudPool {
    targets: Vec<Target>,
    dialer: Dialer,
    replicas: RwLock<Vec<Arc<Replica>>>,
    next: AtomicUsize,
    /// The edge head's model fingerprint: a replica must serve the same model.
    fingerprint: String,
    /// Woken whenever a replica becomes usable (the policy stream waits on it).
    changed: Notify,
    resolve_every: Duration,
}

impl CloudPool {
    /// Resolves `--server` once, starts following each replica's health, and (for DNS names)
    /// re-resolves in the background. Holds no strong reference to itself in its tasks: they end
    /// when the pool is dropped.
    pub(crate) async fn start(config: &Config, fingerprint: String) -> anyhow::Result<Arc<CloudPool>> {
        let server = config.server.as_deref().ok_or_else(|| anyhow::anyhow!("no --server given"))?;
        let targets = parse_targets(server)?;
        let pool = Arc::new(CloudPool {
            dialer: Dialer::new(config)?,
            targets,
            replicas: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            fingerprint,
            changed: Notify::new(),
            resolve_every: Duration::from_secs(config.resolve_interval_s.max(1)),
        });
        pool.refresh().await?;
        if pool.targets.iter().any(|t| t.literal().is_none()) {
            tokio::spawn(re_resolve(Arc::downgrade(&pool)));
        }
        Ok(pool)
    }

    fn list(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("no code panics while holding the replica list").clone()
    }

    /// Resolves the targets and brings the replica list in line: new addresses get a channel and
    /// a health follower, vanished ones are retired. A failed resolution keeps what is known.
    async fn refresh(self: &Arc<Self>) -> anyhow::Result<()> {
        let (found, failed) = resolve(&self.targets).await;
        for f in &failed {
            tracing::warn!("cannot resolve the cloud address {f}; keeping the replicas known so far");
        }
        let resolved: Vec<&Target> = found.iter().map(|(t, _)| t).collect();
        let resolved_now = |r: &Replica| resolved.contains(&&r.target);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        {
            let mut list = self.replicas.write().expect("no code panics while holding the replica list");
            // An address disappears only when the name it came from resolved without it.
            list.retain(|r| {
                let keep = found.iter().any(|(_, a)| *a == r.addr) || !resolved_now(r);
                if !keep {
                    r.retired.send_replace(true);
                    removed.push(r.label.clone());
                }
                keep
            });
            for (t, addr) in &found {
                if list.iter().any(|r| r.addr == *addr) {
                    continue;
                }
                let channel = self.dialer.endpoint(&t.host, *addr)?.connect_lazy();
                let label = if t.literal().is_some() { t.to_string() } else { format!("{addr} ({t})") };
                let replica = Arc::new(Replica {
                    addr: *addr,
                    target: t.clone(),
                    label: label.clone(),
                    channel,
                    outstanding: AtomicUsize::new(0),
                    answered: AtomicU64::new(0),
                    state: Mutex::new(ReplicaState {
                        health: Health::Unknown,
                        model: ModelCheck::Unchecked,
                        down_until: None,
                        backoff: Backoff::new(),
                        generation: 0,
                    }),
                    retired: watch::Sender::new(false),
                });
                tokio::spawn(follow_health(Arc::downgrade(self), replica.clone()));
                list.push(replica);
                added.push(label);
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            let n = self.list().len();
            tracing::info!(replicas = n, added = ?added, removed = ?removed, "cloud replicas");
        }
        Ok(())
    }

    /// The replica for the next forward: among the best-ranked usable ones, the one with the
    /// fewest forwards in flight, round robin among equals; never `not` unless nothing else is
    /// usable... in which case none (a retry goes to another replica or nowhere).
    pub(crate) fn pick(&self, not: Option<&Replica>) -> Option<Arc<Replica>> {
        let list = self.list();
        if list.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(Tier, usize, Arc<Replica>)> = None;
        for i in 0..list.len() {
            let r = &list[(start + i) % list.len()];
            if not.is_some_and(|n| std::ptr::eq(n, r.as_ref())) {
                continue;
            }
            let Some(tier) = r.tier(now) else { continue };
            let load = r.outstanding();
            if best.as_ref().is_none_or(|(bt, bl, _)| (tier, load) < (*bt, *bl)) {
                best = Some((tier, load, r.clone()));
            }
        }
        best.map(|(_, _, r)| r)
    }

    /// Waits up to `limit` for a usable replica other than `not` (or `not` itself when it is the
    /// only one).
    pub(crate) async fn wait_usable(&self, not: Option<&Replica>, limit: Duration) -> Option<Arc<Replica>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if let Some(r) = self.pick(not).or_else(|| self.pick(None)) {
                return Some(r);
            }
            // Backoff windows end without an event: look again now and then.
            let tick = tokio::time::sleep(Duration::from_millis(250));
            tokio::select! {
                _ = notified => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Forwards answered so far by each replica known now, by address.
    pub(crate) fn answered(&self) -> Vec<(String, u64)> {
        self.list().iter().map(|r| (r.addr.to_string(), r.answered.load(Ordering::Relaxed))).collect()
    }

    /// Addresses the edge knows, for logs.
    pub(crate) fn describe(&self) -> String {
        let list = self.list();
        if list.is_empty() {
            return self.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        }
        list.iter().map(|r| r.label.clone()).collect::<Vec<_>>().join(", ")
    }
}

/// Re-resolves the DNS names of `--server` every `--resolve-interval-s` (every second while
/// they resolve to nothing).
async fn re_resolve(pool: Weak<CloudPool>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let wait = if p.list().is_empty() { RESOLVE_RETRY } else { p.resolve_every };
        drop(p);
        tokio::time::sleep(wait).await;
        let Some(p) = pool.upgrade() else { return };
        if let Err(e) = p.refresh().await {
            tracing::warn!("re-resolving the cloud replicas: {e}");
        }
    }
}

/// Follows one replica's health until it is retired or the pool is gone.
async fn follow_health(pool: Weak<CloudPool>, r: Arc<Replica>) {
    let mut retired = r.retired.subscribe();
    let mut backoff = Backoff::between(BACKOFF_MIN, HEALTH_RETRY_MAX);
    let mut reported_loss = false;
    loop {
        if *retired.borrow() || pool.strong_count() == 0 {
            return;
        }
        let attempt = async {
            let mut client = HealthClient::new(r.channel.clone());
            // Bounded: a peer that accepts connections and never answers (a black hole) must not
            // hold this follower forever.
            let open = client.watch(HealthCheckRequest { service: HEALTH_SERVICE.into() });
            let Ok(stream) = tokio::time::timeout(DESCRIBE_TIMEOUT, open).await else {
                return Err(format!("no answer to the health watch within {DESCRIBE_TIMEOUT:?}"));
            };
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == Code::Unimplemented => {
                    // A server without the health service: trust it, and let forwards judge.
                    tracing::warn!(replica = %r.label, "no grpc.health.v1 service; sending forwards without health checks");
                    set_health(&pool, &r, Health::Serving).await;
                    return std::future::pending::<Result<(), String>>().await;
                }
                Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
            };
            let mut serving = false;
            loop {
                // While the replica says NOT_SERVING, the stream is re-opened every few seconds:
                // a server draining for a shutdown keeps it open on a connection that takes no
                // new streams (GOAWAY), and its successor on the same address must be seen.
                let next = if serving {
                    stream.next().await
                } else {
                    match tokio::time::timeout(RECHECK_NOT_SERVING, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => return Ok(()),
                    }
                };
                let Some(msg) = next else { return Err("the health stream ended".to_string()) };
                let msg = msg.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                backoff.reset();
                reported_loss = false;
                serving = msg.status == ServingStatus::Serving as i32;
                if serving {
                    set_health(&pool, &r, Health::Serving).await;
                } else {
                    if r.state().health != Health::Down {
                        tracing::info!(replica = %r.label, "cloud replica not serving (warming up or draining); no forwards go there");
                    }
                    set_health(&pool, &r, Health::Down).await;
                }
            }
        };
        let result = tokio::select! {
            res = attempt => res,
            _ = retired.changed() => return,
        };
        let was_up = {
            let mut s = r.state();
            let was_up = s.health == Health::Serving;
            s.health = Health::Down;
            // The next process on this address may serve another model: check again.
            s.model = ModelCheck::Unchecked;
            was_up
        };
        r.publish();
        if let Err(why) = result {
            if was_up || !reported_loss {
                tracing::warn!(replica = %r.label, "cloud replica unreachable, no forwards go there until it reports SERVING: {why}");
                reported_loss = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.wait()) => {}
            _ = retired.changed() => return,
        }
    }
}

/// Records a health report; on SERVING, checks the replica's model first (once per connection).
async fn set_health(pool: &Weak<CloudPool>, r: &Arc<Replica>, health: Health) {
    if health == Health::Serving && r.state().model == ModelCheck::Unchecked {
        let Some(fingerprint) = pool.upgrade().map(|p| p.fingerprint.clone()) else { return };
        check_model(r, &fingerprint).await;
    }
    let became_usable = {
        let mut s = r.state();
        let was = s.health;
        s.health = health;
        if health == Health::Serving && was != Health::Serving {
            // Back (or new): forget the failures of the process before.
            s.down_until = None;
            s.backoff.reset();
            s.generation += 1;
        }
        health == Health::Serving && was != Health::Serving && !matches!(s.model, ModelCheck::Other(_))
    };
    r.publish();
    if became_usable {
        tracing::info!(replica = %r.label, "cloud replica serving");
        if let Some(p) = pool.upgrade() {
            p.changed.notify_waiters();
        }
    }
}

/// Asks the replica which model it serves; a different fingerprint refuses it.
async fn check_model(r: &Replica, fingerprint: &str) {
    let mut client = ControlClient::new(r.channel.clone());
    let verdict = match tokio::time::timeout(DESCRIBE_TIMEOUT, client.describe(DescribeRequest {})).await {
        Ok(Ok(info)) => {
            let info = info.into_inner();
            if info.fingerprint == fingerprint {
                ModelCheck::Same
            } else {
                r.refuse(format!(
                    "it serves model {} with fingerprint {}, this edge's head has fingerprint {fingerprint} \
                     (a rolling update in progress? the edge needs the head of the model the replica serves)",
                    info.model, info.fingerprint
                ));
                return;
            }
        }
        // An older cloud-server: its per-forward fingerprint check still guards.
        Ok(Err(s)) if s.code() == Code::Unimplemented => ModelCheck::Same,
        Ok(Err(s)) => {
            tracing::debug!(replica = %r.label, "model check failed, trying later: {}", s.message());
            ModelCheck::Unchecked
        }
        Err(_) => ModelCheck::Unchecked,
    };
    r.state().model = verdict;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_parse_with_clear_errors() {
        let t = parse_targets("a:50051, http://b:1 ,https://[::1]:7,10.0.0.2:50051,a:50051").unwrap();
        let shown: Vec<String> = t.iter().map(|t| t.to_string()).collect();
        assert_eq!(shown, ["a:50051", "b:1", "[::1]:7", "10.0.0.2:50051"]);
        assert!(t[2].literal().is_some() && t[0].literal().is_none());
        for (bad, says) in [
            ("cloud", "expected host:port"),
            ("cloud:http", "is not a number"),
            ("cloud:0", "is not a number"),
            ("::1:50051", "in brackets"),
            (":50051", "host is empty"),
            ("ftp://a:1", "scheme \"ftp\""),
            (" , ", "--server is empty"),
        ] {
            let e = parse_targets(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn replica(addr: &str, health: Health, model: ModelCheck) -> Arc<Replica> {
        let addr: SocketAddr = addr.parse().unwrap();
        Arc::new(Replica {
            addr,
            target: Target { host: addr.ip().to_string(), port: addr.port() },
            label: addr.to_string(),
            channel: tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            outstanding: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            state: Mutex::new(ReplicaState { health, model, down_until: None, backoff: Backoff::new(), generation: 0 }),
            retired: watch::Sender::new(false),
        })
    }

    fn pool(replicas: Vec<Arc<Replica>>) -> CloudPool {
        CloudPool {
            targets: vec![],
            dialer: Dialer::plain(),
            replicas: RwLock::new(replicas),
            next: AtomicUsize::new(0),
            fingerprint: "fp".into(),
            changed: Notify::new(),
            resolve_every: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn picks_the_least_loaded_healthy_replica_round_robin_among_equals() {
        let a = replica("127.0.0.1:1", Health::Serving, ModelCheck::Same);
        let b = replica("127.0.0.1:2", Health::Serving, ModelCheck::Same);
        let c = replica("127.0.0.1:3", Health::Serving, ModelCheck::Same);
        let p = pool(vec![a.clone(), b.clone(), c.clone()]);
        // Idle: every replica in turn.
        let mut counts = [0; 3];
        for _ in 0..300 {
            let r = p.pick(None).unwrap();
            counts[(r.addr.port() - 1) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        // Two forwards in flight on a, one on b: c first, then b, then any.
        let _g1 = a.begin();
        let _g2 = a.begin();
        let g3 = b.begin();
        assert_eq!(p.pick(None).unwrap().addr.port(), 3);
        let _g4 = c.begin();
        assert!([2, 3].contains(&p.pick(None).unwrap().addr.port()), "b or c, one in flight each");
        drop(g3);
        assert_eq!(p.pick(None).unwrap().addr.port(), 2, "b has none in flight now");
        // A retry never goes back to the replica that failed.
        for _ in 0..10 {
            assert_ne!(p.pick(Some(&b)).unwrap().addr, b.addr);
        }
    }

    #[tokio::test]
    async fn unhealthy_refused_and_backing_off_replicas_get_nothing() {
        let ok = replica("127.0.0.1:1", Health::Serving, ModelCheck::Same);
        let down = replica("127.0.0.1:2", Health::Down, ModelCheck::Same);
        let other = replica("127.0.0.1:3", Health::Serving, ModelCheck::Other("another model".into()));
        let unknown = replica("127.0.0.1:4", Health::Unknown, ModelCheck::Unchecked);
        let p = pool(vec![ok.clone(), down, other, unknown.clone()]);
        for _ in 0..20 {
            assert_eq!(p.pick(None).unwrap().addr, ok.addr, "a checked, healthy replica comes first");
        }
        // The healthy one fails: it backs off, and the one not heard from yet is better than none.
        ok.failed(ok.generation());
        assert_eq!(p.pick(None).unwrap().addr, unknown.addr);
        assert!(p.pick(Some(&unknown)).is_none(), "nothing else is usable");
        unknown.refuse("serves another model".into());
        assert!(p.pick(None).is_none());
        ok.succeeded();
        assert_eq!(p.pick(None).unwrap().addr, ok.addr);
    }

    #[tokio::test]
    async fn the_forwards_in_flight_when_a_replica_dies_count_as_one_failure() {
        let r = replica("127.0.0.1:1", Health::Serving, ModelCheck::Same);
        let g = r.generation();
        // Three pipelined forwards, all sent before the replica died, fail one after another.
        for _ in 0..3 {
            r.failed(g);
        }
        let wait = r.state().down_until.unwrap() - Instant::now();
        assert!(wait <= BACKOFF_MIN, "one doubling at most: the wait is {wait:?}");
        assert_eq!(r.generation(), g + 1);
        // A probe after the wait fails too: that is a second failure, and the wait doubles.
        r.failed(r.generation());
        assert!(r.state().down_until.unwrap() - Instant::now() <= BACKOFF_MIN * 2);
        r.succeeded();
        assert!(r.tier(Instant::now()).is_some(), "one success ends the outage");
    }

    #[tokio::test]
    async fn names_resolve_to_every_address_and_literals_to_themselves() {
        let (found, failed) = resolve(&parse_targets("127.0.0.1:5,localhost:6").unwrap()).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(found[0].1, "127.0.0.1:5".parse().unwrap());
        assert!(found.iter().any(|(t, a)| t.host == "localhost" && a.port() == 6 && a.ip().is_loopback()));
        let (found, failed) = resolve(&parse_targets("no-such-host.invalid:5").unwrap()).await;
        assert!(found.is_empty());
        assert!(failed[0].starts_with("no-such-host.invalid:5"), "{failed:?}");
    }
}
