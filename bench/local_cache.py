"""The KV cache of local (banded) layers: every position kept and masked, against the window's
positions alone (a ring), same run, same model, same prompts.

The model is gpt3-small's shape made tiny: its 12 layers, odd ones local with the 256-token
window, its context of 2048, but 64 wide (4 heads of 16) over a 512-token vocabulary, random
weights. `--rows` left-padded prompts of 32 and 24 tokens each generate 4 windows of new tokens
greedily (no stop token). "every position" is the cache `generate` made before local layers
kept their window alone (`new_cache` without `left_padded`: the local layers' keys are kept and
masked past the window), "window" the one it makes now. Each side runs one untimed pass, then
the two alternate `--repeats` timed passes; we report the median new tokens per second, the
bytes of the cache's key and value buffers, and whether the two sides drew the same tokens
(and how far apart their log-probabilities are).

    .venv/bin/python bench/local_cache.py
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="prompts, generated together")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from gptlab.engine import SamplingParams, generate
    from gptlab.model import GPT
    from gptlab.model.presets import get_preset

    cfg = get_preset("gpt3-small", d_model=64, n_heads=4, vocab_size=512, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    window = cfg.attention_window
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (32 if i % 2 else 24,), generator=g).tolist()
               for i in range(a.rows)]
    params = SamplingParams(max_new_tokens=4 * window, greedy=True)
    new_cache = model.new_cache
    caches: dict[str, list] = {"every position": [], "window": []}

    def side(name: str):
        def run():
            def made(batch, max_len=None, left_padded=False):
                cache = new_cache(batch, max_len, left_padded and name == "window")
                caches[name].append(cache)
                return cache
            model.new_cache = made
            return generate(model, prompts, params)
        return run

    sides = {name: side(name) for name in caches}
    outs = {name: fn() for name, fn in sides.items()}  # warm-up, untimed
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(a.repeats):
        for name, fn in sides.items():
            t = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t
            rates[name].append(sum(map(len, out.tokens)) / seconds)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__}")
    print(f"gpt3-small's shape made tiny: {cfg.n_layers} layers (odd ones local, window "
          f"{window}), d_model {cfg.d_model}, {cfg.n_heads} heads, context {cfg.context}; "
          f"{a.rows} rows of 24 and 32 tokens, {4 * window} new tokens each, greedy")
    print(f"warm-up pass each, then {a.repeats} timed passes each, alternating; medians")
    for name in sides:
        cache = caches[name][-1]
        buffers = [cache._k, cache._v] + ([cache._wk, cache._wv] if cache._wk is not None
                                          else [])
        size = sum(b.numel() * b.element_size() for b in buffers)
        print(f"  {name:15s} {statistics.median(rates[name]):8.1f} new tokens/s   "
              f"cache {size / 2**20:6.2f} MiB")
    same = outs["every position"].tokens == outs["window"].tokens
    gap = max(abs(x - y) for r, s in zip(outs["every position"].logprobs,
                                         outs["window"].logprobs) for x, y in zip(r, s))
    print(f"  the same tokens: {same}; log-probabilities at most {gap:.1e} apart")


if __name__ == "__main__":
    main()
