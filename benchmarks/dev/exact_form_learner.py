"""Dev diagnostic (#9): a learner with the planted model's exact form that must learn every table itself.

    .venv/bin/python benchmarks/dev/exact_form_learner.py --data DATA [--epochs 3] [--out result.json]

DATA is a synthetic Parquet set (``launch/generate.py --format parquet``). ``learnable_bound.py``'s learner
is handed each history id's topic and bounds only what estimating per-id effects costs; a model must also
learn the topics, for ~400k history ids, from the clicks. This learner has nothing the planted model lacks
and nothing more (no MLP that could overfit, no 16-dim rows):

    z_ctr = b + sum_f e_f[id, 0] + alpha . match + gamma * (t_u . v_i)
    z_cvr = b' + a * sum_f e_f[id, 0] + sum_f e_f[id, 1] + beta . match + t_u^T M v_i

with ``e_f`` a 2-column table per single-valued field (CTR effect, CVR's own), ``match`` the four
combination fields' last weights (log1p of the matched history count, as the reader transforms them),
``t_u`` the weight-averaged rank-``--rank`` vectors of the ids of all four history lists together and
``v_i`` the item category's vector plus the item's own. It trains on CTR over all impressions and CVR over
clicked ones (the likelihood of ``click`` and ``buy | click``) through the project's reader, in one
process, tables by Adagrad, the rest by Adam, and scores the whole test split after every epoch: how
close does a learner of the right form come to the oracle when it must learn the tastes from the data?
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402

from dist_mtl.data.batch import GroupedBatch  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader  # noqa: E402

USER_SINGLES = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
ITEM_SINGLES = ("205", "206", "207", "210", "216", "301")
HISTORIES = ("109_14", "110_14", "127_14", "150_14")
CROSSES = ("508", "509", "702", "853")


class ExactFormModel(nn.Module):
    def __init__(self, vocab: dict[str, int], rank: int, init_std: float):
        super().__init__()
        self.effects = nn.ModuleDict({f: nn.Embedding(vocab[f], 2, sparse=True) for f in USER_SINGLES + ITEM_SINGLES})
        for table in self.effects.values():
            nn.init.zeros_(table.weight)
        self.history = nn.ModuleDict({h: nn.EmbeddingBag(vocab[h], rank, mode="sum", sparse=True, include_last_offset=True) for h in HISTORIES})
        self.category = nn.Embedding(vocab["206"], rank, sparse=True)
        self.item = nn.Embedding(vocab["205"], rank, sparse=True)
        for table in [*self.history.values(), self.category]:
            nn.init.normal_(table.weight, std=init_std)
        nn.init.zeros_(self.item.weight)
        self.bias = nn.Parameter(torch.tensor([-3.2, -5.2]))
        self.shared = nn.Parameter(torch.tensor(0.5))
        self.match = nn.Parameter(torch.zeros(2, len(CROSSES)))
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.mix = nn.Parameter(torch.eye(rank))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [p for m in (*self.effects.values(), *self.history.values(), self.category, self.item)
                for p in m.parameters()]

    def forward(self, batch: GroupedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = batch.user_features.to_dict(), batch.item_features.to_dict()
        idx = batch.user_index
        effects = sum(self.effects[f](users[f].values().long())[idx] for f in USER_SINGLES)
        effects = effects + sum(self.effects[f](items[f].values().long()) for f in ITEM_SINGLES)
        total, weight = 0.0, 0.0
        for h in HISTORIES:
            jt = users[h]
            total = total + self.history[h](jt.values().long(), jt.offsets().long(), per_sample_weights=jt.weights())
            rows = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths().long())
            weight = weight + torch.zeros(jt.lengths().numel()).index_add_(0, rows, jt.weights())
        taste = (total / weight.clamp_min(1e-12)[:, None])[idx]
        vec = self.category(items["206"].values().long()) + self.item(items["205"].values().long())
        match = []
        for c in CROSSES:
            jt = items[c]
            lengths, ends = jt.lengths().long(), jt.offsets()[1:].long()
            last = jt.weights()[(ends - 1).clamp_min(0)] if jt.weights().numel() else torch.zeros_like(ends, dtype=torch.float32)
            match.append(torch.where(lengths > 0, last, torch.zeros_like(last)))
        match = torch.stack(match, 1)
        z_ctr = self.bias[0] + effects[:, 0] + match @ self.match[0] + self.gamma * (taste * vec).sum(1)
        z_cvr = (self.bias[1] + self.shared * effects[:, 0] + effects[:, 1] + match @ self.match[1]
                 + ((taste @ self.mix) * vec).sum(1))
        return z_ctr, z_cvr


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with tied scores counted as half (sklearn's roc_auc_score), in ~1 GB for 43M rows where
    sklearn's needed ~11 GB."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, positive = scores[order], labels[order] > 0
    del order
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1])
    pos = np.add.reduceat(positive.astype(np.int64), starts)
    neg = np.diff(np.append(starts, len(positive))) - pos
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def evaluate(model: ExactFormModel, data: Path, batch_size: int) -> dict[str, float]:
    model.eval()
    ctr, cvr, click, buy = [], [], [], []
    with torch.no_grad():
        for batch in ParquetGroupReader(data, "test", batch_size, shuffle=False):
            z_ctr, z_cvr = model(batch)
            ctr.append(torch.sigmoid(z_ctr).numpy())
            cvr.append(torch.sigmoid(z_cvr).numpy())
            # Copies: a label tensor is a view of the batch's packed buffer, which a view would keep alive
            # (every batch's features: 15.6 GB at full scale).
            click.append(batch.labels["click"].numpy().copy())
            buy.append(batch.labels["buy"].numpy().copy())
    model.train()
    ctr, cvr, click, buy = (np.concatenate(x) for x in (ctr, cvr, click, buy))
    clicked = click > 0
    return {"ctr": exact_auc(click, ctr), "cvr": exact_auc(buy[clicked], cvr[clicked]),
            "ctcvr": exact_auc(buy, ctr * cvr)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--table-lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=0.01)
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--table-eps", type=float, default=1e-3,
                    help="Adagrad's initial accumulator is its square: damps a rarely seen row's first steps, "
                         "as optimizer.sparse_eps does in the product")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    train = ParquetGroupReader(args.data, "train", args.batch_size, shuffle=True, seed=0)
    model = ExactFormModel(train.metadata.vocab_sizes, args.rank, args.init_std)
    sparse = set(map(id, model.sparse_parameters()))
    tables = torch.optim.Adagrad(model.sparse_parameters(), lr=args.table_lr,
                                 initial_accumulator_value=args.table_eps ** 2)
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in sparse], lr=args.dense_lr)
    epochs = []
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for step, batch in enumerate(train):
            z_ctr, z_cvr = model(batch)
            click, buy = batch.labels["click"], batch.labels["buy"]
            clicked = click > 0
            loss = F.binary_cross_entropy_with_logits(z_ctr, click)
            if clicked.any():
                loss = loss + F.binary_cross_entropy_with_logits(z_cvr[clicked], buy[clicked],
                                                                 reduction="sum") / click.numel()
            tables.zero_grad()
            dense.zero_grad()
            loss.backward()
            tables.step()
            dense.step()
            seen += batch.num_impressions
            if step % 1000 == 0:
                rate = seen / (time.perf_counter() - start)
                print(f"epoch {epoch} step {step} loss {loss.item():.4f} ({rate:,.0f} impressions/s)", flush=True)
        minutes = (time.perf_counter() - start) / 60
        auc = evaluate(model, args.data, 32768)
        epochs.append({"epoch": epoch + 1, "train_minutes": minutes, "auc": auc})
        print(f"epoch {epoch + 1}: {minutes:.1f} min, test AUC ctr {auc['ctr']:.4f} cvr {auc['cvr']:.4f} "
              f"ctcvr {auc['ctcvr']:.4f}", flush=True)
    if args.out:
        write_result(args.out, "exact_form_learner", command_line(__file__, sys.argv[1:]), {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "epochs": epochs}, library_versions(["torch", "pyarrow", "numpy"]))


if __name__ == "__main__":
    main()
