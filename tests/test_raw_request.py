"""Raw requests: raw Tianchi feature lists encoded in an export's id space (dist_mtl/data/raw_request.py)
and scored in one call (``ExportedModel.score_raw``), as the converted dataset's rows score."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from script_helpers import load_script
from test_trainer import small_config

from dist_mtl.data.convert import convert_raw
from dist_mtl.data.raw_request import RawRequestEncoder, RawRequestError
from dist_mtl.data.reader import ParquetGroupReader
from dist_mtl.data.synthetic import SyntheticConfig, write_raw
from dist_mtl.distributed import shutdown_distributed
from dist_mtl.export import ExportError, export_model, load_exported, predict_split
from dist_mtl.trainer import Trainer


# The benchmark's reader of a raw split's user groups: (user feature list, its impressions' feature lists,
# their sample ids) in file order, without the click=0/buy=1 rows the converter drops.
serving_bench = load_script("benchmarks/serving_bench.py")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Synthetic raw files converted with min_count 2 (so that some test ids fall outside the maps), a model
    trained on them for one epoch, exported with its id maps, and its predictions of the test split."""
    root = tmp_path_factory.mktemp("raw_request")
    write_raw(root / "raw", SyntheticConfig(train_impressions=3000, test_impressions=800, history_ids_per_user=40.0,
                                            click_rate=0.1, buy_rate_after_click=0.1, seed=5))
    meta = convert_raw(root / "raw", root / "data", min_count=2)
    cfg = small_config(root / "data", root / "run", "model.weight_features=[\"sum\"]")
    try:
        Trainer(cfg).train()
    finally:
        shutdown_distributed()
    checkpoint = sorted((root / "run" / "checkpoints").glob("step-*"))[-1]
    export = export_model(root / "export", cfg, checkpoint=checkpoint)
    predict_split(export, root / "data", "test", root / "p.parquet", metrics=False)
    predictions = pq.read_table(root / "p.parquet")
    row_of = {sample_id: row for row, sample_id in enumerate(predictions.column("sample_id").to_pylist())}
    return {"root": root, "meta": meta, "cfg": cfg, "checkpoint": checkpoint, "export": export,
            "predictions": predictions, "row_of": row_of, "groups": serving_bench.read_groups(root / "raw", "test", users=sys.maxsize)}


def expected_scores(served, sample_ids: list[int]) -> dict[str, np.ndarray]:
    rows = [served["row_of"][s] for s in sample_ids]
    return {name[2:]: served["predictions"].column(name).to_numpy()[rows]
            for name in served["predictions"].column_names if name.startswith("p_")}


def assert_scores(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for task in want:
        np.testing.assert_allclose(got[task].numpy(), want[task], rtol=0, atol=1e-6, err_msg=task)


def test_a_whole_split_of_raw_lines_scores_as_its_converted_rows(served):
    """Every user of the test split in one request, impressions shuffled across users."""
    groups = served["groups"]
    users = [user for user, _, _ in groups]
    items, index, ids = [], [], []
    for u, (_, user_items, user_ids) in enumerate(groups):
        items += user_items
        index += [u] * len(user_items)
        ids += user_ids
    assert len(ids) == served["predictions"].num_rows  # every converted impression is requested once
    order = np.random.default_rng(0).permutation(len(ids))
    model = load_exported(served["export"])
    got = model.score_raw(users, [items[i] for i in order], np.asarray(index)[order])
    assert_scores(got, expected_scores(served, [ids[i] for i in order]))

    # The ids outside the maps are those the converter counted in the test split.
    outside = {f: n for f, n in model._raw_encoder.ids.outside.items() if n}
    converted = served["meta"].notes["splits"]["test"]["ids_outside_id_maps"]
    assert outside and outside == {f: n for f, n in converted.items() if n}


def test_one_user_per_request_and_the_readers_batch(served):
    model = load_exported(served["export"])
    encoder = model.request_encoder()
    for user, items, ids in served["groups"][:3]:
        assert_scores(model.score_raw([user], items), expected_scores(served, ids))
    # The whole split as one request in file order is the reader's batch of the whole split in storage
    # order, tensor for tensor.
    groups = served["groups"]
    items = [i.decode() for _, user_items, _ in groups for i in user_items]
    index = [u for u, (_, user_items, _) in enumerate(groups) for _ in user_items]
    encoded = encoder.encode([user.decode() for user, _, _ in groups], items, index)
    reader = ParquetGroupReader(served["root"] / "data", "test", len(items), shuffle=False,
                                extra_columns=["sample_id"])
    read = next(iter(reader))
    assert read.labels["sample_id"].tolist() == [i for _, _, ids in groups for i in ids]
    assert read.num_users == encoded.num_users == len(groups)
    for side in ("user_features", "item_features"):
        a, b = getattr(encoded, side), getattr(read, side)
        assert a.keys() == b.keys()
        torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)
        torch.testing.assert_close(a.lengths(), b.lengths(), rtol=0, atol=0)
        torch.testing.assert_close(a.weights(), b.weights(), rtol=0, atol=0)
    torch.testing.assert_close(encoded.user_index, read.user_index, rtol=0, atol=0)


ITEM = "205\x02{id}\x031.0\x01206\x0214181\x031.0\x01508\x026299\x033.0"
USER = "101\x023675\x031.0\x01109_14\x022617\x033.0\x01109_14\x022615\x031.0"


@pytest.mark.parametrize("users, items, user_index, error, message", [
    ([USER], [ITEM, ITEM + ",5"], None, RawRequestError, r"request item 1, field 'feature_list': holds a comma"),
    ([USER], [ITEM + "\n"], None, RawRequestError, r"request item 0, field 'feature_list': holds a line break"),
    ([USER], [ITEM, "205\x0212"], None, RawRequestError,
     r"request item 1, field 'feature_list': feature 1 b'205\\x0212' is not field\\x02id\\x03value"),
    ([USER, USER + "\x01109_14\x02x7\x031.0"], [ITEM, ITEM], [0, 1], RawRequestError,
     r"request user 1, field '109_14': feature 4: feature id b'x7' is not an integer"),
    ([USER], [ITEM + "\x01508\x021\x03-3"], None, RawRequestError, r"request item 0, field '508': .* is negative"),
    ([USER], [ITEM, ITEM + "\x01999\x021\x031.0"], None, RawRequestError,
     r"request item 1, field '999': is not an Ali-CCP field .*strict=False"),
    ([USER + "\x01205\x021\x031.0"], [ITEM], None, RawRequestError,
     r"request user 0, field '205': belongs to the other side's features"),
    ([USER], [ITEM, ITEM, ITEM + "\x01206\x022\x031.0"], None, RawRequestError,
     r"request item 2, field '206': is single-valued but given more than once"),
    ([USER], ["205\x021\x032.0"], None, RawRequestError, r"request item 0, field '205': .* value is not 1"),
    ([USER, USER], [ITEM], None, RawRequestError, r"a request of 2 users needs user_index"),
    ([USER, USER], [ITEM, ITEM], [0, 0], RawRequestError, r"request user 1 has no impression"),
    ([USER], [ITEM], [1], RawRequestError, r"user_index\[0\] = 1 is not a user row of the request's 1"),
    ([USER], [ITEM], [0, 0], RawRequestError, r"user_index has shape \(2,\); the request has 1 impressions"),
    ([USER], [ITEM], [0.0], RawRequestError, r"user_index holds float64 values"),
    ([USER], [], None, RawRequestError, r"at least one user and one impression, got 1 users and 0"),
    (USER, [ITEM], None, TypeError, r"user features must be a sequence of feature lists.*not one str"),
    ([USER], [ITEM, None], None, TypeError, r"request item 1: a feature list is str or bytes, not NoneType"),
])
def test_bad_requests_name_side_row_and_field(served, users, items, user_index, error, message):
    items = [i.format(id=7) if isinstance(i, str) else i for i in items]
    with pytest.raises(error, match=message):
        load_exported(served["export"]).score_raw(users, items, user_index)


def test_not_strict_encodes_as_the_converter_and_counts_what_it_resolved(served):
    model = load_exported(served["export"])
    user, items, ids = served["groups"][0]
    encoder = model.request_encoder(strict=False)
    noisy_user = user + b"\x01999\x021\x031.0\x01205\x021\x031.0"  # an unknown field and an item field
    # The item id given twice: the converter keeps the last, so a first, other id changes nothing.
    noisy_items = [b"205\x021\x031.0\x01" + features for features in items]
    assert_scores(model(encoder.encode([noisy_user], noisy_items)), expected_scores(served, ids))
    counted = {("user", "unknown_fields", "999"): 1, ("user", "misplaced_fields", "205"): 1,
               ("item", "repeated_fields", "205"): len(items)}
    assert encoder.ignored == counted
    # A request refused on its item side counts nothing, its user side included.
    encoded_ids = dict(encoder.ids.encoded)
    with pytest.raises(RawRequestError, match=r"request item 1, field 'feature_list'"):
        encoder.encode([noisy_user], [items[0], b"205\x0212"])
    assert encoder.ignored == counted and dict(encoder.ids.encoded) == encoded_ids
    # An empty feature list is an impression whose fields are all missing (index 0), as in conversion.
    assert set(model.score_raw([user], [b""])) == set(model.task_names)


def test_an_export_without_id_maps_refuses_raw_requests(served, tmp_path):
    bare = export_model(tmp_path / "bare", served["cfg"], checkpoint=served["checkpoint"], with_id_maps=False)
    with pytest.raises(ExportError, match=r"carries no id maps, so raw requests cannot be encoded: it was exported "
                                          r"without them"):
        load_exported(bare).score_raw([USER], [ITEM.format(id=7)])
    with pytest.raises(ValueError, match=r"weight_transform 'log' is not one of"):
        RawRequestEncoder(load_exported(served["export"]).id_maps(), "log")


def test_serving_bench_compares_raw_scores_with_predictions_and_times_requests(served, tmp_path):
    record = serving_bench.main(["--model", str(served["export"]), "--raw-dir", str(served["root"] / "raw"),
                         "--predictions", str(served["root"] / "p.parquet"), "--users", "4",
                         "--candidates", "1", "7", "--out", str(tmp_path / "serving.json")])
    groups = served["groups"][:4]
    assert record["users"] == 4 and record["impressions"] == sum(len(items) for _, items, _ in groups)
    assert record["scores_check"]["impressions_compared"] == record["impressions"]
    assert max(record["scores_check"]["max_abs_difference"].values()) <= 1e-6
    assert set(record["latency_one_user"]) == {"1", "7"}
    assert record["latency_one_user"]["7"]["requests"] == 100
    assert 0 < record["latency_one_user"]["1"]["total_ms"]["p50"] <= record["latency_one_user"]["1"]["total_ms"]["p99"]


@pytest.mark.parametrize("transform, weights", [("log1p", np.log1p([3.0, 1.0])), ("none", [3.0, 1.0])])
def test_history_weights_reach_the_model_through_the_exports_transform(served, transform, weights):
    maps = load_exported(served["export"]).id_maps()
    batch = RawRequestEncoder(maps, transform).encode([USER], [ITEM.format(id=7)])
    history = batch.user_features["109_14"]
    assert history.lengths().tolist() == [2]
    np.testing.assert_allclose(history.weights().numpy(), np.asarray(weights, np.float32), rtol=0, atol=0)
    assert batch.user_features["101"].weights().tolist() == [1.0]  # single-valued: unit weight
