"""Relabelling, the cost matrix, the per-sample loss and the joint loss against hand-computed
values, and configuration errors that name the problem."""
import math

import pytest
import torch

from classynet_models.classes import ConfigError, class_sets, parse_assignment, relabel_table
from classynet_models.losses import ExitLoss, LossConfig, check_costs, cost_matrix, exit_widths


def test_ic_sets_grow_and_mc_sets_are_disjoint():
    ic = class_sets([[9], [8], [6]], 4, 10, "ic")
    assert ic.sets == ((9,), (9, 8), (9, 8, 6), tuple(range(10)))
    mc = class_sets([[9], [8], [6]], 4, 10, "mc")
    assert mc.sets == ((9,), (8,), (6,), tuple(range(10)))
    assert parse_assignment("9;8;6;1;7;0") == [[9], [8], [6], [1], [7], [0]]
    assert parse_assignment("0,1;2,3") == [[0, 1], [2, 3]]


def test_relabelling_maps_outsiders_to_the_bag():
    # S_m = (9, 8): class 9 -> 0, class 8 -> 1, every other class -> 2 (the bag).
    t = relabel_table((9, 8), 10)
    assert t.tolist() == [2, 2, 2, 2, 2, 2, 2, 2, 1, 0]
    cfg = LossConfig("cn", class_sets([[9], [8]], 3, 10, "ic"), [1, 1, 1])
    loss = ExitLoss(cfg)
    y = torch.tensor([9, 8, 3, 0])
    assert loss.exit_labels(0, y).tolist() == [0, 1, 1, 1]  # E1: S_1 = {9}, bag index 1
    assert loss.exit_labels(1, y).tolist() == [0, 1, 2, 2]  # E2: S_2 = {9, 8}, bag index 2
    assert loss.exit_labels(2, y).tolist() == [9, 8, 3, 0]  # last exit: unchanged
    assert exit_widths("cn", cfg.classes) == [2, 3, 10]
    assert exit_widths("bn", cfg.classes) == [10, 10, 10]


def test_cost_matrix_layout_of_eq_3():
    c1, c2, c3, c4 = 0.5, 1.0, 1.5, 2.0
    m = cost_matrix([True, True, False, False], (c1, c2, c3, c4))
    assert m.tolist() == [
        [c1, c2, c2, c2],
        [c2, c1, c2, c2],
        [c4, c4, c3, c4],
        [c4, c4, c4, c3],
    ]


def test_per_sample_loss_of_eq_9_by_hand():
    classes = class_sets([[0, 1], [2]], 3, 4, "mc")
    loss = ExitLoss(LossConfig("cn+c", classes, [1.0, 1.0, 1.0], (0.5, 1.0, 1.5, 2.0)))
    # Exit 1: S_1 = {0, 1} + bag. Sample of class 3 (-> bag, label 2), predicted class 0.
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    got = loss.per_sample(0, logits, torch.tensor([3]))
    ce = -math.log(math.exp(1.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(1.0)))
    assert got.item() == pytest.approx(2.0 * ce, rel=1e-6)  # C[bag, 0] = c4 (wrong, non-targeted)
    # A targeted sample predicted right costs c1.
    got = loss.per_sample(0, torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([0]))
    ce = -math.log(math.exp(3.0) / (math.exp(3.0) + 2))
    assert got.item() == pytest.approx(0.5 * ce, rel=1e-6)


def test_joint_loss_is_the_weighted_sum_of_exit_losses():
    classes = class_sets([[0], [1]], 3, 3, "ic")
    w = [0.2, 0.3, 0.5]
    loss = ExitLoss(LossConfig("bn", classes, w))
    torch.manual_seed(0)
    outs = [torch.randn(5, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 1, 0])
    total, parts = loss(outs, y)
    want = sum(wi * torch.nn.functional.cross_entropy(o, y).item() for wi, o in zip(w, outs))
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert parts == pytest.approx([torch.nn.functional.cross_entropy(o, y).item() for o in outs], rel=1e-6)


def test_masking_drops_samples_that_already_exited():
    classes = class_sets([[0]], 2, 3, "ic")
    plain = ExitLoss(LossConfig("cn", classes, [1.0, 1.0], thresholds=[0.1], masking=False))
    masked = ExitLoss(LossConfig("cn", classes, [1.0, 1.0], thresholds=[0.1], masking=True))
    # Sample 0 is a confident class-0 answer at E1 (it would exit); sample 1 is the bag.
    e1 = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    e2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    _, p_plain = plain([e1, e2], y)
    _, p_masked = masked([e1, e2], y)
    ce2 = torch.nn.functional.cross_entropy(e2, y, reduction="none")
    assert p_plain[1] == pytest.approx(ce2.mean().item(), rel=1e-6)
    assert p_masked[1] == pytest.approx((ce2[1] / 2).item(), rel=1e-6)  # sample 0 contributes zero


@pytest.mark.parametrize(
    "assignment,scheme,message",
    [
        ([[10], [1]], "ic", "class 10, but class ids run 0..9"),
        ([[1], [1]], "mc", "class 1 is assigned to both E1 and E2; the mc scheme needs disjoint sets"),
        ([[1]], "ic", "has 1 lists, but a 3-exit model needs 2"),
        ([[1], []], "ic", "exit E2 is assigned no class"),
        ([[1], [2]], "xx", "unknown class-set scheme 'xx'"),
    ],
)
def test_bad_class_assignments_are_named(assignment, scheme, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        class_sets(assignment, 3, 10, scheme)


def test_bad_weights_and_costs_are_named():
    classes = class_sets([[0], [1]], 3, 3, "ic")
    with pytest.raises(ConfigError, match="exit-weight vector has 2 values, but the model has 3 exits"):
        ExitLoss(LossConfig("bn", classes, [0.5, 0.5]))
    with pytest.raises(ConfigError, match="ordering"):
        check_costs((1.0, 0.5, 1.5, 2.0))
    with pytest.raises(ConfigError, match="unknown training mode 'bogus'"):
        ExitLoss(LossConfig("bogus", classes, [1, 1, 1]))
    with pytest.raises(ConfigError, match="parse|integers"):
        parse_assignment("9;x")


def test_branchynet_exits_answer_every_class_and_classynet_exits_their_set():
    from classynet_models.losses import answerable

    classes = class_sets([[9], [8]], 3, 10, "ic")
    assert answerable("bn", classes).sets == (tuple(range(10)),) * 3
    assert answerable("cn", classes).sets == classes.sets
    assert answerable("cs", classes).sets == classes.sets
