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


def simple_linear(in_features: int, out_features: int, device: torch.device | str | None = None) -> IncrementalLinear:
    """A linear head ``in_features -> out_features`` initialised as LAMDA-PILOT's
    ``SimpleLinear`` (``backbone/linears.py``, the head of its rehearsal models):
    ``kaiming_uniform_(nonlinearity="linear")`` weights (uniform in ``+-sqrt(3 / in)``), zero bias."""
    head = IncrementalLinear(in_features)
    weight = torch.empty(out_features, in_features, device=device)
    nn.init.kaiming_uniform_(weight, nonlinearity="linear")
    head.weight = nn.Parameter(weight)
    head.bias = nn.Parameter(torch.zeros(out_features, device=device))
    return head


def expand_linear(old: IncrementalLinear | None, in_features: int, out_features: int,
                  device: torch.device | str | None = None) -> IncrementalLinear:
    """A :func:`simple_linear` head ``in_features -> out_features`` whose block
    ``[:old.out_features, :old.in_features]`` and bias ``[:old.out_features]`` are ``old``'s: a
    head over features that grew in width (concatenated extractors) and in classes (PILOT
    ``DERNet.update_fc``, ``AdaptiveNet.update_fc``). Raises ``ValueError`` if ``old`` is larger."""
    head = simple_linear(in_features, out_features, device)
    if old is not None:
        rows, cols = old.weight.shape
        if rows > out_features or cols > in_features:
            raise ValueError(f"cannot expand a {rows}x{cols} head into {out_features}x{in_features}")
        with torch.no_grad():
            head.weight[:rows, :cols] = old.weight.to(head.weight.device)
            head.bias[:rows] = old.bias.to(head.bias.device)
    return head


@torch.no_grad()
def weight_align(weight: torch.Tensor, num_new: int, value: float = 1.0) -> float:
    """Weight aligning (WA, Zhao et al., CVPR 2020; PILOT ``DERNet/FOSTERNet.weight_align``), in
    place on a head's ``weight`` ``(C, D)`` whose last ``num_new`` rows are the new classes':
    they are multiplied by ``gamma = mean ||old rows|| / mean ||new rows|| * value ** (old / num_new)``
    (the bias is left). Returns gamma."""
    old = weight.shape[0] - num_new
    gamma = weight[:old].norm(dim=1).mean() / weight[old:].norm(dim=1).mean() * value ** (old / num_new)
    weight[old:] *= gamma
    return float(gamma)
