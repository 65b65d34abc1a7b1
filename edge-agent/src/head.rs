//! Finding the head this edge runs: a head partition file, the full model cut at `--partition`
//! or at the deepest partition that fits `--memory-budget`, or a download from the cloud.

use std::time::Duration;

use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::GetPartitionRequest;
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Model};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::{choose, parse_size, plan, Formula};
use prost::Message;
use tokio_stream::StreamExt;

use crate::cloud_client::cloud_endpoint;
use crate::config::Config;

/// Largest head partition the edge accepts from the cloud (far above any model it can run).
const MAX_HEAD_BYTES: usize = 1 << 31;

/// Finds the head this edge runs: from a local file (full model or head partition), or from the
/// cloud.
pub(crate) async fn load_head(config: &Config) -> anyhow::Result<(Model, usize)> {
    let wanted = |m: usize| -> anyhow::Result<Option<usize>> {
        Ok(match &config.partition {
            Some(p) => Some(parse_partition(p, m)?),
            None => None,
        })
    };
    if let Some(path) = &config.model {
        let model = Model::load(path)?;
        let m = model.num_exits();
        if model.meta.partition.is_some() {
            anyhow::ensure!(model.starts_at_input(), "{} is a tail partition; the edge runs a head", path.display());
            let k = model.present.end;
            if let Some(w) = wanted(m)? {
                anyhow::ensure!(w == k, "{} holds partition E{k}, but --partition asks for E{w}", path.display());
            }
            return Ok((model, k));
        }
        let segs = segments(&model)?;
        let k = match (wanted(m)?, &config.memory_budget) {
            (Some(k), _) => k,
            (None, Some(b)) => {
                let costs = plan(&model, &segs, config.max_batch);
                let (i, why) = choose(&costs, parse_size(b)?, Formula::Runtime)?;
                tracing::info!("{why}");
                i + 1
            }
            (None, None) => anyhow::bail!("give --partition Ek or --memory-budget SIZE"),
        };
        let head = extract_side(&model, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Head, m)?)?;
        return Ok((Model::from_bytes(&head.encode_to_vec(), &format!("{} head E{k}", path.display()))?, k));
    }
    let server = config.server.as_deref().ok_or_else(|| anyhow::anyhow!("give --model FILE or --server ADDR"))?;
    let ep = cloud_endpoint(config)?.expect("--server is set");
    let partition = config.partition.clone().ok_or_else(|| {
        anyhow::anyhow!("downloading the head from the cloud needs --partition Ek (--memory-budget needs --model)")
    })?;
    let limit = Duration::from_secs(config.head_timeout_s.max(1));
    let download = async {
        let channel = ep.connect().await.map_err(|e| anyhow::anyhow!("cannot reach the cloud at {server}: {e:?}"))?;
        let mut client = ControlClient::new(channel);
        let mut stream = client
            .get_partition(GetPartitionRequest { partition: partition.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("the cloud at {server} refused partition {partition}: {}", s.message()))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| anyhow::anyhow!("head download from {server} broke off: {}", s.message()))?;
            anyhow::ensure!(
                bytes.len() + chunk.data.len() <= MAX_HEAD_BYTES,
                "the cloud at {server} sent more than {MAX_HEAD_BYTES} bytes for partition {partition}"
            );
            bytes.extend_from_slice(&chunk.data);
        }
        Ok::<_, anyhow::Error>(bytes)
    };
    let bytes = tokio::time::timeout(limit, download).await.map_err(|_| {
        anyhow::anyhow!(
            "the head partition {partition} did not arrive from {server} within {limit:?} (--head-timeout-s); \
             is the cloud up and serving?"
        )
    })??;
    let model = Model::from_bytes(&bytes, &format!("{server} partition {partition}"))?;
    let k = model.present.end;
    tracing::info!(partition, bytes = bytes.len(), "head partition downloaded from the cloud");
    Ok((model, k))
}
