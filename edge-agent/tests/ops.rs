//! Operations: mutual TLS between edge and cloud (accepted and refused peers), the clear-text
//! listener rule, health before and after warm-up, and a SIGTERM that leaves no accepted request
//! unanswered. Real sockets on 127.0.0.1; certificates are made per test with rcgen.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::WatchPolicyRequest;
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::*;
use edge_agent::{classify, Config, Edge};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use tokio::io::AsyncBufReadExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

mod common;
use common::zoo;

fn cloud_config(listen: &str) -> cloud_server::Config {
    let model = zoo("tiny-3exit-cn.onnx");
    cloud_server::Config::parse_from([
        "cloud-server",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        listen,
        "--threads",
        "1",
        "--max-delay-ms",
        "1",
    ])
}

fn edge_config(server: Option<String>) -> Config {
    let model = zoo("tiny-3exit-cn.onnx");
    let mut c =
        Config::parse_from(["edge-agent", "--model", model.to_str().unwrap(), "--partition", "E1", "--threads", "1"]);
    c.server = server;
    c
}

/// A CA and the PEM files of certificates it (or another CA) signs, in a temporary folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `<name>-ca.pem` and returns the issuer.
    fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(self.path(&format!("{name}-ca.pem")), cert.pem()).unwrap();
        Issuer::new(p, key)
    }

    /// Writes `<name>.pem` and `<name>.key` signed by `issuer`, valid for localhost/127.0.0.1.
    fn leaf(&self, name: &str, issuer: &Issuer<'static, KeyPair>, expired: bool) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, issuer).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn identity(&self, name: &str) -> Identity {
        Identity::from_pem(
            std::fs::read(self.path(&format!("{name}.pem"))).unwrap(),
            std::fs::read(self.path(&format!("{name}.key"))).unwrap(),
        )
    }
}

/// A v2 client to `addr` with TLS trusting `ca` and presenting `identity`, if any.
async fn v2_call(addr: std::net::SocketAddr, ca: &Path, identity: Option<Identity>) -> Result<bool, tonic::Status> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    let ep = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    let channel = ep.connect().await.map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut c = GrpcInferenceServiceClient::new(channel);
    Ok(c.server_live(ServerLiveRequest {}).await?.into_inner().live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_the_edge_and_refuses_every_other_client() {
    let pki = Pki::new();
    let ca = pki.ca("main");
    let other = pki.ca("other");
    pki.leaf("cloud", &ca, false);
    pki.leaf("edge", &ca, false);
    pki.leaf("stranger", &other, false);
    pki.leaf("expired", &ca, true);

    let mut cc = cloud_config("127.0.0.1:0");
    cc.tls_cert = Some(pki.path("cloud.pem"));
    cc.tls_key = Some(pki.path("cloud.key"));
    cc.tls_ca = Some(pki.path("main-ca.pem"));
    let cloud = cloud_server::start(cc).await.unwrap();
    let addr = cloud.addr;

    // The edge with a certificate of the right CA: split inference and the policy stream work.
    let mut ec = edge_config(Some(addr.to_string()));
    ec.tls_cert = Some(pki.path("edge.pem"));
    ec.tls_key = Some(pki.path("edge.key"));
    ec.tls_ca = Some(pki.path("main-ca.pem"));
    let edge = Edge::load(&ec).await.unwrap();
    let out = classify(&edge, "fashion-mnist:test", None, Some(200), 32).await.unwrap();
    assert_eq!(out.json["answered"]["degraded"], 0, "{}", out.json);
    assert!(out.json["answered"]["cloud"].as_u64().unwrap() > 0);
    assert!(edge.wait_for_policy(Duration::from_secs(5)).await, "the policy stream reached the mTLS edge");
    assert!(v2_call(addr, &pki.path("main-ca.pem"), Some(pki.identity("edge"))).await.unwrap());

    // Everyone else is refused in the TLS handshake.
    let main_ca = pki.path("main-ca.pem");
    for (who, id) in [
        ("no client certificate", None),
        ("a certificate from another CA", Some(pki.identity("stranger"))),
        ("an expired certificate", Some(pki.identity("expired"))),
    ] {
        let err = v2_call(addr, &main_ca, id).await.expect_err(who);
        // The handshake fails, so the call never reaches a service: the client sees a transport
        // error, whose code depends on when it notices (the TLS alert, or the closed connection).
        let transport = [tonic::Code::Unavailable, tonic::Code::Unknown, tonic::Code::Cancelled];
        assert!(transport.contains(&err.code()), "{who}: {err:?}");
        eprintln!("{who}: refused, {:?}: {}", err.code(), err.message());
    }
    // The control service too: a stranger cannot open the policy stream.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&main_ca).unwrap()))
        .identity(pki.identity("stranger"));
    let ep = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    let refused = match ep.connect().await {
        Err(_) => true,
        Ok(ch) => ControlClient::new(ch).watch_policy(WatchPolicyRequest { fingerprint: String::new() }).await.is_err(),
    };
    assert!(refused, "the policy stream is only served to authenticated edges");
    // Clear text to a TLS port gets nowhere either.
    let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    assert!(GrpcInferenceServiceClient::new(plain).server_live(ServerLiveRequest {}).await.is_err());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_text_beyond_loopback_is_refused_unless_insecure() {
    let e = cloud_server::start(cloud_config("0.0.0.0:0")).await.err().expect("refused").to_string();
    assert!(
        e.contains("refusing to listen on 0.0.0.0:") && e.contains("without TLS") && e.contains("--insecure"),
        "{e}"
    );
    let mut cc = cloud_config("0.0.0.0:0");
    cc.insecure = true;
    let cloud = cloud_server::start(cc).await.unwrap();
    cloud.stop().await;

    let mut ec = edge_config(None);
    ec.partition = Some("E3".into());
    ec.listen = "0.0.0.0:0".into();
    let e = edge_agent::start(ec.clone()).await.err().expect("refused").to_string();
    assert!(e.contains("refusing to listen on 0.0.0.0:") && e.contains("EDGE_AGENT_TLS_CERT"), "{e}");
    ec.insecure = true;
    edge_agent::start(ec).await.unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_checks_the_bearer_token() {
    let mut ec = edge_config(None);
    ec.partition = Some("E3".into());
    ec.api_token = Some("let-me-in".into());
    let edge = edge_agent::start(ec).await.unwrap();
    let ch = Endpoint::from_shared(format!("http://{}", edge.addr)).unwrap().connect().await.unwrap();
    let mut c = GrpcInferenceServiceClient::new(ch);
    let err = c.server_live(ServerLiveRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
    let mut req = tonic::Request::new(ServerLiveRequest {});
    req.metadata_mut().insert("authorization", "Bearer let-me-in".parse().unwrap());
    assert!(c.server_live(req).await.unwrap().into_inner().live);
    edge.stop().await;
}

/// Reads the child's stderr until a line contains `needle`; returns that line.
async fn wait_for_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<impl tokio::io::AsyncRead + Unpin>>,
    needle: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line with {needle:?} within 60 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("the process ended before printing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn addr_in(line: &str) -> String {
    // JSON logs: "addr":"127.0.0.1:PORT"
    let i = line.find("\"addr\":\"").expect("an addr field") + 8;
    line[i..].split('"').next().unwrap().to_string()
}

async fn health(addr: &str) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let ch = Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_warm_and_sigterm_answers_every_accepted_request() {
    // A cloud that accepts connections and never answers: every forwarded batch waits for the
    // 1.5 s cloud timeout, so requests are surely in flight when SIGTERM arrives, and can only
    // be answered degraded.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    // The model arrives through a FIFO that the test writes only after its first health check:
    // the agent listens at once and then blocks reading the model, so the check surely falls
    // while it is loading (a regular file can load faster than a gRPC client connects).
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("resnet110-7exit-cnc.onnx");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["--model", fifo.to_str().unwrap(), "--partition", "E1"])
        .args(["--server", &hole_addr.to_string(), "--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--log-format", "json", "--cloud-timeout-ms", "1500", "--shutdown-timeout-s", "20"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = addr_in(&wait_for_line(&mut lines, "accepting connections").await);
    // Loading and warming the head: health says NOT_SERVING (2) meanwhile.
    let first = tokio::time::timeout(Duration::from_secs(20), health(&addr)).await.ok().flatten();
    let model = std::fs::read(zoo("resnet110-7exit-cnc.onnx")).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(fifo, model)).await.unwrap().unwrap();
    wait_for_line(&mut lines, "edge-agent ready").await;
    let ready = health(&addr).await;
    assert_eq!((first, ready), (Some(2), Some(1)), "NOT_SERVING while warming up, then SERVING");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let ch = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let client = GrpcInferenceServiceClient::new(ch);
    let image = vec![0u8; 28 * 28];
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let mut c = client.clone();
            let image = image.clone();
            tokio::spawn(async move {
                let req = ModelInferRequest {
                    id: i.to_string(),
                    inputs: vec![model_infer_request::InferInputTensor {
                        name: "input".into(),
                        datatype: "UINT8".into(),
                        shape: vec![1, 1, 28, 28],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![image.into()],
                    ..Default::default()
                };
                c.model_infer(req).await
            })
        })
        .collect();
    // Every call is in flight (waiting for the cloud that is gone) when SIGTERM arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut degraded = 0;
    for c in calls {
        let resp = c.await.unwrap().expect("an accepted request is answered, not dropped").into_inner();
        assert!(!resp.outputs.is_empty(), "an answer carries its label");
        if resp.parameters.contains_key("classynet_degraded") {
            degraded += 1;
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "edge-agent exits 0 after draining: {status:?}");
    // Samples E1 answers on the edge need no cloud; the rest can only be answered degraded.
    assert!(degraded > 0, "with no answer from the cloud the forwarded samples are answered degraded");
}

#[test]
fn an_empty_variable_in_the_env_file_counts_as_unset() {
    // `EDGE_AGENT_PARTITION=` next to a memory budget: as an operator means it, the partition is
    // not set (clap alone would see an empty value, refused as a partition next to --memory-budget).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["classify", "--limit", "20", "--json"])
        .env("EDGE_AGENT_MODEL", zoo("tiny-3exit-cn.onnx"))
        .env("EDGE_AGENT_MEMORY_BUDGET", "1GB")
        .env("EDGE_AGENT_PARTITION", "")
        .env("EDGE_AGENT_SERVER", "")
        .env("EDGE_AGENT_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["samples"], 20);
    assert_eq!(v["partition"], "E3", "the budget picked the partition");
}
