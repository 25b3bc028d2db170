"""Reward-model training on K-wise rankings: gptlab against TRL's RewardTrainer, same run.

The model is the demo's SFT model with a fresh scalar head, exported to a Hugging Face Llama
sequence classifier with the same head. The data are the demo's rankings (K up to 8 answers a
prompt, ties allowed). gptlab trains on them as InstructGPT did: each prompt's K answers in one
batch element, the loss averaged over its C(K, 2) pairs with a preference, the prompt encoded
once. TRL's RewardTrainer takes chosen/rejected pairs, so each ranking is expanded into those
same pairs (the same token ids, handed to TRL pre-tokenized), every pair encoding its prompt and
both answers. Both sides make one pass over the same preferences with AdamW at the same
learning rate; we check that the first losses agree on one pair, then the two sides alternate
`--repeats` passes (each with a fresh AdamW; TRL a fresh RewardTrainer on the same model), and
we report the median time of a pass (the training steps only, TRL's timed by a callback) and
the ratio.

    .venv/bin/python bench/reward_step.py --model runs/demo/sft \
        --rankings runs/demo/round-2/rankings_all.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/sft")
    ap.add_argument("--rankings", default="runs/demo/round-2/rankings_all.jsonl")
    ap.add_argument("--n-rankings", type=int, default=256)
    ap.add_argument("--batch-rankings", type=int, default=8, help="gptlab: rankings a step")
    ap.add_argument("--batch-pairs", type=int, default=16, help="TRL: pairs a step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side, alternating")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import datasets
    import transformers
    import trl
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback,
                              TrainerCallback)

    from gptlab.checkpoint import load_model
    from gptlab.data.instruct import read_rankings
    from gptlab.interop.hf import export_hf
    from gptlab.model.heads import ScalarHeadModel
    from gptlab.train.reward import (EncodedRanking, collate_rankings, encode_ranking,
                                     reward_loss)

    base, tok, _ = load_model(a.model)
    torch.manual_seed(0)
    ours = ScalarHeadModel.from_gpt(base)
    encoded = [e for r in read_rankings(a.rankings)[:a.n_rankings]
               if (e := encode_ranking(tok, r, base.config.context)) is not None]
    pairs = [(e.seqs[i], e.seqs[j]) for e in encoded
             for i, j in itertools.combinations(range(len(e.seqs)), 2)
             if e.groups[i] < e.groups[j]]
    transformers.logging.set_verbosity_error()  # the score head is set below, not "missing"
    with tempfile.TemporaryDirectory() as d:
        export_hf(base, tok, d)
        theirs = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1,
                                                                    dtype=torch.float32)
        hf_tok = AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        theirs.score.weight.copy_(ours.head.weight)
    theirs.config.pad_token_id = tok.pad_id
    hf_tok.pad_token_id = tok.pad_id

    steps = -(-len(pairs) // a.batch_pairs)
    args = trl.RewardConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_pairs,
        max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", bf16=False, use_cpu=True,
        gradient_checkpointing=False, disable_dropout=True, max_length=None,
        report_to=[], logging_steps=10**6, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    data = datasets.Dataset.from_dict({"chosen_ids": [c for c, _ in pairs],
                                       "rejected_ids": [r for _, r in pairs]})

    class StepTimer(TrainerCallback):
        first: float | None = None
        last: float = 0.0

        def on_step_begin(self, *_, **__):
            self.first = self.first or time.perf_counter()

        def on_step_end(self, *_, **__):
            self.last = time.perf_counter()

    def make_trainer() -> tuple[trl.RewardTrainer, StepTimer]:
        """A fresh trainer (and so a fresh AdamW) on the model as it is: one pass of TRL."""
        timer = StepTimer()
        trainer = trl.RewardTrainer(model=theirs, args=args, train_dataset=data,
                                    processing_class=hf_tok, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its end-of-training line on stdout
        return trainer, timer

    trainer, timer = make_trainer()

    # The first pair, scored by both: TRL's loss and gptlab's K-wise loss at K = 2 are equal.
    # (Their backward passes warm both sides up before the timed passes.)
    c, r = pairs[0]
    ours.train()
    theirs.train()
    losses = {"gptlab": reward_loss(ours, collate_rankings([EncodedRanking([c, r])], tok.pad_id)),
              "trl": trainer.compute_loss(theirs, trainer.data_collator(
                  [{"chosen_ids": c, "rejected_ids": r}]))}
    for loss in losses.values():
        loss.backward()
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    first = {k: float(v.detach()) for k, v in losses.items()}
    if abs(first["gptlab"] - first["trl"]) > 1e-3 * max(1.0, abs(first["gptlab"])):
        raise SystemExit(f"the two sides disagree on the first loss: {first}")

    def gptlab_pass() -> float:
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.0)
        t = time.perf_counter()
        for i in range(0, len(encoded), a.batch_rankings):
            opt.zero_grad(set_to_none=True)
            reward_loss(ours, collate_rankings(encoded[i:i + a.batch_rankings],
                                               tok.pad_id)).backward()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)  # as TRL's loop does
            opt.step()
        return time.perf_counter() - t

    ready = [(trainer, timer)]  # the first pass uses the trainer built above

    def trl_pass() -> float:
        t, clock = ready.pop() if ready else make_trainer()
        t.train()
        return clock.last - clock.first

    times: dict[str, list[float]] = {"gptlab": [], "trl": []}
    for _ in range(a.repeats):
        times["gptlab"].append(gptlab_pass())
        times["trl"].append(trl_pass())
    t_ours, t_trl = (statistics.median(times[k]) for k in ("gptlab", "trl"))

    seqs_ours = sum(len(e.seqs) for e in encoded)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}")
    print(f"{len(encoded)} rankings, {seqs_ours} answers, {len(pairs)} preference pairs; "
          f"first loss gptlab {first['gptlab']:.4f}, trl {first['trl']:.4f}")
    print(f"{a.repeats} timed passes each, alternating; medians (gptlab "
          + " / ".join(f"{x:.2f}" for x in times["gptlab"]) + " s, trl "
          + " / ".join(f"{x:.2f}" for x in times["trl"]) + " s)")
    print(f"  gptlab  {t_ours:7.2f} s a pass ({-(-len(encoded) // a.batch_rankings)} steps of "
          f"{a.batch_rankings} rankings; {seqs_ours} answers scored)")
    print(f"  trl     {t_trl:7.2f} s a pass ({steps} steps of {a.batch_pairs} pairs; "
          f"{2 * len(pairs)} sequences scored)")
    print(f"  ratio gptlab / trl (speed): {t_trl / t_ours:.2f}x")


if __name__ == "__main__":
    main()
