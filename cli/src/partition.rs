//! `classynet partition`: write the head or tail of a partition as a standalone ONNX file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{fmt_dims, Model};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::human;
use classynet_runtime::{Error, Result};
use prost::Message;

use crate::args::ModelArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SideArg {
    Head,
    Tail,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to cut: E2 keeps exits E1 and E2 on the edge (the head) and the rest in the tail.
    #[arg(long, value_name = "Ek")]
    pub partition: String,
    /// Which side --out receives.
    #[arg(long, value_enum, default_value_t = SideArg::Head)]
    pub side: SideArg,
    /// Output file for --side.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the other side here.
    #[arg(long, value_name = "FILE")]
    pub other_out: Option<PathBuf>,
}

pub fn run(a: &PartitionArgs) -> Result<()> {
    let m = a.model.load()?;
    let segs = segments(&m)?;
    let (first, second) = match a.side {
        SideArg::Head => (PartitionRole::Head, PartitionRole::Tail),
        SideArg::Tail => (PartitionRole::Tail, PartitionRole::Head),
    };
    let mut jobs = vec![(first, a.out.clone())];
    if let Some(o) = &a.other_out {
        jobs.push((second, o.clone()));
    }
    for (role, path) in jobs {
        let side = Side::parse(&a.partition, role, m.num_exits())?;
        let proto = extract_side(&m, &segs, &side)?;
        let bytes = proto.encode_to_vec();
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        // Read it back: what we wrote must load as a model on its own.
        let written = Model::from_bytes(&bytes, &path.display().to_string())?;
        let g = written.graph();
        let params: u64 = g.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as u64).sum();
        let exits = side.exits(m.num_exits());
        println!(
            "wrote {} ({}): {:?} of {}, exits E{}..E{}, input `{}` {} -> outputs {}; {} parameters",
            path.display(),
            human(bytes.len() as u64),
            role,
            a.partition,
            exits.start + 1,
            exits.end,
            written.input_name,
            fmt_dims(&written.tensor_shape(&written.input_name).unwrap_or_default()),
            g.output.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "),
            params
        );
    }
    Ok(())
}
