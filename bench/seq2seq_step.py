"""A seq2seq training step: gptlab's Transformer against transformers' MarianMTModel (the same
2017 architecture), same run, same weights, same batches.

The model is `transformer-small` (or `--model`, a directory `gptlab seq2seq` wrote), with the
tokenizer `gptlab seq2seq` trains on the built-in world's question -> SQL pairs; the Marian side
is `gptlab.interop.marian.to_marian` of the same weights. Both sides take the same batches of
the world's training pairs: forward, label-smoothed cross-entropy (0.1, as a Seq2SeqTrainer
with `label_smoothing_factor` computes it on Marian's logits), backward and an AdamW step, with
dropout on. The first losses are checked equal with dropout off; then one untimed pass a side
(warm-up), then `--repeats` timed passes alternating; each side's median steps per second and
the ratio. `--device cuda` runs both sides there (float32).

    .venv/bin/python bench/seq2seq_step.py
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from timing import alternating_medians, device_name, training_steps_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a seq2seq model directory (default: transformer-small, initialised)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    from gptlab.checkpoint import load_model
    from gptlab.data.instruct import SkipCounter
    from gptlab.interop.marian import to_marian
    from gptlab.model.presets import build_model, get_preset
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.batching import ListBatches
    from gptlab.train.seq2seq import collate, encode_pairs, seq2seq_loss, start_id, world_pairs
    from gptlab.world import build_world

    pairs = world_pairs(build_world(), "train")
    if a.model:
        model, tok, _ = load_model(a.model)
    else:
        tok = train_tokenizer([t for p in pairs for t in (p.source, p.target)], 2048)
        torch.manual_seed(0)
        model = build_model(get_preset("transformer-small", vocab_size=tok.vocab_size))
    items = encode_pairs(tok, pairs, model.config.context, SkipCounter())
    stream = ListBatches(items, a.batch_size, 0,
                         lambda b: collate(b, tok.pad_id, start_id(tok), tok.eos_id))
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(a.steps)]
    model.to(device).eval()
    hf = to_marian(model, tok.pad_id, start_id(tok), tok.eos_id).to(device)
    smoothing = model.config.label_smoothing

    def hf_loss(m: torch.nn.Module, b: dict) -> torch.Tensor:
        logits = m(input_ids=b["src"], attention_mask=b["src_mask"],
                   decoder_input_ids=b["tgt"], decoder_attention_mask=b["tgt_mask"],
                   use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(),
                               ignore_index=-100, label_smoothing=smoothing)

    with torch.no_grad():
        first = {"gptlab": seq2seq_loss(model, batches[0]).item(),
                 "transformers": hf_loss(hf, batches[0]).item()}
    if abs(first["gptlab"] - first["transformers"]) > 1e-3 * max(1.0, abs(first["gptlab"])):
        raise SystemExit(f"the two sides disagree on the first loss: {first}")
    model.train()
    hf.train()

    adamw = dict(lr=1e-4, betas=(0.9, 0.98))
    results = alternating_medians(
        {"gptlab": lambda: training_steps_per_second(model, seq2seq_loss, batches, device, **adamw),
         "transformers": lambda: training_steps_per_second(hf, hf_loss, batches, device,
                                                           **adamw)},
        a.repeats)
    import transformers
    src = sum(int(b["src_mask"].sum()) for b in batches) / len(batches)
    tgt = sum(int(b["tgt_mask"].sum()) for b in batches) / len(batches)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"device {device_name(device)}")
    print(f"{model.num_params():,} parameters; {a.steps} steps of {a.batch_size} pairs "
          f"({src:.0f} source + {tgt:.0f} target tokens a step); first loss (dropout off) "
          f"gptlab {first['gptlab']:.4f}, transformers {first['transformers']:.4f}")
    print(f"warm-up pass each, then {a.repeats} timed passes each, alternating; medians")
    for name, v in results.items():
        print(f"  {name:13s} {v:8.2f} steps/s")
    print(f"  ratio gptlab / transformers: {results['gptlab'] / results['transformers']:.2f}x")


if __name__ == "__main__":
    main()
