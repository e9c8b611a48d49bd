"""Pairwise dot-product feature interactions (DLRM, Naumov et al. 2019), computed the grouped way.

The planted world, like real recommendation data, holds signal in products of embeddings (a user's
history taste against the item's category, the item's attribute against the same attribute in the
user's lists), which an MLP over concatenated embeddings approximates slowly. A dot product between
every pair of pooled field embeddings hands the towers those products directly.

torchrec.models.dlrm.InteractionArch does this on one ``[B, F, D]`` stack with a dense vector first;
here the user-user products are computed once per distinct user and stay on the user side of the
heads' input (``GroupedRows``), like the user embeddings themselves, so the interaction keeps
GroupedBatch's saving: only user-item and item-item products are per impression.
"""

from __future__ import annotations

import torch
from torch import nn


def _upper_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(n, n, offset=1)
    return rows, cols


class GroupedDotInteraction(nn.Module):
    """``([U, F_u(F_u-1)/2], [B, F_u*F_i + F_i(F_i-1)/2])`` from the pooled user rows ``[U, F_u*D]``, item
    rows ``[B, F_i*D]`` and ``user_index``: the user-user products once per user, then per impression
    the user-item and item-item products, each in row-major pair order.
    """

    def __init__(self, user_fields: int, item_fields: int, dim: int):
        super().__init__()
        self.user_fields, self.item_fields, self.dim = user_fields, item_fields, dim
        ur, uc = _upper_pairs(user_fields)
        ir, ic = _upper_pairs(item_fields)
        # Flat indices into the [F, F] product matrices; buffers so that they follow .to(device).
        self.register_buffer("user_pairs", ur * user_fields + uc, persistent=False)
        self.register_buffer("item_pairs", ir * item_fields + ic, persistent=False)

    @staticmethod
    def num_pairs(user_fields: int, item_fields: int) -> tuple[int, int]:
        """(per-user pairs, per-impression pairs)."""
        return (user_fields * (user_fields - 1) // 2,
                user_fields * item_fields + item_fields * (item_fields - 1) // 2)

    def forward(self, user: torch.Tensor, item: torch.Tensor,
                user_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = user.view(-1, self.user_fields, self.dim)
        i = item.view(-1, self.item_fields, self.dim)
        u_rows = u.index_select(0, user_index)
        user_user = torch.bmm(u, u.transpose(1, 2)).flatten(1).index_select(1, self.user_pairs)
        user_item = torch.bmm(u_rows, i.transpose(1, 2)).flatten(1)
        item_item = torch.bmm(i, i.transpose(1, 2)).flatten(1).index_select(1, self.item_pairs)
        return user_user, torch.cat([user_item, item_item], dim=1)
