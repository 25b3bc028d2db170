"""The Python half of bench/gpu.sh: a check on a real model's size, and the summary table.

`real-model`: a random-weight Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3
key-value heads, intermediate 1536, vocabulary 49,152, tied embeddings) made with transformers,
saved as a Hugging Face directory and brought in by `gptlab convert --from hf`. On the device,
gptlab against transformers on the same weights: (a) the largest logit difference in float32
and with both models cast to bfloat16 (and each bf16 side against gptlab's float32 logits);
(b) greedy generation, 64 new tokens a prompt, token for token; (c) sampling at T = 1 (K
answers per prompt, no stop token, so both sides draw the same number of tokens), and an SFT
step (forward, backward, AdamW) on rows that share a prefix, in float32 and under bf16 autocast
(as gptlab trains on CUDA): median time of timed passes after a warm-up, alternating, and the
step's own peak memory (torch.cuda.max_memory_allocated over the step less what was allocated
before it: activations, gradients, logits). `--tiny` shrinks the model and the work for a CPU
dry run; `--quick` keeps the real shape and shrinks the work only.

`sft-profile`: where an SFT step's time goes, on the same model shape and batch: gptlab's step
as it trains (the shared prefix encoded once, the rows against its keys and values), gptlab's
plain forward over whole rows, and transformers', in float32 and under bf16 autocast. For each:
wall time a step, the forward, backward and AdamW parts (each waited for), the GPU's busy time
and its kernel launches a step (torch.profiler), and how often the host waited for the device.
A step whose wall time is far above its GPU time is bound by launches, not arithmetic.

`summary`: the steps' outcomes and every figure measured, as $OUT/summary.md, printed.

    python3 bench/gpu_check.py real-model --device cuda --work /tmp/real --json OUT/real_model.json
    python3 bench/gpu_check.py sft-profile --device cuda --work /tmp/real > OUT/sft_profile.txt
    python3 bench/gpu_check.py summary --steps WORK/steps.tsv --work WORK --out OUT
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=512,
            rope_theta=10000.0, rms_norm_eps=1e-5)


# --- real-model ---------------------------------------------------------------------------------

def real_model(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    shape = TINY if a.tiny else SMOLLM2_135M
    # Sizes of the timed work: what a GPU does in seconds; a CPU dry run only runs through.
    small = a.tiny or a.quick
    n_prompts, k, prompt_len, new = (4, 2, 16, 16) if small else (16, 8, 64, 128)
    rows, prefix_len, steps, repeats = (4, 16, 2, 1) if small else (16, 64, 10, 3)
    greedy_new = 64
    res: dict = {"device": str(device), "shape": shape, "tiny": a.tiny, "quick": a.quick}
    if cuda:
        res["device_name"] = torch.cuda.get_device_name(device)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def say(msg: str) -> None:
        print(msg, flush=True)

    # The model, made and saved by transformers, converted by gptlab's CLI.
    hf_dir, gl_dir = work / "hf", work / "gptlab"
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, hidden_act="silu", tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gptlab", "convert", "--from", "hf", str(hf_dir),
                        "--out", str(gl_dir)], capture_output=True, text=True)
    res["convert_s"] = round(time.perf_counter() - t, 2)
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        raise SystemExit(f"gptlab convert failed (exit {r.returncode})")

    from gptlab.checkpoint import load_model
    from gptlab.engine import SamplingParams, generate
    from gptlab.train.sft import sft_loss

    ours, _, _ = load_model(gl_dir, device=device)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = None
    res["parameters"] = sum(p.numel() for p in ours.parameters())
    say(f"model: {res['parameters'] / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers, "
        f"vocabulary {shape['vocab_size']}), converted by `gptlab convert` in "
        f"{res['convert_s']} s; device {res.get('device_name', device)}")

    # (a) logits, float32 and bf16.
    g = torch.Generator().manual_seed(1)
    V = shape["vocab_size"]
    ids = torch.randint(3, V, (4, 32 if small else 128), generator=g).to(device)
    with torch.no_grad():
        ref = ours(ids).float()
        hf32 = theirs(input_ids=ids).logits.float()
        o16 = copy.deepcopy(ours).to(torch.bfloat16)(ids).float()
        h16 = copy.deepcopy(theirs).to(torch.bfloat16)(input_ids=ids).logits.float()
    scale = ref.abs().max().item()
    res["logits"] = {
        "largest_logit": scale,
        "fp32_max_abs_diff": (ref - hf32).abs().max().item(),
        "bf16_max_abs_diff": (o16 - h16).abs().max().item(),
        "bf16_gptlab_vs_fp32": (o16 - ref).abs().max().item(),
        "bf16_transformers_vs_fp32": (h16 - hf32).abs().max().item(),
        "bf16_argmax_agree": (o16.argmax(-1) == h16.argmax(-1)).float().mean().item(),
    }
    lg = res["logits"]
    say(f"(a) logits, max |gptlab - transformers|: fp32 {lg['fp32_max_abs_diff']:.2e}, bf16 "
        f"{lg['bf16_max_abs_diff']:.2e} (largest logit {scale:.2f}); bf16 against fp32: gptlab "
        f"{lg['bf16_gptlab_vs_fp32']:.2e}, transformers {lg['bf16_transformers_vs_fp32']:.2e}; "
        f"bf16 argmax agree on {lg['bf16_argmax_agree']:.1%} of positions")

    # (b) greedy generation, token for token (float32).
    prompts = torch.randint(3, V, (4, 8 if small else 32), generator=g)
    gen = generate(ours, prompts.tolist(), SamplingParams(max_new_tokens=greedy_new, greedy=True))
    with torch.no_grad():
        out = theirs.generate(input_ids=prompts.to(device),
                              attention_mask=torch.ones_like(prompts).to(device),
                              do_sample=False, max_new_tokens=greedy_new)
    hf_tokens = out[:, prompts.shape[1]:].tolist()
    same = [a_ == b_ for a_, b_ in zip(gen.tokens, hf_tokens)]
    greedy = {"new_tokens": greedy_new, "prompts": len(same), "rows_equal": sum(same)}
    for i, (x, y) in enumerate(zip(gen.tokens, hf_tokens)):
        if x != y:  # where they part: how close the two candidates were in transformers' logits
            at = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)
            seq = torch.tensor([prompts[i].tolist() + y[:at]], device=device)
            with torch.no_grad():
                last = theirs(input_ids=seq).logits[0, -1].float()
            top2 = last.topk(2).values
            greedy["first_divergence"] = {"row": i, "token": at,
                                          "top2_gap": (top2[0] - top2[1]).item()}
            break
    res["greedy"] = greedy
    say(f"(b) greedy, {greedy_new} new tokens: {greedy['rows_equal']} of {greedy['prompts']} "
        f"rows equal token for token"
        + (f"; first divergence {greedy['first_divergence']}" if "first_divergence" in greedy
           else ""))

    # (c1) sampling at T = 1: K answers for each of n prompts, no stop token.
    sp = torch.randint(3, V, (n_prompts, prompt_len), generator=g).tolist()
    rows_k = [p for p in sp for _ in range(k)]

    def sample_ours() -> int:
        return sum(map(len, generate(ours, rows_k, SamplingParams(max_new_tokens=new,
                                                                  temperature=1.0),
                                     seed=0).tokens))

    def sample_theirs() -> int:
        torch.manual_seed(0)
        x = torch.tensor(sp, device=device)
        with torch.no_grad():
            o = theirs.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=k,
                                max_new_tokens=new)
        return (o.shape[1] - prompt_len) * o.shape[0]

    res["sampling"] = timed({"gptlab": sample_ours, "transformers": sample_theirs}, repeats,
                            sync, cuda, device, unit="tokens")
    res["sampling"]["setup"] = f"{n_prompts} prompts x K={k}, {prompt_len}-token prompts, " \
                               f"{new} new tokens, T=1"
    report("(c) sampling", res["sampling"], "tokens/s", say)

    # (c2) an SFT step: rows share a prefix (a system prompt), then a prompt and an answer of
    # their own; the loss on the answers only.
    from gptlab.data.instruct import Example
    from gptlab.train.batching import pad_examples
    prefix = torch.randint(3, V, (prefix_len,), generator=g).tolist()
    examples = []
    for _ in range(rows):
        q = int(torch.randint(prefix_len // 4, prefix_len // 2 + 1, (1,), generator=g))
        ans = int(torch.randint(prefix_len // 2, prefix_len + 1, (1,), generator=g))
        own = torch.randint(3, V, (q + ans,), generator=g).tolist()
        examples.append(Example(ids=prefix + own, loss_mask=[0] * (prefix_len + q) + [1] * ans))
    batch = {key: v.to(device) for key, v in pad_examples(examples, 0).items()}

    def hf_loss(m, b):  # transformers shifts labels itself: its label at t + 1 is ours at t;
        # no KV cache in training, as TRL's trainers pass (use_cache=True would build one)
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"][:, :-1]], 1)
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 labels=labels, use_cache=False).loss

    ours.train()
    theirs.train()
    first = {"gptlab": sft_loss(ours, batch).item(), "transformers": hf_loss(theirs, batch).item()}
    res["sft_first_loss"] = first
    if abs(first["gptlab"] - first["transformers"]) > 1e-3 * max(1.0, abs(first["gptlab"])):
        raise SystemExit(f"the two sides disagree on the first SFT loss: {first}")
    opts = {"gptlab": torch.optim.AdamW(ours.parameters(), lr=1e-5),
            "transformers": torch.optim.AdamW(theirs.parameters(), lr=1e-5)}
    for name_, bf16 in (("sft_step_fp32", False), ("sft_step_bf16_autocast", True)):
        def step_fn(m, loss_fn, opt, bf16=bf16):
            def run() -> int:
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = loss_fn(m, batch)
                    loss.backward()
                    opt.step()
                return steps
            return run
        if bf16 and not cuda:
            continue  # autocast to bf16 on a CPU is not what gptlab does there
        res[name_] = timed({"gptlab": step_fn(ours, sft_loss, opts["gptlab"]),
                            "transformers": step_fn(theirs, hf_loss, opts["transformers"])},
                           repeats, sync, cuda, device, unit="steps")
        res[name_]["setup"] = (f"{rows} rows, a {prefix_len}-token shared prefix, "
                               f"{int(batch['attention_mask'].sum())} real tokens, "
                               f"{int((batch['labels'] != -100).sum())} with loss")
        report(f"(c) SFT step, {'bf16 autocast' if bf16 else 'fp32'}", res[name_], "steps/s",
               say)
    say(f"first SFT losses: gptlab {first['gptlab']:.4f}, transformers "
        f"{first['transformers']:.4f}")
    if a.json:
        from gptlab.io import strict_json  # a NaN (a bf16 overflow) as null, named
        Path(a.json).write_text(strict_json(res, non_finite="null", indent=1) + "\n")
    return 0


# --- sft-profile --------------------------------------------------------------------------------

def sft_profile(a: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptlab.data.instruct import Example
    from gptlab.interop import load_pretrained
    from gptlab.train.batching import pad_examples
    from gptlab.train.sft import sft_loss

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    shape = TINY if a.tiny else SMOLLM2_135M
    rows, prefix_len, steps = (4, 16, 2) if a.tiny else (16, 64, 15)
    hf_dir = Path(a.work) / "hf-profile"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, hidden_act="silu", tie_word_embeddings=True,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
                     ).save_pretrained(hf_dir)
    ours = load_pretrained(hf_dir)[0].to(device).train()
    theirs = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).train()
    g = torch.Generator().manual_seed(1)
    V = shape["vocab_size"]
    prefix = torch.randint(3, V, (prefix_len,), generator=g).tolist()
    examples = []
    for _ in range(rows):  # as real-model's SFT step: a shared prefix, then a prompt and answer
        q = int(torch.randint(prefix_len // 4, prefix_len // 2 + 1, (1,), generator=g))
        ans = int(torch.randint(prefix_len // 2, prefix_len + 1, (1,), generator=g))
        own = torch.randint(3, V, (q + ans,), generator=g).tolist()
        examples.append(Example(ids=prefix + own, loss_mask=[0] * (prefix_len + q) + [1] * ans))
    batch = {key: v.to(device) for key, v in pad_examples(examples, 0).items()}

    def hf_loss(m, b):
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"][:, :-1]], 1)
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                 use_cache=False).loss

    def plain_loss(m, b):
        return m(b["input_ids"], labels=b["labels"])

    sides = [("gptlab, shared prefix (as it trains)", ours, sft_loss),
             ("gptlab, whole rows", ours, plain_loss), ("transformers", theirs, hf_loss)]
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, theirs)}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(m, loss_fn, bf16: bool, parts: dict | None = None) -> None:
        opt = opts[id(m)]
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(m, batch)
        for part, work in (("forward", None), ("backward", loss.backward), ("adamw", opt.step)):
            if work is not None:
                work()
            if parts is not None:
                sync()
                parts[part] += (time.perf_counter() - t) * 1e3 / steps
                t = time.perf_counter()

    print(f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {rows} rows, a "
          f"{prefix_len}-token shared prefix, {int(batch['attention_mask'].sum())} tokens; "
          f"device {torch.cuda.get_device_name(device) if cuda else device}; {steps} steps each")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    gpu_type = torch.autograd.DeviceType.CUDA
    for bf16 in ((False, True) if cuda else (False,)):
        for name, m, loss_fn in sides:
            for _ in range(3):
                step(m, loss_fn, bf16)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step(m, loss_fn, bf16)
            sync()
            wall = (time.perf_counter() - t) * 1e3 / steps
            parts = dict.fromkeys(("forward", "backward", "adamw"), 0.0)
            for _ in range(steps):
                step(m, loss_fn, bf16, parts)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    step(m, loss_fn, bf16)
                sync()
            events = prof.key_averages()
            kernels = sum(e.count for e in events if e.device_type == gpu_type) / 3
            busy = sum(e.self_device_time_total for e in events
                       if e.device_type == gpu_type) / 3e3
            waits = sum(e.count for e in events if e.key == "cudaStreamSynchronize") / 3
            print(f"{name}, {'bf16 autocast' if bf16 else 'fp32'}: {wall:.1f} ms a step "
                  f"(forward {parts['forward']:.1f}, backward {parts['backward']:.1f}, AdamW "
                  f"{parts['adamw']:.1f} ms, each waited for); GPU busy {busy:.1f} ms, "
                  f"{kernels:.0f} kernels, {waits:.0f} waits for the device a step")
    return 0


def timed(sides: dict, repeats: int, sync, cuda: bool, device, unit: str) -> dict:
    """Warm each side up, then `repeats` timed passes alternating: the median rate, and the
    pass's own peak memory on CUDA (max allocated during it less allocated before it)."""
    import torch
    for fn in sides.values():
        fn()
    rates: dict[str, list[float]] = {n: [] for n in sides}
    peaks: dict[str, list[int]] = {n: [] for n in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t = time.perf_counter()
            n = fn()
            sync()
            rates[name].append(n / (time.perf_counter() - t))
            if cuda:
                peaks[name].append(torch.cuda.max_memory_allocated(device) - before)
    out: dict = {f"{n}_{unit}_per_s": statistics.median(r) for n, r in rates.items()}
    out["ratio"] = out[f"gptlab_{unit}_per_s"] / out[f"transformers_{unit}_per_s"]
    if cuda:
        for n, p in peaks.items():
            out[f"{n}_peak_mib"] = max(p) / 2**20
        out["peak_ratio"] = out["transformers_peak_mib"] / max(out["gptlab_peak_mib"], 1e-9)
    return out


def report(title: str, r: dict, unit: str, say) -> None:
    rates = [v for k_, v in r.items() if k_.endswith("_per_s")]
    line = (f"{title}: gptlab {rates[0]:.1f} {unit}, transformers {rates[1]:.1f} {unit}, "
            f"ratio {r['ratio']:.2f}x")
    if "gptlab_peak_mib" in r:
        line += (f"; the pass's own peak memory: gptlab {r['gptlab_peak_mib']:.0f} MiB, "
                 f"transformers {r['transformers_peak_mib']:.0f} MiB "
                 f"({r['peak_ratio']:.2f}x less)")
    say(line)


# --- summary ------------------------------------------------------------------------------------

def summary(a: argparse.Namespace) -> int:
    work, out = Path(a.work), Path(a.out)
    lines = [f"# gptlab GPU check ({a.device})", ""]
    machine = work / "machine.txt"
    if machine.exists():
        lines += ["```", *machine.read_text(errors="replace").splitlines(), "```", ""]
    lines += ["| step | status | seconds | note |", "|---|---|---:|---|"]
    for row in Path(a.steps).read_text().splitlines():
        name, status, secs, note = (row.split("\t") + [""] * 4)[:4]
        lines.append(f"| {name} | {status} | {secs} | {note} |")
    tests = out / "tests.log"
    if tests.exists():
        last = [ln for ln in tests.read_text(errors="replace").splitlines()
                if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", ln)
                and ("=" in ln or re.match(r"^\d+ ", ln))]
        lines += ["", f"tests: {last[-1].strip('= ') if last else 'no pytest summary line'}"]
        failed = [ln for ln in tests.read_text(errors="replace").splitlines()
                  if ln.startswith(("FAILED ", "ERROR "))]
        lines += [f"- {ln}" for ln in failed[:30]]
    rep = out / "report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        acc = r.get("exec_acc", {})
        lines += ["", "pipeline: exec_acc " + ", ".join(
            f"{k}: {v:.3f}" for k, v in acc.items() if isinstance(v, (int, float)))
            + (f"; {r['minutes']:.1f} minutes" if isinstance(r.get("minutes"), (int, float))
               else "")]
        if isinstance(r.get("stage_minutes"), dict):
            lines.append("stage minutes: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["stage_minutes"].items()
                if isinstance(v, (int, float))))
    rows = []
    for log, unit in (("sampling.log", "answers/s"), ("sft_step.log", "steps/s")):
        p = work / log
        if not p.exists():
            continue
        text = p.read_text(errors="replace")
        got = {m.group(1): m.group(2) for m in re.finditer(
            r"^\s+(gptlab|transformers)\s+([\d.]+) " + re.escape(unit), text, re.M)}
        ratio = re.search(r"ratio gptlab / transformers: ([\d.]+x)", text)
        if got and ratio:
            rows.append(f"| bench/{log.replace('.log', '.py')} (the pipeline's model) | "
                        f"{got.get('gptlab', '?')} {unit} | {got.get('transformers', '?')} "
                        f"{unit} | {ratio.group(1)} | |")
    real = out / "real_model.json"
    if real.exists():
        from gptlab.io import restore_non_finite  # real-model's run imported gptlab too
        r = restore_non_finite(json.loads(real.read_text()))
        for key, label, unit in (("sampling", "sampling", "tokens"),
                                 ("sft_step_fp32", "SFT step, fp32", "steps"),
                                 ("sft_step_bf16_autocast", "SFT step, bf16 autocast", "steps")):
            if key not in r:
                continue
            x = r[key]
            mem = (f"{x['gptlab_peak_mib']:.0f} / {x['transformers_peak_mib']:.0f} MiB "
                   f"({x['peak_ratio']:.2f}x less)" if "gptlab_peak_mib" in x else "")
            rows.append(f"| {r['parameters'] / 1e6:.1f}M Llama, {label} ({x['setup']}) | "
                        f"{x[f'gptlab_{unit}_per_s']:.1f} {unit}/s | "
                        f"{x[f'transformers_{unit}_per_s']:.1f} {unit}/s | {x['ratio']:.2f}x | "
                        f"{mem} |")
        lg, gr = r["logits"], r["greedy"]
        extra = [f"real-model logits, max |gptlab - transformers|: fp32 "
                 f"{lg['fp32_max_abs_diff']:.2e}, bf16 {lg['bf16_max_abs_diff']:.2e} (largest "
                 f"logit {lg['largest_logit']:.2f}; bf16 vs fp32: gptlab "
                 f"{lg['bf16_gptlab_vs_fp32']:.2e}, transformers "
                 f"{lg['bf16_transformers_vs_fp32']:.2e})",
                 f"greedy, {gr['new_tokens']} new tokens: {gr['rows_equal']} of {gr['prompts']} "
                 f"rows equal" + (f" (first divergence {gr['first_divergence']})"
                                  if "first_divergence" in gr else ""),
                 f"first SFT losses: {r['sft_first_loss']}"]
    else:
        extra = []
    if rows:
        lines += ["", "| benchmark | gptlab | transformers | ratio | step's own peak memory, "
                      "gptlab / transformers |", "|---|---:|---:|---:|---|"] + rows
    if extra:
        lines += [""] + extra
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("real-model")
    r.add_argument("--device", default="cuda")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--work", required=True, help="scratch directory (the two model dirs)")
    r.add_argument("--json", help="write the figures here")
    r.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU dry run")
    r.add_argument("--quick", action="store_true",
                   help="the real shape, but the timed work as small as --tiny's (a CPU check)")
    p = sub.add_parser("sft-profile")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", required=True, help="scratch directory (the model)")
    p.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU dry run")
    s = sub.add_parser("summary")
    s.add_argument("--steps", required=True)
    s.add_argument("--work", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="cuda")
    a = ap.parse_args()
    return {"real-model": real_model, "sft-profile": sft_profile, "summary": summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
