"""DCNv2 (Wang et al. 2021) over corella's feature contract.

forward takes the five named input tensors of `runtime.features.INPUT_NAMES` and returns the
click logit [B]; ONNX export keeps those names. `forward_with_layers` also returns every cross
layer's output, which the alignment loss of joint training reads.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from runtime.features import STAT_NAMES, FeatureSpec

__all__ = ["DCNv2Config", "CrossLayer", "LowRankMixtureCrossLayer", "Standardize", "DCNv2"]


class DCNv2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = Field(16, ge=2, le=512, description="size of every field embedding")
    num_cross_layers: int = Field(3, ge=1, le=12, description="depth of the cross network")
    cross_rank: int | None = Field(
        None, ge=1, le=1024, description="None: full-rank cross layers; else low-rank mixture rank"
    )
    num_experts: int = Field(4, ge=1, le=16, description="experts per low-rank mixture layer")
    mlp_hidden: list[int] = Field([256, 128], description="hidden sizes of the deep tower")
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="dropout in the deep tower")
    embedding_init_std: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="standard deviation of the embeddings at initialization (small: the statistics, not "
        "random embeddings, drive the first steps; 1.0 overfits the ids before the statistics are learned)",
    )
    normalize_stats: bool = Field(True, description="standardize the statistics input by its training-split moments")


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l.  x0, x_l: [B, D] -> [B, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class LowRankMixtureCrossLayer(nn.Module):
    """DCN-Mix: a gated mixture of low-rank experts x0 * (U_i g(C_i g(V_i^T x)) + b) + x."""

    def __init__(self, dim: int, rank: int, num_experts: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(num_experts, dim, rank) * dim**-0.5)
        self.c = nn.Parameter(torch.randn(num_experts, rank, rank) * rank**-0.5)
        self.u = nn.Parameter(torch.randn(num_experts, rank, dim) * rank**-0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        low = torch.tanh(torch.einsum("bd,edr->ber", x, self.v))
        low = torch.tanh(torch.einsum("ber,ers->bes", low, self.c))
        experts = x0.unsqueeze(1) * (torch.einsum("bes,esd->bed", low, self.u) + self.bias)
        weights = torch.softmax(self.gate(x), dim=-1).unsqueeze(-1)
        return (experts * weights).sum(dim=1) + x


class Standardize(nn.Module):
    """(x - mean) / std with fixed moments (buffers saved with the weights), set once from the
    training split by `fit`: the same in training and inference, whatever the batch size."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, values: torch.Tensor) -> None:
        self.mean.copy_(values.mean(dim=0))
        self.std.copy_(values.std(dim=0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [B, L, D], mask [B, L] (float) -> [B, D]; zero where the mask is empty."""
    total = (values * mask.unsqueeze(-1)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


class DCNv2(nn.Module):
    """Field embeddings + pooled tags + pooled history (all, and liked) -> cross net || MLP."""

    def __init__(self, spec: FeatureSpec, config: DCNv2Config | None = None) -> None:
        super().__init__()
        self.config = config = config or DCNv2Config()
        d = config.embedding_dim
        self.fields = spec.categorical_fields
        self.embeddings = nn.ModuleList(
            nn.Embedding(spec.vocabularies[name].size, d, padding_idx=0) for name in self.fields
        )
        self.tag_embedding = nn.Embedding(spec.vocabularies["tag"].size, d, padding_idx=0)
        for embedding in (*self.embeddings, self.tag_embedding):
            nn.init.normal_(embedding.weight, std=config.embedding_init_std)
            with torch.no_grad():
                embedding.weight[0].zero_()
        # the statistics vary by hundredths around their means: standardize them to weigh like embeddings
        self.stats_norm = Standardize(len(STAT_NAMES)) if config.normalize_stats else nn.Identity()
        self.register_buffer("rating_max", torch.tensor(float(spec.rating_max)), persistent=False)
        self.register_buffer("like_threshold", torch.tensor(float(spec.like_threshold)), persistent=False)
        num_dense = 3 + len(STAT_NAMES)  # mean history rating, history fill, share liked; the statistics
        self.input_dim = (len(self.fields) + 3) * d + num_dense
        if config.cross_rank is None:
            self.cross = nn.ModuleList(CrossLayer(self.input_dim) for _ in range(config.num_cross_layers))
        else:
            self.cross = nn.ModuleList(
                LowRankMixtureCrossLayer(self.input_dim, config.cross_rank, config.num_experts)
                for _ in range(config.num_cross_layers)
            )
        layers: list[nn.Module] = []
        width = self.input_dim
        for hidden in config.mlp_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(self.input_dim + width, 1)

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.embeddings[1]

    def embed(
        self,
        categorical: torch.Tensor,
        tags: torch.Tensor,
        history_items: torch.Tensor,
        history_ratings: torch.Tensor,
        stats: torch.Tensor,
    ) -> torch.Tensor:
        """The five inputs -> x0 [B, input_dim]."""
        fields = [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        tag_mask = (tags > 0).float()
        history_mask = (history_items > 0).float()
        liked_mask = history_mask * (history_ratings >= self.like_threshold).float()
        history_vectors = self.item_embedding(history_items)
        filled = history_mask.sum(dim=1, keepdim=True)
        dense = torch.cat(
            [
                (history_ratings * history_mask).sum(dim=1, keepdim=True) / filled.clamp(min=1.0) / self.rating_max,
                filled / history_items.shape[1],
                liked_mask.sum(dim=1, keepdim=True) / filled.clamp(min=1.0),
                self.stats_norm(stats),
            ],
            dim=1,
        )
        pooled = [
            _masked_mean(self.tag_embedding(tags), tag_mask),
            _masked_mean(history_vectors, history_mask),
            _masked_mean(history_vectors, liked_mask),
        ]
        return torch.cat([*fields, *pooled, dense], dim=1)

    def forward_with_layers(
        self,
        categorical: torch.Tensor,
        tags: torch.Tensor,
        history_items: torch.Tensor,
        history_ratings: torch.Tensor,
        stats: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state, layers = self._states(categorical, tags, history_items, history_ratings, stats)
        return self.head(state).squeeze(-1), layers

    def representation(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """What the head reads [B, representation_dim], from `embed`'s five inputs: the last cross
        layer's output beside the deep network's. The click logit is one linear read of it; the LLM's
        CRM token (`crm_token`) reads it all."""
        return self._states(*inputs, **named)[0]

    @property
    def representation_dim(self) -> int:
        return self.head.in_features

    def _states(self, *inputs: torch.Tensor, **named: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x0 = self.embed(*inputs, **named)
        x, layers = x0, []
        for layer in self.cross:
            x = layer(x0, x)
            layers.append(x)
        return torch.cat([x, self.mlp(x0)], dim=1), layers

    def forward(
        self,
        categorical: torch.Tensor,
        tags: torch.Tensor,
        history_items: torch.Tensor,
        history_ratings: torch.Tensor,
        stats: torch.Tensor,
    ) -> torch.Tensor:
        """Click logit [B]."""
        return self.forward_with_layers(categorical, tags, history_items, history_ratings, stats)[0]
