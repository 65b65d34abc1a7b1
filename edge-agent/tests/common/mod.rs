//! Helpers shared by the edge's integration tests: the zoo's files, the flags a user would give
//! the two servers, a metrics scrape, and the answers of a `classify` run. Each test file uses
//! some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::Parser;
use edge_agent::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A file of the committed model zoo.
pub fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo").join(name)
}

/// `cloud-server --model MODEL --listen LISTEN --threads 1 --max-delay-ms 1 EXTRA...`, parsed as
/// the binary parses it (tests run without CLOUD_SERVER_* variables in the environment).
pub fn cloud_config(model: &Path, listen: &str, extra: &[&str]) -> cloud_server::Config {
    let model = model.to_str().expect("a UTF-8 path");
    let mut args = vec!["cloud-server", "--model", model, "--listen", listen, "--threads", "1", "--max-delay-ms", "1"];
    args.extend_from_slice(extra);
    cloud_server::Config::parse_from(args)
}

/// `edge-agent --partition PARTITION --server SERVER --listen 127.0.0.1:0 --threads 1
/// --cloud-timeout-ms TIMEOUT EXTRA...` with `model` as --model (none: the head is downloaded).
pub fn edge_config(model: Option<&Path>, partition: &str, server: &str, timeout_ms: u64, extra: &[&str]) -> Config {
    let timeout = timeout_ms.to_string();
    let mut args = vec![
        "edge-agent",
        "--partition",
        partition,
        "--server",
        server,
        "--listen",
        "127.0.0.1:0",
        "--cloud-timeout-ms",
        &timeout,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut c = Config::parse_from(args);
    c.model = model.map(Path::to_path_buf);
    c
}

/// (class, exit) of every sample of a `classify` run; panics on an unanswered one.
pub fn answers(out: &edge_agent::ClassifyOutput) -> Vec<(u32, usize)> {
    out.answers.iter().map(|a| a.map(|(c, e, _)| (c, e)).expect("every sample answered")).collect()
}

/// The body of `GET /metrics` from `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split("\r\n\r\n").nth(1).unwrap().to_string()
}
