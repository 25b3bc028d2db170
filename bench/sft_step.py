"""An SFT training step: gptlab against Hugging Face transformers, same run, same weights.

The model is the demo's pretrained model (or any gptlab model directory), exported to a Hugging
Face Llama directory. Both sides take the same batches of the world's demonstrations (prompt
tokens masked out of the loss), forward, backward and an AdamW step; we check that the first
losses agree, run one untimed pass a side (warm-up), then alternate `--repeats` timed passes,
and report each side's median steps per second and the ratio. gptlab encodes the prompt prefix
the whole batch shares (the schema) once; transformers runs every row in full, as TRL's SFT
does. `--device cuda` runs both sides there (float32, as on the CPU; bench/gpu.sh does).

    .venv/bin/python bench/sft_step.py --model runs/demo/pretrain --data runs/demo/sft_data.jsonl
"""
from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from timing import alternating_medians, device_name, training_steps_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/pretrain")
    ap.add_argument("--data", default="runs/demo/sft_data.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    from transformers import AutoModelForCausalLM

    from gptlab.checkpoint import load_model
    from gptlab.data.instruct import SkipCounter, read_demonstrations
    from gptlab.interop.hf import export_hf
    from gptlab.train.batching import ListBatches, pad_examples
    from gptlab.train.sft import sft_loss

    model, tok, _ = load_model(a.model)
    examples = read_demonstrations(a.data, tok, model.config.context, SkipCounter())
    stream = ListBatches(examples, a.batch_size, 0, lambda b: pad_examples(b, tok.pad_id))
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(a.steps)]
    model.to(device)
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)
    model.train()
    hf.train()

    def hf_loss(m: torch.nn.Module, b: dict) -> torch.Tensor:
        # transformers shifts labels itself: its label at t + 1 is ours at t. No KV cache in
        # training, as TRL's trainers pass (the config's use_cache=True builds one).
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"][:, :-1]], 1)
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                 use_cache=False).loss

    first = {"gptlab": sft_loss(model, batches[0]).item(),
             "transformers": hf_loss(hf, batches[0]).item()}
    if abs(first["gptlab"] - first["transformers"]) > 1e-3 * max(1.0, abs(first["gptlab"])):
        raise SystemExit(f"the two sides disagree on the first loss: {first}")

    adamw = dict(lr=1e-4)
    results = alternating_medians(
        {"gptlab": lambda: training_steps_per_second(model, sft_loss, batches, device, **adamw),
         "transformers": lambda: training_steps_per_second(hf, hf_loss, batches, device,
                                                           **adamw)},
        a.repeats)
    import transformers
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"device {device_name(device)}")
    print(f"{a.steps} steps of {a.batch_size} demonstrations ({tokens:.0f} real tokens a step); "
          f"first loss gptlab {first['gptlab']:.4f}, transformers {first['transformers']:.4f}")
    print(f"warm-up pass each, then {a.repeats} timed passes each, alternating; medians")
    for name, v in results.items():
        print(f"  {name:13s} {v:8.2f} steps/s")
    print(f"  ratio gptlab / transformers: {results['gptlab'] / results['transformers']:.2f}x")


if __name__ == "__main__":
    main()
