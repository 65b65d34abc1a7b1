//! What several verbs share: the model to load, where samples come from, the exit policy.

use std::path::{Path, PathBuf};

use clap::Args;
use classynet_runtime::dataset::Dataset;
use classynet_runtime::exit::{Policy, PolicyFile};
use classynet_runtime::model::Model;
use classynet_runtime::{Error, Result};

/// Which model to load; `--cuts` and `--exits` turn on the plain-ONNX path.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// ONNX model file: a ClassyNet export (with `classynet` metadata) or, with --cuts and
    /// --exits, any early-exit ONNX graph.
    #[arg(long, env = "CLASSYNET_MODEL", value_name = "FILE")]
    pub model: PathBuf,
    /// Plain ONNX only: tensor after each exit's block, comma-separated, one fewer than --exits.
    #[arg(long, value_delimiter = ',', requires = "exits", value_name = "T1,T2,..")]
    pub cuts: Vec<String>,
    /// Plain ONNX only: graph outputs holding each exit's logits, in exit order.
    #[arg(long, value_delimiter = ',', value_name = "O1,O2,..")]
    pub exits: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        if self.exits.is_empty() {
            Model::load(&self.model)
        } else {
            Model::load_plain(&self.model, &self.cuts, &self.exits)
        }
    }
}

/// Where samples come from.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// fashion-mnist:test|train, cifar10:test|train|FILE.bin, npz:FILE, idx:IMAGES,LABELS.
    #[arg(long, default_value = "fashion-mnist:test")]
    pub dataset: String,
    /// Folder with the dataset files (default for Fashion-MNIST: where the Debian package
    /// dataset-fashion-mnist installs them).
    #[arg(long, env = "CLASSYNET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N samples.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Use only these samples of --dataset, in this order: a JSON file with an `indices` list
    /// (the `validation.json` a `classynet-train` run writes for its held-out split) or a JSON
    /// list. Applied before --limit.
    #[arg(long, value_name = "FILE")]
    pub samples: Option<PathBuf>,
    /// Samples per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

impl DataArgs {
    /// Loads the dataset and checks that its samples fit the model (see [`Dataset::open_for`]).
    pub fn open(&self, m: &Model) -> Result<Dataset> {
        if self.batch == 0 {
            return Err(Error::Parse("--batch must be at least 1".into()));
        }
        let Some(path) = &self.samples else {
            return Dataset::open_for(&self.dataset, self.data_dir.as_deref(), self.limit, m);
        };
        let all = Dataset::open_for(&self.dataset, self.data_dir.as_deref(), None, m)?;
        let mut idx = read_indices(path, all.len())?;
        if let Some(n) = self.limit {
            idx.truncate(n);
        }
        Ok(all.select(&idx))
    }
}

/// Indices from a `validation.json` (`{"indices": [...]}`) or a plain JSON list.
fn read_indices(path: &Path, len: usize) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Parse(format!("{}: not JSON ({e})", path.display())))?;
    let list = v.get("indices").unwrap_or(&v).as_array().ok_or_else(|| {
        Error::Parse(format!("{}: expected a JSON list of sample indices or an object with `indices`", path.display()))
    })?;
    list.iter()
        .map(|x| match x.as_u64() {
            Some(i) if (i as usize) < len => Ok(i as usize),
            _ => Err(Error::Parse(format!(
                "{}: {x} is not a sample index of the dataset (0..{})",
                path.display(),
                len.saturating_sub(1)
            ))),
        })
        .collect()
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values serialise"));
}

pub fn load_policy(path: Option<&Path>, m: &Model) -> Result<Policy> {
    match path {
        Some(p) => Policy::resolve(&m.meta, &PolicyFile::load(p)?).map_err(|e| match e {
            Error::Policy(msg) => Error::Policy(format!("{}: {msg}", p.display())),
            other => other,
        }),
        None => Ok(Policy::defaults(&m.meta)),
    }
}
