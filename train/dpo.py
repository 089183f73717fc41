"""Direct preference optimisation: `python -m train.dpo --init SFT_RUN --data tasks|PATH.jsonl --beta 0.1`.

The policy starts from --init and a frozen copy of it is the reference (eval mode, no gradients).
A response's log-probability is the sum of its per-token log-probs, taken from the model's
reduction="none" loss path (kernels.linear_cross_entropy), so it runs on the same kernels as
training. The loss is -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))); the reference terms
never change, so they are computed once per pair and cached. --nll-weight (default 1; 0 is plain
DPO) adds that times the chosen responses' mean per-token NLL, which keeps the SFT model's correct
answers likely: without it, exact match falls while reward accuracy rises. With --data tasks the
rejected responses are, by default, the reference model's own wrong answers: each training prompt
is sampled --samples times and every distinct wrong reply makes a pair (a built-in plausible wrong
answer stands in when a sample is right). On the tiny CPU model 4 samples instead of 1 raised
held-out reward accuracy 0.917 -> 0.929 and exact match 0.769 -> 0.823.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from model import GPT
from train import tasks
from train.chat_format import ChatTokens
from train.loop import TrainConfig, add_args, config_from, positive_int
from train.runtime import Runtime
from train.sft import add_post_args, holdout, load_init, run_post, task_sample
from train.sft_data import IGNORE, Example, collate, encode_pairs, load_dpo, stream_indices

CPU_DEFAULTS = TrainConfig(batch_size=16, max_steps=4000, lr=3e-4, min_lr=3e-5, warmup_steps=10, weight_decay=0.0,
                           eval_interval=400, eval_tokens=350, ckpt_interval=1000, log_interval=10)
CUDA_DEFAULTS = TrainConfig(batch_size=32, max_steps=1500, lr=3e-5, min_lr=3e-6, warmup_steps=30, weight_decay=0.0,
                            eval_interval=500, eval_tokens=700, ckpt_interval=1500, log_interval=10)
Pair = tuple[Example, Example]


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probs of the target tokens of each row (ignored targets count 0): (B, T) -> (B,)."""
    return -model(x, targets=y, reduction="none").float().sum(dim=-1)


def implicit_rewards(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * (policy - reference) log-prob of the chosen and of the rejected responses: (B,), (B,)."""
    return beta * (pi_c - ref_c), beta * (pi_r - ref_r)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over pairs (each argument (B,)) and its diagnostics: the implicit rewards
    beta * (policy - reference) log-prob of chosen and rejected, their margin, and how often the
    chosen reward is strictly higher."""
    chosen, rejected = implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta)
    loss = -F.logsigmoid(chosen - rejected).mean()
    metrics = {"reward_acc": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
               "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen responses then the rejected ones as one padded batch: x, y (2B, L)."""
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def pair_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int, device: torch.device) -> torch.Tensor:
    """(log p(chosen), log p(rejected)) of each pair's response under model: (2, B)."""
    b = pair_batch(pairs, pad_id)
    return sequence_logps(model, b["x"].to(device), b["y"].to(device)).view(2, len(pairs))


def accuracy_by_kind(wins: list[bool], kinds: list[str]) -> dict[str, float]:
    """val_reward_acc_<kind>: the fraction of each kind's held-out pairs whose chosen reward is higher."""
    by_kind: dict[str, list[bool]] = {}
    for win, kind in zip(wins, kinds, strict=True):
        by_kind.setdefault(kind, []).append(win)
    return {f"val_reward_acc_{kind}": sum(w) / len(w) for kind, w in by_kind.items()}


class DPOJob:
    """Preference pairs against a frozen reference; exact match on the test tasks."""
    name = "dpo"

    def __init__(self, train: list[Pair], val: list[Pair], test_tasks: list[tasks.Task], tok, reference: GPT,
                 beta: float, cfg: TrainConfig, rt: Runtime, nll_weight: float = 0.0,
                 val_kinds: list[str] | None = None):
        self.train, self.val, self.test_tasks, self.tok = train, val, test_tasks, tok
        self.val_kinds = val_kinds                        # task kind of each held-out pair, for per-kind accuracy
        self.reference, self.beta, self.cfg, self.rt, self.nll_weight = reference, beta, cfg, rt, nll_weight
        self.pad_id = ChatTokens.of(tok).bos
        self.ref_cache: dict[int, torch.Tensor] = {}     # train pair index -> (ref_c, ref_r) on the device
        self.val_ref: torch.Tensor | None = None          # (2, n_val)

    @torch.no_grad()
    def reference_logps(self, pairs: list[Pair]) -> torch.Tensor:
        """The frozen reference's (ref_c, ref_r) log-probs of pairs: (2, B)."""
        with self.rt.autocast():
            return pair_logps(self.reference, pairs, self.pad_id, self.rt.device)

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        B, W = self.cfg.batch_size, self.rt.world_size
        start = ((step * self.cfg.grad_accum + micro) * W + self.rt.rank) * B
        index = stream_indices(len(self.train), start, B, self.cfg.seed)
        missing = sorted(set(index) - set(self.ref_cache))
        if missing:
            for i, ref in zip(missing, self.reference_logps([self.train[i] for i in missing]).T):
                self.ref_cache[i] = ref
        batch = {k: v.to(self.rt.device, non_blocking=True)
                 for k, v in pair_batch([self.train[i] for i in index], self.pad_id).items()}
        batch["ref"] = torch.stack([self.ref_cache[i] for i in index], dim=1)        # (2, B)
        return batch

    def loss(self, model, batch):
        logps = sequence_logps(model, batch["x"], batch["y"]).view(2, -1)            # (2, B)
        loss, metrics = dpo_loss(logps[0], logps[1], batch["ref"][0], batch["ref"][1], self.beta)
        if not self.nll_weight:
            return loss, metrics
        # Plain DPO lowers the chosen responses' likelihood along with the rejected ones' (both
        # rewards fall); on the tasks that breaks greedy answers, mostly by not stopping. The mean
        # NLL per chosen token holds the chosen answers up.
        nll = -logps[0].sum() / (batch["y"][:logps.shape[1]] != IGNORE).sum()
        return loss + self.nll_weight * nll, {**metrics, "dpo_loss": loss.detach(), "chosen_nll": nll.detach()}

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    def evaluate(self, model: GPT) -> dict[str, float]:
        metrics = tasks.exact_match(model, self.tok, self.test_tasks, self.cfg.batch_size)
        if self.val:
            chunks = [self.val[i:i + self.cfg.batch_size] for i in range(0, len(self.val), self.cfg.batch_size)]
            if self.val_ref is None:
                self.val_ref = torch.cat([self.reference_logps(c) for c in chunks], dim=1)            # (2, n)
            policy = torch.cat([pair_logps(model, c, self.pad_id, self.rt.device) for c in chunks], dim=1)
            loss, extra = dpo_loss(policy[0], policy[1], self.val_ref[0], self.val_ref[1], self.beta)
            metrics.update({"val_loss": loss.item(), **{f"val_{k}": v.item() for k, v in extra.items()}})
            if self.val_kinds:
                chosen, rejected = implicit_rewards(policy[0], policy[1], self.val_ref[0], self.val_ref[1], self.beta)
                metrics.update(accuracy_by_kind((chosen > rejected).tolist(), self.val_kinds))
        return metrics

    def sample(self, model: GPT) -> str:
        return task_sample(model, self.tok, self.test_tasks[0])


def task_pairs(task_list: list[tasks.Task], model: GPT, tok, rejected: str, seed: int, rt: Runtime,
               samples: int = 1) -> list[dict]:
    """DPO records of built-in tasks. Rejected 'sampled': each prompt is sampled `samples` times from
    the model and every distinct wrong reply makes a pair (the built-in wrong answer stands in for
    right samples), so the prompts the model gets wrong most often weigh most."""
    if rejected == "rule":
        return [tasks.dpo_record(t) for t in task_list]
    pairs: dict[tuple[str, str], dict] = {}
    with rt.autocast():
        for k in range(samples):
            # A prime stride keeps each round's seeds apart (replies() adds length * 1000 + start to the seed).
            for t, w in zip(task_list, tasks.sampled_rejections(model, tok, task_list, seed + k * 7919)):
                pairs.setdefault((t.prompt, w), tasks.dpo_record(t, w))
    if rt.is_main:
        builtin = {(t.prompt, t.wrong) for t in task_list}
        own = sum(key not in builtin for key in pairs)
        print(f"rejected responses: {len(pairs)} pairs from {len(task_list)} prompts x {samples} samples, "
              f"{own} of them the --init model's own wrong replies, the rest built-in wrong answers")
    return list(pairs.values())


def build(args: argparse.Namespace, rt: Runtime) -> tuple[DPOJob, GPT]:
    policy, tok = load_init(args, rt)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = config_from(args)
    test_tasks = tasks.make_tasks("test", cfg.eval_tokens, args.task_seed)
    if args.data == "tasks":
        train_records = task_pairs(tasks.make_tasks("train", args.n_train, args.task_seed), reference, tok,
                                   args.rejected, cfg.seed, rt, args.samples)
        val_records = task_pairs(test_tasks, reference, tok, args.rejected, cfg.seed + 1, rt)
    else:
        train_records, val_records = holdout(load_dpo(args.data), cfg.eval_tokens)
    block = policy.cfg.block_size
    train, dropped = encode_pairs(train_records, tok, block)
    val, _ = encode_pairs(val_records, tok, block)
    if not train:
        raise SystemExit(f"no preference pair of {args.data} fits in block_size {block} tokens")
    if rt.is_main:
        print(f"data: {args.data}  {len(train)} train pairs ({dropped} longer than block_size dropped), "
              f"{len(val)} held-out pairs, {len(test_tasks)} test tasks, beta={args.beta}")
    # Per-kind accuracy needs one held-out pair per test task; a block_size too small for some drops them.
    kinds = [t.kind for t in test_tasks] if args.data == "tasks" and len(val) == len(test_tasks) else None
    return DPOJob(train, val, test_tasks, tok, reference, args.beta, cfg, rt, args.nll_weight, kinds), policy


def build_parser(cuda: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.dpo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_post_args(parser, n_train=8000)
    parser.add_argument("--beta", type=float, default=0.1,
                        help="strength of the pull towards the reference (the KL penalty's inverse temperature)")
    parser.add_argument("--nll-weight", type=float, default=1.0,
                        help="add this times the chosen responses' mean per-token NLL to the loss (0: plain DPO)")
    parser.add_argument("--rejected", choices=("sampled", "rule"), default="sampled",
                        help="with --data tasks: rejected = the --init model's own wrong sample (sampled) "
                             "or a built-in plausible wrong answer (rule)")
    parser.add_argument("--samples", type=positive_int, default=4,
                        help="with --rejected sampled: replies sampled per training prompt; each distinct "
                             "wrong one is a pair (held-out pairs always take one sample)")
    add_args(parser, CUDA_DEFAULTS if cuda else CPU_DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    return run_post("dpo", build_parser, build, argv)


if __name__ == "__main__":
    main()
