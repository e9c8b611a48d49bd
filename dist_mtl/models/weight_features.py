"""Per-row summaries of the multi-valued fields' id weights, as dense inputs to the heads.

Weighted sum pooling multiplies each id's embedding by its weight, so a history count or a combination
field's count reaches the towers only through embedding rows that each id must learn on its own; what
many rows share ("this user's list of categories holds the item's category 12 times") is learned once
per id. torch-rechub's Ali-CCP recipe hands its model the weights as dense columns as well (D109_14 ...
D853, the weight of the one id it keeps per field: the last); these are the same kind of inputs computed
on the batch, with every id of the list kept and no preprocessing pass.

Each statistic is ``log1p`` of a non-negative per-row quantity (an empty row gives 0):

- ``sum``: the sum of the row's weights (history fields: the user's activity in that list);
- ``last``: the weight of the row's last entry (torch-rechub's dense column);
- ``count``: the number of ids in the row.
"""

from typing import Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dist_mtl.config import WEIGHT_STATS


def _positions(keys: List[str], fields: List[str]) -> List[int]:
    # By name, as the embedding tables read the KJT: a batch whose keys come in another order than the
    # schema's must not have its weight columns read from other fields.
    return [keys.index(f) for f in fields]


def _check_fields(keys: Sequence[str], fields: Iterable[str]) -> None:
    missing = [f for f in fields if f not in keys]
    if missing:
        raise ValueError(f"fields {missing} are not among the side's keys {list(keys)}")


def row_weight_stats(
    lengths: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, keys: List[str], fields: List[str],
    stats: List[str],
) -> torch.Tensor:
    """``[B, len(fields) * len(stats)]`` for a KJT with ``keys`` in key-major layout; columns go field by
    field, each with its ``stats``."""
    rows = _positions(keys, fields)
    batch = lengths.numel() // len(keys)
    lengths = _key_rows(lengths, batch, rows)
    starts, ends = _key_rows(offsets[:-1], batch, rows), _key_rows(offsets[1:], batch, rows)
    columns: List[torch.Tensor] = []
    for stat in stats:
        if stat == "sum":
            value = _sums_between(weights, starts, ends)
        elif stat == "last":
            last = weights[(ends - 1).clamp(min=0)] if weights.numel() > 0 else weights.new_zeros(ends.shape)
            value = torch.where(lengths > 0, last, torch.zeros_like(last))
        else:
            value = lengths.to(weights.dtype)
        columns.append(torch.log1p(value.clamp(min=0.0)))
    # [stats, fields, B] -> [B, fields, stats]
    return torch.stack(columns, 0).permute(2, 1, 0).reshape(batch, len(rows) * len(stats))


def _key_rows(per_row: torch.Tensor, batch: int, rows: List[int]) -> torch.Tensor:
    """``[len(rows), batch]``: the key-major ``per_row`` values (lengths, offsets) of the keys at ``rows``.
    Sliced, not gathered through an index tensor: that would be a host-to-device copy every step."""
    return torch.stack([per_row[r * batch:(r + 1) * batch] for r in rows])


def _sums_between(weights: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    # float64: row sums are differences of a running total that reaches ~1e5 on a batch of histories.
    cumulative = torch.cat([weights.new_zeros(1, dtype=torch.float64), weights.double().cumsum(0)])
    return (cumulative[ends] - cumulative[starts]).to(weights.dtype)


def row_weight_sums(lengths: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, keys: List[str],
                    fields: List[str]) -> torch.Tensor:
    """``[B, len(fields)]``: each row's sum of weights in each of ``fields`` (no log1p)."""
    rows = _positions(keys, fields)
    batch = lengths.numel() // len(keys)
    return _sums_between(weights, _key_rows(offsets[:-1], batch, rows), _key_rows(offsets[1:], batch, rows)).t()


# Leaves for TorchRec's pipeline tracer: it traces the model's forward symbolically, and these functions
# read sizes (numel, view) that a symbolic trace cannot.
torch.fx.wrap("row_weight_stats")
torch.fx.wrap("row_weight_sums")


class RowWeightFeatures(nn.Module):
    """The configured statistics of the multi-valued ``fields`` of one side's KJT (``keys``: the side's
    keys, which must hold them; a batch may order them otherwise)."""

    # Declared for TorchScript, which cannot infer an element type from an empty list.
    fields: List[str]
    stats: List[str]
    out_dim: int

    def __init__(self, keys: Sequence[str], fields: Sequence[str], stats: Sequence[str]):
        super().__init__()
        unknown = [s for s in stats if s not in WEIGHT_STATS]
        if unknown:
            raise ValueError(f"unknown weight statistic(s) {unknown}; choose from {WEIGHT_STATS}")
        _check_fields(keys, fields)
        self.fields = list(fields)
        self.stats = list(stats)
        self.out_dim = len(self.fields) * len(self.stats)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return row_weight_stats(features.lengths(), features.offsets(), features.weights(), features.keys(),
                                self.fields, self.stats)

    @torch.jit.export
    def append_to(self, pooled: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """``pooled`` (the side's pooled embeddings, one row per KJT row) with the statistics appended;
        unchanged when none are configured. The training model and the exported one both call this."""
        if self.out_dim == 0:
            return pooled
        return torch.cat([pooled, self.forward(features)], dim=1)


class WeightedMeanPooling(nn.Module):
    """Turns the weighted-sum pooled columns of some multi-valued fields into weighted means
    (``model.mean_pooled_fields``): each listed field's columns are divided by the row's total weight in
    that field.

    Hand-written because no pooling does it: TorchRec's unsharded ``PoolingType.MEAN`` refuses per-id
    weights (``F.embedding_bag`` supports them with sum only) and fbgemm's mean divides by the number of
    ids, not by their weights. An empty row stays zero."""

    fields: List[str]
    starts: List[int]
    dims: List[int]

    def __init__(self, keys: Sequence[str], columns: Mapping[str, Tuple[int, int]]):
        """``keys``: the side's KJT keys (a batch may order them otherwise); ``columns``: the
        ``[start, stop)`` pooled columns of each field to pool as a mean."""
        super().__init__()
        _check_fields(keys, columns)
        # Column order, so that forward can cut the row into pieces from left to right.
        self.fields = sorted(columns, key=lambda f: columns[f][0])
        self.starts = [columns[f][0] for f in self.fields]
        self.dims = [columns[f][1] - columns[f][0] for f in self.fields]

    def forward(self, pooled: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        if len(self.fields) == 0:
            return pooled
        totals = row_weight_sums(features.lengths(), features.offsets(), features.weights(), features.keys(),
                                 self.fields)
        # Only a positive total divides (weight_transform "none" passes raw weights through).
        scale = torch.where(totals > 0, 1.0 / totals, torch.zeros_like(totals)).to(pooled.dtype)
        pieces: List[torch.Tensor] = []
        done = 0
        for k, (start, dim) in enumerate(zip(self.starts, self.dims)):
            pieces.append(pooled[:, done:start])
            pieces.append(pooled[:, start:start + dim] * scale[:, k:k + 1])
            done = start + dim
        pieces.append(pooled[:, done:])
        return torch.cat(pieces, dim=1)
