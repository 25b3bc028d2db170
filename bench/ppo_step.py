"""One PPO iteration (rollout → score → advantages → clipped updates): gptlab against TRL's
PPOTrainer, same run.

The policy is the demo's SFT model; the reward model is the demo's round-2 reward model, and the
value model starts from it on both sides. TRL gets them as Hugging Face Llama models: the policy
a causal LM, the reward and value models one-label sequence classifiers whose score head is a
linear layer with a bias. gptlab's reward is normalised after its head, (head(h) − score_bias) ·
score_scale; that is folded into the score weight and bias of the reward model and of the value
model, as gptlab folds it into its value model's head, so both sides score a response alike.
TRL 1.16 no longer has PPO: this needs trl 1.12, the last release with it
(`trl.experimental.ppo`), which the `bench` extra pins.

Each step on both sides: the same 32 prompts (the first 32 of the file), one response each at
temperature 1.0 (the update divides the logits by it too), up to 80 new tokens, stopping at
EOS; k1 KL penalty with β = 0.05; a missing EOS costs 1.0; GAE with γ = 1, λ = 0.95,
advantages whitened; 2 epochs over 2 minibatches of 16, policy clip 0.2, value clip 0.2,
vf_coef 0.1; one AdamW (β = 0.9, 0.95, no weight decay, constant 5e-5) over policy and value;
no ptx, no dropout, fp32. We check that both sides start from the same models (the reward,
policy log-probs and values of one rollout agree to 1e-3), run each side's own training loop
(gptlab's `PPOTrainer.train`, TRL's `train`) for a warm-up step and `--steps` timed steps, step
end to step end, and report seconds a step, split into sampling, the no-grad forwards, TRL's
`gc.collect()` calls, and the rest (the update and each loop's bookkeeping).

What differs, as far as TRL allows:
  - Sampling: gptlab's engine drops finished rows from the batch; TRL calls `generate`, which
    decodes all 32 rows until every one has ended (or 80 tokens), then cuts each response after
    its first EOS. Both train on the cut responses; we print their lengths.
  - TRL takes the rollout's log-probs from `generate`'s scores; gptlab recomputes them with a
    forward of the policy (4 no-grad forwards a step against TRL's 3).
  - gptlab encodes the prompts' shared start (here the schema, 61 tokens) once per forward and
    shares its keys and values across rows, gradients included; TRL runs every row in full.
  - TRL does not clip gradients in PPO, so gptlab's clip is off here too (`grad_clip=0`).
  - TRL pays the score one position past the last token (its `padding_mask_p1`) and whitens
    with an unbiased variance; gptlab pays it on the last token. The two sides draw different
    random numbers, so they need not sample the same responses (from the demo's SFT model,
    nearly deterministic on these prompts, they do).

    .venv/bin/python bench/ppo_step.py --policy runs/demo/sft --reward runs/demo/round-2/reward \\
        --prompts runs/demo/world/prompts.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

T = 1.0  # the sampling temperature, also applied to the logits in the update


class PhaseClock:
    """Seconds spent in each phase of a step, summed over the timed steps."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, phase: str, fn: Callable, only_no_grad: bool = False) -> Callable:
        def timed(*args, **kwargs):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(phase, time.perf_counter() - t)
            return out
        return timed


def scalar_head(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    head = torch.nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def hf_models(ours: Any, reward_dir: str, work: Path) -> tuple[Any, Any, Any, Any]:
    """(policy, reward, value, tokenizer) for TRL, with gptlab's weights."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    from gptlab.checkpoint import load_model
    from gptlab.interop.hf import export_hf

    tok = ours.tok
    rm, _, _ = load_model(reward_dir)
    export_hf(ours.policy, tok, work / "policy")
    export_hf(rm.backbone, tok, work / "reward")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    reward, value = (AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=torch.float32) for _ in range(2))
    rm.fold_normalisation()
    reward.score, value.score = (scalar_head(rm.head.weight, rm.head.bias) for _ in range(2))
    reward.requires_grad_(False)
    for m in (policy, reward, value):
        m.config.pad_token_id = tok.pad_id
    hf_tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    hf_tok.pad_token_id = tok.pad_id
    # TRL stops at one token and finds padding by id: EOS must be the only stop, PAD its own.
    assert tok.stop_ids == {hf_tok.eos_token_id} and tok.pad_id != tok.eos_id
    return policy, reward, value, hf_tok


@torch.no_grad()
def start_gap(ours: Any, policy: Any, reward: Any, value: Any) -> dict[str, float]:
    """Largest |gptlab − TRL| of the reward, policy log-probs and values of one gptlab rollout,
    each side computing them its own way."""
    from trl.experimental.ppo.ppo_trainer import forward
    from trl.experimental.utils import get_reward
    from trl.trainer.utils import selective_log_softmax

    from gptlab.train.ppo import prefix_cache, response_logprobs, response_values

    pad = ours.tok.pad_id
    ro = ours.rollout(0)
    B = ro.ids.shape[0]
    full = ro.ids if ro.prefix is None else torch.cat([ro.prefix.expand(B, -1), ro.ids], 1)
    ctx = full.shape[1] - ro.response_ids.shape[1]  # TRL's context_length
    real = ro.response_mask.bool()
    logits = forward(policy, full, pad).logits[:, ctx - 1:-1] / T
    gaps = {
        "reward": ours.reward_model(ro.ids, ro.attention_mask,
                                    prefix_cache(ours.reward_model.backbone, ro.prefix, B))
        - get_reward(reward, full, pad, ctx)[1],
        "policy log-prob": (response_logprobs(ours.policy, ro, T)[0]
                            - selective_log_softmax(logits, ro.response_ids))[real],
        "value": (response_values(ours.value_model, ro)
                  - get_reward(value, full, pad, ctx)[0][:, ctx - 1:-1, 0])[real],
    }
    return {k: float(v.abs().max()) for k, v in gaps.items()}


def time_gptlab(ours: Any, steps: int) -> tuple[list[float], PhaseClock, list[tuple[int, float]]]:
    """gptlab's own loop (`PPOTrainer.train`, its metrics line and stderr line included) for a
    warm-up step and `steps` timed ones, step end to step end, as TRL's below: (seconds of each,
    phases, (longest, mean) response length of each). A step ends where the loop takes its
    snapshot for Ctrl-C, once the step is logged."""
    clock, lengths, marks = PhaseClock(), [], []
    rollout, snapshot = ours.rollout, ours.snapshot

    def timed_rollout(step: int):
        t = time.perf_counter()
        ro = rollout(step)
        clock.add("sampling", time.perf_counter() - t)
        lengths.append((ro.response_ids.shape[1], float(ro.response_mask.sum(1).float().mean())))
        return ro

    def marked_snapshot() -> dict:
        state = snapshot()
        marks.append(time.perf_counter())  # the first: before step 1; then each step's end
        if len(marks) == 2:  # the warm-up step is over
            clock.seconds.clear()
            lengths.clear()
        return state

    ours.rollout, ours.snapshot = timed_rollout, marked_snapshot
    ours.score = clock.wrap("no-grad forwards", ours.score)
    ours.advantages = clock.wrap("no-grad forwards", ours.advantages)
    ours.train()
    times = [b - a for a, b in zip(marks, marks[1:])][1:]
    return times, clock, lengths


def time_trl(trainer_args: dict, steps: int, eos_id: int
             ) -> tuple[list[float], PhaseClock, list[tuple[int, float]]]:
    """TRL's own loop for a warm-up step and `steps` timed ones, its phases timed by wrapping
    the functions of its module that the loop calls."""
    from transformers import PrinterCallback, TrainerCallback
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    clock, lengths = PhaseClock(), []
    generate_batch = clock.wrap("sampling", trl_ppo.batch_generation)

    def batch_generation(model, queries, *rest):
        qr, logits = generate_batch(model, queries, *rest)
        resp = qr[:, queries.shape[1]:]
        cut = trl_ppo.first_true_indices(resp == eos_id) + 1  # through the first EOS
        lengths.append((resp.shape[1], float(cut.clamp(max=resp.shape[1]).float().mean())))
        return qr, logits

    trl_ppo.batch_generation = batch_generation
    trl_ppo.get_reward = clock.wrap("no-grad forwards", trl_ppo.get_reward)
    trl_ppo.forward = clock.wrap("no-grad forwards", trl_ppo.forward, only_no_grad=True)
    trl_ppo.gc = types.SimpleNamespace(collect=clock.wrap("gc.collect", gc.collect))

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.phases: dict[str, float] = {}

        def on_train_begin(self, *_, **__):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())
            if len(self.marks) == 2:  # the warm-up step is over
                clock.seconds.clear()
                lengths.clear()
            self.phases = dict(clock.seconds)  # a step's last gc.collect() runs after this

    marks = StepClock()
    trainer = trl_ppo.PPOTrainer(**trainer_args, callbacks=[marks])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    times = [b - a for a, b in zip(marks.marks, marks.marks[1:])][1:]
    clock.seconds = marks.phases
    return times, clock, lengths


def report(name: str, times: list[float], clock: PhaseClock,
           lengths: list[tuple[int, float]], decoding: str) -> float:
    per = sum(times) / len(times)
    order = ("sampling", "no-grad forwards", "gc.collect")
    phases = {k: clock.seconds[k] / len(times) for k in order if k in clock.seconds}
    phases["update and the rest"] = per - sum(phases.values())
    print(f"  {name:7s} {per:6.2f} s a step (min {min(times):.2f}, max {max(times):.2f}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"  {'':7s} responses {sum(m for _, m in lengths) / len(lengths):.1f} tokens on "
          f"average, the longest {max(r for r, _ in lengths)}; {decoding}")
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="runs/demo/sft")
    ap.add_argument("--reward", default="runs/demo/round-2/reward")
    ap.add_argument("--prompts", default="runs/demo/world/prompts.jsonl")
    ap.add_argument("--batch", type=int, default=32, help="prompts a rollout")
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--steps", type=int, default=5, help="timed steps each side")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know PPO is experimental there

    import datasets
    import transformers
    import trl
    from transformers import DataCollatorWithPadding
    try:
        from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    except ImportError:
        raise SystemExit(f"trl {trl.__version__} has no PPO; install the last one that has it: "
                         f'.venv/bin/pip install "torch==2.13.0" "trl==1.12.0"') from None

    from gptlab.data.instruct import encode_prompt
    from gptlab.io import read_jsonl
    from gptlab.train.ppo import PPOConfig, PPOTrainer

    B, mb = a.batch, a.batch // a.minibatches
    transformers.logging.set_verbosity_error()  # the score heads are set by hand, not "missing"
    with tempfile.TemporaryDirectory(prefix="ppo_step-") as d:
        work = Path(d)
        records = read_jsonl(a.prompts)[:B]
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        ours = PPOTrainer(PPOConfig(
            policy=a.policy, prompts=str(prompts), out=str(work / "gptlab"), reward=a.reward,
            steps=a.steps + 1, batch_size=B, minibatch_size=mb, ppo_epochs=a.epochs, lr=5e-5,
            grad_clip=0.0, kl_coef=0.05, kl_estimator="k1", clip=0.2, value_clip=0.2,
            vf_coef=0.1, gae_gamma=1.0, gae_lambda=0.95, temperature=T,
            max_new_tokens=a.max_new_tokens, missing_eos_penalty=1.0, ptx_coef=0.0, seed=0,
            device="cpu"))
        policy, reward, value, hf_tok = hf_models(ours, a.reward, work)
        gap = start_gap(ours, policy, reward, value)
        if max(gap.values()) > 1e-3:
            raise SystemExit(f"the two sides do not start from the same models: {gap}")

        trl_args = TRLPPOConfig(
            output_dir=str(work / "trl"), per_device_train_batch_size=B,
            gradient_accumulation_steps=1, num_mini_batches=a.minibatches,
            num_ppo_epochs=a.epochs, total_episodes=B * (a.steps + 1),
            local_rollout_forward_batch_size=B, learning_rate=5e-5,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
            optim="adamw_torch", response_length=a.max_new_tokens, temperature=T,
            stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, kl_estimator="k1",
            cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
            whiten_rewards=False, num_sample_generations=0, bf16=False, use_cpu=True,
            report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            seed=0)
        data = datasets.Dataset.from_dict(
            {"input_ids": [encode_prompt(ours.tok, r["prompt"]) for r in records]})
        t_ours, clock_ours, len_ours = time_gptlab(ours, a.steps)
        t_trl, clock_trl, len_trl = time_trl(
            dict(args=trl_args, processing_class=hf_tok, model=policy, ref_model=None,
                 reward_model=reward, value_model=value, train_dataset=data,
                 data_collator=DataCollatorWithPadding(hf_tok)), a.steps, ours.tok.eos_id)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}")
    print(f"{B} prompts a rollout, one response each, T={T}, <= {a.max_new_tokens} new tokens; "
          f"{a.epochs} epochs x {a.minibatches} minibatches of {mb}; a warm-up step, then "
          f"{a.steps} timed, each side")
    print("same start, max |gptlab - trl|: " + ", ".join(f"{k} {v:.1e}" for k, v in gap.items()))
    per_ours = report("gptlab", t_ours, clock_ours, len_ours,
                      "finished rows leave the batch")
    per_trl = report("trl", t_trl, clock_trl, len_trl,
                     f"all {B} rows decoded until the longest ends")
    print(f"  ratio gptlab / trl (speed): {per_trl / per_ours:.2f}x")


if __name__ == "__main__":
    main()
