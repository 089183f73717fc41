"""The preference losses of the DPO stage (`python -m train.dpo --loss dpo|ipo|simpo|orpo|kto`).

Each is a small function on (B,) tensors: the summed log-probabilities log pi(y|x) of the B
responses under the policy (pi_*) and, where the loss has one, under the frozen reference (ref_*),
plus the responses' token counts |y| (n_*) where the loss normalises by length. Each returns the
per-example losses (B,) and the rewards the stage reports (reward accuracy is how often the chosen
response's reward is the higher). The log-probabilities come from the model's chunked per-token
losses (train/dpo.py), so no loss here ever sees the logits. y_w is the chosen response, y_l the
rejected one; sigma is the logistic function.

dpo    L = -log sigma(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
       Rafailov et al. 2023; reward beta * (log pi(y|x) - log ref(y|x)).
ipo    L = (h - 1 / (2 tau))^2,  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
       Azar et al. 2023 (their empirical loss, on summed log-probs); tau is the weight of the KL
       regulariser, DPO's beta in the same objective, so the stage's --beta serves as tau. The
       squared loss pulls the log-ratio margin to 1 / (2 tau) instead of pushing it to infinity.
simpo  L = -log sigma(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)
       Meng et al. 2024: reference-free, the reward is the length-normalised log-prob
       beta / |y| * log pi(y|x), gamma a target reward margin.
orpo   L = -log pi(y_w|x) / |y_w| + lambda * -log sigma(log odds(y_w|x) - log odds(y_l|x)),
       odds(y|x) = P / (1 - P) with P = exp(log pi(y|x) / |y|), the per-token likelihood
       Hong et al. 2024: reference-free, the SFT loss plus an odds-ratio penalty; reward log odds.
kto    r = log pi(y|x) - log ref(y|x);  z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)]),
       detached, over mismatched pairs (each prompt x_j of the batch with another example's
       completion y'_j): the batch's estimate of KL(pi || ref), the reference point;
       L = lambda_D - lambda_D * sigma(beta * (r - z0))   for a desirable y,
           lambda_U - lambda_U * sigma(beta * (z0 - r))   for an undesirable y
       Ethayarajh et al. 2024: unpaired examples, each labelled desirable or not; reward beta * r.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]     # per-example losses, chosen rewards, rejected rewards

# ORPO's odds of a response whose mean log-prob is 0 are infinite (and their gradient NaN); an fp32
# model sure of a short reply rounds its log-prob to exactly that, so the mean is capped here:
# odds of at most about 1e6.
SURE = -1e-6


def dpo(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float) -> Losses:
    """DPO: -log sigma of the difference of the implicit rewards beta * (log pi - log ref)."""
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def ipo(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, tau: float) -> Losses:
    """IPO: the squared distance of the log-ratio margin h from 1 / (2 tau); rewards tau * (log pi - log ref)."""
    margin = (pi_c - ref_c) - (pi_r - ref_r)
    return (margin - 1 / (2 * tau)) ** 2, tau * (pi_c - ref_c), tau * (pi_r - ref_r)


def simpo(pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, beta: float,
          gamma: float) -> Losses:
    """SimPO: -log sigma of the length-normalised reward margin beta * log pi / |y| less gamma."""
    chosen, rejected = beta * pi_c / n_c, beta * pi_r / n_r
    return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected


def log_odds(logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) of P = exp(logp / n), the per-token likelihood of a response: (B,)."""
    mean = (logp / n).clamp(max=SURE)
    return mean - torch.log(-torch.expm1(mean))


def orpo(pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, lam: float) -> Losses:
    """ORPO: the chosen response's mean per-token NLL plus lam times -log sigma of the log odds ratio."""
    chosen, rejected = log_odds(pi_c, n_c), log_odds(pi_r, n_r)
    return -pi_c / n_c - lam * F.logsigmoid(chosen - rejected), chosen, rejected


def kto(pi: torch.Tensor, ref: torch.Tensor, kl_pi: torch.Tensor, kl_ref: torch.Tensor, desirable: torch.Tensor,
        beta: float, desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """KTO on B unpaired examples (desirable: (B,) bool), with kl_pi, kl_ref the log-probs of the
    batch's mismatched pairs: -> (per-example losses (B,), rewards beta * r (B,), the reference point z0)."""
    z0 = (kl_pi - kl_ref).mean().clamp(min=0).detach()
    r = pi - ref
    weight = torch.where(desirable, r.new_tensor(desirable_weight), r.new_tensor(undesirable_weight))   # (B,)
    value = weight * torch.sigmoid(beta * torch.where(desirable, r - z0, z0 - r))
    return weight - value, beta * r, z0
