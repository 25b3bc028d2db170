"""The device plumbing of every stage, on each device this machine has: the CPU always, and
CUDA where there is a GPU (there these are the checks a GPU run must pass; on a CPU-only machine
only the "cpu" cases run). Where bf16 autocast is on (CUDA), numbers agree to bf16's precision.

Each test runs a stage's own code on the device and compares it with another path to the same
numbers: KV-cache decoding with a full forward, a shared prefix with the plain forward, PPO's
recomputed log-probabilities with the rollout's; a run trained on the device resumes on the CPU."""
import dataclasses

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.data.tokens import BlockBatches
from gptlab.engine import SamplingParams, generate
from gptlab.model import GPT, get_preset
from gptlab.model.attention import common_prefix_length
from gptlab.model.heads import ScalarHeadModel
from gptlab.train.loop import TrainConfig, autocast, train
from gptlab.train.pretrain import lm_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
on_each_device = pytest.mark.parametrize("device", DEVICES)


def tol(device: str) -> float:
    """float32 on the CPU; on CUDA, TF32 matmuls (a training run turns them on) or bf16."""
    return 1e-4 if device == "cpu" else 3e-2


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(get_preset("tiny"), context=64, **kw))


def prompts_sharing_a_prefix() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 500, (20,), generator=g).tolist()  # > MIN_SHARED_PREFIX
    return [head + torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]


@on_each_device
def test_kv_cache_generation_matches_a_full_forward(device):
    model = tiny().to(device).eval()
    prompts = prompts_sharing_a_prefix() + [[5, 6]]  # left padding of 23 positions
    gen = generate(model, prompts, SamplingParams(max_new_tokens=8, greedy=True))
    with torch.no_grad():
        for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
            logits = model(torch.tensor([p + toks], device=device))[0, len(p) - 1:-1].float()
            chosen = logits.gather(-1, torch.tensor(toks, device=device)[:, None])[:, 0]
            # The chosen token is the full forward's best (up to a near tie).
            assert (logits.amax(-1) - chosen).max().item() <= tol(device)
            want = logits.log_softmax(-1).gather(-1, torch.tensor(toks, device=device)[:, None])
            assert np.allclose(lps, want[:, 0].cpu().numpy(), atol=tol(device))
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9)
    first = generate(model, prompts, params, seed=3)
    assert generate(model, prompts, params, seed=3).tokens == first.tokens  # seeded on device


@on_each_device
def test_shared_prefix_forward_equals_the_plain_one_under_the_training_autocast(device):
    """SFT's and the reward model's shared prefixes (index tensors, PrefixKV copies) on the
    device, in the autocast the common loop trains under."""
    from gptlab.train.reward import EncodedRanking, collate_rankings
    from gptlab.train.loop import to_device
    from gptlab.train.sft import sft_loss
    dev = torch.device(device)
    model = tiny().to(dev).train()
    seqs = prompts_sharing_a_prefix()
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=dev)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100)).roll(-1, 1)
    labels[:, :20] = -100  # no loss on the shared prefix, as SFT's prompts
    labels[:, -1] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with autocast(dev):
        shared = sft_loss(model, batch)
        plain = model(ids, labels=labels)
    assert shared.dtype == torch.float32
    assert abs(shared.item() - plain.item()) <= tol(device)

    rm = ScalarHeadModel.from_gpt(model).to(dev).eval()
    b = collate_rankings([EncodedRanking(seqs[:2], prompt_len=20),
                          EncodedRanking(seqs[2:], prompt_len=20)], 0)
    b = to_device(b, dev)  # its host lists stay
    with torch.no_grad(), autocast(dev):
        once = rm.score_continuations(b["prompt_ids"], b["prompt_mask"], b["rows"],
                                      b["cont_ids"], b["cont_mask"])
        whole = rm(b["input_ids"], b["attention_mask"])
    assert once.dtype == torch.float32 and once.device.type == dev.type  # "cuda" is cuda:0
    assert torch.allclose(once, whole, atol=tol(device))


@on_each_device
def test_ppo_recomputes_the_rollouts_log_probabilities(device):
    """The ratio π/π_old starts at 1: response_logprobs (a full forward with the shared prefix
    encoded once) gives the log-probabilities the KV-cache rollout sampled with."""
    from gptlab.train.ppo import Rollout, layout, response_logprobs
    model = tiny().to(device).eval()
    prompts = prompts_sharing_a_prefix()
    gen = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=1.5), seed=2)
    ids, mask, rmask, P, prefix = layout(prompts, gen.tokens, 0, device,
                                         shared=common_prefix_length(prompts))
    assert prefix is not None and prefix.device == ids.device
    ro = Rollout(ids, mask, rmask, P, [], gen.tokens, torch.tensor(gen.finished), prefix)
    with torch.no_grad():
        lp, entropy = response_logprobs(model, ro, 1.5, with_entropy=True)
    assert lp.dtype == entropy.dtype == torch.float32
    for i, want in enumerate(gen.logprobs):
        assert np.allclose(lp[i, :len(want)].cpu().numpy(), want, atol=tol(device))


@on_each_device
def test_a_run_trained_on_the_device_resumes_on_the_cpu(tmp_path, device):
    """A checkpoint written on the device (its optimizer moments there, CUDA RNG states too)
    is read onto the CPU and the run continues there."""
    tokens = np.random.default_rng(0).integers(3, 500, 4000).astype(np.uint16)
    ids = np.arange(100)
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, max_steps=3, batch_size=4, eval_every=0,
                      eval_batches=0, save_every=3, progress=False, device=device, seed=1)
    result = train(tiny(), BlockBatches(tokens, 32, ids, 4, seed=1), lm_loss, cfg, tmp_path)
    assert result.step == 3 and np.isfinite(result.loss)
    resumed = dataclasses.replace(cfg, device="cpu", max_steps=5)
    again = train(tiny(9), BlockBatches(tokens, 32, ids, 4, seed=1), lm_loss, resumed, tmp_path,
                  resume=True)
    assert again.step == 5 and np.isfinite(again.loss)


@on_each_device
def test_a_ppo_run_on_the_device_saves_and_resumes_on_the_cpu(tmp_path, device):
    """Rollout, scoring, GAE and the clipped update on the device, with a shared prompt
    prefix; its checkpoint continues on the CPU (`--device` may change on a resume)."""
    import instruct_task as task
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.ppo import PPOConfig, PPOTrainer

    paths = task.write_task(tmp_path, n=24)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    save_model(tmp_path / "policy", GPT(dataclasses.replace(
        get_preset("tiny"), vocab_size=tok.vocab_size, context=64)), tok)

    def length_reward(prompts, responses, records):
        return [float(len(r)) / 10 for r in responses]

    cfg = PPOConfig(policy=str(tmp_path / "policy"), prompts=str(paths["prompts"]),
                    out=str(tmp_path / "run"), device=device, temperature=1.5, max_new_tokens=6,
                    batch_size=4, minibatch_size=2, ppo_epochs=1, steps=2, save_every=1)
    PPOTrainer(cfg, reward_fn=length_reward).train()
    trainer = PPOTrainer(dataclasses.replace(cfg, device="cpu", steps=3, resume=True),
                         reward_fn=length_reward)
    assert trainer.step == 2
    trainer.train()
    assert trainer.step == 3


# --- the verbs that generate: --device -------------------------------------------------------

class Loaded(Exception):
    """Raised by a stand-in loader once it has recorded where it was asked to load."""


@pytest.mark.parametrize("verb", ["sample", "generate", "chat"])
def test_the_verbs_that_generate_load_the_model_on_the_device_asked(tmp_path, monkeypatch, verb):
    """`auto` is a GPU where torch sees one (these verbs used to run on the CPU whatever the
    machine had); a device named that the machine lacks is refused, naming the field, before
    the model loads or anything is written."""
    import gptlab.chat.terminal
    import gptlab.checkpoint
    from gptlab.cli import main
    asked = []

    def loader(path, device="cpu", *a, **kw):
        asked.append(torch.device(device))
        raise Loaded

    monkeypatch.setattr(gptlab.checkpoint, "load_language_model", loader)
    monkeypatch.setattr(gptlab.chat.terminal, "load_language_model", loader)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "samples.jsonl"
    args = {"sample": ["sample", "--model", "m", "--prompts", str(prompts), "--out", str(out)],
            "generate": ["generate", "--model", "m", "--prompt", "hi"],
            "chat": ["chat", "--model", "m"]}[verb]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for flags, want in (([], "cuda"), (["--device", "auto"], "cuda"),
                        (["--device", "cuda:1"], "cuda:1"), (["--device", "cpu"], "cpu")):
        with pytest.raises(Loaded):
            main([*args, *flags])
        assert asked.pop() == torch.device(want)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Loaded):
        main(args)
    assert asked.pop() == torch.device("cpu")
    assert main([*args, "--device", "cuda"]) == 2  # a UserError: exit 2
    assert asked == [] and not out.exists()


def test_the_pipeline_samples_and_evaluates_where_its_stages_train(tmp_path, monkeypatch):
    """The pipeline's feedback sampling and its evaluation load their models on `auto`'s
    device, as its training stages do (they used to load them on the CPU)."""
    from types import SimpleNamespace

    from gptlab.eval import pipeline_eval
    from gptlab.train import pipeline
    asked = []

    def loader(path, device="cpu", *a, **kw):
        asked.append(torch.device(device))
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "load_model", loader)
    monkeypatch.setattr(pipeline_eval, "load_model", loader)
    for name in ("prompts.jsonl", "test.jsonl"):
        (tmp_path / name).write_text('{"id": "q1", "prompt": "hi", "completion": " x"}\n')
    pipe = SimpleNamespace(cfg=pipeline.PipelineConfig(), out=tmp_path, world=None,
                           world_dir=tmp_path, test_questions=lambda: [
                               {"id": "q1", "prompt": "hi", "completion": " x"}])
    with pytest.raises(Loaded):
        pipeline.Pipeline.feedback(pipe, tmp_path / "policy", 1)
    with pytest.raises(Loaded):
        pipeline_eval.evaluate_pipeline(pipe, tmp_path, tmp_path, tmp_path)
    assert asked == [torch.device("cuda")] * 2


def test_ppo_turns_tf32_on_as_the_training_loop_does(tmp_path, monkeypatch):
    """PPO runs no autocast: on CUDA its float32 matrix products use TF32, as those of every
    other training verb do (before, only a PPO run after a training stage in the same process,
    the pipeline's, got TF32; `gptlab ppo` alone ran full float32)."""
    import instruct_task as task
    import gptlab.train.ppo as ppo_module
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.loop import allow_tf32

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        allow_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        allow_tf32(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

    called = []
    monkeypatch.setattr(ppo_module, "allow_tf32", called.append)
    paths = task.write_task(tmp_path, n=8)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    save_model(tmp_path / "policy", GPT(dataclasses.replace(
        get_preset("tiny"), vocab_size=tok.vocab_size, context=64)), tok)
    ppo_module.PPOTrainer(ppo_module.PPOConfig(
        policy=str(tmp_path / "policy"), prompts=str(paths["prompts"]), out=str(tmp_path / "run"),
        device="cpu", max_new_tokens=6, batch_size=4, minibatch_size=2, steps=1),
        reward_fn=lambda p, r, rec: [0.0] * len(r))
    assert called == [torch.device("cpu")]


def test_bf16_autocast_only_on_a_gpu_that_computes_in_bf16(monkeypatch):
    """A V100 or T4 only emulates bf16 (torch's is_bf16_supported() says yes, counting the
    emulation), far slower than float32 there: it trains in float32; an Ampere or later GPU
    under bf16 autocast."""
    import warnings

    from gptlab.train.loop import autocast
    cuda = torch.device("cuda")
    for native, want in ((False, False), (True, True)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: n or including_emulation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.autocast warns where there is no CUDA
            assert isinstance(autocast(cuda), torch.autocast) == want
            assert not isinstance(autocast(cuda, bf16=False), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)
