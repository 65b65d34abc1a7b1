//! Compiles the committed `.proto` files with protox (a protobuf compiler written in Rust), so a
//! build needs no system `protoc`.

fn main() {
    let protos = ["onnx/onnx.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."]).expect("the committed .proto files compile");
    prost_build::Config::new()
        // Tensor payloads can be large; `bytes::Bytes` would avoid one copy but ONNX models are
        // decoded once at load time, so plain Vec<u8> keeps the API simple.
        .compile_fds(fds)
        .expect("prost code generation succeeds for the committed schemas");
}
