//! `classynet`: plan, partition, run, verify and benchmark early-exit ONNX models.
fn main() -> std::process::ExitCode {
    classynet_runtime::cli::main()
}
