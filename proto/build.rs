//! Compiles the committed `.proto` files with protox (a protobuf compiler written in Rust), so a
//! build needs no system `protoc`.

fn main() {
    let services = ["inference/grpc_predict_v2.proto", "classynet/v1/control.proto"];
    for p in &services {
        println!("cargo:rerun-if-changed={p}");
    }

    let fds = protox::compile(services, ["."]).expect("the committed service schemas compile");
    tonic_prost_build::configure()
        // Tensor payloads go straight from the socket into `Bytes` without a copy.
        .bytes(".")
        .compile_fds(fds)
        .expect("tonic code generation succeeds for the service schemas");
}
