"""The MAC counter against a model counted by hand."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from classynet_eval.macs import MacError, exit_costs, node_macs


def _init(name, shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def two_exit_model():
    # x: 1x1x4x4 -> conv1 (2 filters 3x3, pad 1) -> 2x4x4 -> exit1: flatten + gemm 32->3
    #                        -> conv2 (4 filters 3x3, stride 2, pad 1) -> 4x2x2 -> exit2: flatten + gemm 16->3
    #                        -> a depthwise conv (group 4, 1x1) on conv2's output feeds exit2 too.
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "g1", "b1"], ["exit1"], transB=1),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "wd"], ["d2"], group=4),
        helper.make_node("Flatten", ["d2"], ["f2"]),
        helper.make_node("MatMul", ["f2", "m2"], ["exit2"]),
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("exit1", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("exit2", TensorProto.FLOAT, ["N", 3])],
        [_init("w1", [2, 1, 3, 3]), _init("g1", [3, 32]), _init("b1", [3]), _init("w2", [4, 2, 3, 3]),
         _init("wd", [4, 1, 1, 1]), _init("m2", [16, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_counted_nodes():
    # conv1: 2*4*4 outputs x 1*3*3 = 288; gemm: 3 outputs x 32 = 96;
    # conv2: 4*2*2 outputs x 2*3*3 = 288; depthwise: 16 outputs x 1 = 16; matmul: 3 x 16 = 48.
    assert node_macs(two_exit_model()) == [288, 0, 0, 96, 288, 16, 0, 48]


def test_exit_costs_follow_enabled_exits():
    m = two_exit_model()
    assert exit_costs(m, ["exit1", "exit2"], [True, True]) == [384, 384 + 288 + 16 + 48]
    # A disabled exit's branch is not run, so a sample leaving at E2 does not pay for it.
    assert exit_costs(m, ["exit1", "exit2"], [False, True]) == [384, 288 + 288 + 16 + 48]


def test_unknown_output_is_an_error():
    with pytest.raises(MacError, match="no node produces"):
        exit_costs(two_exit_model(), ["exit1", "nope"], [True, True])
