"""Random GroupedBatches and small unsharded models for model tests."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dist_mtl.config import ModelConfig
from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.schema import ALI_CCP_FIELDS, ITEM_FIELDS, USER_FIELDS, FieldSpec

VOCAB = 40
VOCAB_SIZES = {f.name: VOCAB for f in ALI_CCP_FIELDS}


def random_kjt(fields: tuple[FieldSpec, ...], rows: int, gen: torch.Generator) -> KeyedJaggedTensor:
    lengths, values, weights = [], [], []
    for f in fields:
        if f.multi_valued:
            n = torch.randint(0, 6, (rows,), generator=gen)
        else:
            n = torch.ones(rows, dtype=torch.int64)
        lengths.append(n)
        values.append(torch.randint(0, VOCAB, (int(n.sum()),), generator=gen))
        weights.append(torch.rand(int(n.sum()), generator=gen) if f.multi_valued else torch.ones(int(n.sum())))
    return KeyedJaggedTensor(
        keys=[f.name for f in fields],
        values=torch.cat(values),
        lengths=torch.cat(lengths).int(),
        weights=torch.cat(weights),
    )


def random_batch(num_users: int, num_impressions: int, seed: int = 0, extra: tuple[str, ...] = ()) -> GroupedBatch:
    """Each user has at least one impression; impressions of a user are contiguous."""
    gen = torch.Generator().manual_seed(seed)
    assert num_impressions >= num_users
    counts = torch.ones(num_users, dtype=torch.int64)
    counts += torch.bincount(torch.randint(0, num_users, (num_impressions - num_users,), generator=gen),
                             minlength=num_users)
    user_index = torch.repeat_interleave(torch.arange(num_users), counts)
    click = (torch.rand(num_impressions, generator=gen) < 0.4).float()
    buy = click * (torch.rand(num_impressions, generator=gen) < 0.3).float()
    labels = {"click": click, "buy": buy}
    for name in extra:
        labels[name] = torch.rand(num_impressions, generator=gen) * 3
    return GroupedBatch(
        user_features=random_kjt(USER_FIELDS, num_users, gen),
        item_features=random_kjt(ITEM_FIELDS, num_impressions, gen),
        user_index=user_index,
        labels=labels,
    )


def small_model_config(head: str = "esmm") -> ModelConfig:
    return ModelConfig(head=head, embedding_dim=8, tower_dims=[16, 8], expert_dims=[16], num_experts=3)
