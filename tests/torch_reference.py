"""PyTorch reference implementations, written plainly (loops where the maths has them).

These follow the formulas in our docstrings and the conventions of TRL/verl, and
are the other side of `test_torch_reference.py`. float64 throughout.
"""

import torch


def t(x, requires_grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad)


def kl(logp, ref, kind):
    d = logp - ref
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    d = d.clamp(-20, 20)
    return torch.exp(-d) - 1 + d


def shape_rewards(scores, logp, ref, mask, kl_coef, kind):
    n, steps = mask.shape
    rewards = torch.zeros(n, steps, dtype=torch.float64)
    for i in range(n):
        last = None
        for j in range(steps):
            if mask[i, j] > 0:
                rewards[i, j] = -kl_coef * kl(logp[i, j], ref[i, j], kind)
                last = j
        if last is not None:
            rewards[i, last] += scores[i]
    return rewards


def rloo_advantages(r, k):
    g = r.view(-1, k)
    baseline = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(r, k, scale, eps):
    g = r.view(-1, k)
    centered = g - g.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (g.std(-1, keepdim=True) + eps)  # torch.std: ddof=1
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    return centered.reshape(-1)


def gae(rewards, values, mask, gamma, lam):
    """Explicit reverse loop over the valid tokens of each row."""
    n, steps = mask.shape
    adv = torch.zeros(n, steps, dtype=torch.float64)
    for i in range(n):
        valid = [j for j in range(steps) if mask[i, j] > 0]
        next_value, next_adv = 0.0, 0.0
        for j in reversed(valid):
            delta = rewards[i, j] + gamma * next_value - values[i, j]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, j]
            adv[i, j] = next_adv
    returns = (adv + values) * mask
    return adv, returns


def whiten(x, mask, shift_mean=True, eps=1e-8):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()  # ddof=0
    y = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return y * mask


def aggregate(loss_mat, mask, mode, seq_weight=None):
    if seq_weight is None:  # the seq-mean modes average over the rows with a token (verl's convention)
        seq_weight = (mask.sum(-1) > 0).double()
    mask = mask * seq_weight[:, None]
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        seq = seq / mask.shape[-1]
    return (seq * seq_weight).sum() / seq_weight.sum()


def bandit_loss(logp, ref, scores, mask, kl_coef, kind, advantage_fn, mode):
    """REINFORCE/RLOO as TRL/verl do it: reward from detached log-probs."""
    seq_rewards = shape_rewards(scores, logp.detach(), ref, mask, kl_coef, kind).sum(-1)
    adv = advantage_fn(seq_rewards).detach()
    return aggregate(-adv[:, None] * logp, mask, mode)


def ppo_policy_loss(logp, old, adv, mask, clip_eps, clip_eps_high, dual_clip, mode):
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    pg = torch.max(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.min(pg, -dual_clip * adv), pg)
    return aggregate(pg, mask, mode), ((pg2 > pg1).double() * mask).sum() / mask.sum()


def value_loss(values, old_values, returns, mask, clip, mode):
    if clip is None:
        return aggregate(0.5 * (values - returns) ** 2, mask, mode)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return aggregate(0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, mode)


def token_logprobs(logits, tokens, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def token_entropy(logits, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)
