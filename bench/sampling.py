"""Sampling K answers per prompt: gptlab's engine against Hugging Face transformers, same run.

The model is the demo's SFT model (or any gptlab model directory), exported to a Hugging Face
Llama directory so both libraries run the same weights on the same prompts. Each side samples
K answers for each of N prompts at temperature T (transformers: `num_return_sequences=K`),
up to `--max-new-tokens`, stopping at EOS. Each side first runs one untimed pass (warm-up),
then the two sides alternate `--repeats` timed passes (the timer covers the sampling only:
answers and tokens are counted after it); we report each side's median answers per second, the
new tokens each generated and its median new tokens per second, and both ratios. `--device
cuda` runs both sides there (float32; bench/gpu.sh does), the CPU otherwise.

    .venv/bin/python bench/sampling.py --model runs/demo/sft --prompts runs/demo/world/prompts.jsonl
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from timing import device_name, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/sft")
    ap.add_argument("--prompts", default="runs/demo/world/prompts.jsonl")
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--k", type=int, default=8, help="answers per prompt")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per batch")
    ap.add_argument("--temperature", type=float, default=1.5)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    from transformers import AutoModelForCausalLM

    from gptlab.checkpoint import load_model
    from gptlab.data.instruct import encode_prompt
    from gptlab.engine import SamplingParams, generate
    from gptlab.interop.hf import export_hf
    from gptlab.io import read_jsonl

    model, tok, _ = load_model(a.model, device=device)
    model.eval()
    prompts = [encode_prompt(tok, r["prompt"]) for r in read_jsonl(a.prompts)[:a.n]]
    stop = tuple(sorted(tok.stop_ids))
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()

    # Each side returns its raw outputs; answers and new tokens are counted after the timer.
    def ours() -> list:
        out = []
        for b in range(0, len(prompts), a.batch_prompts):
            rows = [p for p in prompts[b:b + a.batch_prompts] for _ in range(a.k)]
            out.append(generate(model, rows, SamplingParams(
                max_new_tokens=a.max_new_tokens, temperature=a.temperature, stop_ids=stop),
                seed=b, pad_id=tok.pad_id).tokens)
        return out

    def count_ours(out: list) -> tuple[int, int]:
        return sum(map(len, out)), sum(len(row) for rows in out for row in rows)

    def theirs() -> list:
        outs = []
        for b in range(0, len(prompts), a.batch_prompts):
            chunk = prompts[b:b + a.batch_prompts]
            P = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk],
                                device=device)
            torch.manual_seed(b)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                  temperature=a.temperature, top_k=0, top_p=1.0,
                                  num_return_sequences=a.k, max_new_tokens=a.max_new_tokens,
                                  eos_token_id=list(stop), pad_token_id=tok.pad_id)
            outs.append(out[:, P:])
        return outs

    def count_theirs(outs: list) -> tuple[int, int]:
        n = new = 0
        for out in outs:
            n += out.shape[0]
            # New tokens up to and including the first stop token (the rest is padding).
            for row in out.tolist():
                new += next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        return n, new

    sides = {"gptlab": (ours, count_ours), "transformers": (theirs, count_theirs)}
    for fn, _ in sides.values():
        fn()  # warm-up, untimed
    rates: dict[str, list[float]] = {name: [] for name in sides}
    token_rates: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, int] = {}
    for _ in range(a.repeats):
        for name, (fn, count) in sides.items():
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            seconds = time.perf_counter() - t
            n, tokens[name] = count(out)
            rates[name].append(n / seconds)
            token_rates[name].append(tokens[name] / seconds)
    results = {name: statistics.median(r) for name, r in rates.items()}
    per_token = {name: statistics.median(r) for name, r in token_rates.items()}
    import transformers
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"device {device_name(device)}")
    print(f"{a.n} prompts x K={a.k}, T={a.temperature}, <= {a.max_new_tokens} new tokens, "
          f"{a.batch_prompts} prompts per batch")
    print(f"warm-up pass each, then {a.repeats} timed passes each, alternating; medians")
    for name, v in results.items():
        print(f"  {name:13s} {v:8.1f} answers/s  ({tokens[name]} new tokens a pass, "
              f"{per_token[name]:.0f} new tokens/s)")
    print(f"  ratio gptlab / transformers: {results['gptlab'] / results['transformers']:.2f}x")
    # The two sides draw different random numbers, so their answers' lengths differ a little:
    # the same ratio in new tokens a second.
    print(f"  ratio in new tokens/s: {per_token['gptlab'] / per_token['transformers']:.2f}x")


if __name__ == "__main__":
    main()
