"""Preference optimisation: `python -m train.dpo --init SFT_RUN --data tasks|PATH.jsonl --loss dpo --beta 0.1`.

The policy starts from --init and a frozen copy of it is the reference (eval mode, no gradients).
A response's log-probability is the sum of its per-token log-probs, taken from the model's
reduction="none" loss path (kernels.linear_cross_entropy), so it runs on the same kernels as
training; with --packing (the default) the chosen and rejected sequences of a micro-batch are
packed whole into rows, each attending only to itself, and the per-token losses are summed per
sequence: no loss ever holds (tokens x vocabulary) logits.

--loss picks the preference loss (train/preference.py has each formula and its paper): dpo (the
default), ipo, simpo and orpo on pairs; kto on unpaired examples labelled desirable or not
({"prompt", "completion", "label"} JSONL; with --data tasks each built-in pair gives its chosen reply
as desirable and its rejected one as undesirable, and the held-out pairs stay pairs). dpo, ipo and
kto measure the policy against the frozen reference, whose log-probs never change, so they are
computed once per example and cached (kto's reference point, from mismatched pairs of the
micro-batch, once per step); simpo and orpo are reference-free: no reference is built.
--nll-weight (default 1; 0 is the plain loss; orpo has its own NLL term instead) adds that times
the chosen (desirable) responses' mean per-token NLL, which keeps the SFT model's correct answers
likely: without it, exact match falls while reward accuracy rises. With --data tasks the
rejected responses are, by default, the reference model's own wrong answers: each training prompt
is sampled --samples times and every distinct wrong reply makes a pair (a built-in plausible wrong
answer stands in when a sample is right). On the tiny CPU model 4 samples instead of 1 raised
held-out reward accuracy 0.917 -> 0.929 and exact match 0.769 -> 0.823. Only as many training
prompts are sampled as the run's steps can use (sampled_prompts), with a progress bar on stderr.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from model import GPT
from model.chat_format import render_prompt
from model.command import run_command
from train.data import tasks
from train import preference
from train.config import TrainConfig, greater_than, non_negative, option, positive
from train.launch import Stage, run
from train.data.prepare import PreparedData
from train.posttrain import PostConfig, PostJob, held_out_tasks, holdout, load_init, report
from train.progress import progress
from train.replies import sampled_rejections
from train.runtime import Runtime
from train.data.sft_data import IGNORE, Example, collate, encode_pairs, encode_unpaired, load_dpo, load_kto

LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig(PostConfig):
    loss: str = option("dpo", "preference loss (formulas in train/preference.py): dpo; ipo (squared, pulls the "
                              "log-ratio margin to 1 / (2 --beta)); simpo (reference-free, length-normalised: "
                              "--simpo-beta, --simpo-gamma); orpo (reference-free odds ratio plus NLL: "
                              "--orpo-lambda); kto (unpaired desirable / undesirable examples: --beta, "
                              "--kto-desirable-weight, --kto-undesirable-weight)", choices=LOSSES)
    beta: float = option(0.1, "strength of the pull towards the reference (the KL penalty's inverse temperature): "
                              "dpo's and kto's beta, ipo's tau (> 0)", non_negative)
    simpo_beta: float = option(2.0, "simpo: scale of the reward, the mean per-token log-prob (the paper's 2.0-2.5)",
                               greater_than(0))
    simpo_gamma: float = option(1.0, "simpo: target reward margin between chosen and rejected (the paper's "
                                     "gamma / beta of 0.5 at beta 2)", non_negative)
    orpo_lambda: float = option(0.1, "orpo: weight of the odds-ratio term beside the chosen reply's NLL (the "
                                     "paper's 0.1)", non_negative)
    kto_desirable_weight: float = option(1.0, "kto: weight lambda_D of the desirable examples", greater_than(0))
    kto_undesirable_weight: float = option(1.0, "kto: weight lambda_U of the undesirable examples (the paper keeps "
                                                "lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]; --data tasks "
                                                "gives n_D = n_U)", greater_than(0))
    nll_weight: float = option(1.0, "add this times the chosen (kto: desirable) responses' mean per-token NLL to "
                                    "the loss (0: the plain loss; not with orpo, whose loss has its own)",
                               non_negative)
    rejected: str = option("sampled", "with --data tasks: rejected = the --init model's own wrong sample "
                                      "(sampled) or a built-in plausible wrong answer (rule)",
                           choices=("sampled", "rule"))
    samples: int = option(4, "with --rejected sampled: replies sampled per training prompt; each distinct "
                             "wrong one is a pair (held-out pairs always take one sample)", positive)


# DPO mixes more pretraining text than the other stages (0.7 of the positions): from the default SFT run on
# the CPU, 0.5 ended at exact match 0.843 with the pretraining val loss 3.68 -> 3.78 (1.35x the pretrained
# perplexity), 0.7 at 0.851 with 3.68 -> 3.63 (1.16x).
CPU_DEFAULTS = DPOConfig(n_train=8000, batch_size=16, max_steps=4000, lr=3e-4, min_lr=3e-5, warmup_steps=10,
                         weight_decay=0.0, eval_interval=400, eval_examples=350, ckpt_interval=1000, log_interval=10,
                         pretrain_mix=0.7)
CUDA_DEFAULTS = DPOConfig(n_train=8000, batch_size=32, max_steps=1500, lr=3e-5, min_lr=3e-6, warmup_steps=30,
                          weight_decay=0.0, eval_interval=500, eval_examples=700, ckpt_interval=1500, log_interval=10,
                          pretrain_mix=0.7)
Pair = tuple[Example, Example]
Item = Pair | tuple[Example, bool]          # a preference pair, or an unpaired (example, desirable) for kto


def sequence_logps(model: torch.nn.Module, batch: dict, n: int) -> torch.Tensor:
    """Sum of the log-probs of the target tokens of each of the n examples of a collated batch, padded
    or packed (ignored targets count 0): the per-token losses of its rows, summed per example over
    its positions (batch["segment"]) -> (n,)."""
    losses = model(batch["x"], targets=batch["y"], reduction="none", documents=batch.get("documents"))  # (R, L)
    sums = losses.new_zeros(n + 1, dtype=torch.float32).index_add(0, batch["segment"].flatten(),
                                                                  losses.float().flatten())  # padding: slot n
    return -sums[:n]


def response_lengths(batch: dict, n: int) -> torch.Tensor:
    """The target tokens |y| of each of the n examples of a collated batch: (n,)."""
    kept = (batch["y"] != IGNORE).flatten().float()
    return kept.new_zeros(n + 1).index_add(0, batch["segment"].flatten(), kept)[:n]


def examples_of(items: list) -> tuple[list[Example], list[bool]]:
    """The examples of preference pairs (the chosen responses, then the rejected ones) or of unpaired
    (example, desirable) items, and whether each is desirable (a chosen response is)."""
    if isinstance(items[0][1], Example):
        return [c for c, _ in items] + [r for _, r in items], [True] * len(items) + [False] * len(items)
    return [e for e, _ in items], [desirable for _, desirable in items]


def unpaired(pairs: list[Pair]) -> list[tuple[Example, bool]]:
    """KTO's examples of preference pairs: each chosen response desirable, each rejected one not."""
    return [item for c, r in pairs for item in ((c, True), (r, False))]


def mismatched(examples: list[Example], block_size: int) -> list[Example]:
    """KTO's mismatched pairs: each example's prompt (the tokens before its mask turns on) with the next
    example's completion (the last with the first's), cut to block_size + 1 tokens."""
    starts = [e.mask.index(True) for e in examples]
    nexts = list(zip(examples[1:] + examples[:1], starts[1:] + starts[:1]))
    return [Example((e.ids[:s] + o.ids[t:])[:block_size + 1], (e.mask[:s] + o.mask[t:])[:block_size + 1])
            for e, s, (o, t) in zip(examples, starts, nexts)]


def reward_metrics(rewards: torch.Tensor, desirable: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics of the rewards of (B, 2) pairs (chosen, rejected): how often the chosen reward is
    strictly higher (reward_acc), the mean margin and the mean rewards. Of (B,) unpaired examples:
    how often a reward has its label's sign (> 0 desirable, < 0 not), the mean reward of the
    desirable (chosen_reward) and of the undesirable ones (rejected_reward)."""
    if rewards.dim() == 2:
        chosen, rejected = rewards.unbind(1)
        metrics = {"reward_acc": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                   "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}
    else:
        good = desirable.float()
        metrics = {"reward_acc": torch.where(desirable, rewards > 0, rewards < 0).float().mean(),
                   "chosen_reward": (rewards * good).sum() / good.sum().clamp(min=1),
                   "rejected_reward": (rewards * (1 - good)).sum() / (1 - good).sum().clamp(min=1)}
    return {k: v.detach() for k, v in metrics.items()}


def accuracy_by_kind(wins: list[bool], kinds: list[str]) -> dict[str, float]:
    """val_reward_acc_<kind>: the fraction of each kind's held-out pairs whose chosen reward is higher."""
    by_kind: dict[str, list[bool]] = {}
    for win, kind in zip(wins, kinds, strict=True):
        by_kind.setdefault(kind, []).append(win)
    return {f"val_reward_acc_{kind}": sum(w) / len(w) for kind, w in by_kind.items()}


class DPOJob(PostJob):
    """Preference pairs (or, for kto, unpaired examples) under cfg.loss, against a frozen reference
    unless the loss is reference-free (reference None); exact match on the test tasks. The held-out
    items are pairs, or with kto from a file unpaired examples; per-kind accuracy wants pairs."""
    name = "dpo"

    def __init__(self, train: list[Item], val: list[Item], test_tasks: list[tasks.Task], tok, reference: GPT | None,
                 beta: float, cfg: DPOConfig, rt: Runtime, nll_weight: float = 0.0,
                 val_kinds: list[str] | None = None, pack_to: int = 0, corpus: PreparedData | None = None,
                 block_size: int = 0):
        super().__init__(test_tasks, tok, cfg, rt, corpus, block_size)
        self.train, self.val, self.pack_to = train, val, pack_to      # pack_to 0: one sequence per row
        self.val_kinds = val_kinds                        # task kind of each held-out pair, for per-kind accuracy
        self.reference, self.beta, self.nll_weight = reference, beta, nll_weight
        self.unpaired = cfg.loss == "kto"                 # train items (example, desirable), not pairs
        self.ref_cache: dict[int, torch.Tensor] = {}     # train item -> the reference's log-probs of its examples
        self.val_batches: list[dict] | None = None        # the held-out items' batches, the reference's included

    @torch.no_grad()
    def reference_logps(self, examples: list[Example]) -> torch.Tensor:
        """The frozen reference's log-probs of the examples' responses: (n,)."""
        with self.rt.autocast():
            batch = self.on_device(collate(examples, self.pad_id, self.pack_to))
            return sequence_logps(self.reference, batch, len(examples))

    def cached_reference(self, keys: list[int]) -> torch.Tensor:
        """The reference's log-probs of the examples of train items `keys`, in batch order (examples_of):
        each item's computed once, when a batch first takes it."""
        missing = sorted(set(keys) - set(self.ref_cache))
        if missing:
            logps = self.reference_logps(examples_of([self.train[i] for i in missing])[0])
            for i, ref in zip(missing, logps.view(-1, len(missing)).T):                  # (examples per item,)
                self.ref_cache[i] = ref
        return torch.stack([self.ref_cache[i] for i in keys], dim=1).flatten()          # (n,)

    def preference_batch(self, items: list, keys: list[int] | None = None) -> dict:
        """The items' examples collated (examples_of), with "paired", "lengths" (each example's response
        tokens), the reference's log-probs "ref" (cached for train items, given as keys), and for kto
        the labels "desirable" and the mismatched pairs of its reference point ("kl", "kl_ref")."""
        examples, desirable = examples_of(items)
        batch = self.on_device(collate(examples, self.pad_id, self.pack_to))
        batch["paired"], batch["lengths"] = isinstance(items[0][1], Example), response_lengths(batch, len(examples))
        if self.reference is not None:
            batch["ref"] = self.cached_reference(keys) if keys is not None else self.reference_logps(examples)
        if self.unpaired:
            kl = mismatched(examples, self.reference.cfg.block_size)
            batch["desirable"] = torch.tensor(desirable, device=self.rt.device)
            batch["kl"] = self.on_device(collate(kl, self.pad_id, self.pack_to))
            batch["kl_ref"] = self.reference_logps(kl)
        return batch

    def terms(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """cfg.loss on a preference_batch: -> (losses (n,) of its pairs or unpaired examples, rewards
        ((B, 2) of a batch of pairs, else (n,)), the mean NLL per chosen (desirable) token, and the
        loss's own metrics (kto: kl, its reference point z0))."""
        cfg, lengths, n = self.cfg, batch["lengths"], len(batch["lengths"])
        if self.unpaired:
            with torch.no_grad():                       # z0 is a detached estimate: no graph for it
                kl = sequence_logps(model, batch["kl"], n)
            pi, good = sequence_logps(model, batch, n), batch["desirable"]
            losses, rewards, z0 = preference.kto(pi, batch["ref"], kl, batch["kl_ref"], good, self.beta,
                                                 cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
            nll = -(pi * good).sum() / (lengths * good).sum().clamp(min=1)
            return losses, rewards.view(2, -1).T if batch["paired"] else rewards, nll, {"kl": z0}
        pi, lengths = sequence_logps(model, batch, n).view(2, -1), lengths.view(2, -1)    # (2, B) chosen, rejected
        if cfg.loss in REFERENCE_FREE:
            hyper = (cfg.simpo_beta, cfg.simpo_gamma) if cfg.loss == "simpo" else (cfg.orpo_lambda,)
            losses, chosen, rejected = getattr(preference, cfg.loss)(*pi, *lengths, *hyper)
        else:
            losses, chosen, rejected = getattr(preference, cfg.loss)(*pi, *batch["ref"].view(2, -1), self.beta)
        return losses, torch.stack([chosen, rejected], dim=1), -pi[0].sum() / lengths[0].sum(), {}

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        index = self.indices(len(self.train), step, micro)
        batch = self.preference_batch([self.train[i] for i in index], index)
        return self.with_pretraining(batch, step, micro)

    def loss(self, model, batch):
        return self.plus_pretraining(model, batch, *self.preference_loss(model, batch))

    def preference_loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, rewards, nll, extra = self.terms(model, batch)
        loss, metrics = losses.mean(), {**reward_metrics(rewards, batch.get("desirable")), **extra}
        if not self.nll_weight or self.cfg.loss == "orpo":
            return loss, metrics
        # Plain DPO lowers the chosen responses' likelihood along with the rejected ones' (both
        # rewards fall); on the tasks that breaks greedy answers, mostly by not stopping. The mean
        # NLL per chosen token holds the chosen answers up.
        return loss + self.nll_weight * nll, {**metrics, f"{self.cfg.loss}_loss": loss.detach(),
                                              "chosen_nll": nll.detach()}

    def validate(self, model: GPT) -> dict[str, float]:
        metrics = self.held_out_metrics(model)
        if self.val:
            if self.val_batches is None:
                size = self.cfg.batch_size
                self.val_batches = [self.preference_batch(self.val[i:i + size]) for i in range(0, len(self.val), size)]
            results = [self.terms(model, b) for b in self.val_batches]
            losses, rewards = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
            desirable = torch.cat([b["desirable"] for b in self.val_batches]) if rewards.dim() == 1 else None
            metrics.update({"val_loss": losses.mean().item(),
                            **{f"val_{k}": v.item() for k, v in reward_metrics(rewards, desirable).items()}})
            if self.val_kinds:
                metrics.update(accuracy_by_kind((rewards[:, 0] > rewards[:, 1]).tolist(), self.val_kinds))
        return metrics


def task_pairs(task_list: list[tasks.Task], model: GPT, tok, rejected: str, seed: int, rt: Runtime,
               samples: int = 1, split: str = "training") -> list[dict]:
    """DPO records of built-in tasks. Rejected 'sampled': each prompt is sampled `samples` times from
    the model and every distinct wrong reply makes a pair (the built-in wrong answer stands in for
    right samples), so the prompts the model gets wrong most often weigh most. The main process shows
    the sampling's progress on stderr ("sampling <split> replies")."""
    if rejected == "rule":
        return [tasks.dpo_record(t) for t in task_list]
    pairs: dict[tuple[str, str], dict] = {}
    with rt.autocast(), progress(len(task_list) * samples, f"sampling {split} replies", " replies",
                                 show=rt.is_main) as bar:
        for k in range(samples):
            # A prime stride keeps each round's seeds apart (replies() adds length * 1000 + start to the seed).
            for t, w in zip(task_list, sampled_rejections(model, tok, task_list, seed + k * 7919, bar=bar)):
                pairs.setdefault((t.prompt, w), tasks.dpo_record(t, w))
    if rt.is_main:
        builtin = {(t.prompt, t.wrong) for t in task_list}
        own = sum(key not in builtin for key in pairs)
        print(f"rejected responses: {len(pairs)} pairs from {len(task_list)} prompts x {samples} samples, "
              f"{own} of them the --init model's own wrong replies, the rest built-in wrong answers")
    return list(pairs.values())


def run_length(cfg: TrainConfig, world_size: int, task_list: list[tasks.Task], tok) -> tuple[int, int]:
    """(steps, pairs per step): the most optimizer steps the run can take, and the pairs each takes,
    batch_size x grad_accum x world_size. --max-steps bounds the steps (a --max-minutes budget may
    take fewer, measured only once training runs). With --max-tokens the loop counts its steps from
    the tokens of a batch, so they are bounded here by the fewest tokens a step can hold: each of a
    pair's two examples has at least its rendered prompt's length of inputs (the reply adds one or
    more)."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    if not cfg.max_tokens:
        return cfg.max_steps, per_step
    shortest = min(len(render_prompt([{"role": "user", "content": t.prompt}], tok)) for t in task_list)
    return max(1, cfg.max_tokens // (per_step * 2 * shortest)), per_step


def sampled_prompts(cfg: DPOConfig, rt: Runtime, task_list: list[tasks.Task], tok) -> list[tasks.Task]:
    """The training prompts to sample replies to: the first steps x pairs per step of them (run_length).
    Every prompt gives at least one pair, so more would only make pairs no step reaches, at the cost of
    minutes of generation for a short run. The count depends on the config's flags alone (not on what
    a run records while training), so a --resume, which reuses the config, samples the same prompts
    with the same seeds, hence the same pairs, and its batches stay a pure function of the step."""
    steps, per_step = run_length(cfg, rt.world_size, task_list, tok)
    n = min(len(task_list), steps * per_step)
    if n < len(task_list) and rt.is_main:
        bound = "--max-tokens allows" if cfg.max_tokens else "the run takes"
        print(f"sampling replies to {n:,} of the {len(task_list):,} training prompts: {bound} at most "
              f"{steps:,} steps of {per_step:,} pairs")
    return task_list[:n]


def build(cfg: DPOConfig, rt: Runtime) -> tuple[DPOJob, GPT]:
    if cfg.loss == "ipo" and not cfg.beta:
        raise SystemExit("--loss ipo needs --beta > 0: it pulls the log-ratio margin to 1 / (2 beta)")
    policy, tok, corpus = load_init(cfg, rt)
    reference = None if cfg.loss in REFERENCE_FREE else copy.deepcopy(policy).eval().requires_grad_(False)
    test_tasks = held_out_tasks(cfg)
    kto_file = cfg.loss == "kto" and cfg.data != "tasks"          # unpaired examples, not pairs
    if cfg.data == "tasks":
        sampler = policy if reference is None else reference       # the --init weights either way
        train_tasks = tasks.make_tasks("train", cfg.n_train, cfg.task_seed)
        if cfg.rejected == "sampled":
            train_tasks = sampled_prompts(cfg, rt, train_tasks, tok)
        train_records = task_pairs(train_tasks, sampler, tok, cfg.rejected, cfg.seed, rt, cfg.samples)
        val_records = task_pairs(test_tasks, sampler, tok, cfg.rejected, cfg.seed + 1, rt, split="held-out")
    else:
        train_records, val_records = holdout((load_kto if kto_file else load_dpo)(cfg.data), cfg.eval_examples)
    block = policy.cfg.block_size
    encode = encode_unpaired if kto_file else encode_pairs
    train, dropped = encode(train_records, tok, block)
    val, _ = encode(val_records, tok, block)
    what = "examples" if kto_file else "pairs"
    if not train:
        raise SystemExit(f"no preference {what[:-1]} of {cfg.data} fits in block_size {block} tokens")
    if rt.is_main:
        print(f"data: {cfg.data}  {len(train)} train {what} ({dropped} longer than block_size dropped), "
              f"{len(val)} held-out {what}, {len(test_tasks)} test tasks, loss={cfg.loss}, beta={cfg.beta}")
    if cfg.loss == "kto" and not kto_file:
        train = unpaired(train)          # the held-out pairs stay pairs, whose reward accuracy is comparable
    # Per-kind accuracy needs one held-out pair per test task; a block_size too small for some drops them.
    kinds = [t.kind for t in test_tasks] if cfg.data == "tasks" and len(val) == len(test_tasks) else None
    return DPOJob(train, val, test_tasks, tok, reference, cfg.beta, cfg, rt, cfg.nll_weight, kinds,
                  block if cfg.packing else 0, corpus, block), policy


STAGE = Stage("dpo", __doc__, CPU_DEFAULTS, CUDA_DEFAULTS, build, finish=report)


def main(argv: list[str] | None = None) -> dict:
    return run(STAGE, argv)


if __name__ == "__main__":
    run_command(main)
