"""The DPO loss family: pure functions on per-sequence log-probabilities.

Every loss takes the policy's and the reference's log-probs of the chosen and rejected
completions, each a (B,) tensor, and returns `(losses, chosen_rewards, rejected_rewards)`, each
(B,): per-pair losses (the caller reduces) and the implicit rewards `beta * (log pi - log pi_ref)`.

Whether a loss sees summed or per-token-averaged log-probs is part of its registry entry
(`LOSSES[name].average`): IPO and the length-normalised sigmoid are defined on averages.
Adding a loss = adding a function and a registry line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]


def _rewards(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Implicit rewards r = beta * log(pi / pi_ref) (paper Eq. 5), detached: they are reported,
    not differentiated."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def sigmoid(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), with label smoothing = cDPO (Mitchell 2023).

    loss = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta),
    Delta = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)).
    """
    logits = beta * ((pc - rc) - (pr - rr))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def robust(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label noise eps:

    loss = [-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps).
    """
    logits = beta * ((pc - rc) - (pr - rr))
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def ipo(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17) on per-token averages:

    loss = (Delta_avg - 1 / (2 beta))^2, beta in the role of the paper's tau: the log-ratio
    margin regresses to 1 / (2 beta) instead of growing without bound.
    """
    losses = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def hinge(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF"): loss = max(0, 1 - beta Delta)."""
    losses = torch.relu(1 - beta * ((pc - rc) - (pr - rr)))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def exo_pair(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment").

    Reverse KL between the model's preference distribution sigma(beta Delta) and the label
    distribution (1 - eps, eps); eps = label_smoothing, or 1e-3 when 0 (log 0 is undefined):
    loss = sigma(b D) (log sigma(b D) - log(1 - eps)) + sigma(-b D) (log sigma(-b D) - log eps).
    """
    eps = label_smoothing or 1e-3
    logits = beta * ((pc - rc) - (pr - rr))
    losses = logits.sigmoid() * (F.logsigmoid(logits) - math.log(1 - eps)) + (-logits).sigmoid() * (
        F.logsigmoid(-logits) - math.log(eps)
    )
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def nca_pair(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of LMs"), on rewards r:

    loss = -log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r).
    """
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def bco_pair(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization"):

    loss = -log sigma(r_c - delta) - log sigma(-(r_r - delta)), with the shift delta the mean
    reward of the batch (detached). The paper keeps a running mean over steps; with one batch's
    mean this stays a pure function.
    """
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    delta = torch.cat([r_c, r_r]).mean().detach()
    losses = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def sppo_hard(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.6):

    loss = (log(pi/pi_ref)(y_c) - 1/(2 beta))^2 + (log(pi/pi_ref)(y_r) + 1/(2 beta))^2,
    the winner's probability pushed to 1 and the loser's to 0 (scaled by 1/beta).
    """
    a, b = pc - rc, pr - rr
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def apo_zero(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization"): for chosen
    outputs better than the model's own, raise chosen and lower rejected likelihood:

    loss = (1 - sigma(r_c)) + sigma(r_r).
    """
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    losses = (1 - torch.sigmoid(r_c)) + torch.sigmoid(r_r)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def apo_down(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024): for chosen outputs worse than the model's own,
    lower chosen likelihood while keeping the margin:

    loss = sigma(r_c) + (1 - sigma(r_c - r_r)).
    """
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    losses = torch.sigmoid(r_c) + (1 - torch.sigmoid(r_c - r_r))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def nll(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """NLL of the chosen completion per token (the SFT term of RPO, Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", Eq. 1): loss = -log pi(y_c | x) / |y_c|.

    Registered with `average=True`, so `pc` is already the per-token mean log-prob.
    Combine it with DPO: `loss_type: [sigmoid, nll]`, `loss_weights: [1.0, 0.2]`.
    """
    return (-pc, *_rewards(pc, pr, rc, rr, beta))


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., LossOutput]
    average: bool = False  # True: fed per-token-averaged log-probs instead of sums
    # True: the loss reads each log-ratio on its own, not only the chosen-rejected difference;
    # with a uniform reference (reference_free) that is log pi(y), a large negative number
    # that saturates the loss, so such losses refuse reference_free.
    needs_reference: bool = False
    # Whether the loss reads `label_smoothing`: True; False: it ignores it, so a run that sets
    # label_smoothing > 0 with it is refused; None: it has no preference label to smooth (nll),
    # so it may sit beside a loss that reads it.
    smoothing: bool | None = False


LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid, smoothing=True),
    "robust": Loss(robust, smoothing=True),
    "ipo": Loss(ipo, average=True),
    "hinge": Loss(hinge),
    "exo_pair": Loss(exo_pair, smoothing=True),
    "nca_pair": Loss(nca_pair, needs_reference=True),
    "bco_pair": Loss(bco_pair, needs_reference=True),
    "sppo_hard": Loss(sppo_hard, needs_reference=True),
    "apo_zero": Loss(apo_zero, needs_reference=True),
    "apo_down": Loss(apo_down, needs_reference=True),
    # SimPO-style length normalisation of DPO: the sigmoid loss on per-token averages.
    "sigmoid_norm": Loss(sigmoid, average=True, smoothing=True),
    "nll": Loss(nll, average=True, smoothing=None),
}


def get_loss(name: str) -> Loss:
    """The registry entry for `name`, with the list of valid names on a typo."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss_type {name!r}; choose from {', '.join(LOSSES)}") from None
