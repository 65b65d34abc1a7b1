//! Compiles the committed ONNX schema (`proto/onnx/onnx.proto`) with protox, a protobuf compiler
//! written in Rust, so a build needs no system `protoc`. The core owns the model format it reads,
//! cuts and writes; it links no gRPC.

fn main() {
    let onnx = ["onnx/onnx.proto"];
    for p in onnx {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(onnx, ["proto"]).expect("the committed ONNX schema compiles");
    prost_build::Config::new().compile_fds(fds).expect("prost code generation succeeds for the ONNX schema");
}
