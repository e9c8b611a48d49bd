import math

import numpy as np
import pytest
import torch

from dist_mtl.losses import PROBABILITY_EPS, ModelOutput, MultiTaskLoss
from dist_mtl.tasks import TaskConfig, default_esmm_tasks


def _batch(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = {name: (torch.randn(n, generator=g) * 2).requires_grad_() for name in ("ctr", "cvr", "ctcvr")}
    click = (torch.rand(n, generator=g) < 0.4).float()
    buy = click * (torch.rand(n, generator=g) < 0.5).float()
    labels = {"click": click, "buy": buy, "dwell": torch.rand(n, generator=g) * 3}
    return logits, labels


def _np_bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def test_bce_with_logits_and_bce_on_probability_agree():
    logits, labels = _batch()
    task = TaskConfig(name="ctr", label="click")
    probability = torch.sigmoid(logits["ctr"])
    with_logit = MultiTaskLoss.task_loss(
        task, ModelOutput(predictions={"ctr": probability}, logits={"ctr": logits["ctr"]}), labels)
    without_logit = MultiTaskLoss.task_loss(task, ModelOutput(predictions={"ctr": probability}), labels)
    expected = _np_bce(probability.detach().double().numpy(), labels["click"].numpy()).mean()
    assert with_logit.item() == pytest.approx(expected, rel=1e-5)
    assert without_logit.item() == pytest.approx(expected, rel=1e-5)


def test_extreme_logit_stays_finite_where_probability_saturates():
    task = TaskConfig(name="ctr", label="click")
    logit = torch.tensor([60.0, -60.0], requires_grad=True)
    labels = {"click": torch.tensor([0.0, 1.0])}
    loss = MultiTaskLoss.task_loss(task, ModelOutput({"ctr": torch.sigmoid(logit)}, {"ctr": logit}), labels)
    loss.backward()
    # BCE-with-logits keeps the true loss (60 per row); the clamped probability would cap it near 16.
    assert loss.item() == pytest.approx(60.0, rel=1e-5)
    assert torch.isfinite(logit.grad).all()


def test_ctcvr_loss_from_log_probability_is_exact_where_the_product_underflows():
    task = TaskConfig(name="ctcvr", label="buy")
    ctr, cvr = torch.tensor([-9.0, 0.3, 2.0], requires_grad=True), torch.tensor([-9.0, -1.0, 8.0], requires_grad=True)
    labels = {"buy": torch.tensor([1.0, 0.0, 0.0])}

    def loss(with_log_probability: bool) -> torch.Tensor:
        p = torch.sigmoid(ctr) * torch.sigmoid(cvr)
        log_p = torch.nn.functional.logsigmoid(ctr) + torch.nn.functional.logsigmoid(cvr)
        out = ModelOutput({"ctcvr": p}, log_probabilities={"ctcvr": log_p} if with_log_probability else {})
        return MultiTaskLoss.task_loss(task, out, labels)

    exact = loss(True)
    grad_ctr, grad_cvr = torch.autograd.grad(exact, (ctr, cvr))
    # Row 0: a purchase rated p = sigmoid(-9)^2 ~ 1.5e-8, below the clamp: -log p = 18.0002 exactly,
    # and its gradient reaches both towers. The clamped probability reads 16.1 with zero gradient.
    log_p = np.log(1 / (1 + np.exp(9.0))) * 2
    p1 = 1 / (1 + np.exp(-0.3)) / (1 + np.exp(1.0))
    p2 = 1 / (1 + np.exp(-2.0)) / (1 + np.exp(-8.0))
    expected = (-log_p - np.log1p(-p1) - np.log1p(-p2)) / 3
    assert exact.item() == pytest.approx(expected, rel=1e-5)
    assert grad_ctr[0] < -0.3 and grad_cvr[0] < -0.3  # d/da of -log sigmoid(a) / 3 at a = -9
    clamped = loss(False)
    clamped_grad_ctr, _ = torch.autograd.grad(clamped, (ctr, cvr))
    assert clamped.item() < exact.item() - 0.5 and clamped_grad_ctr[0] == 0
    # Rows 1 and 2 (p inside the clamp's range) get the same gradient either way.
    torch.testing.assert_close(grad_ctr[1:], clamped_grad_ctr[1:], rtol=1e-4, atol=1e-6)


def test_masked_rows_are_excluded_from_value_and_gradient():
    logits, labels = _batch(n=50, seed=1)
    task = TaskConfig(name="cvr", label="buy", rows="click")
    clicked = labels["click"] == 1
    # Labels outside the task's rows may be undefined; they must not leak into the loss.
    labels["buy"] = torch.where(clicked, labels["buy"], torch.full_like(labels["buy"], math.nan))
    logit = logits["cvr"]
    loss = MultiTaskLoss.task_loss(task, ModelOutput({"cvr": torch.sigmoid(logit)}, {"cvr": logit}), labels)
    loss.backward()

    p = torch.sigmoid(logit).detach().double().numpy()
    mask = clicked.numpy()
    expected = _np_bce(p[mask], labels["buy"].numpy()[mask]).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(logit.grad[~clicked] == 0)
    assert torch.all(logit.grad[clicked] != 0)


def test_sample_weights_follow_the_documented_definition():
    logits, labels = _batch(n=40, seed=2)
    p = torch.sigmoid(logits["ctr"]).detach()
    plain = TaskConfig(name="ctr", label="click")
    weighted = TaskConfig(name="ctr", label="click", weight_column="w")
    output = ModelOutput({"ctr": p})

    labels["w"] = torch.full_like(p, 2.0)
    assert MultiTaskLoss.task_loss(weighted, output, labels).item() == pytest.approx(
        2 * MultiTaskLoss.task_loss(plain, output, labels).item(), rel=1e-6)

    w = torch.rand(40, generator=torch.Generator().manual_seed(3)) * 4
    labels["w"] = w
    per_row = _np_bce(p.double().numpy(), labels["click"].numpy())
    expected = (w.double().numpy() * per_row).sum() / 40  # divided by the row count, not by sum(w)
    assert MultiTaskLoss.task_loss(weighted, output, labels).item() == pytest.approx(expected, rel=1e-5)


def test_masked_sample_weights_divide_by_the_masked_row_count():
    _, labels = _batch(n=30, seed=4)
    prediction = torch.linspace(-1, 1, 30)
    task = TaskConfig(name="dwell", label="dwell", type="regression", weight_column="w", rows="click")
    labels["w"] = torch.arange(30, dtype=torch.float32)
    loss = MultiTaskLoss.task_loss(task, ModelOutput({"dwell": prediction}), labels)
    mask = labels["click"].numpy() == 1
    err = (prediction.numpy() - labels["dwell"].numpy()) ** 2
    expected = (labels["w"].numpy() * err)[mask].sum() / mask.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_total_is_the_task_weighted_sum_and_weight_zero_task_gets_no_gradient():
    logits, labels = _batch(seed=5)
    tasks = [
        TaskConfig(name="ctr", label="click", loss_weight=0.5),
        TaskConfig(name="cvr", label="buy", loss_weight=0.0, rows="click"),
        TaskConfig(name="ctcvr", label="buy", loss_weight=3.0),
    ]
    output = ModelOutput(
        predictions={k: torch.sigmoid(v) for k, v in logits.items()},
        logits={"ctr": logits["ctr"], "cvr": logits["cvr"]},
    )
    total, per_task = MultiTaskLoss(tasks)(output, labels)
    assert set(per_task) == {"ctr", "cvr", "ctcvr"}
    assert all(not v.requires_grad for v in per_task.values())
    assert per_task["cvr"].item() > 0  # reported although it is not trained
    assert total.item() == pytest.approx(0.5 * per_task["ctr"].item() + 3.0 * per_task["ctcvr"].item(), rel=1e-6)
    total.backward()
    assert logits["cvr"].grad is None
    assert logits["ctr"].grad is not None and logits["ctcvr"].grad is not None


def test_batch_without_task_rows_gives_zero_loss_and_finite_gradients():
    logits, labels = _batch(n=16, seed=6)
    labels["click"] = torch.zeros(16)
    labels["buy"] = torch.full((16,), math.nan)  # undefined everywhere: no row is the task's
    tasks = [TaskConfig(name="cvr", label="buy", rows="click")]
    logit = logits["cvr"]
    probability = torch.sigmoid(logit)
    for output in (ModelOutput({"cvr": probability}, {"cvr": logit}), ModelOutput({"cvr": probability})):
        total, per_task = MultiTaskLoss(tasks)(output, labels)
        assert total.item() == 0.0 and per_task["cvr"].item() == 0.0
        assert total.requires_grad
        (grad,) = torch.autograd.grad(total, logit)
        assert torch.isfinite(grad).all() and torch.all(grad == 0)


def test_empty_batch_gives_zero_loss():
    tasks = default_esmm_tasks()
    empty = torch.zeros(0, requires_grad=True)
    output = ModelOutput({t.name: torch.sigmoid(empty) for t in tasks}, {"ctr": empty, "cvr": empty})
    total, _ = MultiTaskLoss(tasks)(output, {"click": torch.zeros(0), "buy": torch.zeros(0)})
    total.backward()
    assert total.item() == 0.0


@pytest.mark.parametrize(
    "task, missing",
    [
        (TaskConfig(name="ctr", label="clk"), "label column 'clk'"),
        (TaskConfig(name="ctr", label="click", weight_column="dwell_w"), "weight column 'dwell_w'"),
        (TaskConfig(name="ctr", label="click", rows="viewed"), "rows column 'viewed'"),
        (TaskConfig(name="other", label="click"), "no prediction"),
    ],
)
def test_missing_column_names_task_and_column(task, missing):
    _, labels = _batch(n=8)
    output = ModelOutput({"ctr": torch.full((8,), 0.5)})
    with pytest.raises(ValueError, match=f"task '{task.name}'.*{missing}"):
        MultiTaskLoss([task])(output, labels)


def test_shape_mismatch_is_rejected():
    _, labels = _batch(n=8)
    with pytest.raises(ValueError, match="label column 'click' has shape \\(8,\\), expected \\(7,\\)"):
        MultiTaskLoss([TaskConfig(name="ctr", label="click")])(ModelOutput({"ctr": torch.rand(7)}), labels)
    with pytest.raises(ValueError, match="expected \\[B\\]"):
        MultiTaskLoss([TaskConfig(name="ctr", label="click")])(ModelOutput({"ctr": torch.rand(8, 1)}), labels)


def test_constructor_rejects_untrainable_or_ambiguous_task_lists():
    with pytest.raises(ValueError, match="loss_weight 0"):
        MultiTaskLoss([TaskConfig(name="ctr", label="click", loss_weight=0.0)])
    with pytest.raises(ValueError, match="repeated: \\['ctr'\\]"):
        MultiTaskLoss([TaskConfig(name="ctr", label="click"), TaskConfig(name="ctr", label="buy")])
