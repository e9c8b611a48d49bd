"""Grouped users vs users copied onto impressions, through the whole job: same data and order, same AUCs."""

import pytest
from training_paths import train_checking_path

from dist_mtl.config import load_config
from dist_mtl.data.synthetic import SyntheticConfig, write_parquet_direct


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    write_parquet_direct(root, SyntheticConfig(train_impressions=50_000, test_impressions=15_000,
                                               history_ids_per_user=30.0, click_rate=0.2,
                                               buy_rate_after_click=0.2, seed=2))
    return root


def test_grouped_and_expanded_training_reach_the_same_test_auc(dataset, tmp_path):
    def run(grouped: bool) -> dict:
        cfg = load_config(None, [f'data.path="{dataset}"', f'run_dir="{tmp_path / str(grouped)}"',
                                 f"data.grouped={'true' if grouped else 'false'}", "data.batch_size=256", "optimizer.dense_lr=0.003",
                                 "model.embedding_dim=8", "model.tower_dims=[16,8]", "train.epochs=1",
                                 "train.progress_bar=false"])
        return train_checking_path(cfg)  # and that the copied-rows run really copied them

    grouped, expanded = run(True), run(False)
    assert grouped["samples_trained"] == expanded["samples_trained"]
    assert grouped["metrics"]["ctr/auc"] > 0.55  # it learned something worth comparing
    for task in ("ctr", "cvr", "ctcvr"):
        assert abs(grouped["metrics"][f"{task}/auc"] - expanded["metrics"][f"{task}/auc"]) < 0.002, task
