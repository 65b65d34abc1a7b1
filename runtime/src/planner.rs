//! The memory planner: what each partition `Ek` costs on the edge, and which is the deepest one
//! that fits a memory budget.
//!
//! For the head of `Ek` (segments 1..=k):
//! * **weights**: the bytes of every initializer its segments use (element count × element
//!   size), counted once;
//! * **activations(B)**: the peak, over the nodes in graph order, of the bytes of all tensors
//!   alive at once for a batch of B samples. A tensor is alive from the node that produces it
//!   (the input: from the start) until its last consumer has run; graph outputs (exit logits
//!   and the cut) stay alive to the end. Per-sample sizes come from the graph's declared shapes
//!   (`value_info`, as `onnx.shape_inference` writes them); a symbolic leading dimension is the
//!   batch. This is what a memory-planning executor without in-place reuse needs; ONNX
//!   Runtime's arena rounds up and may reuse buffers, so its measured peak differs slightly.
//! * **total** = weights + activations(B);
//! * the paper's formula, parameters × 4 bytes × B, beside it for comparison.
//!
//! The batch is part of the plan: [`choose_batch`] tries every batch from a ceiling down to 1 and
//! keeps the first at which some partition fits, so a small budget runs `E1` at a small batch
//! instead of nothing at 16. What the engine itself holds resident (ONNX Runtime's library and
//! environment: tens of MB) is not counted here; `classynet plan` measures it per engine, and
//! its `--count-baseline` takes it off the budget before choosing.

use std::collections::HashMap;

use crate::onnx;

use crate::error::{Error, Result};
use crate::model::{value_shape, Dim, Model};
use crate::partition::Segment;

/// The cost of one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionCost {
    /// `E1`..`EM`.
    pub name: String,
    /// Number of exits on the edge.
    pub k: usize,
    pub params: u64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    /// Tensors whose shape the graph does not declare; activations are a lower bound if > 0.
    pub unknown_shapes: usize,
    pub batch: usize,
}

impl PartitionCost {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.activation_bytes
    }

    /// The paper's estimate: parameters × 4 bytes × batch.
    pub fn paper_bytes(&self) -> u64 {
        self.params * 4 * self.batch as u64
    }
}

/// Which number a budget is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Formula {
    /// weights + peak activations for the batch (what the edge really holds).
    Runtime,
    /// parameters × 4 bytes × batch, as in the paper's Table IV.
    Paper,
}

/// The batch an edge runs: a fixed size, or `auto` (up to a ceiling) for the largest batch with
/// which some partition fits the budget.
///
/// Text form: `16` (fixed), `auto` (ceiling [`DEFAULT_AUTO_MAX_BATCH`]), `auto:32` (ceiling 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchChoice {
    Fixed(usize),
    Auto { max: usize },
}

/// The ceiling of `--max-batch auto`: the paper's edge batch.
pub const DEFAULT_AUTO_MAX_BATCH: usize = 16;

impl BatchChoice {
    /// The largest batch this choice allows (the fixed size, or the ceiling of `auto`).
    pub fn max(self) -> usize {
        match self {
            BatchChoice::Fixed(n) | BatchChoice::Auto { max: n } => n,
        }
    }

    pub fn is_auto(self) -> bool {
        matches!(self, BatchChoice::Auto { .. })
    }
}

impl std::str::FromStr for BatchChoice {
    type Err = Error;

    fn from_str(text: &str) -> Result<BatchChoice> {
        let bad = || {
            Error::Parse(format!(
                "batch `{text}`: expected a number of samples (16), `auto` (the largest batch up to \
                 {DEFAULT_AUTO_MAX_BATCH} with which a partition fits the budget) or `auto:N` (up to N)"
            ))
        };
        let t = text.trim();
        let (auto, n) = match t.strip_prefix("auto") {
            Some("") => (true, DEFAULT_AUTO_MAX_BATCH),
            Some(rest) => (true, rest.strip_prefix(':').and_then(|n| n.trim().parse().ok()).ok_or_else(bad)?),
            None => (false, t.parse().map_err(|_| bad())?),
        };
        if n == 0 {
            return Err(Error::Parse(format!("batch `{text}`: must be at least 1")));
        }
        Ok(if auto { BatchChoice::Auto { max: n } } else { BatchChoice::Fixed(n) })
    }
}

impl std::fmt::Display for BatchChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchChoice::Fixed(n) => write!(f, "{n}"),
            BatchChoice::Auto { max } if *max == DEFAULT_AUTO_MAX_BATCH => f.write_str("auto"),
            BatchChoice::Auto { max } => write!(f, "auto:{max}"),
        }
    }
}

/// A partition and batch chosen for a budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// The batch the edge runs.
    pub batch: usize,
    /// Index into `costs` of the chosen partition (`E{index + 1}`).
    pub index: usize,
    /// Costs of every partition at `batch`.
    pub costs: Vec<PartitionCost>,
    /// One sentence saying why.
    pub why: String,
}

impl BatchPlan {
    pub fn chosen(&self) -> &PartitionCost {
        &self.costs[self.index]
    }
}

/// Chooses the batch and the partition for `budget`: for each batch from `max_batch` down to 1,
/// the deepest partition that fits ([`choose`]); the first batch at which any fits wins. So the
/// configured batch is kept whenever something fits with it, and a budget too small for it gets
/// the shallowest partition at a smaller batch instead of nothing. `costs_at(b)` is
/// [`plan`] at batch `b` (a closure so that tests need no model). An error when even batch 1
/// fits nothing, with the smallest need and the budget.
pub fn choose_batch(
    max_batch: usize,
    budget: u64,
    formula: Formula,
    mut costs_at: impl FnMut(usize) -> Vec<PartitionCost>,
) -> Result<BatchPlan> {
    if max_batch == 0 {
        return Err(Error::Parse("the largest batch must be at least 1".into()));
    }
    // Costs grow with the batch, so a bisection would do; the linear walk is at most a few dozen
    // cheap passes over the graph and keeps "from the ceiling down" literal.
    let mut smallest = None;
    for batch in (1..=max_batch).rev() {
        let costs = costs_at(batch);
        match choose(&costs, budget, formula) {
            Ok((index, why)) => {
                let why = if batch < max_batch {
                    format!("batch {batch} is the largest up to {max_batch} with which a partition fits; {why}")
                } else {
                    why
                };
                return Ok(BatchPlan { batch, index, costs, why });
            }
            Err(_) if batch == 1 => smallest = costs.into_iter().next(),
            Err(_) => {}
        }
    }
    let c = smallest.expect("a model has at least one partition");
    let (need, what) = match formula {
        Formula::Runtime => (c.total(), "weights + activations"),
        Formula::Paper => (c.paper_bytes(), "params × 4 B × batch"),
    };
    Err(Error::Parse(format!(
        "no partition fits a budget of {} at any batch from {max_batch} down to 1: the smallest, {} at batch 1, \
         needs {} ({what}; {} more than the budget)",
        human(budget),
        c.name,
        human(need),
        human(need.saturating_sub(budget))
    )))
}

/// Costs of `E1..EM` for a batch of `batch` samples. `segs` are the full model's segments.
pub fn plan(model: &Model, segs: &[Segment], batch: usize) -> Vec<PartitionCost> {
    let g = model.graph();
    let shapes = declared_shapes(g);
    (1..=segs.len())
        .map(|k| {
            let head = &segs[..k];
            let mut inits: Vec<usize> = head.iter().flat_map(|s| s.initializers.iter().copied()).collect();
            inits.sort_unstable();
            inits.dedup();
            let (params, weight_bytes) = inits.iter().fold((0u64, 0u64), |(p, b), &i| {
                let (n, bytes) = tensor_size(&g.initializer[i]);
                (p + n, b + bytes)
            });
            let (activation_bytes, unknown_shapes) = peak_activations(g, head, &shapes, batch);
            PartitionCost { name: format!("E{k}"), k, params, weight_bytes, activation_bytes, unknown_shapes, batch }
        })
        .collect()
}

/// The deepest partition whose cost under `formula` is within `budget` bytes, with a sentence
/// explaining the choice; an error explaining why when none fits.
pub fn choose(costs: &[PartitionCost], budget: u64, formula: Formula) -> Result<(usize, String)> {
    let cost = |c: &PartitionCost| match formula {
        Formula::Runtime => c.total(),
        Formula::Paper => c.paper_bytes(),
    };
    let what = match formula {
        Formula::Runtime => "weights + activations",
        Formula::Paper => "params × 4 B × batch",
    };
    let fit = costs.iter().rposition(|c| cost(c) <= budget);
    match fit {
        Some(i) => {
            let c = &costs[i];
            let mut why = format!(
                "{} is the deepest partition that fits: {} ({what}, batch {}) ≤ budget {}",
                c.name,
                human(cost(c)),
                c.batch,
                human(budget)
            );
            if let Some(next) = costs.get(i + 1) {
                why.push_str(&format!("; {} would need {}", next.name, human(cost(next))));
            } else {
                why.push_str("; every exit runs on the edge");
            }
            Ok((i, why))
        }
        None => Err(Error::Parse(format!(
            "no partition fits a budget of {}: the smallest, {}, needs {} ({what}, batch {})",
            human(budget),
            costs[0].name,
            human(cost(&costs[0])),
            costs[0].batch
        ))),
    }
}

/// What the kernel counts as this process's memory (`/proc/self/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Resident set now (`VmRSS`): anonymous memory plus the mapped pages of libraries and files.
    pub rss_bytes: u64,
    /// Highest resident set since the process started (`VmHWM`).
    pub peak_bytes: u64,
    /// The anonymous part of the resident set now (`RssAnon`: heap, stacks; what the process
    /// allocated itself). The rest is file-backed: the pages of the binary's and the engine
    /// library's code that the kernel mapped, clean and shared. `None` before Linux 4.5.
    pub anon_bytes: Option<u64>,
}

/// This process's resident memory; `None` where `/proc` is not Linux's.
pub fn resident() -> Option<Resident> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS` and `VmHWM` from the text of a `/proc/PID/status` (the kernel writes them in KiB).
pub fn parse_status(text: &str) -> Option<Resident> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find_map(|l| l.strip_prefix(name))?;
        let kib: u64 = line.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some(Resident { rss_bytes: field("VmRSS")?, peak_bytes: field("VmHWM")?, anon_bytes: field("RssAnon") })
}

/// Parses `470kB`, `2.31 MB`, `28.5MiB`, `1024` (bytes). kB/MB/GB are powers of 10; KiB/MiB/GiB
/// powers of 2.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::Parse(format!("size `{text}`: expected a number followed by a unit (B, kB, KiB, MB, MiB, GB, GiB)"))
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "kB" | "KB" | "k" | "K" => 1e3,
        "KiB" | "kiB" => 1024.0,
        "MB" | "M" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" | "G" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::Parse(format!(
                "size `{text}`: unknown unit `{other}` (expected B, kB, KiB, MB, MiB, GB or GiB; MB = 10^6 bytes, MiB = 2^20)"
            )))
        }
    };
    Ok((value * mult).round() as u64)
}

/// Bytes as `2.31 MB` (powers of 10, like the paper's budgets).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

fn declared_shapes(g: &onnx::GraphProto) -> HashMap<&str, (Vec<Dim>, usize)> {
    g.input
        .iter()
        .chain(&g.output)
        .chain(&g.value_info)
        .filter_map(|v| {
            let dims = value_shape(v)?;
            let elem = match v.r#type.as_ref()?.value.as_ref()? {
                onnx::type_proto::Value::TensorType(t) => elem_bits(t.elem_type()),
                _ => return None,
            };
            Some((v.name(), (dims, elem)))
        })
        .collect()
}

/// Bytes of a tensor for `batch` samples; None when its shape is unknown.
fn value_bytes(shape: Option<&(Vec<Dim>, usize)>, batch: usize) -> Option<u64> {
    let (dims, bits) = shape?;
    let mut n: u64 = 1;
    for (i, d) in dims.iter().enumerate() {
        n *= match d {
            Dim::Fixed(v) => *v as u64,
            Dim::Symbolic if i == 0 => batch as u64,
            Dim::Symbolic => return None,
        };
    }
    Some((n * *bits as u64).div_ceil(8))
}

fn peak_activations(
    g: &onnx::GraphProto,
    head: &[Segment],
    shapes: &HashMap<&str, (Vec<Dim>, usize)>,
    batch: usize,
) -> (u64, usize) {
    let mut nodes: Vec<usize> = head.iter().flat_map(|s| s.nodes.iter().copied()).collect();
    nodes.sort_unstable();
    let is_init: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let mut outputs: Vec<&str> = head.iter().map(|s| s.logits.as_str()).collect();
    outputs.extend(head.last().and_then(|s| s.cut.as_deref()));
    // Last step at which each tensor is read (outputs: never freed).
    let mut last_use: HashMap<&str, usize> = HashMap::new();
    for (step, &n) in nodes.iter().enumerate() {
        for i in &g.node[n].input {
            last_use.insert(i.as_str(), step);
        }
    }
    for o in &outputs {
        last_use.insert(o, usize::MAX);
    }
    let mut unknown = 0;
    let mut size = |name: &str| -> u64 {
        value_bytes(shapes.get(name), batch).unwrap_or_else(|| {
            unknown += 1;
            0
        })
    };
    let input = head[0].input.as_str();
    let mut live: HashMap<&str, u64> = HashMap::from([(input, size(input))]);
    let mut current: u64 = live.values().sum();
    let mut peak = current;
    for (step, &n) in nodes.iter().enumerate() {
        for o in &g.node[n].output {
            if o.is_empty() || is_init.contains(o.as_str()) {
                continue;
            }
            let b = size(o);
            live.insert(o.as_str(), b);
            current += b;
        }
        peak = peak.max(current);
        live.retain(|name, bytes| {
            let keep = last_use.get(name).is_some_and(|&s| s > step);
            if !keep {
                current -= *bytes;
            }
            keep
        });
    }
    (peak, unknown)
}

/// Multiply-accumulates per sample of each segment: Conv (output elements × input channels per
/// group × kernel area), Gemm and MatMul (output elements × the reduced dimension); element-wise
/// ops and pooling are not counted, as is usual for MAC figures. A sample answered at exit `m`
/// costs the sum over segments `0..=m`. Shapes come from the graph's declared shapes and the
/// weights; a Conv, Gemm or MatMul whose shapes are unknown is an error naming the node.
pub fn segment_macs(model: &Model, segs: &[Segment]) -> Result<Vec<u64>> {
    let g = model.graph();
    let shapes = declared_shapes(g);
    let weights: HashMap<&str, &[i64]> = g.initializer.iter().map(|t| (t.name(), &t.dims[..])).collect();
    // Per-sample dimensions of a tensor: a declared shape without its batch, or a weight's dims.
    let dims = |name: &str| -> Option<Vec<u64>> {
        if let Some(w) = weights.get(name) {
            return Some(w.iter().map(|&d| d.max(0) as u64).collect());
        }
        let (d, _) = shapes.get(name)?;
        d.iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(v) => Some(*v as u64),
                Dim::Symbolic if i == 0 => Some(1),
                Dim::Symbolic => None,
            })
            .collect()
    };
    let node_macs = |i: usize| -> Result<u64> {
        let n = &g.node[i];
        let need = |name: &str| {
            dims(name).ok_or_else(|| {
                Error::Parse(format!(
                    "no declared shape for `{name}` of {} node `{}`: MACs need the shapes that \
                     onnx.shape_inference writes",
                    n.op_type(),
                    n.name()
                ))
            })
        };
        let per_sample = |d: &[u64]| d.iter().skip(1).product::<u64>();
        Ok(match n.op_type() {
            "Conv" => {
                let (out, w) = (need(&n.output[0])?, need(&n.input[1])?);
                per_sample(&out) * w.iter().skip(1).product::<u64>()
            }
            "Gemm" | "MatMul" => {
                let (out, a) = (need(&n.output[0])?, need(&n.input[0])?);
                // Gemm's A may be transposed; its reduced dimension is then the first.
                let trans_a =
                    n.op_type() == "Gemm" && n.attribute.iter().any(|a| a.name() == "transA" && a.i.unwrap_or(0) != 0);
                let k = if trans_a { a.first() } else { a.last() }.copied().unwrap_or(1);
                per_sample(&out) * k
            }
            _ => 0,
        })
    };
    segs.iter().map(|s| s.nodes.iter().map(|&i| node_macs(i)).sum()).collect()
}

/// Element count and bytes of an initializer.
fn tensor_size(t: &onnx::TensorProto) -> (u64, u64) {
    let n: u64 = t.dims.iter().map(|&d| d.max(0) as u64).product();
    let bits = elem_bits(t.data_type()) as u64;
    (n, (n * bits).div_ceil(8))
}

/// Bits per element of an ONNX data type (strings and unknown types count as 0).
fn elem_bits(data_type: i32) -> usize {
    use onnx::tensor_proto::DataType as T;
    match T::try_from(data_type) {
        Ok(T::Float | T::Int32 | T::Uint32) => 32,
        Ok(T::Double | T::Int64 | T::Uint64 | T::Complex64) => 64,
        Ok(T::Complex128) => 128,
        Ok(T::Float16 | T::Bfloat16 | T::Int16 | T::Uint16) => 16,
        Ok(T::Uint8 | T::Int8 | T::Bool) => 8,
        Ok(T::Uint4 | T::Int4) => 4,
        Ok(t) if t.as_str_name().starts_with("FLOAT8") => 8,
        Ok(t) if t.as_str_name().starts_with("FLOAT4") => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny3;
    use crate::partition::segments;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("470kB").unwrap(), 470_000);
        assert_eq!(parse_size("2.31 MB").unwrap(), 2_310_000);
        assert_eq!(parse_size("28.5MiB").unwrap(), 29_884_416);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("112MB").unwrap(), 112_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        let e = parse_size("5 parsecs").unwrap_err().to_string();
        assert!(e.contains("unknown unit `parsecs`") && e.contains("MiB = 2^20"), "{e}");
        assert!(parse_size("MB").is_err());
    }

    /// tiny3's MACs by hand (scripts/make-models.py; 4×4 input, same padding): segment 1: conv
    /// 1→2 3×3, 32 outputs × 9, + exit 2→2, 2 × 2 = 292; segment 2: conv 2→2 3×3, 32 × 18, +
    /// exit 2→4, 4 × 2 = 584; segment 3: conv 2→4 1×1, 64 × 2 = 128.
    #[test]
    fn tiny3_macs_match_a_hand_count() {
        let m = tiny3();
        assert_eq!(segment_macs(&m, &segments(&m).unwrap()).unwrap(), vec![292, 584, 128]);
    }

    /// tiny3 counted by hand (see scripts/make-models.py): parameters 26 / 50 / 12 per segment.
    /// Activations for batch B, per sample (floats): input 16; segment 1: conv 32, cut1 32,
    /// pool 2, flatten 2, exit1 2; segment 2: conv2_out 32, relu 32, cut2 32, pool 2, flatten 2,
    /// exit2 4; segment 3: conv 64, pool 4, exit3 4.
    #[test]
    fn tiny3_costs_match_a_hand_count() {
        let m = tiny3();
        let segs = segments(&m).unwrap();
        let costs = plan(&m, &segs, 2);
        assert_eq!(costs.iter().map(|c| c.params).collect::<Vec<_>>(), vec![26, 76, 88]);
        assert_eq!(costs.iter().map(|c| c.weight_bytes).collect::<Vec<_>>(), vec![104, 304, 352]);
        assert!(costs.iter().all(|c| c.unknown_shapes == 0));
        // E1, batch 2, in floats: after the conv: input 16 + conv 32 = 48 (peak so far); after
        // relu: input freed... the largest moment is conv + cut1 alive together (32 + 32 = 64),
        // plus exit1 held to the end. Peak = 64 floats per sample -> 64 * 4 B * 2.
        assert_eq!(costs[0].activation_bytes, 64 * 4 * 2);
        assert_eq!(costs[0].total(), 104 + 512);
        assert_eq!(costs[0].paper_bytes(), 26 * 4 * 2);
        // Deeper heads need at least as much.
        assert!(costs.windows(2).all(|w| w[1].total() >= w[0].total()));
    }

    #[test]
    fn the_budget_picks_the_deepest_fitting_partition() {
        let m = tiny3();
        let costs = plan(&m, &segments(&m).unwrap(), 1);
        let (i, why) = choose(&costs, costs[1].total(), Formula::Runtime).unwrap();
        assert_eq!(i, 1);
        assert!(why.starts_with("E2 is the deepest partition that fits") && why.contains("E3 would need"), "{why}");
        let (i, why) = choose(&costs, u64::MAX, Formula::Runtime).unwrap();
        assert_eq!(i, 2);
        assert!(why.contains("every exit runs on the edge"));
        let e = choose(&costs, 10, Formula::Runtime).unwrap_err().to_string();
        assert!(e.contains("no partition fits a budget of 10 B") && e.contains("E1"), "{e}");
        let (i, _) = choose(&costs, 26 * 4, Formula::Paper).unwrap();
        assert_eq!(i, 0);
    }

    #[test]
    fn resident_memory_is_read_from_proc_status() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        let r = Resident { rss_bytes: 1024 * 1024, peak_bytes: 2048 * 1024, anon_bytes: None };
        assert_eq!(parse_status(text), Some(r));
        let text = "VmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t   256 kB\nRssFile:\t   768 kB\n";
        assert_eq!(parse_status(text), Some(Resident { anon_bytes: Some(256 * 1024), ..r }));
        assert_eq!(parse_status("Name:\tx\n"), None);
        if cfg!(target_os = "linux") {
            let r = resident().expect("Linux has /proc/self/status");
            assert!(r.rss_bytes > 0 && r.peak_bytes >= r.rss_bytes, "{r:?}");
            assert!(r.anon_bytes.is_some_and(|a| a > 0 && a <= r.rss_bytes), "{r:?}");
        }
    }

    #[test]
    fn batch_choices_parse_fixed_auto_and_a_ceiling() {
        assert_eq!("16".parse::<BatchChoice>().unwrap(), BatchChoice::Fixed(16));
        assert_eq!("auto".parse::<BatchChoice>().unwrap(), BatchChoice::Auto { max: DEFAULT_AUTO_MAX_BATCH });
        assert_eq!("auto:32".parse::<BatchChoice>().unwrap(), BatchChoice::Auto { max: 32 });
        assert_eq!(BatchChoice::Auto { max: 32 }.to_string(), "auto:32");
        assert_eq!(BatchChoice::Auto { max: 16 }.to_string(), "auto");
        for bad in ["0", "auto:0", "auto:", "auto32", "many", "-1"] {
            let e = bad.parse::<BatchChoice>().unwrap_err().to_string();
            assert!(e.contains(&format!("batch `{bad}`")), "{bad}: {e}");
        }
    }

    /// For each batch from the ceiling down, the deepest partition that fits; the first batch at
    /// which any fits wins, so a larger batch beats a deeper partition.
    #[test]
    fn the_largest_batch_that_fits_wins_over_a_deeper_partition() {
        let m = tiny3();
        let segs = segments(&m).unwrap();
        let at = |b: usize| plan(&m, &segs, b);
        // Enough for everything at the ceiling: the ceiling and the deepest partition.
        let p = choose_batch(16, u64::MAX, Formula::Runtime, at).unwrap();
        assert_eq!((p.batch, p.index), (16, 2));
        assert!(!p.why.contains("is the largest up to"), "{}", p.why);
        // Exactly E1 at 16: batch 16 with E1, although E3 would fit at batch 1.
        let e1_16 = at(16)[0].total();
        assert!(at(1)[2].total() <= e1_16, "the fixture lets E3 fit at batch 1");
        let p = choose_batch(16, e1_16, Formula::Runtime, at).unwrap();
        assert_eq!((p.batch, p.chosen().name.as_str()), (16, "E1"));
        // Between E1 at 3 and E1 at 4: batch 3.
        let budget = at(3)[0].total();
        assert!(at(4)[0].total() > budget);
        let p = choose_batch(16, budget, Formula::Runtime, at).unwrap();
        assert_eq!((p.batch, p.index), (3, 0));
        assert_eq!(p.costs[0].batch, 3);
        assert!(p.why.starts_with("batch 3 is the largest up to 16 with which a partition fits; E1"), "{}", p.why);
        // The ceiling is respected even when the budget would allow more.
        let p = choose_batch(4, u64::MAX, Formula::Runtime, at).unwrap();
        assert_eq!(p.batch, 4);
        // Not even E1 at batch 1: the smallest need and the budget.
        let need = at(1)[0].total();
        let e = choose_batch(16, need - 1, Formula::Runtime, at).unwrap_err().to_string();
        assert!(
            e.contains(&format!("no partition fits a budget of {}", human(need - 1)))
                && e.contains("at any batch from 16 down to 1")
                && e.contains(&format!("E1 at batch 1, needs {}", human(need))),
            "{e}"
        );
        // The paper's formula is batch-linear: params × 4 B × batch.
        let p = choose_batch(16, 26 * 4 * 5, Formula::Paper, at).unwrap();
        assert_eq!((p.batch, p.index), (5, 0));
    }
}
