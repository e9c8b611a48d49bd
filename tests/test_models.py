import dataclasses
import math

import pytest
import torch
from torch import nn

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.schema import ITEM_FIELDS, USER_FIELDS
from dist_mtl.losses import MultiTaskLoss
from dist_mtl.models import MultiTaskModel
from dist_mtl.models import HeadInput
from dist_mtl.models.embeddings import pooled_by_name, table_name
from dist_mtl.models.interaction import GroupedDotInteraction
from dist_mtl.models.layers import GroupedInputLinear, GroupedRows
from dist_mtl.models.weight_features import RowWeightFeatures, WeightedMeanPooling
from dist_mtl.tasks import TaskConfig, default_esmm_tasks
from model_helpers import VOCAB_SIZES, random_batch, small_model_config

MMOE_TASKS = [
    TaskConfig("ctr", "click"),
    TaskConfig("ctcvr", "buy"),
    TaskConfig("price", "price", type="regression", loss_weight=0.5),
]


def plain_input(user_kt, item_kt, user_index):
    """The heads' input without interactions as dense rows: user rows gathered to impressions, then item
    rows."""
    return HeadInput(small_model_config())(*pooled_by_name(user_kt, item_kt), user_index).dense()


def build(head: str, tasks, interaction: str = "none"):
    torch.manual_seed(0)
    cfg = small_model_config(head)
    cfg.interaction = interaction
    return MultiTaskModel(cfg, VOCAB_SIZES, tasks, sparse_device="cpu")


@pytest.mark.parametrize("head,tasks", [("esmm", default_esmm_tasks()), ("mmoe", MMOE_TASKS),
                                        ("ple", MMOE_TASKS), ("shared_bottom", MMOE_TASKS)])
def test_forward_backward_shapes(head, tasks):
    model = build(head, tasks)
    batch = random_batch(num_users=5, num_impressions=23, extra=("price",))
    out = model(batch)
    assert set(out.predictions) == {t.name for t in tasks}
    for t in tasks:
        p = out.predictions[t.name]
        assert p.shape == (23,)
        if t.type == "binary":
            assert bool(((p >= 0) & (p <= 1)).all())
    loss, per_task = MultiTaskLoss(tasks)(out, batch.labels)
    loss.backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("head,tasks", [("esmm", default_esmm_tasks()), ("mmoe", MMOE_TASKS), ("ple", MMOE_TASKS)])
def test_bfloat16_heads_keep_float32_outputs_and_grads_and_track_float32(head, tasks):
    model = build(head, tasks)
    batch = random_batch(num_users=5, num_impressions=64, extra=("price",))
    runs = {}
    for precision in ("float32", "bfloat16"):
        model.head.bfloat16 = precision == "bfloat16"
        model.zero_grad()
        out = model(batch)
        loss, _ = MultiTaskLoss(tasks)(out, batch.labels)
        loss.backward()
        runs[precision] = (out, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out32, loss32, grads32), (out16, loss16, grads16) = runs["float32"], runs["bfloat16"]
    for t in tasks:
        assert out16.predictions[t.name].dtype == torch.float32
        # bfloat16 keeps ~3 significant digits: close to float32, yet not bit-equal (autocast was on).
        torch.testing.assert_close(out16.predictions[t.name], out32.predictions[t.name], rtol=0.05, atol=0.02)
        assert not torch.equal(out16.predictions[t.name], out32.predictions[t.name])
    for name, logit in out16.logits.items():
        # The output unit runs in float32: its logits are not bfloat16 values cast back.
        assert logit.dtype == torch.float32 and not torch.equal(logit, logit.to(torch.bfloat16).float()), name
    torch.testing.assert_close(loss16, loss32, rtol=0.02, atol=1e-3)
    assert grads16.keys() == grads32.keys()
    for name, g in grads16.items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads32[name].flatten(), dim=0)
        assert float(cos) > 0.95 or float(grads32[name].norm()) < 1e-6, name


def test_a_head_without_predict_cannot_be_built():
    from dist_mtl.models.layers import MultiTaskHead

    class NoPredict(MultiTaskHead):
        pass

    with pytest.raises(TypeError, match="predict"):
        NoPredict()


def ple_head(level_dims):
    from dist_mtl.models.mmoe import PLEHead

    torch.manual_seed(0)
    return PLEHead(12, MMOE_TASKS, shared_experts=2, task_experts=2, level_dims=level_dims, tower_dims=[8])


@torch.no_grad()
def ctr_after_changing(head, x, *experts):
    before = head(x).predictions["ctr"].clone()
    for expert in experts:
        for p in expert.parameters():
            p.add_(torch.randn_like(p))
    return before, head(x).predictions["ctr"]


def test_ple_tasks_read_only_their_own_and_the_shared_experts_at_the_last_level():
    x = torch.randn(9, 12)
    one_level = ple_head([8])
    assert "shared_gate" not in one_level.levels[0]  # a last level has no shared branch
    assert one_level.levels[0]["task_gates"]["ctr"].out_features == 2 + 2
    other_task = one_level.levels[0]["task_experts"]["ctcvr"]
    torch.testing.assert_close(*ctr_after_changing(one_level, x, other_task))
    before, after = ctr_after_changing(one_level, x, one_level.levels[0]["shared_experts"])
    assert not torch.allclose(before, after)

    two_levels = ple_head([8, 6])
    # Below the last level the shared branch mixes every expert: 3 tasks x 2 own + 2 shared.
    assert two_levels.levels[0]["shared_gate"].out_features == 3 * 2 + 2
    assert "shared_gate" not in two_levels.levels[1]
    # Another task's level-0 experts reach CTR through the shared branch; its last-level experts do not.
    torch.testing.assert_close(*ctr_after_changing(two_levels, x, two_levels.levels[1]["task_experts"]["ctcvr"]))
    before, after = ctr_after_changing(two_levels, x, two_levels.levels[0]["task_experts"]["ctcvr"])
    assert not torch.allclose(before, after)


def test_ple_task_output_is_its_gated_mixture_through_its_tower():
    head = ple_head([8])
    x = torch.randn(5, 12)
    level = head.levels[0]
    outputs = [e(x) for e in level["task_experts"]["ctr"]] + [e(x) for e in level["shared_experts"]]
    gate = torch.softmax(level["task_gates"]["ctr"](x), dim=-1)
    mixture = sum(gate[:, i : i + 1] * o for i, o in enumerate(outputs))
    torch.testing.assert_close(head(x).logits["ctr"], head.towers["ctr"](mixture))


def grouped_rows(num_users=4, num_impressions=11, user_dim=5, item_dim=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(num_users, user_dim, generator=g, requires_grad=True)
    item = torch.randn(num_impressions, item_dim, generator=g, requires_grad=True)
    # Every user has an impression, in shuffled order, and one user has most of them.
    user_index = torch.cat([torch.arange(num_users), torch.zeros(num_impressions - num_users, dtype=torch.long)])
    return GroupedRows(user, item, user_index[torch.randperm(num_impressions, generator=g)])


def test_grouped_input_linear_is_linear_on_the_gathered_rows():
    x = grouped_rows()
    torch.manual_seed(0)
    layer = GroupedInputLinear(12, 6)
    reference = nn.Linear(12, 6)
    reference.load_state_dict(layer.state_dict())
    out = layer(x)
    expected = reference(x.dense())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer(x.dense()), expected)  # a plain tensor: nn.Linear itself
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [layer.weight, layer.bias, x.user, x.item])
    expected_grads = torch.autograd.grad((expected * weights).sum(),
                                         [reference.weight, reference.bias, x.user, x.item])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("head", ["esmm", "mmoe", "ple", "shared_bottom"])
def test_every_head_reads_grouped_rows_as_their_gathered_rows(head):
    from dist_mtl.models import HEADS

    tasks = default_esmm_tasks() if head == "esmm" else MMOE_TASKS
    cfg = small_model_config(head)
    torch.manual_seed(0)
    module = HEADS[head](12, cfg, tasks).eval()
    x = grouped_rows()
    grouped, dense = module(x).predictions, module(x.dense()).predictions
    for t in tasks:
        torch.testing.assert_close(grouped[t.name], dense[t.name])


def test_esmm_ctcvr_is_product_and_loss_is_ctr_plus_ctcvr():
    model = build("esmm", default_esmm_tasks())
    batch = random_batch(num_users=4, num_impressions=30)
    out = model(batch)
    torch.testing.assert_close(out.predictions["ctcvr"], out.predictions["ctr"] * out.predictions["cvr"])
    loss, _ = MultiTaskLoss(default_esmm_tasks())(out, batch.labels)
    click, buy = batch.labels["click"], batch.labels["buy"]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits["ctr"], click)
    expected = expected + torch.nn.functional.binary_cross_entropy(out.predictions["ctcvr"], buy)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_esmm_cvr_tower_gets_gradient_only_through_ctcvr():
    tasks = default_esmm_tasks()
    model = build("esmm", tasks)
    batch = random_batch(num_users=4, num_impressions=30)

    def cvr_grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for p in model.head.cvr_tower.parameters()]

    full = cvr_grads(MultiTaskLoss(tasks)(model(batch), batch.labels)[0])
    only_ctcvr = cvr_grads(MultiTaskLoss([tasks[2]])(model(batch), batch.labels)[0])
    only_ctr = cvr_grads(MultiTaskLoss([tasks[0]])(model(batch), batch.labels)[0])
    for g_full, g_ctcvr, g_ctr in zip(full, only_ctcvr, only_ctr):
        torch.testing.assert_close(g_full, g_ctcvr)
        assert float(g_ctr.abs().max()) == 0.0
    assert any(float(g.abs().max()) > 0 for g in full)


def test_grouped_and_expanded_pool_identically():
    model = build("esmm", default_esmm_tasks())
    batch = random_batch(num_users=6, num_impressions=40)
    expanded = batch.expanded()
    assert expanded.num_users == 40 and batch.num_users == 6
    grouped_x = plain_input(model.user_ebc(batch.user_features), model.item_ebc(batch.item_features),
                            batch.user_index)
    expanded_x = plain_input(model.user_ebc(expanded.user_features), model.item_ebc(expanded.item_features),
                             expanded.user_index)
    torch.testing.assert_close(grouped_x, expanded_x, rtol=1e-6, atol=1e-6)
    loss_g, _ = MultiTaskLoss(default_esmm_tasks())(model(batch), batch.labels)
    loss_e, _ = MultiTaskLoss(default_esmm_tasks())(model(expanded), expanded.labels)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)


def test_dot_interaction_is_every_pairwise_product_of_the_gathered_fields():
    model = build("esmm", default_esmm_tasks(), interaction="dot")
    batch = random_batch(num_users=5, num_impressions=17)
    x = model.head_input(*pooled_by_name(model.user_ebc(batch.user_features),
                                         model.item_ebc(batch.item_features)), batch.user_index)
    plain = plain_input(model.user_ebc(batch.user_features), model.item_ebc(batch.item_features),
                        batch.user_index)
    n_user, n_item, dim = len(USER_FIELDS), len(ITEM_FIELDS), 8
    per_user, per_impression = GroupedDotInteraction.num_pairs(n_user, n_item)
    assert x.user.shape == (5, n_user * dim + per_user)
    assert x.item.shape == (17, n_item * dim + per_impression)
    assert model.head_input.out_dim == plain.shape[1] + per_user + per_impression
    torch.testing.assert_close(x.user.index_select(0, batch.user_index)[:, : n_user * dim], plain[:, : n_user * dim])
    torch.testing.assert_close(x.item[:, : n_item * dim], plain[:, n_user * dim:])
    # The documented order, computed the slow way: user-user pairs on the user side, then user-item and
    # item-item pairs on the item side.
    f = plain.view(17, n_user + n_item, dim)
    user_pairs = [(a, b) for a in range(n_user) for b in range(a + 1, n_user)]
    item_pairs = [(a, n_user + b) for a in range(n_user) for b in range(n_item)]
    item_pairs += [(n_user + a, n_user + b) for a in range(n_item) for b in range(a + 1, n_item)]

    def products(pairs):
        return torch.stack([(f[:, a] * f[:, b]).sum(-1) for a, b in pairs], dim=1)

    torch.testing.assert_close(x.user.index_select(0, batch.user_index)[:, n_user * dim:], products(user_pairs),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.item[:, n_item * dim:], products(item_pairs), rtol=1e-5, atol=1e-6)


def test_dot_interaction_grouped_equals_expanded_and_trains():
    tasks = default_esmm_tasks()
    model = build("esmm", tasks, interaction="dot")
    batch = random_batch(num_users=6, num_impressions=40)
    expanded = batch.expanded()
    loss_g, _ = MultiTaskLoss(tasks)(model(batch), batch.labels)
    loss_e, _ = MultiTaskLoss(tasks)(model(expanded), expanded.labels)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)
    loss_g.backward()
    user_table = model.user_ebc.embedding_bags[table_name(USER_FIELDS[0].name)].weight
    assert user_table.grad is not None and float(user_table.grad.abs().sum()) > 0


def test_pooled_columns_follow_schema_order_not_ebc_key_order():
    model = build("esmm", default_esmm_tasks())
    batch = random_batch(num_users=3, num_impressions=9)
    user_kt = model.user_ebc(batch.user_features)
    item_kt = model.item_ebc(batch.item_features)
    x = plain_input(user_kt, item_kt, batch.user_index)
    # Feed the same pooled values with the user keys reversed (what a sharded EBC may return).
    from torchrec.sparse.jagged_tensor import KeyedTensor

    d = user_kt.to_dict()
    rev = list(reversed(list(d)))
    permuted = KeyedTensor.from_tensor_list(rev, [d[k] for k in rev])
    torch.testing.assert_close(plain_input(permuted, item_kt, batch.user_index), x)
    dim = 8
    first_user_key = USER_FIELDS[0].name
    torch.testing.assert_close(x[:, :dim], d[first_user_key].index_select(0, batch.user_index))
    last_item_key = ITEM_FIELDS[-1].name
    torch.testing.assert_close(x[:, -dim:], item_kt.to_dict()[last_item_key])


def test_batch_validate_names_the_source():
    batch = random_batch(num_users=3, num_impressions=6)
    batch.source = "train/impressions-00001.parquet rg 2"
    batch.user_index[4] = 7
    with pytest.raises(ValueError, match=r"user_index\[4\]=7 is outside the batch's 3 users in batch from "
                                         r"train/impressions-00001\.parquet rg 2"):
        batch.validate()
    batch = random_batch(num_users=3, num_impressions=6)
    batch.user_index[:] = torch.tensor([0, 0, 0, 2, 2, 2])
    with pytest.raises(ValueError, match="user row 1 has no impression"):
        batch.validate()


def test_output_bias_starts_at_the_label_rates_logit():
    model = build("mmoe", MMOE_TASKS)
    price_bias = model.head.towers["price"].out.bias.clone()
    model.init_output_bias({"ctr": 0.04, "ctcvr": 0.0002, "price": None})
    torch.testing.assert_close(model.head.towers["ctr"].out.bias, torch.tensor([math.log(0.04 / 0.96)]))
    torch.testing.assert_close(model.head.towers["ctcvr"].out.bias, torch.tensor([math.log(0.0002 / 0.9998)]))
    torch.testing.assert_close(model.head.towers["price"].out.bias, price_bias)  # no rate given: untouched

    esmm = build("esmm", default_esmm_tasks())
    esmm.init_output_bias({"ctr": 0.5, "cvr": 0.0, "ctcvr": 0.01})  # ctcvr has no layer of its own
    assert float(esmm.head.ctr_tower.out.bias) == pytest.approx(0.0, abs=1e-7)
    # A rate of 0 (no purchase in the split) is clamped, not -inf.
    assert float(esmm.head.cvr_tower.out.bias) == pytest.approx(math.log(1e-6 / (1 - 1e-6)), rel=1e-5)


def test_row_weight_stats_per_field_and_row():
    # keys a (single-valued), b, c over 3 rows; b's rows: [2, 3], [], [5]; c's rows: [1], [4, 6, 10], []
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.arange(10),
                            lengths=torch.tensor([1, 1, 1, 2, 0, 1, 1, 3, 0]),
                            weights=torch.tensor([1.0, 1, 1, 2, 3, 5, 1, 4, 6, 10]))
    features = RowWeightFeatures(["a", "b", "c"], ["c", "b"], ["sum", "last", "count"])
    got = features(kjt)
    assert features.out_dim == 6 and got.shape == (3, 6)
    expected = torch.tensor([[1, 1, 1, 5, 3, 2],  # c: sum 1, last 1, one id; b: sum 5, last 3, two ids
                             [20, 10, 3, 0, 0, 0],
                             [0, 0, 0, 5, 5, 1]], dtype=torch.float32)
    torch.testing.assert_close(got, torch.log1p(expected))
    assert torch.jit.script(features)(kjt).equal(got)
    # Fields are found by name, as the tables find theirs: the same rows with the keys in another order.
    permuted = kjt.permute([2, 0, 1])
    assert permuted.keys() == ["c", "a", "b"]
    assert features(permuted).equal(got) and torch.jit.script(features)(permuted).equal(got)
    with pytest.raises(ValueError, match="unknown weight statistic"):
        RowWeightFeatures(["a"], ["a"], ["mean"])
    with pytest.raises(ValueError, match=r"fields \['d'\] are not among the side's keys"):
        RowWeightFeatures(["a", "b"], ["d"], ["sum"])


@pytest.mark.parametrize("options", [{"weight_features": ["last", "sum"]}, {"mean_pooled_fields": ["109_14"]}])
def test_a_batch_with_its_keys_in_another_order_scores_the_same(options):
    cfg = small_model_config("esmm")
    for key, value in options.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = MultiTaskModel(cfg, VOCAB_SIZES, default_esmm_tasks(), sparse_device="cpu").eval()
    batch = random_batch(num_users=5, num_impressions=20, seed=2)
    order = list(range(len(batch.user_features.keys())))[::-1]
    permuted = dataclasses.replace(batch, user_features=batch.user_features.permute(order))
    with torch.no_grad():
        expected, got = model(batch).predictions, model(permuted).predictions
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)


def test_weight_features_reach_the_heads():
    torch.manual_seed(0)
    cfg = small_model_config("esmm")
    cfg.weight_features = ["sum", "last"]
    model = MultiTaskModel(cfg, VOCAB_SIZES, default_esmm_tasks(), sparse_device="cpu")
    multi = sum(f.multi_valued for f in USER_FIELDS + ITEM_FIELDS)
    assert model.head_input.out_dim == build("esmm", default_esmm_tasks()).head_input.out_dim + 2 * multi
    batch = random_batch(num_users=5, num_impressions=23)
    loss = MultiTaskLoss(default_esmm_tasks())(model(batch), batch.labels)[0]
    loss.backward()

    # With every table at zero the pooled embeddings carry nothing, so what moves the predictions is
    # the weight statistics: the first user's history weights, gathered to that user's impressions only.
    with torch.no_grad():
        for p in list(model.user_ebc.parameters()) + list(model.item_ebc.parameters()):
            p.zero_()
    before = model(batch).predictions["ctr"].detach()
    users = batch.user_features
    weights = users.weights().clone()
    offsets = users.offsets()
    for k, f in enumerate(USER_FIELDS):
        if f.multi_valued:
            row = k * batch.num_users  # the first user's row of field k
            weights[offsets[row]:offsets[row + 1]] *= 7.0
    changed = KeyedJaggedTensor(keys=users.keys(), values=users.values(), lengths=users.lengths(), weights=weights)
    after = model(GroupedBatch(changed, batch.item_features, batch.user_index, batch.labels)).predictions["ctr"]
    moved = (after.detach() - before).abs() > 1e-7
    assert moved.any() and moved.equal(batch.user_index == 0)


def test_weighted_mean_pooling_divides_each_listed_field_by_its_rows_weight():
    # keys a (single-valued, dim 2), b (dim 3), c (dim 2) over 3 rows; b: [2, 3], [], [5]; c: [1], [4, 6, 10], []
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.arange(10),
                            lengths=torch.tensor([1, 1, 1, 2, 0, 1, 1, 3, 0]),
                            weights=torch.tensor([1.0, 1, 1, 2, 3, 5, 1, 4, 6, 10]))
    pooled = torch.arange(21, dtype=torch.float32).reshape(3, 7) + 1
    means = WeightedMeanPooling(["a", "b", "c"], {"c": (5, 7), "b": (2, 5)})
    got = means(pooled, kjt)
    b_scale = torch.tensor([[1 / (2 + 3.0)], [0.0], [1 / 5]])  # an empty row (total 0) is zeroed
    c_scale = torch.tensor([[1.0], [1 / (4 + 6 + 10)], [0.0]])
    expected = torch.cat([pooled[:, :2], pooled[:, 2:5] * b_scale, pooled[:, 5:] * c_scale], 1)
    torch.testing.assert_close(got, expected)
    assert torch.jit.script(means)(pooled, kjt).equal(got)
    # An empty row stays zero instead of dividing by nothing; no listed field leaves the rows as they are.
    empty = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.arange(1), lengths=torch.tensor([1, 0, 0]),
                              weights=torch.ones(1))
    assert means(torch.cat([torch.ones(1, 2), torch.zeros(1, 5)], 1), empty).equal(
        torch.cat([torch.ones(1, 2), torch.zeros(1, 5)], 1))
    assert WeightedMeanPooling(["a", "b", "c"], {})(pooled, kjt) is pooled


def factor_model(rank: int = 4, factor_only=("109_14", "110_14"), mean_pooled=("109_14", "110_14"),
                 head: str = "esmm"):
    torch.manual_seed(0)
    cfg = small_model_config(head)
    cfg.factor_rank, cfg.factor_only_fields, cfg.mean_pooled_fields = rank, list(factor_only), list(mean_pooled)
    cfg.weight_features = ["sum"]
    return MultiTaskModel(cfg, VOCAB_SIZES, default_esmm_tasks() if head == "esmm" else MMOE_TASKS,
                          sparse_device="cpu")


def test_mean_pooled_fields_reach_the_head_as_means_of_their_ids():
    model = factor_model(mean_pooled=("109_14", "127_14"))
    plain = factor_model(mean_pooled=())
    plain.load_state_dict(model.state_dict())
    batch = random_batch(num_users=5, num_impressions=23)
    rows = {}
    for name, m in (("mean", model), ("sum", plain)):
        user, _ = pooled_by_name(m.user_ebc(batch.user_features), m.item_ebc(batch.item_features))
        rows[name] = m.user_means(user, batch.user_features)
    users = batch.user_features.to_dict()
    for k, f in enumerate(USER_FIELDS):
        cols = slice(8 * k, 8 * k + 8)
        want = rows["sum"][:, cols]
        if f.name in ("109_14", "127_14"):
            total = torch.stack([w.sum() for w in users[f.name].weights().split(users[f.name].lengths().tolist())])
            want = torch.where(total[:, None] > 0, want / total[:, None], torch.zeros_like(want))
        torch.testing.assert_close(rows["mean"][:, cols], want)


@pytest.mark.parametrize("head", ["esmm", "mmoe", "ple", "shared_bottom"])
def test_factor_terms_add_to_the_binary_logits_and_hide_their_fields_from_the_head(head):
    model = factor_model(head=head).eval()
    module, batch = model.head, random_batch(num_users=5, num_impressions=23, extra=("price",))
    user, item = pooled_by_name(model.user_ebc(batch.user_features), model.item_ebc(batch.item_features))
    user = model.user_weights.append_to(model.user_means(user, batch.user_features), batch.user_features)
    item = model.item_weights.append_to(item, batch.item_features)
    x = model.head_input(user, item, batch.user_index)
    hidden = {c for f in ("109_14", "110_14") for c in range(*model.head_input.layout.user_columns[f])}
    assert len(hidden) == 16
    if head == "esmm":
        assert module.ctr_tower.body[0].in_features == model.head_input.out_dim - 16
    keep = [c for c in range(user.shape[1]) if c not in hidden]
    # ESMM's two towers; elsewhere every binary task in config order (the regression task "price" has none).
    tasks = ["ctr", "cvr"] if head == "esmm" else ["ctr", "ctcvr"]
    assert module.factors.tasks == tasks and set(module.factors.mix) == set(tasks[1:])
    u = module.factors.user_projection(x.user)[x.user_index]
    i = module.factors.item_projection(x.item)
    with torch.no_grad():
        module.factors.mix[tasks[1]].copy_(torch.randn(4, 4))
    out = model(batch)
    bare = module.predict(GroupedRows(x.user[:, keep], x.item, x.user_index), {})
    torch.testing.assert_close(out.logits[tasks[0]], bare.logits[tasks[0]] + (u * i).sum(1))
    torch.testing.assert_close(out.logits[tasks[1]],
                               bare.logits[tasks[1]] + ((u @ module.factors.mix[tasks[1]]) * i).sum(1))
    if head == "esmm":
        torch.testing.assert_close(out.predictions["ctcvr"],
                                   torch.sigmoid(out.logits["ctr"]) * torch.sigmoid(out.logits["cvr"]))
    else:
        torch.testing.assert_close(out.predictions["price"], bare.predictions["price"])
    # Grouped and gathered rows give the same outputs.
    dense = module(x.dense()).logits
    for task in tasks:
        torch.testing.assert_close(dense[task], out.logits[task])
    # The hidden fields move the outputs only through the factors.
    with torch.no_grad():
        module.factors.user_projection.weight[:, sorted(hidden)] = 0.0
    moved = x.user.clone()
    moved[:, sorted(hidden)] += 5.0
    before, after = module(x).predictions, module(GroupedRows(moved, x.item, x.user_index)).predictions
    for task in before:
        torch.testing.assert_close(after[task], before[task])


def test_factors_without_hidden_fields_keep_every_column_for_the_towers():
    model = factor_model(factor_only=())
    assert model.head.visible_user_columns is None
    assert model.head.ctr_tower.body[0].in_features == model.head_input.out_dim


def test_factor_model_trains_end_to_end_in_bfloat16_with_float32_terms():
    model = factor_model()
    model.head.bfloat16 = True
    batch = random_batch(num_users=5, num_impressions=23)
    out = model(batch)
    assert out.logits["cvr"].dtype == torch.float32
    loss, _ = MultiTaskLoss(default_esmm_tasks())(out, batch.labels)
    loss.backward()
    for p in (model.head.factors.user_projection.weight, model.head.factors.item_projection.weight,
              model.head.factors.mix["cvr"]):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("head,tasks", [("esmm", default_esmm_tasks()), ("mmoe", MMOE_TASKS),
                                        ("ple", MMOE_TASKS), ("shared_bottom", MMOE_TASKS)])
def test_task_tower_dims_size_their_tasks_towers_and_an_empty_list_is_a_linear_readout(head, tasks):
    torch.manual_seed(0)
    cfg = small_model_config(head)
    linear, wide = ("cvr", "ctr") if head == "esmm" else ("ctcvr", "price")
    cfg.task_tower_dims = {linear: [], wide: [32]}
    model = MultiTaskModel(cfg, VOCAB_SIZES, tasks, sparse_device="cpu")
    towers = ({"ctr": model.head.ctr_tower, "cvr": model.head.cvr_tower} if head == "esmm"
              else dict(model.head.towers))
    sizes = {name: [layer.out_features for layer in t.body if isinstance(layer, nn.Linear)]
             for name, t in towers.items()}
    assert sizes[linear] == [] and sizes[wide] == [32]
    assert all(v == [16, 8] for k, v in sizes.items() if k not in (linear, wide))  # the rest: tower_dims
    # The linear tower is its output unit alone, on the tower's whole input (grouped: per user, then gathered).
    assert len(towers[linear].body) == 0 and isinstance(towers[linear].out, GroupedInputLinear)
    batch = random_batch(num_users=5, num_impressions=23, extra=("price",))
    # The head's input as the model's forward builds it, taken at the head rather than rebuilt here.
    head_inputs: list[GroupedRows] = []
    model.head.register_forward_pre_hook(lambda _, args: head_inputs.append(args[0]))
    out = model(batch)
    loss, _ = MultiTaskLoss(tasks)(out, batch.labels)
    loss.backward()
    assert float(towers[linear].out.weight.grad.abs().sum()) > 0
    if head == "esmm":
        want = head_inputs[0].dense() @ towers["cvr"].out.weight.t() + towers["cvr"].out.bias
        torch.testing.assert_close(out.logits["cvr"], want.squeeze(-1).detach(), rtol=1e-5, atol=1e-5)
