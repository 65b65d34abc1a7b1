//! Finding the head this edge runs: a head partition file, the full model cut at `--partition`
//! or at the deepest partition that fits `--memory-budget`, or a download from the cloud; and the
//! batch it runs (`--max-batch N`, or `auto`: the largest batch with which a partition fits).

use std::time::Duration;

use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::{GetPartitionRequest, PartitionChunk};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Model};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::{choose, choose_batch, parse_size, plan, resident, BatchChoice, BatchPlan, Formula};
use prost::Message;
use tokio_stream::StreamExt;

use crate::cloud_client::{Backoff, Dialer};
use crate::config::Config;
use crate::replicas::{parse_targets, resolve};

/// Largest head partition the edge accepts from the cloud (far above any model it can run).
const MAX_HEAD_BYTES: usize = 1 << 31;

/// The head this edge runs, its batch, and what the planner says it needs.
pub(crate) struct Head {
    pub model: Model,
    /// Exits on this device.
    pub k: usize,
    /// Most samples per run: `--max-batch N`, or what `auto` chose.
    pub max_batch: usize,
    /// The planner's weights + peak activations of this head at `max_batch` (None when the head's
    /// graph cannot be planned); what the memory report compares the resident set with.
    pub plan_bytes: Option<u64>,
    /// Resident memory before the model was read, with the engine already open: the process's
    /// own baseline (code, the engine, tokio and gRPC), measured where it runs.
    pub baseline_bytes: Option<u64>,
    /// `--partition auto`: the cut is chosen per batch, among the exits of this head.
    pub adaptive: bool,
}

/// Finds the head this edge runs (see [`find_head`]) and its batch, and plans its memory.
pub(crate) async fn load_head(config: &Config) -> anyhow::Result<Head> {
    // The engine is open and no model is read yet: what every model pays on top.
    let baseline_bytes = resident().map(|r| r.rss_bytes);
    let (model, k, chosen_batch) = find_head(config).await?;
    // Cutting the head parsed the whole model file; give that memory back before the engine
    // loads the head (see `return_freed_heap`).
    return_freed_heap();
    let max_batch = match (chosen_batch, config.max_batch) {
        (Some(b), _) => b,
        (None, BatchChoice::Fixed(b)) => b,
        (None, BatchChoice::Auto { max }) => {
            tracing::info!(
                max_batch = max,
                "--max-batch {}: without --memory-budget (and a full --model) nothing limits the batch; \
                 running batches of up to {max}",
                config.max_batch
            );
            max
        }
    };
    let plan_bytes = segments(&model).ok().and_then(|segs| plan(&model, &segs, max_batch).last().map(|c| c.total()));
    Ok(Head { model, k, max_batch, plan_bytes, baseline_bytes, adaptive: config.adaptive() })
}

/// Hands freed heap memory back to the kernel. glibc keeps freed memory of the main heap and its
/// arenas resident for reuse; after the full model file (7 MB for the zoo's ResNet-110, decoded
/// and copied while its head is cut) is dropped, that was measured at about 17 MB of resident
/// memory that an E1 head of 60 kB never uses again. `malloc_trim` returns it.
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only releases free pages of glibc's own heaps; it takes no pointer
        // and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Finds the head: from a local file (full model or head partition), or from the cloud. With
/// `--memory-budget` also the batch (`Some`), chosen with the partition.
async fn find_head(config: &Config) -> anyhow::Result<(Model, usize, Option<usize>)> {
    let wanted = |m: usize| -> anyhow::Result<Option<usize>> {
        Ok(match &config.partition {
            Some(_) if config.adaptive() => match config.adaptive_head() {
                Some(head) => Some(
                    parse_partition(head, m)
                        .map_err(|e| anyhow::anyhow!("--partition auto:{head}: {e} (auto:Ek holds the head Ek)"))?,
                ),
                None => None,
            },
            Some(p) => Some(parse_partition(p, m).map_err(|e| anyhow::anyhow!("--partition: {e}, or auto"))?),
            None => None,
        })
    };
    anyhow::ensure!(
        !(config.adaptive() && config.model.is_none()),
        "--partition auto needs --model (the full model, or a head partition file): the edge cuts its head itself"
    );
    if let Some(path) = &config.model {
        let model = Model::load(path)?;
        let m = model.num_exits();
        if model.meta.partition.is_some() {
            anyhow::ensure!(model.starts_at_input(), "{} is a tail partition; the edge runs a head", path.display());
            let k = model.present.end;
            if let Some(w) = wanted(m)? {
                anyhow::ensure!(w == k, "{} holds partition E{k}, but --partition asks for E{w}", path.display());
            }
            return Ok((model, k, None));
        }
        let segs = segments(&model)?;
        let (k, batch) = match (wanted(m)?, &config.memory_budget) {
            (Some(k), _) => (k, None),
            (None, Some(b)) => {
                let budget = parse_size(b)?;
                let p = match config.max_batch {
                    BatchChoice::Auto { max } => {
                        choose_batch(max, budget, Formula::Runtime, |b| plan(&model, &segs, b))?
                    }
                    BatchChoice::Fixed(n) => {
                        let costs = plan(&model, &segs, n);
                        let (index, why) = choose(&costs, budget, Formula::Runtime)
                            .map_err(|e| anyhow::anyhow!("{e}; --max-batch auto would try smaller batches"))?;
                        BatchPlan { batch: n, index, costs, why }
                    }
                };
                tracing::info!(partition = p.index + 1, batch = p.batch, "{}", p.why);
                (p.index + 1, Some(p.batch))
            }
            // Adaptive without a budget: every exit but the last, so that any cut can be chosen.
            (None, None) if config.adaptive() => (m.saturating_sub(1).max(1), None),
            (None, None) => anyhow::bail!("give --partition Ek (or auto) or --memory-budget SIZE"),
        };
        let head = extract_side(&model, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Head, m)?)?;
        return Ok((Model::from_bytes(&head.encode_to_vec(), &format!("{} head E{k}", path.display()))?, k, batch));
    }
    let server = config.server.as_deref().ok_or_else(|| anyhow::anyhow!("give --model FILE or --server ADDR"))?;
    let targets = parse_targets(server)?;
    let dialer = Dialer::new(config)?;
    let partition = config.partition.clone().ok_or_else(|| {
        anyhow::anyhow!("downloading the head from the cloud needs --partition Ek (--memory-budget needs --model)")
    })?;
    let limit = Duration::from_secs(config.head_timeout_s.max(1));
    // Every replica cuts the same model the same way: take the head from the first that gives
    // it, trying each address in turn (again, until the time limit, while none does).
    let download = async {
        let mut backoff = Backoff::new();
        loop {
            let (found, unresolved) = resolve(&targets).await;
            let mut why: Vec<String> = unresolved;
            for (t, addr) in &found {
                match download_from(&dialer, &t.host, *addr, &partition).await? {
                    Ok(bytes) => return Ok::<_, anyhow::Error>((bytes, format!("{addr}"))),
                    Err(e) => {
                        tracing::warn!(replica = %addr, "head download failed, trying the next replica: {e}");
                        why.push(format!("{addr}: {e}"));
                    }
                }
            }
            tracing::warn!("no cloud replica gave partition {partition} ({}); retrying", why.join("; "));
            tokio::time::sleep(backoff.wait()).await;
        }
    };
    let (bytes, from) = tokio::time::timeout(limit, download).await.map_err(|_| {
        anyhow::anyhow!(
            "the head partition {partition} did not arrive from {server} within {limit:?} (--head-timeout-s); \
             is the cloud up and serving?"
        )
    })??;
    let server = from;
    let model = Model::from_bytes(&bytes, &format!("{server} partition {partition}"))?;
    let k = model.present.end;
    tracing::info!(partition, bytes = bytes.len(), "head partition downloaded from the cloud");
    Ok((model, k, None))
}

/// Downloads head partition `partition` from the replica at `addr`. The outer error is final (the
/// cloud says the partition does not exist: another replica would say the same); the inner one
/// lets the next replica be tried.
async fn download_from(
    dialer: &Dialer,
    host: &str,
    addr: std::net::SocketAddr,
    partition: &str,
) -> anyhow::Result<anyhow::Result<Vec<u8>>> {
    let channel = match dialer.endpoint(host, addr)?.connect().await {
        Ok(c) => c,
        Err(e) => return Ok(Err(anyhow::anyhow!("cannot connect: {e:?}"))),
    };
    let mut client = ControlClient::new(channel);
    let mut stream = match client.get_partition(GetPartitionRequest { partition: partition.to_string() }).await {
        Ok(s) => s.into_inner(),
        Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument) => {
            anyhow::bail!("the cloud at {addr} refused partition {partition}: {}", s.message())
        }
        Err(s) => return Ok(Err(anyhow::anyhow!("refused partition {partition}: {}", s.message()))),
    };
    Ok(read_chunks(&mut stream, partition).await)
}

async fn read_chunks(stream: &mut tonic::Streaming<PartitionChunk>, partition: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| anyhow::anyhow!("the download broke off: {}", s.message()))?;
        anyhow::ensure!(
            bytes.len() + chunk.data.len() <= MAX_HEAD_BYTES,
            "sent more than {MAX_HEAD_BYTES} bytes for partition {partition}"
        );
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}
