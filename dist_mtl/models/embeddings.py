"""The sparse part every head shares: a user-side and an item-side EmbeddingBagCollection.

The user side is pooled once per distinct user in the batch (the heads' first layers gather it to
impressions after multiplying it, see dist_mtl.models.layers.GroupedInputLinear); the item side is pooled
per impression.
Pooled embeddings are read by feature name (``KeyedTensor.regroup`` with a fixed key order), never by
position: a sharded EBC returns its keys in its own order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from dist_mtl.data.schema import ITEM_KEYS, USER_KEYS, FieldSpec


def table_name(feature: str) -> str:
    return f"t_{feature}"


def is_table_weight(fqn: str) -> bool:
    """Whether a parameter or state-dict name is an embedding table's weight: TorchRec names it
    "<ebc>.embedding_bags.<table>.weight", sharded or not."""
    return ".embedding_bags." in fqn and fqn.endswith(".weight")


def table_of_weight(fqn: str) -> str:
    """``t_<field>`` of a table weight's name (``is_table_weight``)."""
    return fqn.split(".embedding_bags.", 1)[1].removesuffix(".weight")


def build_ebc(
    fields: Sequence[FieldSpec],
    vocab_sizes: Mapping[str, int],
    embedding_dim: int,
    field_dims: Mapping[str, int],
    device: torch.device | str = "meta",
) -> EmbeddingBagCollection:
    """One table per field, sum pooling, weighted (count weights on lists, 1.0 on single ids).

    Built on the meta device by default: DistributedModelParallel materialises only each rank's shards.
    """
    tables = [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=field_dims.get(f.name, embedding_dim),
            num_embeddings=int(vocab_sizes[f.name]),
            feature_names=[f.name],
            pooling=PoolingType.SUM,
        )
        for f in fields
    ]
    return EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device(device))


def field_columns(fields: Sequence[FieldSpec], embedding_dim: int,
                  field_dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """The ``[start, stop)`` columns of each field's pooled embedding in a side's row (schema order, as
    ``pooled_by_name`` lays them out)."""
    columns, start = {}, 0
    for f in fields:
        dim = field_dims.get(f.name, embedding_dim)
        columns[f.name] = (start, start + dim)
        start += dim
    return columns


def pooled_by_name(user_pooled: KeyedTensor, item_pooled: KeyedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([U, user dims], [B, item dims])`` with columns in schema field order, whatever order a sharded
    EBC returned its keys in."""
    user = KeyedTensor.regroup([user_pooled], [USER_KEYS])[0]
    item = KeyedTensor.regroup([item_pooled], [ITEM_KEYS])[0]
    return user, item


