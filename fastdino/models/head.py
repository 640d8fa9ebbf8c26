"""DINO projection head, as official DINO (same parameter names, so official checkpoints load).

    x -> Linear(in, 2048) -> GELU -> Linear(2048, 2048) -> GELU -> Linear(2048, 256)     (mlp.0/2/4)
      -> z = x / ||x||_2                                                                   (bottleneck)
      -> logits = z W^T,  W = g * v / ||v||_row  (weight-normalized Linear(256, K), no bias) (last_layer)

With norm_last_layer, g is fixed to 1, so the rows of W are unit vectors and the logits are cosines.
DINOv3's head (last_layer="plain", model.head_last_layer) has a plain Linear(256, K) instead (key
"last_layer.weight", no weight norm, trunc_normal(0.02) init).
With fused_last_layer (model.fused_head, the student only), forward stops at the bottleneck z and the
DINO loss term applies the last layer inside its kernel (fastdino.losses.dino.DINOTerm): the (N, K)
logits are never formed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = weight_g * weight_v / ||weight_v||_row (weight norm, dim 0).

    weight_g: (out, 1), weight_v: (out, in): the names and shapes of torch.nn.utils.weight_norm,
    which is deprecated; this module does not depend on it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5 ** 0.5)  # nn.Linear's default init, as official (weight_norm of a Linear)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))

    def weight(self) -> torch.Tensor:
        """Effective weight (out, in): g * v / ||v||_row."""
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class PlainLinear(nn.Linear):
    """DINOv3's last layer: a plain Linear without bias (no weight norm), trunc_normal(0.02) init as
    the official DINOHead.init_weights; weight() returns it, as WeightNormLinear's effective weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def weight_matrix(self) -> torch.Tensor:
        return self.weight


def last_layer_weight(last_layer: nn.Module) -> torch.Tensor:
    """The (K, bottleneck) weight a head's last layer applies: weight norm's g * v / ||v||, or the
    plain Linear's weight."""
    return last_layer.weight_matrix() if isinstance(last_layer, PlainLinear) else last_layer.weight()


LAST_LAYERS = ("weight_norm", "plain")  # model.head_last_layer


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 fused_last_layer: bool = False, last_layer: str = "weight_norm"):
        super().__init__()
        if last_layer not in LAST_LAYERS:
            raise ValueError(f"DINOHead: last_layer={last_layer!r} is not one of {list(LAST_LAYERS)}")
        self.fused_last_layer = fused_last_layer
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if i == nlayers - 2 else hidden_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.norm_last_layer = norm_last_layer and last_layer == "weight_norm"
        if last_layer == "plain":  # DINOv3: nn.Linear(bottleneck, K, bias=False)
            self.last_layer = PlainLinear(bottleneck_dim, out_dim)
            return
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> L2-normalized bottleneck features (N, bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> logits (N, out_dim); with fused_last_layer the bottleneck (N, bottleneck_dim)."""
        z = self.forward_bottleneck(x)
        return z if self.fused_last_layer else self.last_layer(z)
