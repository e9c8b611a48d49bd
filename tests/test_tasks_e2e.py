"""Tasks as configuration, end to end: MMOE with two binary tasks and one regression task learns all three."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dist_mtl.config import load_config
from dist_mtl.data.schema import DatasetMetadata
from dist_mtl.data.synthetic import SyntheticConfig, write_parquet_direct
from dist_mtl.tasks import TaskConfig, check_task_columns, task_columns
from dist_mtl.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_parquet_direct(root, SyntheticConfig(train_impressions=60_000, test_impressions=20_000,
                                               history_ids_per_user=20.0, click_rate=0.2,
                                               buy_rate_after_click=0.25, extra_targets=True, seed=1))
    return root


def test_mmoe_learns_two_binary_and_one_regression_task(dataset, tmp_path):
    tasks_toml = (
        '[[tasks]]\nname = "ctr"\nlabel = "click"\n'
        '[[tasks]]\nname = "ctcvr"\nlabel = "buy"\n'
        '[[tasks]]\nname = "price"\nlabel = "price"\ntype = "regression"\nloss_weight = 0.5\n'
        'weight_column = "dwell"\n'
    )
    path = tmp_path / "mmoe.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[data]\npath = "{dataset}"\nbatch_size = 512\n'
                    '[model]\nhead = "mmoe"\nembedding_dim = 8\ntower_dims = [16, 8]\nexpert_dims = [32]\n'
                    'num_experts = 3\n[train]\nepochs = 2\nprogress_bar = false\nearly_stop_metric = "ctr/auc"\n'
                    '[optimizer]\ndense_lr = 0.003\n' + tasks_toml)
    summary = Trainer(load_config(path)).train()
    m = summary["metrics"]
    meta = DatasetMetadata.load(dataset)
    price = np.concatenate([pq.read_table(dataset / p.impressions, columns=["price"]).column(0).to_numpy()
                            for p in meta.split("test").parts])
    assert m["ctr/auc"] > 0.6 and m["ctcvr/auc"] > 0.6, m
    assert m["price/mse"] < 0.5 * float(price.var()), (m["price/mse"], float(price.var()))
    assert m["price/count"] == len(price)


def test_task_columns_missing_from_the_dataset_are_refused_before_training(dataset, tmp_path):
    cfg = load_config(None, [f'data.path="{dataset}"', f'run_dir="{tmp_path}"', 'model.head="mmoe"',
                             'train.early_stop_metric="ctr/auc"',
                             'tasks=[{name = "ctr", label = "click"}, {name = "gmv", label = "gmv", type = "regression"}]'])
    with pytest.raises(ValueError, match="task 'gmv': label column 'gmv' is not in the dataset"):
        Trainer(cfg)


def test_evaluating_needs_the_label_and_rows_columns_but_not_the_weight_column(dataset):
    meta = DatasetMetadata.load(dataset)
    weighted = TaskConfig(name="price", label="price", type="regression", weight_column="exposure")
    with pytest.raises(ValueError, match="task 'price': weight column 'exposure' is not in the dataset"):
        check_task_columns([weighted], meta)
    check_task_columns([weighted], meta, weights=False)  # metrics never read a weight column
    viewed = TaskConfig(name="ctr", label="click", rows="viewed")
    with pytest.raises(ValueError, match="task 'ctr': rows column 'viewed' is not in the dataset"):
        check_task_columns([viewed], meta, weights=False)
    assert task_columns([weighted, viewed]) == ["price", "exposure", "viewed"]
    assert task_columns([weighted, viewed], weights=False) == ["price", "viewed"]
