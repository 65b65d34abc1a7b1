"""ClassyNet training: BranchyNet baseline, bags of classes (IC and MC), the cost-sensitive
loss matrix, and export to the runtime's ONNX model format (docs/model-format.md)."""

__version__ = "0.1.0"
