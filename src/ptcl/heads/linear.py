"""Growing linear and cosine heads (old rows are kept when new classes arrive)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IncrementalLinear(nn.Module):
    """A linear head whose output grows; ``grow(n)`` keeps the old classes' rows."""

    def __init__(self, in_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_new: int) -> None:
        new_w = torch.empty(num_new, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(new_w, a=5**0.5)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new_w]))
        if self.bias is not None:
            bound = 1 / self.in_features**0.5
            new_b = torch.empty(num_new, device=self.weight.device).uniform_(-bound, bound)
            self.bias = nn.Parameter(torch.cat([self.bias.data, new_b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class CosineHead(IncrementalLinear):
    """Cosine classifier ``sigma * cos(x, w)`` (Hou et al. 2019), no bias.

    Used with class-mean prototypes as weights by SimpleCIL/APER (LAMDA-PILOT's
    ``CosineLinear``); ``sigma`` is learnable when ``learn_sigma``.
    """

    def __init__(self, in_features: int, sigma: float = 1.0, learn_sigma: bool = False) -> None:
        super().__init__(in_features, bias=False)
        self.sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learn_sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))
