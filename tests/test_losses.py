"""Every loss against numbers worked out by hand.

One pair throughout, unless a test says otherwise:
    log pi(y_c) = -1, log pi(y_r) = -3, log pi_ref(y_c) = log pi_ref(y_r) = -2.
So the chosen log-ratio is a = -1 - (-2) = 1, the rejected one b = -3 - (-2) = -1, and
Delta = a - b = 2. With beta = 0.5: beta * Delta = 1, rewards r_c = 0.5, r_r = -0.5.
Useful values: log sigma(1) = -log(1 + e^-1) = -0.3132617, log sigma(-1) = -1.3132617,
log sigma(0.5) = -0.4740770, log sigma(-0.5) = -0.9740770, sigma(0.5) = 0.6224593,
sigma(1) = 0.7310586.
"""

import math

import pytest
import torch

from lit_dpo.losses import LOSSES, get_loss

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def run(name, beta, label_smoothing):
    losses, chosen, rejected = LOSSES[name].fn(
        PC, PR, RC, RR, beta=beta, label_smoothing=label_smoothing
    )
    return losses.item(), chosen.item(), rejected.item()


CASES = [
    # -log sigma(1) = log(1 + e^-1)
    ("sigmoid", 0.5, 0.0, 0.3132617),
    # cDPO: 0.9 * 0.3132617 + 0.1 * 1.3132617
    ("sigmoid", 0.5, 0.1, 0.4132617),
    # robust: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8
    ("robust", 0.5, 0.1, 0.1882617),
    # robust with eps = 0 is plain DPO
    ("robust", 0.5, 0.0, 0.3132617),
    # hinge: relu(1 - 0.25 * 2) = 0.5; and relu(1 - 1) = 0 at beta 0.5
    ("hinge", 0.25, 0.0, 0.5),
    ("hinge", 0.5, 0.0, 0.0),
    # IPO (fed averages; here the same numbers): (2 - 1 / (2 * 0.5))^2 = 1
    ("ipo", 0.5, 0.0, 1.0),
    # EXO, eps = 1e-3: s(1)(log s(1) - log .999) + s(-1)(log s(-1) - log .001)
    #   = 0.7310586 * (-0.3122612) + 0.2689414 * 5.5944936
    ("exo_pair", 0.5, 0.0, 1.2763098),
    # NCA: -log s(.5) - .5 log s(-.5) - .5 log s(.5) = .4740770 + .4870385 + .2370385
    ("nca_pair", 0.5, 0.0, 1.1981540),
    # BCO: delta = mean(0.5, -0.5) = 0, so -2 log s(0.5)
    ("bco_pair", 0.5, 0.0, 0.9481540),
    # SPPO hard, 0.5 / beta = 2: (1 - 2)^2 + (-1 + 2)^2
    ("sppo_hard", 0.25, 0.0, 2.0),
    # APO-zero: (1 - s(0.5)) + s(-0.5) = 2 * 0.3775407
    ("apo_zero", 0.5, 0.0, 0.7550813),
    # APO-down: s(0.5) + 1 - s(1) = 0.6224593 + 0.2689414
    ("apo_down", 0.5, 0.0, 0.8914008),
    # sigmoid_norm is the sigmoid loss on averages: same inputs, same number
    ("sigmoid_norm", 0.5, 0.0, 0.3132617),
    # NLL of the chosen completion: -(-1)
    ("nll", 0.5, 0.0, 1.0),
]


@pytest.mark.parametrize("name, beta, eps, expected", CASES)
def test_hand_worked_values(name, beta, eps, expected):
    loss, chosen, rejected = run(name, beta, eps)
    assert loss == pytest.approx(expected, abs=1e-6)
    # implicit rewards r = beta * (log pi - log pi_ref): beta * 1 and beta * -1
    assert chosen == pytest.approx(beta) and rejected == pytest.approx(-beta)


def test_every_registered_loss_is_checked_here():
    assert {case[0] for case in CASES} == set(LOSSES)


def test_pairwise_losses_are_ln2_or_symmetric_at_zero_margin():
    """When policy = reference every log-ratio is 0: DPO gives exactly ln 2."""
    zeros = torch.zeros(3)
    losses, chosen, rejected = LOSSES["sigmoid"].fn(zeros, zeros, zeros, zeros, beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2)))
    assert torch.equal(chosen, zeros) and torch.equal(rejected, zeros)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    for name in ("sigmoid", "ipo", "hinge", "robust", "nca_pair", "apo_zero", "sppo_hard"):
        pc.grad = pr.grad = None
        LOSSES[name].fn(pc, pr, RC, RR, beta=0.1)[0].sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), name


def test_rewards_are_detached():
    pc = PC.clone().requires_grad_()
    _, chosen, _ = LOSSES["sigmoid"].fn(pc, PR, RC, RR, beta=0.1)
    assert not chosen.requires_grad


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid"):
        get_loss("dpo")


# -- the extension point: a loss registered outside lit_dpo (docs/architecture.md's recipe) -----


def margin_sigmoid(pc, pr, rc, rr, *, beta, label_smoothing=0.0):
    """DPO with a target margin gamma = 0.5 (SimPO's margin term, Meng et al. 2024, Eq. 6):
    loss = -log sigma(beta Delta - 0.5)."""
    logits = beta * ((pc - rc) - (pr - rr)) - 0.5
    rewards = (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
    return (-torch.nn.functional.logsigmoid(logits), *rewards)


@pytest.fixture
def registered_margin_loss():
    from lit_dpo.losses import Loss

    LOSSES["margin_sigmoid"] = Loss(margin_sigmoid)
    yield "margin_sigmoid"
    del LOSSES["margin_sigmoid"]


def test_a_loss_registered_outside_the_core_drives_the_module(
    tiny_model_dir, registered_margin_loss
):
    """At step 0 the policy is its reference, Delta = 0, so every pair's loss is
    -log sigma(-0.5) = log(1 + e^0.5) = 0.9740770 (the docstring's log sigma(-0.5)), and the
    pair's test value: beta Delta = 1, -log sigma(0.5) = 0.4740770."""
    from test_module import pairs_batch

    from lit_dpo.module import DPOModule

    assert run(registered_margin_loss, 0.5, 0.0)[0] == pytest.approx(0.4740770, abs=1e-6)
    module = DPOModule(tiny_model_dir, loss_type=registered_margin_loss)
    module.configure_model()
    losses = module(pairs_batch())["losses"]
    assert losses.tolist() == pytest.approx([0.9740770] * 4, abs=1e-6)
