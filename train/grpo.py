"""Reinforcement learning with verifiable rewards (GRPO):
`python -m train.grpo --init SFT_OR_DPO_RUN --data tasks|PATH.jsonl --group 8`.

Each step, every process takes --batch-size prompts per micro-batch and samples --group G replies to
each with the current policy (generate with the KV cache, --temperature, seeded by the step, so a
step's batch is a pure function of the step and the weights, and --resume is exact). A verifier
scores each reply: 1 for the exact answer (the built-in tasks, or the "answer" of a JSONL line
{"prompt", "answer"}), plus --format-reward when the reply ends with the end-of-turn token. The
advantage of reply i in its group is A_i = (r_i - mean r) / (std r + 1e-4) (--no-scale-rewards: not
divided, as Dr. GRPO argues), so a group whose rewards are all equal teaches nothing. With the
per-token log-probs logp of the policy, logp_old of the policy that sampled and ref of the frozen
--init model, each reply token t of reply i costs

    -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta * (exp(ref - logp) - (ref - logp) - 1),
    rho = exp(logp - logp_old),  eps = --clip,  beta = --kl-beta,

averaged over every reply token of the micro-batch (not per reply first, which would make a token
of a long reply weigh less; DAPO and Dr. GRPO do the same). Each sampled batch makes one update,
so logp_old is the policy's own logp, detached: rho is 1 in value and its gradient is logp's; the
clip bounds updates only when samples are reused, which this stage does not do. The KL term is the
GRPO paper's unbiased estimator; it is always measured (kl) and only added with --kl-beta > 0.

Log-probs come from the model's reduction="none" loss path (kernels.linear_cross_entropy): the
(tokens x vocabulary) logits never exist. Pretraining text is mixed in as in every post-training
stage (train/posttrain.py). Metrics: reward, reward_std (within groups), zero_var (the fraction of
groups whose rewards are all equal), correct, kl, reply_len; at each evaluation, held-out exact
match per task kind.

Other verifiers: call main() with verifier=f, where f(reply, answer) -> float is the reward of a
reply (the text before the end of turn) given the "answer" field of its prompt; e.g.
    from train.grpo import main
    main(["--init", "runs/sft", "--data", "my_prompts.jsonl"], verifier=lambda reply, answer: ...)
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from model import GPT
from model.chat_format import ChatTokens, render_prompt, reply_text
from model.command import at_least, run_command
from model.generate import generate_ragged
from train.config import non_negative, option, positive
from train.data import tasks
from train.data.prepare import PreparedData
from train.data.sft_data import IGNORE, Example, _text, collate, read_jsonl
from train.launch import Stage, run
from train.posttrain import PostConfig, PostJob, held_out_tasks, holdout, load_init, report
from train.replies import answer_budget, eval_mode
from train.runtime import Runtime

Verifier = Callable[[str, str], float]      # (reply, answer) -> reward


def exact_answer(reply: str, answer: str) -> float:
    """The default verifier: 1 when the reply is the answer exactly (surrounding space aside)."""
    return float(reply.strip() == answer.strip())


@dataclass
class GRPOConfig(PostConfig):
    batch_size: int = option(16, "prompts per micro-batch on each process; each is sampled --group times", positive)
    group: int = option(8, "replies sampled per prompt (G): the advantages compare each with its group",
                        at_least(2))
    temperature: float = option(1.0, "sampling temperature of the replies", non_negative)
    max_new_tokens: int = option(0, "most tokens of a sampled reply (0: twice the longest answer, plus 4)",
                                 non_negative)
    clip: float = option(0.2, "clip range eps of the probability ratio (PPO's)", non_negative)
    kl_beta: float = option(0.0, "weight of the KL penalty to the frozen --init model (0: none; kl is logged "
                                 "either way)", non_negative)
    format_reward: float = option(0.1, "reward added when a reply ends with the end-of-turn token", non_negative)
    scale_rewards: bool = option(True, "divide each group's advantages by its reward std (--no-scale-rewards: "
                                       "only subtract the group mean)")


# On the CPU: 15 minutes, as many steps as fit. From an SFT run (exact match 0.60), 8 minutes on the
# 2-core Xeon under load: 16 prompts a step at lr 2e-4 left sampled accuracy flat (0.59-0.64 over 120
# steps) while the KL grew, the Adam steps of a noisy gradient; lr 1e-3 fell to exact match 0.40; 64
# prompts at lr 3e-4 raised sampled accuracy 0.59 -> 0.69 in 44 steps.
CPU_DEFAULTS = GRPOConfig(n_train=20000, batch_size=64, group=8, max_steps=1000, max_minutes=15.0, lr=3e-4,
                          min_lr=3e-5, warmup_steps=10, weight_decay=0.0, eval_interval=50, eval_examples=350,
                          ckpt_interval=100, log_interval=10)
CUDA_DEFAULTS = GRPOConfig(n_train=20000, batch_size=32, group=16, max_steps=500, lr=5e-5, min_lr=5e-6,
                           warmup_steps=10, weight_decay=0.0, eval_interval=50, eval_examples=700,
                           ckpt_interval=100, log_interval=10)


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: each minus its group's mean, divided by the group's
    (unbiased) std + 1e-4 when scale."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if scale else centred


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                clip: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss with the k3 KL penalty, averaged over tokens; each argument is
    (N,), one entry per reply token (advantages: its reply's). -> (loss, {"kl", "clipped"})."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    log_ratio = ref_logp - logp
    kl = torch.exp(log_ratio) - log_ratio - 1
    loss = (beta * kl - surrogate).mean() if beta else -surrogate.mean()
    clipped = ((ratio - 1).abs() > clip).float().mean()
    return loss, {"kl": kl.detach().mean(), "clipped": clipped.detach()}


@dataclass(frozen=True)
class Prompt:
    ids: list[int]        # the rendered prompt, up to <|assistant|>
    answer: str
    kind: str


class GRPOJob(PostJob):
    """Sampled groups scored by a verifier; exact match on the held-out prompts."""
    name = "grpo"

    def __init__(self, prompts: list[Prompt], test_tasks: list[tasks.Task], tok, policy: GPT, reference: GPT,
                 verifier: Verifier, cfg: GRPOConfig, rt: Runtime, corpus: PreparedData | None, block_size: int):
        super().__init__(test_tasks, tok, cfg, rt, corpus, block_size)
        self.prompts, self.policy, self.reference, self.verifier = prompts, policy, reference, verifier
        self.end, self.stop = ChatTokens.of(tok).end, ChatTokens.of(tok).stop
        self.max_new = cfg.max_new_tokens or answer_budget(tok, prompts)      # reads each one's .answer
        self.last: tuple[tuple[int, int], dict] | None = None      # the loop asks for a step's first batch twice

    def batch(self, step: int, micro: int) -> dict:
        if self.last is not None and self.last[0] == (step, micro):
            return self.last[1]
        cfg, G = self.cfg, self.cfg.group
        prompts = [self.prompts[i] for i in self.indices(len(self.prompts), step, micro)]
        seed = cfg.seed * 1_000_003 + (step * cfg.grad_accum + micro) * self.rt.world_size + self.rt.rank
        with eval_mode(self.policy), self.rt.autocast():
            replies = sample_replies(self.policy, prompts, G, self.max_new, cfg.temperature, self.stop, seed)
        texts = [reply_text(r, self.tokenizer) for r in replies]
        correct = torch.tensor([self.verifier(t, prompts[i // G].answer) for i, t in enumerate(texts)])
        well_formed = torch.tensor([self.end in r for r in replies], dtype=torch.float32)
        rewards = (correct + cfg.format_reward * well_formed).view(len(prompts), G)                 # (P, G)
        examples = [Example(prompts[i // G].ids + r, [False] * len(prompts[i // G].ids) + [True] * len(r))
                    for i, r in enumerate(replies)]
        batch = self.on_device(collate(examples, self.pad_id, self.block_size if cfg.packing else 0))
        batch["advantages"] = group_advantages(rewards, cfg.scale_rewards).flatten().to(self.rt.device)
        with torch.no_grad(), self.rt.autocast():
            batch["ref_logp"] = reply_logps(self.reference, batch)
        spread = rewards.std(dim=1)                                                                  # (P,)
        batch["stats"] = {"reward": rewards.mean(), "reward_std": spread.mean(),
                          "zero_var": (spread == 0).float().mean(), "correct": correct.mean(),
                          "reply_len": torch.tensor(sum(map(len, replies)) / len(replies), dtype=torch.float32)}
        batch = self.with_pretraining(batch, step, micro)
        self.last = ((step, micro), batch)
        return batch

    def loss(self, model, batch):
        logp = reply_logps(model, batch)                                                  # (N,)
        targets = batch["segment"][batch["y"] != IGNORE]                                  # (N,) reply of each token
        loss, metrics = policy_loss(logp, logp.detach(), batch["ref_logp"], batch["advantages"][targets],
                                    self.cfg.clip, self.cfg.kl_beta)
        return self.plus_pretraining(model, batch, loss, {**metrics, **batch["stats"]})

    def validate(self, model: GPT) -> dict[str, float]:
        return self.held_out_metrics(model)


def reply_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The log-prob of every reply token of a collated batch, in row-major order: (N,) float32."""
    losses = model(batch["x"], targets=batch["y"], reduction="none", documents=batch.get("documents"))  # (R, L)
    return -losses[batch["y"] != IGNORE].float()


def sample_replies(model: GPT, prompts: list[Prompt], group: int, max_new_tokens: int, temperature: float,
                   stop: list[int], seed: int) -> list[list[int]]:
    """group sampled replies to each prompt (prompt-major: reply j of prompt i at i * group + j), each
    through its first stop token, all generated in one ragged batch (generate_ragged)."""
    return generate_ragged(model, [p.ids for p in prompts for _ in range(group)], max_new_tokens, temperature,
                           stop_tokens=stop, seed=seed)


def load_prompts(path: str) -> list[dict[str, str]]:
    """Every {"prompt", "answer"} record of a GRPO JSONL file."""
    return [{"prompt": _text(r, "prompt", where), "answer": _text(r, "answer", where)} for where, r in read_jsonl(path)]


def encode_prompts(records: list[tasks.Task], tok, block_size: int, what: str) -> list[Prompt]:
    """Render each prompt; one that leaves no room for a reply token in block_size is a mistake to name."""
    prompts = [Prompt(render_prompt([{"role": "user", "content": t.prompt}], tok), t.answer, t.kind) for t in records]
    if too_long := [i for i, p in enumerate(prompts) if len(p.ids) >= block_size]:
        raise ValueError(f"{len(too_long)} prompt(s) of {what} (the first: record {too_long[0] + 1}, "
                         f"{len(prompts[too_long[0]].ids)} tokens rendered) leave no room for a reply in block_size "
                         f"{block_size}; shorten them or drop them")
    return prompts


def build(cfg: GRPOConfig, rt: Runtime, verifier: Verifier = exact_answer) -> tuple[GRPOJob, GPT]:
    if cfg.fsdp:
        raise SystemExit("--fsdp: GRPO samples with the whole model on each process; run it with DDP (torchrun "
                         "without --fsdp)")
    policy, tok, corpus = load_init(cfg, rt)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    test_tasks = held_out_tasks(cfg)
    if cfg.data == "tasks":
        train = tasks.make_tasks("train", cfg.n_train, cfg.task_seed)
    else:
        records, held_out = holdout(load_prompts(cfg.data), cfg.eval_examples)
        train = [tasks.Task("data", r["prompt"], r["answer"], "") for r in records]
        test_tasks = [tasks.Task("data", r["prompt"], r["answer"], "") for r in held_out]
    block = policy.cfg.block_size
    prompts = encode_prompts(train, tok, block, cfg.data)
    encode_prompts(test_tasks, tok, block, f"{cfg.data}'s held-out part")
    if rt.is_main:
        print(f"data: {cfg.data}  {len(prompts)} training prompts, {len(test_tasks)} held-out prompts; "
              f"{cfg.batch_size} prompts x {cfg.group} replies per micro-batch")
    return GRPOJob(prompts, test_tasks, tok, policy, reference, verifier, cfg, rt, corpus, block), policy


STAGE = Stage("grpo", __doc__, CPU_DEFAULTS, CUDA_DEFAULTS, build, finish=report)


def main(argv: list[str] | None = None, verifier: Verifier = exact_answer) -> dict:
    return run(dataclasses.replace(STAGE, build=partial(build, verifier=verifier)), argv)


if __name__ == "__main__":
    run_command(main)
