import pytest

from dist_mtl.config import ConfigError, JobConfig, load_config


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = load_config()
    assert cfg.model.head == "esmm" and [t.name for t in cfg.tasks] == ["ctr", "cvr", "ctcvr"]
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('run_dir = "r1"\n[data]\nbatch_size = 128\n[model]\ntower_dims = [32, 16]\n')
    cfg = load_config(path, ["data.batch_size=256", "model.head=mmoe", "model.field_dims={\"205\" = 32}"])
    assert cfg.run_dir == "r1"
    assert cfg.data.batch_size == 256  # command line beats file
    assert cfg.model.tower_dims == [32, 16]  # file beats default
    assert cfg.model.head == "mmoe" and cfg.model.field_dims == {"205": 32}
    assert cfg.data.eval_batch_size == JobConfig().data.eval_batch_size  # default where both are silent


@pytest.mark.parametrize("head", ["mmoe", "ple", "shared_bottom"])
def test_heads_with_a_tower_per_task_default_to_ctr_and_ctcvr(head, tmp_path):
    """ESMM's default CVR task has loss weight 0; in a head with its own tower per task it would never
    train, so these heads default to the two tasks trained over all impressions."""
    cfg = load_config(None, [f"model.head={head}"])
    assert [(t.name, t.label, t.loss_weight, t.rows) for t in cfg.tasks] == [
        ("ctr", "click", 1.0, "all"), ("ctcvr", "buy", 1.0, "all")]
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    # Tasks the user gives are kept, whichever head reads them.
    three = 'tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, {name="ctcvr", label="buy"}]'
    assert [t.name for t in load_config(None, [f"model.head={head}", three]).tasks] == ["ctr", "cvr", "ctcvr"]


def test_tasks_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nhead = "mmoe"\n[train]\nearly_stop_metric = "ctr/auc"\n'
        '[[tasks]]\nname = "ctr"\nlabel = "click"\n'
        '[[tasks]]\nname = "price"\nlabel = "price"\ntype = "regression"\nloss_weight = 0.5\nweight_column = "dwell"\n'
    )
    cfg = load_config(path)
    assert [(t.name, t.type, t.loss_weight, t.weight_column) for t in cfg.tasks] == [
        ("ctr", "binary", 1.0, ""), ("price", "regression", 0.5, "dwell")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batchsize=3", "unknown config key 'data.batchsize'"),
        ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
        ('tasks=[{name="ctr", label="click"}, {name="ctcvr"}]', "tasks[1]: missing required key 'tasks[1].label'"),
        ('data.eval_split=""', "data.eval_split must name a split of the dataset"),
        ("data.batch_size=0", "data.batch_size must be > 0"),
        ("data.batch_size=\"many\"", "data.batch_size: expected an integer"),
        ("model.embedding_dim=18", "multiples of 4"),
        ("model.field_dims={\"205\" = 10}", "model.field_dims.205 = 10"),
        ("model.head=transformer", "model.head must be one of"),
        ("model.task_experts=0", "model.task_experts must be > 0"),
        ("model.activation=swish", "model.activation must be one of"),
        ("model.interaction=cross", "model.interaction must be 'none' or 'dot'"),
        ('model.weight_features=["mean"]', "model.weight_features must be distinct names from"),
        ('model.weight_features=["sum", "sum"]', "model.weight_features must be distinct names from"),
        ('model.output_bias_init="prior"', "model.output_bias_init must be 'label_rate' or 'default'"),
        ("model.head_precision=float16", "model.head_precision must be one of"),
        ("sharding.sharding_type=diagonal", "sharding.sharding_type must be one of"),
        ("optimizer.sparse=lamb", "optimizer.sparse must be one of"),
        ("optimizer.sparse_eps=0", "optimizer.sparse_eps must be > 0"),
        ("train.early_stop_metric=\"nope/auc\"", "names no task"),
        # A name the evaluation does not produce would read NaN: no best model, an early stop.
        ("train.early_stop_metric=\"ctcvr/AUC\"", "a binary task is ranked by ['ctcvr/auc', 'ctcvr/gauc', 'ctcvr/logloss']"),
        ("train.early_stop_metric=\"ctr/gauc\"", "train.early_stop_metric 'ctr/gauc' needs train.group_auc = true"),
        ("train.early_stop_metric=\"ctcvr/calibration\"", "a binary task is ranked by"),
        ("train.early_stop_patience=0", "train.early_stop_patience must be > 0"),
        ("model.field_dims={nosuchfield = 32}", "model.field_dims names no field: ['nosuchfield']"),
        ('model.field_init_scale={"t_110_14" = 0}', "model.field_init_scale names no field: ['t_110_14']"),
        ('model.field_init_scale={"110_14" = -0.5}', "model.field_init_scale.110_14 must be a finite number >= 0"),
        ('model.field_init_scale={"110_14" = nan}', "model.field_init_scale.110_14 must be a finite number >= 0"),
        # A table's name instead of its field's would otherwise leave the table to the planner unnoticed.
        ('sharding.table_sharding={t_205 = "column_wise"}', "sharding.table_sharding names no field: ['t_205']"),
        ('tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click", loss_weight=0.0}, '
         '{name="ctcvr", label="buy", loss_weight=0.0}]', "the CVR tower would never train"),
        ("data.shuffle=3", "expected true or false"),
        ('model.mean_pooled_fields=["205"]', "model.mean_pooled_fields must be distinct multi-valued fields"),
        ('model.mean_pooled_fields=["109_14", "109_14"]', "model.mean_pooled_fields must be distinct"),
        ("model.factor_rank=-1", "model.factor_rank must be >= 0"),
        (("model.factor_rank=4", 'model.head="mmoe"', 'tasks=[{name="price", label="price", type="regression"}]',
          'train.early_stop_metric="price/mse"'),
         "model.factor_rank adds its terms to the binary tasks' logits, and tasks has none"),
        ('model.factor_only_fields=["109_14"]', "model.factor_only_fields needs model.factor_rank > 0"),
        (("model.factor_rank=4", 'model.factor_only_fields=["205"]'), "model.factor_only_fields must be distinct user-side"),
        (("model.factor_rank=4", 'model.factor_only_fields=["109_14"]', "model.interaction=dot"),
         "model.factor_only_fields cannot be combined with model.interaction = 'dot'"),
        ('optimizer.field_sparse_eps={"nosuch" = 1e-8}', "optimizer.field_sparse_eps names no field: ['nosuch']"),
        ('optimizer.field_sparse_lr={"101" = 0}', "optimizer.field_sparse_lr.101 must be > 0"),
        (('optimizer.sparse="sgd"', 'optimizer.field_sparse_eps={"101" = 1e-8}'),
         "optimizer.field_sparse_eps is an Adagrad epsilon; optimizer.sparse = 'sgd' has none"),
        (("optimizer.dense_epochs=3", "train.epochs=2"), "optimizer.dense_epochs must be in [0, train.epochs = 2]"),
        ("justaword", "not of the form"),
        # pCTCVR is a product of the two towers' outputs and has no tower to size.
        ('model.task_tower_dims={ctcvr = [8]}', "model.task_tower_dims names ['ctcvr'], which have no tower in the esmm head"),
        (('model.head="mmoe"', 'model.task_tower_dims={cvr = [8]}'),
         "model.task_tower_dims names ['cvr'], which have no tower in the mmoe head"),
        ('model.task_tower_dims={cvr = [8, 0]}', "model.task_tower_dims.cvr must be a list of positive sizes"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, list(override) if isinstance(override, tuple) else [override])


def test_factor_options_load():
    cfg = load_config(None, ["model.factor_rank=8", 'model.factor_only_fields=["109_14", "150_14"]',
                             'model.mean_pooled_fields=["109_14", "110_14", "127_14", "150_14"]',
                             "train.epochs=2", "optimizer.dense_epochs=1"])
    assert (cfg.model.factor_rank, cfg.model.factor_only_fields) == (8, ["109_14", "150_14"])
    assert len(cfg.model.mean_pooled_fields) == 4 and cfg.optimizer.dense_epochs == 1
    # Every head takes the factors (on its binary tasks).
    mmoe = load_config(None, ["model.factor_rank=8", 'model.head="mmoe"', 'model.factor_only_fields=["109_14"]',
                              'tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, '
                              '{name="ctcvr", label="buy"}]'])
    assert (mmoe.model.head, mmoe.model.factor_rank) == ("mmoe", 8)


def test_task_tower_dims_load_and_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ['model.task_tower_dims={cvr = [], ctr = [32]}'])
    assert cfg.model.task_tower_dims == {"cvr": [], "ctr": [32]}
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_dot_interaction_needs_one_embedding_dim():
    with pytest.raises(ConfigError, match="every field needs the same dim"):
        load_config(None, ['model.field_dims={"205" = 32}', "model.interaction=dot"])
    assert load_config(None, ['model.field_dims={"205" = 16}', "model.interaction=dot"]).model.interaction == "dot"


def test_weight_features_and_dot_interaction_exclude_each_other():
    with pytest.raises(ConfigError, match="cannot be combined with model.interaction = 'dot'"):
        load_config(None, ['model.weight_features=["last"]', "model.interaction=dot"])
    assert load_config(None, ['model.weight_features=["last", "sum"]']).model.weight_features == ["last", "sum"]


def test_task_errors(tmp_path):
    def cfg_with(tasks_toml: str):
        path = tmp_path / "t.toml"
        path.write_text('[model]\nhead = "mmoe"\n[train]\nearly_stop_metric = "a/auc"\n' + tasks_toml)
        return load_config(path)

    with pytest.raises(ConfigError, match="unknown type 'ordinal'"):
        cfg_with('[[tasks]]\nname = "a"\nlabel = "click"\ntype = "ordinal"\n')
    with pytest.raises(ConfigError, match="loss_weight must be >= 0"):
        cfg_with('[[tasks]]\nname = "a"\nlabel = "click"\nloss_weight = -1.0\n')
    with pytest.raises(ConfigError, match="duplicate task names"):
        cfg_with('[[tasks]]\nname = "a"\nlabel = "click"\n[[tasks]]\nname = "a"\nlabel = "buy"\n')
    with pytest.raises(ConfigError, match=r"\['b'\] have loss_weight 0, so the mmoe head's towers for them would never train"):
        cfg_with('[[tasks]]\nname = "a"\nlabel = "click"\n[[tasks]]\nname = "b"\nlabel = "buy"\nloss_weight = 0.0\n')
    path = tmp_path / "esmm.toml"
    path.write_text(
        '[train]\nearly_stop_metric = "ctr/auc"\n'
        '[[tasks]]\nname = "ctr"\nlabel = "click"\n'
        '[[tasks]]\nname = "cvr"\nlabel = "price"\ntype = "regression"\n'
        '[[tasks]]\nname = "ctcvr"\nlabel = "buy"\n'
    )
    with pytest.raises(ConfigError, match="esmm head carries only binary tasks"):
        load_config(path)


@pytest.mark.parametrize("tasks, error", [
    # Without rows = "click", CVR's AUC and its output bias would be over every impression, silently.
    ('[{name="ctr", label="click"}, {name="cvr", label="buy", loss_weight=0.0}, {name="ctcvr", label="buy"}]',
     r"task 'cvr' of the esmm head is over the clicked impressions: rows = 'click' \(ctr's label\), got rows = 'all'"),
    ('[{name="ctr", label="click"}, {name="cvr", label="buy", rows="buy"}, {name="ctcvr", label="buy"}]',
     r"got rows = 'buy'"),
    ('[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, {name="ctcvr", label="buy", rows="click"}]',
     r"task 'ctcvr' of the esmm head is over every impression"),
])
def test_esmm_tasks_must_keep_the_papers_rows(tasks, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, [f"tasks={tasks}"])
    # The same tasks with the paper's rows load.
    load_config(None, ['tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, '
                       '{name="ctcvr", label="buy"}]'])


def test_label_rates_come_from_the_splits_counts():
    from dist_mtl.data.schema import SplitInfo
    from dist_mtl.tasks import TaskConfig, default_esmm_tasks, label_rate

    split = SplitInfo(num_impressions=1000, num_users=10, num_clicks=40, num_buys=2)
    rates = {t.name: label_rate(t, split) for t in default_esmm_tasks()}
    assert rates == {"ctr": 40 / 1000, "cvr": 2 / 40, "ctcvr": 2 / 1000}
    assert label_rate(TaskConfig("price", "price", type="regression"), split) is None
    assert label_rate(TaskConfig("dwell", "dwell_long"), split) is None  # an extra column: no stored count
    assert label_rate(TaskConfig("ctr", "click"), SplitInfo()) is None  # empty split
