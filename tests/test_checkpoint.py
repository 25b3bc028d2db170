"""Model directories and training checkpoints: exact round trips, clear errors, atomicity."""
import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import gptlab.io
from gptlab import checkpoint as ck
from gptlab.errors import UserError
from gptlab.model import GPT, Transformer, TransformerConfig, get_preset


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny")).eval()


def test_save_then_load_gives_identical_logits(tmp_path):
    net = tiny()
    ck.save_model(tmp_path / "m", net)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "gptlab/1" and meta["arch"] == "gpt"
    loaded, tok, _ = ck.load_model(tmp_path / "m")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(ids), loaded(ids))
    assert tok is None
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()  # still tied


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left")])
def test_a_save_over_a_model_that_fails_puts_the_old_model_back_byte_for_byte(tmp_path,
                                                                              monkeypatch,
                                                                              stop):
    # A resumed run saves OUT again: stopped after the new weights, it left them under the old
    # config.json (step 4, its val_loss), or, later, no model at all where one was.
    from gptlab.tokenizer import train_tokenizer
    (tmp_path / "c.txt").write_text("select name from employees where salary > 10\n" * 20)
    tok = train_tokenizer([tmp_path / "c.txt"], vocab_size=270)
    out = tmp_path / "m"
    ck.save_model(out, tiny(), tok, extra={"step": 4})
    before = _files(out)
    torch.manual_seed(1)
    newer = GPT(get_preset("tiny"))

    def stopped(*args, **kwargs):
        raise stop
    monkeypatch.setattr(ck, "write_json_atomic", stopped)
    with pytest.raises(stop if isinstance(stop, type) else type(stop)):
        ck.save_model(out, newer, tok, extra={"step": 8})
    monkeypatch.undo()
    assert _files(out) == before and not list(out.glob(".*"))
    assert ck.load_model(out)[2]["step"] == 4
    ck.save_model(out, newer, tok, extra={"step": 8})
    model, _, meta = ck.load_model(out)
    assert meta["step"] == 8 and not list(out.glob(".*"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), newer.parameters()))


_KILLED_SAVE = """
import os, sys, torch
from gptlab import checkpoint as ck
from gptlab.model import GPT, get_preset
torch.manual_seed(1)
def killed(*args, **kwargs):
    os.kill(os.getpid(), 9)
ck.write_json_atomic = killed  # killed as config.json, the last file, is written
ck.save_model(sys.argv[1], GPT(get_preset("tiny")), extra={"step": 8})
"""


def test_a_save_over_a_model_killed_before_its_config_leaves_no_model_until_it_is_put_back(
        tmp_path, capsys):
    """Killed, a save cannot put the old model back: the directory holds no config.json, so
    no verb reads the new weights as the old step's; the next reader (or save) puts the old
    model back from where the save moved it, byte for byte."""
    import subprocess
    out = tmp_path / "m"
    ck.save_model(out, tiny(), extra={"step": 4})
    before = _files(out)
    r = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], timeout=300)
    assert r.returncode == -9
    assert not (out / "config.json").exists()
    aside, = out.glob(".old-files.*")
    assert sorted(p.name for p in aside.iterdir()) == ["config.json", "held.json",
                                                       "model.safetensors"]
    capsys.readouterr()
    model, _, meta = ck.load_model(out)
    assert meta["step"] == 4 and _files(out) == before
    assert capsys.readouterr().err == (
        f"note: {out}: a write killed before it was done was undone: its old config.json, "
        f"model.safetensors put back from {aside.name}\n")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny().parameters()))


def test_a_model_whose_save_is_under_way_is_no_model_and_says_why(tmp_path):
    out = tmp_path / "m"
    ck.save_model(out, tiny(), extra={"step": 4})
    with gptlab.io.old_files_aside(out, ck.model_files()):  # a live save: its lock held
        with pytest.raises(UserError) as e:
            ck.load_model(out)
    assert str(e.value) == (f"{out}: not a model directory (config.json is missing): a save "
                            f"into it is under way, or was stopped and left the old model's "
                            f"files in .old-files.*/, which the next save into it puts back")


def test_encoder_decoder_round_trip(tmp_path):
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(vocab_size=30, context=16, n_encoder_layers=1,
                                        n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32)).eval()
    ck.save_model(tmp_path, net)
    loaded, _, meta = ck.load_model(tmp_path)
    src, tgt = torch.randint(0, 30, (1, 5)), torch.randint(0, 30, (1, 4))
    with torch.no_grad():
        assert torch.equal(net(src, tgt), loaded(src, tgt))
    assert meta["arch"] == "transformer"


@pytest.mark.parametrize("kind", ["gpt-sinusoidal", "gpt-untied", "reward", "transformer"])
def test_loading_takes_the_files_weights_without_a_random_init(tmp_path, kind):
    """The model is built on the meta device and given the file's tensors: no random numbers
    drawn (the caller's generator is where it was), ties and buffers as built, every tensor
    trainable and real."""
    from gptlab.model.gpt import GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    if kind == "transformer":
        net = Transformer(TransformerConfig(vocab_size=30, context=16, n_encoder_layers=1,
                                            n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32))
        args = (torch.randint(0, 30, (1, 5)), torch.randint(0, 30, (1, 4)))
    else:
        cfg = GPTConfig(vocab_size=40, context=16, n_layers=2, n_heads=2, d_model=16,
                        positions="sinusoidal" if kind == "gpt-sinusoidal" else "rotary",
                        tie_embeddings=kind != "gpt-untied")
        net = GPT(cfg) if kind.startswith("gpt") else ScalarHeadModel(cfg)
        if kind == "reward":
            net.score_bias.fill_(0.3)
        args = (torch.randint(0, 40, (2, 7)),)
    ck.save_model(tmp_path, net.eval())
    before = torch.random.get_rng_state()
    loaded, _, _ = ck.load_model(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), before)
    with torch.no_grad():
        assert torch.equal(net(*args), loaded(*args))
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    assert len(list(loaded.parameters())) == len(list(net.parameters()))  # ties kept


def test_truncated_weights_give_a_clear_error(tmp_path):
    ck.save_model(tmp_path, tiny())
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors.*truncated or corrupt"):
        ck.load_model(tmp_path)


def test_missing_files_give_clear_errors(tmp_path):
    ck.save_model(tmp_path, tiny())
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="weights are missing"):
        ck.load_model(tmp_path)
    with pytest.raises(UserError, match="model not found"):
        ck.load_model(tmp_path / "nope")


def test_a_model_directory_s_nan_is_strict_json_and_reads_back(tmp_path):
    # A diverged run's val_loss was written as the bare token NaN: config.json was no JSON.
    import math

    from test_io import strict_loads
    ck.save_model(tmp_path / "m", tiny(), extra={"stage": "sft", "val_loss": math.nan})
    meta = strict_loads((tmp_path / "m" / "config.json").read_text())
    assert meta["val_loss"] is None and meta["non_finite"] == {"/val_loss": "NaN"}
    read = ck.read_meta(tmp_path / "m")
    assert math.isnan(read["val_loss"]) and "non_finite" not in read
    ck.load_model(tmp_path / "m")  # the model loads as before
    # A model config of a non-finite number saves as strict JSON and is still named on load.
    net = tiny()
    net.config.norm_eps = math.inf
    ck.save_model(tmp_path / "n", net)
    assert strict_loads((tmp_path / "n" / "config.json").read_text())["model"]["norm_eps"] is None
    with pytest.raises(UserError, match="field 'model.norm_eps': must be a finite number, got inf"):
        ck.load_model(tmp_path / "n")


def test_weights_of_another_shape_are_rejected(tmp_path):
    ck.save_model(tmp_path, tiny())
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit"):
        ck.load_model(tmp_path)


def _edited(tmp_path, edit) -> None:
    """A saved tiny model whose config.json `edit` (a function of the parsed JSON) rewrites."""
    ck.save_model(tmp_path, tiny())
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(edit(meta)))


def _set(key, value):
    def edit(meta):
        meta["model"][key] = value
        return meta
    return edit


@pytest.mark.parametrize("edit, file, message", [
    (_set("n_layers", "two"), "config.json",
     "field 'model.n_layers': must be an integer, got 'two'"),
    (_set("n_layers", -1), "config.json", "field 'model.n_layers': must be at least 1, got -1"),
    (_set("context", 0), "config.json", "field 'model.context': must be at least 1, got 0"),
    (_set("norm_eps", float("nan")), "config.json",
     "field 'model.norm_eps': must be a finite number, got nan"),
    (_set("dropout", 1.0), "config.json", "field 'model.dropout': must be in [0, 1), got 1.0"),
    (_set("bias", 1), "config.json", "field 'model.bias': must be true or false, got 1"),
    (_set("head_dim", "8"), "config.json",
     "field 'model.head_dim': must be an integer or null, got '8'"),
    (_set("n_kv_heads", 3), "config.json",
     "field 'model': n_heads (4) must be a multiple of n_kv_heads (3)"),
    (_set("norm", "batchnorm"), "config.json",
     "field 'model': unknown norm 'batchnorm' (expected layernorm or rmsnorm)"),
    (_set("attention_window", 0), "config.json",
     "field 'model.attention_window': must be at least 1, got 0"),
    (_set("attention_window", 2.5), "config.json",
     "field 'model.attention_window': must be an integer or null, got 2.5"),
    (_set("attention_scale", 0), "config.json",
     "field 'model.attention_scale': must be > 0, got 0"),
    (_set("attention_scale", float("inf")), "config.json",
     "field 'model.attention_scale': must be a finite number, got inf"),
    (_set("attention_scale", "1"), "config.json",
     "field 'model.attention_scale': must be a number or null, got '1'"),
    (_set("local_attention_layers", [True]), "config.json",
     "field 'model.local_attention_layers': must be a string or a list of integers, got [True]"),
    (_set("local_attention_layers", "third"), "config.json",
     "field 'model': local_attention_layers must be all, odd, even or a list of distinct layer "
     "indices from 0 to 1, not 'third'"),
    (_set("local_attention_layers", [1, 2]), "config.json",
     "field 'model': local_attention_layers must be all, odd, even or a list of distinct layer "
     "indices from 0 to 1, not [1, 2]"),
    (lambda m: [], "config.json", "expected a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "model"}, "config.json",
     "field 'model': missing: the model's configuration (its sizes and options)"),
    (lambda m: {**m, "model": {k: v for k, v in m["model"].items() if k != "d_model"}},
     "config.json", "field 'model': missing model config keys ['d_model']"),
    (lambda m: {**m, "format": "gptlab/9"}, "config.json",
     "field 'format': config.json has format 'gptlab/9', expected 'gptlab/1'"),
    # The config is valid but is not the one the weights were trained with: the first tensor
    # that differs is named with both shapes, in one line.
    (_set("vocab_size", 600), "model.safetensors",
     "weights do not fit the model's config.json: lm_head.weight is (512, 64) in the file, the "
     "config implies (600, 64)"),
    (_set("d_model", 32), "model.safetensors",
     "weights do not fit the model's config.json: blocks.0.attn.k_proj.weight is (64, 64) in the "
     "file, the config implies (32, 32) (and 19 more)"),
    # Building 10^30 layers on the meta device looped until the memory was gone.
    (_set("n_layers", 10**30), "config.json",
     "field 'model.n_layers': is 1000000000000000000000000000000, but model.safetensors holds 20 "
     "tensors, fewer than one per layer: the config does not describe these weights"),
    (_set("n_layers", 1), "model.safetensors",
     "weights do not fit the model's config.json: 9 tensor(s) in the file are not in the model "
     "(blocks.1.attn.k_proj.weight, blocks.1.attn.o_proj.weight, blocks.1.attn.q_proj.weight, "
     "...)"),
])
def test_a_bad_config_json_names_the_file_and_field(tmp_path, edit, file, message, capsys):
    from gptlab.cli import main
    _edited(tmp_path, edit)
    with pytest.raises(UserError) as e:
        ck.load_model(tmp_path)
    where = f"{tmp_path / file}, " if message.startswith("field '") else f"{tmp_path / file}: "
    assert str(e.value) == where + message
    out = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


def test_local_attention_layers_save_and_load_and_a_config_without_them_is_dense(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("tiny", attention_window=3, local_attention_layers=[1])
    net = GPT(cfg).eval()
    ck.save_model(tmp_path / "m", net)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (meta["model"]["attention_window"], meta["model"]["local_attention_layers"]) == (3, [1])
    loaded, _, _ = ck.load_model(tmp_path / "m")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert loaded.config == cfg and torch.equal(net(ids), loaded(ids))
        # A model directory from before the fields: dense attention, as it was trained.
        for key in ("attention_window", "local_attention_layers"):
            del meta["model"][key]
        (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
        old, _, _ = ck.load_model(tmp_path / "m")
        assert old.config.attention_window is None
        dense = GPT(get_preset("tiny")).eval()
        dense.load_state_dict(net.state_dict())
        assert torch.equal(old(ids), dense(ids))
        assert (old(ids) - net(ids)).abs().max() > 1e-3  # the band changed the logits


def test_attention_scale_saves_and_loads_and_a_config_without_it_scales_by_1_over_sqrt_d(
        tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("tiny", attention_scale=1.0)
    net = GPT(cfg).eval()
    ck.save_model(tmp_path / "m", net)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"]["attention_scale"] == 1.0
    loaded, _, _ = ck.load_model(tmp_path / "m")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert loaded.config == cfg and torch.equal(net(ids), loaded(ids))
        # A model directory from before the field: 1/sqrt(d_head), as it was trained.
        del meta["model"]["attention_scale"]
        (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
        old, _, _ = ck.load_model(tmp_path / "m")
        assert old.config.attention_scale is None
        plain = GPT(get_preset("tiny")).eval()
        plain.load_state_dict(net.state_dict())
        assert torch.equal(old(ids), plain(ids))
        assert (old(ids) - net(ids)).abs().max() > 1e-3  # the scale changed the logits


def test_a_config_json_saved_with_a_byte_order_mark_is_still_gptlabs(tmp_path):
    # Notepad's BOM made the directory read as a Hugging Face one, which then failed on it
    # ("Unexpected UTF-8 BOM"); JSONL and YAML files already dropped it.
    net = tiny()
    ck.save_model(tmp_path, net)
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes().replace(b"\n", b"\r\n"))
    assert ck.is_gptlab_dir(tmp_path)
    loaded, _, meta = ck.load_model(tmp_path)
    assert meta["format"] == "gptlab/1"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(net(ids), loaded(ids))


def test_checkpointer_keeps_last_k_and_points_to_latest(tmp_path):
    net = tiny()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    c = ck.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        c.save(step, net, optimizer=opt, state={"step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-20", "step-30"]
    latest = c.latest()
    assert latest.name == "step-30"
    assert c.load(latest, tiny(), torch.optim.AdamW(net.parameters()))["step"] == 30


def test_a_broken_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    net = tiny()
    c = ck.Checkpointer(tmp_path, keep=3)
    for step in (2, 10):
        c.save(step, net, state={"step": step})
    pointer = tmp_path / "checkpoints" / "latest"
    (tmp_path / "checkpoints" / "step-11").mkdir()  # no manifest: never finished
    for broken in ("step-99\n", ""):
        pointer.write_text(broken)
        assert c.latest().name == "step-10"  # step 10 > step 2, by number not by name
    pointer.unlink()
    assert c.load(c.latest(), tiny())["step"] == 10
    for p in (tmp_path / "checkpoints").glob("step-*"):
        (p / "manifest.json").unlink(missing_ok=True)
    assert c.latest() is None


def test_a_failed_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    net = tiny()
    c = ck.Checkpointer(tmp_path, keep=3)
    c.save(1, net, state={"step": 1})

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(OSError):
        c.save(2, net, state={"step": 2})
    monkeypatch.undo()
    assert c.latest().name == "step-1"
    assert not (tmp_path / "checkpoints" / "step-2").exists()
    # Nor a hidden half-copy: on a full disk it kept the disk full for the rerun.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert c.load(c.latest(), tiny())["step"] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
@pytest.mark.parametrize("limit_kb,file", [(256, "model.safetensors"), (800, "optimizer.pt")])
def test_a_file_too_large_for_the_disk_inside_torch_or_safetensors_is_an_oserror_naming_it(
        tmp_path, limit_kb, file):
    """A real limit on the size of a file (as a full disk or FAT32's 4 GiB would be) met inside
    safetensors or torch.save: each said it in an error of its own naming no file (a traceback
    from the CLI); it is the OSError, naming the file, and the save leaves nothing behind."""
    import resource
    import signal
    net = tiny()
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.tensor([[1, 2]])).sum().backward()
    optimizer.step()  # optimizer.pt is twice the weights (0.56 MB): 800 KB is between
    c = ck.Checkpointer(tmp_path)
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails, EFBIG, instead
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, before[1]))
        with pytest.raises(OSError) as failed:
            c.save(1, net, optimizer=optimizer, state={"step": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    assert failed.value.errno == errno.EFBIG
    assert Path(failed.value.filename).name == file
    assert Path(failed.value.filename).parent.parent == tmp_path / "checkpoints"
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_killed_saves_copy_is_removed_by_the_next_save(tmp_path):
    c = ck.Checkpointer(tmp_path, keep=3)
    c.save(1, tiny(), state={"step": 1})
    stale = tmp_path / "checkpoints" / ".step-2.tmp99999"  # another process's, killed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    c.save(2, tiny(), state={"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-1", "step-2"]


@pytest.mark.parametrize("again", [False, True])
def test_a_save_whose_rename_into_place_fails_leaves_no_copy_and_the_old_step_whole(
        tmp_path, monkeypatch, again):
    """The copy was left (`.step-N.<random>.tmp`, 3 MB of a small model, a model's worth of a
    large one) for the next save to remove; the step saved again keeps its old files."""
    c = ck.Checkpointer(tmp_path)
    c.save(1, tiny(), state={"step": 1})
    if again:
        c.save(2, tiny(), state={"step": 2})
    before = _files(tmp_path / "checkpoints")

    rename = ck.os.replace

    def no_space(src, dst, *args, **kwargs):
        if again or Path(dst).name == "step-2":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)
    if again:
        monkeypatch.setattr(ck, "replace_dir", no_space)
    else:
        monkeypatch.setattr(ck.os, "replace", no_space)
    with pytest.raises(OSError):
        c.save(2, tiny(), state={"step": 2})
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".old-files")]
    if again:
        assert _files(tmp_path / "checkpoints") == before
        ck.Checkpointer.verify(tmp_path / "checkpoints" / "step-2", advice="")


def test_keeping_the_last_k_leaves_directories_it_did_not_write(tmp_path):
    # `step-4.bak` crashed every save after it (int('4.bak')); `step-4-keep` was deleted.
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(4, tiny(), state={})
    for name in ("step-4.bak", "step-4-keep", "step-²"):  # "²".isdigit(), int("²") fails
        (tmp_path / "checkpoints" / name).mkdir()
    c.save(5, tiny(), state={})
    c.save(6, tiny(), state={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-4-keep", "step-4.bak", "step-6", "step-²"]
    assert c.latest().name == "step-6"


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="an atomic swap of two directories is Linux's renameat2")
def test_saving_a_step_again_never_leaves_a_moment_without_it(tmp_path, monkeypatch):
    # A resumed run that stops early saves its step again. That save removed the step's
    # checkpoint, then renamed the new one in: killed between the two, with keep=1, nothing
    # was left to resume from. Here the kill comes right after the first removal.
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(7, tiny(), state={"copy": "old"})
    real_rmtree = shutil.rmtree

    def killed_after(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if Path(path).parent.name == "checkpoints":  # a copy of the step, not a file's temp
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_after)
    with pytest.raises(KeyboardInterrupt):
        c.save(7, tiny(), state={"copy": "new"})
    monkeypatch.undo()
    latest = c.latest()
    assert latest is not None and latest.name == "step-7"
    assert c.load(latest, tiny())["copy"] == "new"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-7"]
    # Where the system cannot swap, the old copy goes aside, the new one in, then the old is
    # removed. It was removed first: interrupted there, neither was left.
    monkeypatch.setattr(gptlab.io, "_exchange", lambda a, b: False)
    monkeypatch.setattr(shutil, "rmtree", killed_after)
    with pytest.raises(KeyboardInterrupt):
        c.save(7, tiny(), state={"copy": "newer"})
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert c.load(c.latest(), tiny())["copy"] == "newer"
    c.save(7, tiny(), state={"copy": "newest"})
    assert c.load(c.latest(), tiny())["copy"] == "newest"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-7"]


def test_without_a_swap_a_failed_rename_of_a_step_saved_again_keeps_the_old_copy(tmp_path,
                                                                                 monkeypatch):
    import os
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(7, tiny(), state={"copy": "old"})
    monkeypatch.setattr(gptlab.io, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def refused_in(a, b):
        if Path(a).name.endswith(".tmp") and Path(b).name == "step-7":  # the new copy in
            raise OSError("refused")
        return real_replace(a, b)
    monkeypatch.setattr(os, "replace", refused_in)
    before = _tree(tmp_path / "checkpoints" / "step-7")
    with pytest.raises(OSError, match="refused"):
        c.save(7, tiny(), state={"copy": "new"})
    monkeypatch.undo()
    assert _tree(tmp_path / "checkpoints" / "step-7") == before  # the same files
    assert not list((tmp_path / "checkpoints").glob(".old-files.*"))
    assert c.load(c.latest(), tiny())["copy"] == "old"


def _tree(d):
    """Every entry under `d`, hidden ones too: a file's bytes and inode (one put back is the
    same file), a directory as None."""
    import os
    return {p.relative_to(d).as_posix(): None if p.is_dir() else
            (p.read_bytes(), os.stat(p).st_ino) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("resume", [False, True])
def test_without_a_swap_a_save_killed_between_its_renames_has_the_old_copy_put_back(
        tmp_path, capsys, resume):
    """Where the system cannot swap, a step saved again has its old copy renamed aside, then
    the new one in. Killed between the two, the old copy was a `.tmp.old`, which the next save
    removed as a stale temporary, with the new copy: step-7 was lost. It is put back now."""
    c = ck.Checkpointer(tmp_path, keep=3)
    c.save(6, tiny(), state={"copy": "six"})
    c.save(7, tiny(), state={"copy": "old"})
    before = _tree(tmp_path / "checkpoints" / "step-7")
    _killed_while("import gptlab.io\n"
                  "from pathlib import Path\n"
                  "gptlab.io._exchange = lambda a, b: False\n"
                  "real = os.replace\n"
                  "def replace(a, b):\n"
                  "    if Path(b).name == 'step-7' and Path(a).name.endswith('.tmp'):\n"
                  "        KILL()\n"
                  "    return real(a, b)\n"
                  "os.replace = replace\n"
                  "ck.Checkpointer('.', keep=3).save(7, GPT(get_preset('tiny')), state={})",
                  tmp_path)
    assert not (tmp_path / "checkpoints" / "step-7").exists()
    capsys.readouterr()
    if resume:  # what a resume reads first: latest() named step-6, a step before the kill
        assert c.latest() == tmp_path / "checkpoints" / "step-7"
        assert "its old step-7 put back from .old-files." in capsys.readouterr().err
        assert _tree(tmp_path / "checkpoints" / "step-7") == before
    c.save(8, tiny(), state={"copy": "eight"})
    assert ("its old step-7 put back from .old-files." in capsys.readouterr().err) != resume
    assert _tree(tmp_path / "checkpoints" / "step-7") == before
    assert c.load(tmp_path / "checkpoints" / "step-7", tiny())["copy"] == "old"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-6", "step-7", "step-8"]


def test_a_damaged_pointer_or_manifest_is_a_clear_error_or_a_fallback(tmp_path):
    c = ck.Checkpointer(tmp_path, keep=3)
    for step in (2, 10):
        c.save(step, tiny(), state={"step": step})
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_bytes(b"\xff\xfe\x00step")  # not the text a save writes
    assert c.latest().name == "step-10"
    pointer.unlink()
    pointer.mkdir()
    assert c.latest().name == "step-10"
    manifest = tmp_path / "checkpoints" / "step-10" / "manifest.json"
    for damaged in ("", "[1, 2]", '{"step": 10}', '{"step": 10, "sha256": [1]}'):
        manifest.write_text(damaged)
        with pytest.raises(UserError) as err:
            c.load(c.latest(), tiny())
        assert str(err.value).startswith(f"{manifest}: is damaged")
        assert f"remove {manifest.parent} to resume from the checkpoint before it" in str(err.value)


def test_a_corrupted_checkpoint_is_detected(tmp_path):
    c = ck.Checkpointer(tmp_path)
    path = c.save(5, tiny(), state={})
    (path / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="missing or corrupt"):
        c.load(path, tiny())


def test_a_save_below_the_newest_step_is_kept_and_named_latest(tmp_path):
    # Resuming from an earlier checkpoint (the pointer moved back by hand) saves a lower step
    # than ones on disk: keeping the last K by number must not remove the save just made.
    net = tiny()
    c = ck.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        c.save(step, net, state={"step": step})
    c.save(15, net, state={"step": 15})
    assert (tmp_path / "checkpoints" / "step-15").is_dir()
    assert c.latest().name == "step-15" and c.load(c.latest(), tiny())["step"] == 15


def test_keeping_the_last_k_counts_up_to_the_step_saved_and_keeps_the_one_resumed_from(tmp_path):
    # Resumed from step 10 (the pointer moved back by hand) past steps 20 and 30 of the run's
    # first line, the save of step 12 counted them in and removed step 10 with keep=2: the one
    # the run resumed from, leaving step 12 the only checkpoint of its line.
    net = tiny()
    for step in (10, 20, 30):
        ck.Checkpointer(tmp_path, keep=None).save(step, net, state={"step": step})
    (tmp_path / "checkpoints" / "latest").write_text("step-10\n")
    c = ck.Checkpointer(tmp_path, keep=2)
    names = lambda: sorted(p.name for p in c.dir.glob("step-*"))  # noqa: E731
    c.save(12, net, state={"step": 12})
    assert names() == ["step-10", "step-12", "step-20", "step-30"]
    c.save(14, net, state={"step": 14})
    assert names() == ["step-12", "step-14", "step-20", "step-30"]
    assert c.latest().name == "step-14"


def test_a_checkpoint_removal_killed_midway_leaves_no_step_with_part_of_its_files(tmp_path,
                                                                                  monkeypatch):
    # Keeping the last K removed an old step-N file by file: killed midway, step-N was left
    # with its manifest and part of its files, a checkpoint to `latest` (once the newer one was
    # removed, as a damaged one's message advises), which then failed to verify.
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(1, tiny(), state={"step": 1})
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if path.parent == tmp_path / "checkpoints" and "step-1" in path.name:
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt  # as a kill: nothing after the first file is removed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        c.save(2, tiny(), state={"step": 2})
    monkeypatch.undo()
    assert c.latest().name == "step-2"
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-2"]
    shutil.rmtree(tmp_path / "checkpoints" / "step-2")
    assert c.latest() is None
    c.save(3, tiny(), state={"step": 3})  # removes the killed removal's leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-3"]


def test_a_checkpoint_that_cannot_be_renamed_aside_is_left_whole_and_removed_later(
        tmp_path, monkeypatch, capsys):
    # Windows renames no directory while another process has a file in it open (a reader of
    # the checkpoint); it was then removed where it was, file by file: the open file stayed,
    # the others went, and step-1 was left with part of its files.
    c = ck.Checkpointer(tmp_path, keep=1)
    old = c.save(1, tiny(), state={"step": 1})
    real_replace, real_rmtree = gptlab.io.os.replace, shutil.rmtree

    def replace(src, dst):
        if Path(src) == old:
            raise PermissionError(errno.EACCES, "Access is denied", str(src))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if Path(path) == old:  # all but the file held open, as ignore_errors leaves it
            for f in Path(path).rglob("*"):
                if f.is_file() and f.name != "manifest.json":
                    f.unlink()
            return
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(gptlab.io.os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    c.save(2, tiny(), state={"step": 2})
    ck.Checkpointer.verify(old)  # whole: every file its manifest names
    assert f"warning: {old} was left in place" in capsys.readouterr().err
    monkeypatch.undo()
    c.save(3, tiny(), state={"step": 3})  # the next save removes it
    assert sorted(p.name for p in c.dir.iterdir()) == ["latest", "step-3"]


def test_a_resume_removes_what_a_killed_removal_of_the_last_save_left(tmp_path, monkeypatch):
    # Killed while removing an old checkpoint at a run's last save, its hidden copy was left;
    # only a later save removed it, and a run done with its steps saves no more: the copy of
    # a whole checkpoint stayed for good.
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(1, tiny(), state={"step": 1})
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".step-1."):
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        c.save(2, tiny(), state={"step": 2})
    monkeypatch.undo()
    assert [p.name for p in c.dir.glob(".step-1.*.tmp")]  # the leftover
    assert ck.Checkpointer(tmp_path, keep=1).load(c.latest(), tiny())["step"] == 2
    assert sorted(p.name for p in c.dir.iterdir()) == ["latest", "step-2"]


def test_the_manifest_covers_the_files_of_models_saved_inside_a_checkpoint(tmp_path):
    c = ck.Checkpointer(tmp_path)
    path = c.save(1, tiny(), models={"value": tiny()})
    manifest = json.loads((path / "manifest.json").read_text())["sha256"]
    assert "value/model.safetensors" in manifest
    weights = path / "value" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern changed, the size the same
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="missing or corrupt"):
        c.verify(path)


def _killed_while(code: str, tmp_path) -> None:
    """Run `code` in a Python that SIGKILLs itself inside it (`KILL()`), as `kill -9` would."""
    import os
    import subprocess
    import sys
    prelude = ("import os, signal, torch\n"
               "from gptlab import checkpoint as ck\n"
               "from gptlab.io import atomic_path\n"
               "from gptlab.model import GPT, get_preset\n"
               "def KILL(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9


def test_a_write_killed_midway_leaves_a_temp_the_next_write_of_that_file_removes(tmp_path):
    # A killed write's hidden temporary (a model's weights: its whole size) stayed forever.
    from gptlab.io import write_json_atomic
    _killed_while("with atomic_path('out.json') as t:\n    t.write_bytes(b'x' * 1000)\n    KILL()",
                  tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.json.") and left[0].endswith(".tmp")
    write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}


def test_a_killed_checkpoint_save_is_never_resumed_and_the_next_save_removes_it(tmp_path):
    from gptlab.train.loop import check_run_dir
    c, net = ck.Checkpointer(tmp_path, keep=3), tiny()
    # A stage's checkpoint, which holds its optimizer's state (a resume requires it).
    c.save(1, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), state={"step": 1})
    _killed_while("torch.save = KILL\n"
                  "ck.Checkpointer('.', keep=3).save(2, GPT(get_preset('tiny')), state={})",
                  tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[:1][0].startswith(".step-2.") and names[1:] == ["latest", "step-1"]
    # A stale copy, even a complete one with its manifest, is no checkpoint.
    import shutil
    shutil.copytree(tmp_path / "checkpoints" / "step-1", tmp_path / "checkpoints" / ".step-9.x.tmp")
    assert c.latest().name == "step-1"
    assert check_run_dir(tmp_path, resume=True).name == "step-1"
    c.save(2, tiny(), state={"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-1", "step-2"]


def test_two_writers_of_one_place_never_remove_or_share_each_others_temporaries(tmp_path,
                                                                               monkeypatch):
    # A save removed every `.step-*.tmp*` as stale, a live writer's too, and named its own by
    # the process id, which two writers (a container each, or one process) can share: the
    # first writer's save then failed on its vanished directory.
    from gptlab.io import atomic_path, write_text_atomic
    with atomic_path(tmp_path / "a.txt") as first:
        first.write_text("first")
        write_text_atomic(tmp_path / "a.txt", "second")  # another writer, while the first writes
        assert first.read_text() == "first"
    assert (tmp_path / "a.txt").read_text() == "first"
    real_save, inner = ck.torch.save, []

    def save_meanwhile(obj, f, *a, **k):
        if not inner:  # another writer saves the same step while this one is writing
            inner.append(None)
            inner[0] = ck.Checkpointer(tmp_path, keep=3).save(3, tiny(), state={"by": "inner"})
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(ck.torch, "save", save_meanwhile)
    c = ck.Checkpointer(tmp_path, keep=3)
    path = c.save(3, tiny(), state={"by": "outer"})
    monkeypatch.undo()
    assert inner == [path] and c.load(path, tiny()) == {"by": "outer"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-3"]


def test_writes_work_where_a_directory_cannot_be_locked(tmp_path, monkeypatch):
    # The lock on each writer's temporary made every write fail where it cannot be taken:
    # Windows (no fcntl, and os.open of a directory is refused), a file system without flock
    # (ENOLCK; NFS refuses an exclusive flock on a file open read-only: EBADF).
    import errno
    import os
    import sys
    import types
    from gptlab import io
    stale = tmp_path / ".a.txt.killed.tmp"
    stale.mkdir()
    real_open = os.open

    def windows_open(path, flags, *a, **k):  # (shutil.rmtree's own opens stay Linux's)
        if os.path.isdir(path) and sys._getframe(1).f_globals["__name__"] == "gptlab.io":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(io, "fcntl", None)
    monkeypatch.setattr(io.os, "open", windows_open)
    io.write_text_atomic(tmp_path / "a.txt", "windows")
    ck.Checkpointer(tmp_path, keep=3).save(1, tiny(), state={"on": "windows"})
    monkeypatch.undo()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(io, "fcntl", types.SimpleNamespace(flock=no_flock, LOCK_EX=2, LOCK_NB=4))
    io.write_text_atomic(tmp_path / "a.txt", "nfs")
    c = ck.Checkpointer(tmp_path, keep=3)
    path = c.save(2, tiny(), state={"on": "nfs"})
    monkeypatch.undo()
    assert (tmp_path / "a.txt").read_text() == "nfs" and c.load(path, tiny()) == {"on": "nfs"}
    # Unable to tell a killed write's temporary from a live one, no write removed it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.txt.killed.tmp", "a.txt",
                                                          "checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-1", "step-2"]


def test_a_temporary_removed_as_stale_before_its_writer_opens_it_is_made_again(tmp_path):
    # Another process's write of the same file can take a just-made temporary for a killed
    # write's and remove it before its writer opened it to lock it: the write then failed
    # with FileNotFoundError instead of making another.
    import shutil
    import tempfile
    from gptlab.io import held_temp
    made = []

    def make():
        made.append(tempfile.mkdtemp(prefix=".x.", suffix=".tmp", dir=tmp_path))
        if len(made) == 1:
            shutil.rmtree(made[0])  # the other process's remove_stale_temps, meanwhile
        return made[-1]
    with held_temp(make) as tmp:
        assert str(tmp) == made[1] and tmp.is_dir()


def test_a_reward_models_pad_token_id_must_be_null_or_a_token_id_not_a_boolean(tmp_path):
    # `true` passed as an int (it is one in Python): the score would be read past token id 1.
    from gptlab.model.gpt import GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    rm = ScalarHeadModel(GPTConfig(vocab_size=40, context=16, n_layers=1, n_heads=2, d_model=16))
    rm.pad_token_id = 1
    ck.save_model(tmp_path, rm)
    assert ck.load_model(tmp_path)[0].pad_token_id == 1
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "pad_token_id": True}))
    with pytest.raises(UserError) as e:
        ck.load_model(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}, field 'pad_token_id': must be null or "
                            f"a token id in [0, 40), got True")


@pytest.mark.parametrize("tail", ["yes", 1, None])
def test_a_reward_models_reads_template_tail_must_be_true_or_false(tmp_path, tail):
    # "yes" is truthy: the model would be scored after a template tail it was not trained on.
    from gptlab.model.gpt import GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    rm = ScalarHeadModel(GPTConfig(vocab_size=40, context=16, n_layers=1, n_heads=2, d_model=16))
    rm.reads_template_tail = True
    ck.save_model(tmp_path, rm)
    assert ck.load_model(tmp_path)[0].reads_template_tail is True
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "reads_template_tail": tail}))
    with pytest.raises(UserError) as e:
        ck.load_model(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}, field 'reads_template_tail': must be "
                            f"true or false, got {tail!r}")
    del meta["reads_template_tail"]  # absent: a model scored at its end of turn
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert ck.load_model(tmp_path)[0].reads_template_tail is False


def test_weights_saved_in_another_dtype_load_in_the_dtype_the_model_declares(tmp_path):
    # Loading onto the meta device takes the file's tensors: taken as they are, bf16 weights
    # made a float32 model bf16 (loading in place converts them, as it always did).
    net = tiny().to(torch.bfloat16)
    ck.save_model(tmp_path, net)
    loaded, _, _ = ck.load_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, p), q in zip(net.named_parameters(), loaded.parameters()):
        assert torch.equal(p.float(), q), name
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_a_temporary_removed_as_stale_between_its_open_and_its_lock_is_made_again(tmp_path,
                                                                                 monkeypatch):
    # The other half of the race above: removed after its writer opened it but before the
    # lock was taken, the directory the writer holds is gone; it must make another.
    import os
    import shutil
    import tempfile
    import types
    from gptlab import io
    made, real_flock = [], io.fcntl.flock

    def make():
        made.append(tempfile.mkdtemp(prefix=".x.", suffix=".tmp", dir=tmp_path))
        return made[-1]

    def flock(fd, op):
        if len(made) == 1:
            shutil.rmtree(made[0])  # the other process's remove_stale_temps, meanwhile
        return real_flock(fd, op)
    monkeypatch.setattr(io, "fcntl", types.SimpleNamespace(
        flock=flock, LOCK_EX=io.fcntl.LOCK_EX, LOCK_NB=io.fcntl.LOCK_NB))
    with io.held_temp(make) as tmp:
        assert len(made) == 2 and str(tmp) == made[1] and tmp.is_dir()
        assert os.listdir(tmp_path) == [tmp.name]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_and_checkpoints_get_the_permissions_a_plain_write_gives(tmp_path, umask):
    # The temporaries are made owner-only (mkstemp's, mkdtemp's 0600 / 0700); renamed into
    # place as they are, a checkpoint or a file that its writer replaced (safetensors does)
    # would be unreadable to the group that may read everything else the run writes.
    import os
    import stat
    import tempfile
    from gptlab.io import atomic_path
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "w.bin") as t:
            fd, other = tempfile.mkstemp(dir=t.parent)  # a writer that replaces the file
            os.write(fd, b"x")
            os.close(fd)
            os.replace(other, t)
        step = ck.Checkpointer(tmp_path, keep=3).save(1, tiny(), state={})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(step.stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "w.bin").read_bytes() == b"x"


def test_a_write_removes_the_killed_temporaries_of_its_own_file_only(tmp_path):
    # `.a.<random>.tmp` is a's; `.ab.<random>.tmp` is ab's, though it starts as a's do.
    from gptlab.io import write_text_atomic
    for name in (".a.killed.tmp", ".ab.killed.tmp"):
        (tmp_path / name).mkdir()
    write_text_atomic(tmp_path / "a", "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ab.killed.tmp", "a"]
    write_text_atomic(tmp_path / "ab", "ab")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ab"]


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_machine_without_one(tmp_path, monkeypatch):
    """optimizer.pt and trainer.pt of a run on CUDA hold CUDA tensors (Adam's moments): they
    are read onto the CPU, and the optimizer's state follows its parameters. The files are
    written here as a GPU run writes them: every tensor tagged with the location cuda:0."""
    import torch.serialization as ser

    from gptlab.train.loop import make_optimizer
    net = tiny().train()
    opt = make_optimizer(net, lr=1e-3, weight_decay=0.1)
    net(torch.randint(0, 512, (2, 9)), labels=torch.randint(0, 512, (2, 9))).backward()
    opt.step()
    on_gpu = [(0, lambda storage: "cuda:0", lambda obj, location: None)]
    with monkeypatch.context() as m:
        m.setattr(ser, "_package_registry", on_gpu + list(ser._package_registry))
        path = ck.Checkpointer(tmp_path).save(1, net, optimizer=opt,
                                              state={"step": 1, "noise": torch.ones(2)})
    again = tiny().train()
    opt2 = make_optimizer(again, lr=1e-3, weight_decay=0.1)
    state = ck.Checkpointer(tmp_path).load(path, again, opt2)
    assert state["step"] == 1 and state["noise"].device.type == "cpu"
    moments = [s["exp_avg"] for s in opt2.state.values()]
    assert len(moments) == len(list(net.parameters()))
    assert all(t.device.type == "cpu" for t in moments)
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
               for a, b in zip(opt.state.values(), opt2.state.values()))


def test_a_file_and_a_checkpoint_are_on_the_disk_before_a_name_points_at_them(tmp_path,
                                                                              monkeypatch):
    # Nothing was flushed (fsync): after a power cut the rename could be on the disk and the
    # bytes not, `latest` naming a checkpoint of empty files and the older ones pruned.
    import os
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)),
                                                     real_replace(a, b))[1])
    from gptlab.io import write_text_atomic
    write_text_atomic(tmp_path / "a.txt", "text")
    ino = lambda p: ("fsync", p.stat().st_ino)  # noqa: E731
    assert events == [ino(tmp_path / "a.txt"), ("replace", "a.txt"), ino(tmp_path)]
    events.clear()
    path = ck.Checkpointer(tmp_path, keep=1).save(1, tiny(), optimizer=torch.optim.SGD(
        tiny().parameters(), lr=0.1), state={"step": 1})
    renamed = events.index(("replace", "step-1"))
    flushed_before = set(events[:renamed])
    assert {ino(f) for f in path.rglob("*")} | {ino(path)} <= flushed_before
    assert {"optimizer.pt", "trainer.pt", "manifest.json"} <= {f.name for f in path.iterdir()}
    assert events[renamed + 1] == ino(tmp_path / "checkpoints")
    assert events.index(("replace", "latest")) > renamed + 1


def test_a_file_is_flushed_where_only_a_handle_open_for_writing_can_be(tmp_path, monkeypatch):
    # Windows' fsync (_commit) refuses a handle opened read-only (EBADF), which was opened and
    # the refusal ignored: there no file was ever flushed. As Windows does, here:
    fcntl = pytest.importorskip("fcntl")
    import os
    import stat
    flushed, real_fsync = [], os.fsync

    def windows_fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == \
                os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)
        flushed.append(st.st_ino)
    monkeypatch.setattr(os, "fsync", windows_fsync)
    from gptlab.io import fsync_path, write_text_atomic
    write_text_atomic(tmp_path / "a.txt", "text")
    assert (tmp_path / "a.txt").stat().st_ino in flushed
    # One that cannot be opened for writing (root may open any) is still flushed where it can.
    ro, real_open = tmp_path / "ro.txt", os.open
    ro.write_text("x")

    def no_writing(path, flags, *args):
        if Path(path) == ro and flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", no_writing)
    monkeypatch.setattr(os, "fsync", real_fsync)
    fsync_path(ro)


def test_a_pad_token_id_must_be_an_id_of_the_vocabulary():
    from gptlab.checkpoint import check_pad_token_id
    assert check_pad_token_id(None, 10, "config.json", "pad_token_id") is None
    assert check_pad_token_id(0, 10, "config.json", "pad_token_id") == 0
    assert check_pad_token_id(9, 10, "config.json", "pad_token_id") == 9
    for bad in (10, -1, True, 2.0, "3"):
        with pytest.raises(UserError, match="pad_token_id"):
            check_pad_token_id(bad, 10, "config.json", "pad_token_id")


def test_a_layer_count_one_past_the_tensors_or_a_tokenizer_one_past_the_embedding_is_refused(
        tmp_path):
    """Both checks at their boundary: as many layers as tensors, and a tokenizer exactly as
    large as the embedding, pass."""
    import json
    from safetensors import safe_open
    from gptlab.checkpoint import check_layer_counts, check_tokenizer_fits
    from gptlab.model import GPT
    from gptlab.model.gpt import GPTConfig
    model = GPT(GPTConfig(vocab_size=20, context=8, d_model=8, n_layers=1, n_heads=2))
    ck.save_model(tmp_path / "m", model)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        tensors = len(f.keys())
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    for n, refused in ((tensors, False), (tensors + 1, True)):
        meta["model"]["n_layers"] = n
        if refused:
            with pytest.raises(UserError, match=f"is {n}, but model.safetensors holds "
                                                f"{tensors} tensors"):
                check_layer_counts(meta, tmp_path / "config.json",
                                   tmp_path / "m" / "model.safetensors")
        else:
            check_layer_counts(meta, tmp_path / "config.json", tmp_path / "m" / "model.safetensors")

    class Tok:
        vocab_size = 20
    check_tokenizer_fits(model, Tok())
    Tok.vocab_size = 21
    with pytest.raises(UserError, match="tokenizer has 21 tokens but the model's embedding has "
                                        "20 rows"):
        check_tokenizer_fits(model, Tok())


def test_a_value_model_is_known_by_its_stage_or_by_its_place_in_a_ppo_run(tmp_path,
                                                                          monkeypatch):
    from gptlab.checkpoint import VALUE_STAGE, is_value_model

    def model(d, stage=None):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({} if stage is None else {"stage": stage}))
        return d
    run = model(tmp_path / "run", "ppo")
    assert is_value_model(model(tmp_path / "marked", VALUE_STAGE))
    assert is_value_model(model(run / "value"))  # written before the stage was recorded
    assert not is_value_model(model(run / "scorer"))  # PPO writes none but value/
    assert not is_value_model(model(tmp_path / "sft" / "value"))  # not beside a PPO policy
    model(tmp_path / "sft", "sft")
    assert not is_value_model(tmp_path / "sft" / "value")
    assert not is_value_model(model(tmp_path / "r" / "value", "reward"))  # its stage says
    (tmp_path / "r" / "config.json").write_text(json.dumps({"stage": "ppo"}))
    assert not is_value_model(tmp_path / "r" / "value")
    # A path written from where the user stands: "." in the value directory itself.
    monkeypatch.chdir(run / "value")
    assert is_value_model(".")
    # Not a model directory: a file (a GGUF), or a directory without config.json.
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    assert not is_value_model(tmp_path / "m.gguf") and not is_value_model(tmp_path / "empty")


def test_a_language_model_given_as_a_reward_model_and_the_reverse_say_what_it_is(tmp_path):
    ck.save_model(tmp_path / "gpt", tiny())
    with pytest.raises(UserError) as e:
        ck.load_reward_model(tmp_path / "gpt")
    assert str(e.value) == (f"{tmp_path / 'gpt'}, field 'reward': not a reward model (expected "
                            f"a scalar-head model or a one-label sequence classifier)")
    torch.manual_seed(0)
    ck.save_model(tmp_path / "t5", Transformer(TransformerConfig(
        vocab_size=30, context=16, n_encoder_layers=1, n_decoder_layers=1, d_model=16,
        n_heads=2, d_ff=32)))
    # `instead` tells what to give in place of a scalar head: of another model it says nothing.
    with pytest.raises(UserError) as e:
        ck.load_language_model(tmp_path / "t5", instead="give the SFT model")
    assert str(e.value) == (f"{tmp_path / 't5'}, field 'model': not a decoder-only language "
                            f"model: this is an encoder-decoder Transformer, which has no text to "
                            f"say")


def test_a_lost_pointer_falls_back_to_the_line_saved_last_not_the_highest_step(tmp_path):
    # Steps 1..4, then resumed from step 2 (the pointer moved back by hand): the save of step 3
    # replaces the first line's step 3, and step 4 of the abandoned line stays (keep counts up
    # to the step saved). A lost pointer fell back to step 4, the abandoned line.
    net = tiny()
    c = ck.Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3, 4):
        c.save(step, net, state={"step": step, "line": "first"})
    (c.dir / "latest").write_text("step-2\n")
    assert c.load(c.latest(), tiny())["line"] == "first"
    c.save(3, net, state={"step": 3, "line": "resumed"})
    assert sorted(p.name for p in c.dir.glob("step-*")) == ["step-2", "step-3", "step-4"]
    saves = {p.name: json.loads((p / "manifest.json").read_text())["save"]
             for p in c.dir.glob("step-*")}
    assert saves == {"step-2": 2, "step-3": 5, "step-4": 4}  # in the order they were written
    (c.dir / "latest").unlink()
    assert c.latest().name == "step-3"
    assert c.load(c.latest(), tiny()) == {"step": 3, "line": "resumed"}
    # The pointer naming the resumed line's step 3, removed (damaged, as its error advises):
    # the checkpoint before it is step 2, not the abandoned line's step 4, though step 4 was
    # written after step 2.
    (c.dir / "latest").write_text("step-3\n")
    shutil.rmtree(c.dir / "step-3")
    assert c.latest().name == "step-2"
    # Checkpoints written before `save` was recorded: the highest step, as before; any that
    # records it was written after them.
    for p in c.dir.glob("step-*"):
        mf = p / "manifest.json"
        mf.write_text(json.dumps({k: v for k, v in json.loads(mf.read_text()).items()
                                  if k not in ("save", "threads")}))
    (c.dir / "latest").unlink()
    assert c.latest().name == "step-4"
    assert c.load(c.latest(), tiny())["line"] == "first"
    (c.dir / "latest").write_text("step-2\n")
    c.save(3, net, state={"step": 3, "line": "again"})
    assert json.loads((c.dir / "step-3" / "manifest.json").read_text())["save"] == 1
    (c.dir / "latest").unlink()
    assert c.load(c.latest(), tiny())["line"] == "again"


def test_a_checkpoint_records_the_threads_it_was_computed_on(tmp_path):
    c = ck.Checkpointer(tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = c.save(1, tiny(), state={})
        torch.set_num_threads(2)
        two = c.save(2, tiny(), state={})
    finally:
        torch.set_num_threads(threads)
    assert (ck.Checkpointer.threads_of(one), ck.Checkpointer.threads_of(two)) == (1, 2)
    (two / "manifest.json").write_text(json.dumps({"step": 2, "sha256": {}}))  # an older save
    assert ck.Checkpointer.threads_of(two) is None


def _poisoned(path: Path, name: str, values: dict[int, float]) -> None:
    """Set values of tensor `name` of the safetensors file `path` (by flat index)."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    flat = state[name].view(-1)
    for i, v in values.items():
        flat[i] = v
    save_file(state, str(path), metadata={"format": "pt"})


def test_weights_holding_a_nan_or_an_infinity_are_refused_naming_the_tensor(tmp_path):
    """A diverged run's weights loaded without a word, and every logit was NaN."""
    ck.save_model(tmp_path / "m", tiny())
    weights = tmp_path / "m" / "model.safetensors"
    _poisoned(weights, "blocks.1.mlp.up.weight", {5: float("nan")})
    with pytest.raises(UserError) as err:
        ck.load_model(tmp_path / "m")
    n = tiny().blocks[1].mlp.up.weight.numel()
    assert str(err.value) == (
        f"{weights}: tensor 'blocks.1.mlp.up.weight' holds non-finite weights (1 NaN of its {n} "
        f"values): the weights of a run that diverged, whose every output would be NaN; load an "
        f"earlier checkpoint")
    # The first such tensor is named, with its NaN and infinities counted.
    _poisoned(weights, "blocks.0.attn.k_proj.weight", {0: float("inf"), 1: float("-inf"),
                                                      2: float("nan")})
    with pytest.raises(UserError, match=r"tensor 'blocks.0.attn.k_proj.weight' holds non-finite "
                                        r"weights \(1 NaN and 2 infinite of its \d+ values\)"):
        ck.load_model(tmp_path / "m")
    # A model loaded in place (a checkpoint resumed) is refused too.
    with pytest.raises(UserError, match="blocks.0.attn.k_proj.weight"):
        ck.load_weights(tiny(), weights)


def test_a_model_of_no_gptlab_arch_is_refused_before_anything_is_written(tmp_path):
    # Its weights were written first, then the arch was asked for: a directory of weights with
    # no config.json was left behind. Over a model (replace_model), the old one stays whole.
    with pytest.raises(TypeError) as e:
        ck.save_model(tmp_path / "m", torch.nn.Linear(2, 2))
    assert str(e.value) == "cannot save a Linear: not a gptlab model"
    assert not (tmp_path / "m").exists()
    ck.save_model(tmp_path / "best", tiny(), extra={"step": 4})
    before = {p.name: p.read_bytes() for p in (tmp_path / "best").iterdir()}
    with pytest.raises(TypeError, match="cannot save a Linear: not a gptlab model"):
        ck.replace_model(tmp_path / "best", torch.nn.Linear(2, 2))
    assert {p.name: p.read_bytes() for p in (tmp_path / "best").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary left


@pytest.mark.parametrize("meta, said", [
    ({"arch": "bert", "model": {}}, "field 'arch': unknown arch 'bert' (known: gpt, scalar, "
                                    "transformer, classifier)"),
    ({"arch": "gpt", "model": [512, 64]}, "field 'model': expected an object of model config "
                                          "fields"),
])
def test_a_config_json_of_an_unknown_arch_or_a_model_that_is_no_object_is_named(tmp_path,
                                                                                meta, said):
    ck.save_model(tmp_path, tiny())
    (tmp_path / "config.json").write_text(json.dumps({"format": "gptlab/1", **meta}))
    with pytest.raises(UserError) as e:
        ck.load_model(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}, {said}"


def test_a_language_model_without_a_tokenizer_is_refused_where_text_is_needed(tmp_path):
    ck.save_model(tmp_path, tiny())
    with pytest.raises(UserError) as e:
        ck.load_language_model(tmp_path, field="policy")
    assert str(e.value) == (f"{tmp_path}, field 'policy': the model has no tokenizer "
                            f"(tokenizer.json)")
    model, tok, _ = ck.load_language_model(tmp_path, need_tokenizer=False)
    assert tok is None and model.config.vocab_size == 512


def test_torch_save_leaves_an_error_that_is_no_os_error_as_it_is(tmp_path):
    with pytest.raises((AttributeError, TypeError)) as e:  # pickle's, naming the lambda
        ck.torch_save({"fn": lambda: 0}, tmp_path / "state.pt")
    assert "lambda" in str(e.value)
    with pytest.raises(OSError) as e:
        ck.torch_save({"n": 1}, tmp_path / "missing" / "state.pt")
    assert e.value.filename == str(tmp_path / "missing" / "state.pt")


def test_a_file_given_as_a_model_is_named_a_file_not_a_directory_missing_its_config(tmp_path):
    (tmp_path / "demos.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(UserError) as e:
        ck.load_model(tmp_path / "demos.jsonl")
    assert str(e.value) == (f"{tmp_path / 'demos.jsonl'}: is a file, not a model: a model is a "
                            f"directory (config.json, model.safetensors, the tokenizer's files) "
                            f"or a .gguf file")


# --- a resume refuses a checkpoint that lacks what its stage saves, before it trains -------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step pretrain run with checkpoints step-2 and step-4, and the arguments it ran with
    (less --out and --max-steps)."""
    import random
    from gptlab.cli import main
    from gptlab.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("pretrained")
    rng, words = random.Random(0), "the cat sat on a mat and the dog ran".split()
    docs = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(60)]
    (d / "a.txt").write_text("\n\n".join(docs) + "\n")
    train_tokenizer(docs, vocab_size=300).save(d / "tok")
    args = ["pretrain", "--model", "tiny", "--no-progress", "--sample-tokens", "0", "--data",
            str(d / "a.txt"), "--tokenizer", str(d / "tok"), "--block-size", "16",
            "--batch-size", "4", "--eval-every", "0", "--save-every", "2", "--cache-dir",
            str(d / "cache")]
    assert main([*args, "--max-steps", "4", "--out", str(d / "run")]) == 0
    return d / "run", args


def _manifest_edit(checkpoint: Path, name: str, data: bytes | None) -> None:
    """Give checkpoint file `name` the bytes `data` (None: remove it) and make its manifest agree,
    as a hand edit would: the hashes then pass."""
    import hashlib
    mf = checkpoint / "manifest.json"
    manifest = json.loads(mf.read_text())
    if data is None:
        (checkpoint / name).unlink()
        del manifest["sha256"][name]
    else:
        (checkpoint / name).write_bytes(data)
        manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    mf.write_text(json.dumps(manifest))


def _pickled(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _refused_resume(pretrained, tmp_path, capsys, damage, resume=("--resume",)
                    ) -> tuple[Path, str]:
    """Copy the run, `damage(run)` it, resume it to step 6 (with the flags `resume`): exit
    code 2 and nothing written. Returns the copy's step-4 and the error line."""
    from gptlab.cli import main
    run, args = pretrained
    out = tmp_path / "run"
    shutil.copytree(run, out)
    damage(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    dirs = sorted(p for p in out.rglob("*") if p.is_dir())
    capsys.readouterr()
    assert main([*args, "--max-steps", "6", "--out", str(out), *resume]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p for p in out.rglob("*") if p.is_dir()) == dirs
    return out / "checkpoints" / "step-4", err


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer.pt", "config.json",
                                  "model.safetensors"])
def test_a_resume_refuses_a_checkpoint_whose_manifest_left_out_a_file_its_stage_saves(
        pretrained, tmp_path, capsys, name):
    # Without optimizer.pt the run resumed silently with a fresh optimizer; without trainer.pt
    # it failed on the bare file name, after run.json had recorded the resume.
    step4, err = _refused_resume(pretrained, tmp_path, capsys, lambda out: _manifest_edit(
        out / "checkpoints" / "step-4", name, None))
    assert err == (f"gptlab pretrain: error: {step4 / name}: checkpoint file is missing: every "
                   f"save writes it, and manifest.json does not list it; remove {step4} to "
                   f"resume from the checkpoint before it, if there is one\n")


@pytest.mark.parametrize("name, content, said", [
    ("trainer.pt", b"not a pickle", "UnpicklingError: invalid load key, 'n'."),
    ("optimizer.pt", b"not a pickle", "UnpicklingError: invalid load key, 'n'."),
    ("trainer.pt", _pickled({"x": 1}), "it holds no 'step', which every save writes"),
    ("trainer.pt", _pickled([1, 2]), "it holds 'list', not a trainer's state"),
    ("optimizer.pt", _pickled({"state": {}}), "not an optimizer's state: it needs a 'state' "
                                              "object and a list of 'param_groups', each with "
                                              "its 'params'"),
])
def test_a_resume_refuses_a_trainer_or_optimizer_state_it_cannot_read_as_damaged(
        pretrained, tmp_path, capsys, name, content, said):
    # Their hashes in the manifest agreeing, each was a traceback (UnpicklingError, KeyError
    # 'budget_pending', KeyError 'param_groups') and exit code 1.
    step4, err = _refused_resume(pretrained, tmp_path, capsys, lambda out: _manifest_edit(
        out / "checkpoints" / "step-4", name, content))
    assert err == (f"gptlab pretrain: error: {step4 / name}: is damaged ({said}); remove {step4} "
                   f"to resume from the checkpoint before it, if there is one\n")


def test_a_checkpoint_named_with_resume_from_that_is_damaged_is_not_to_be_removed(
        pretrained, tmp_path, capsys):
    # Named with --resume-from, it advised removing it "to resume from the checkpoint before
    # it", which --resume-from does not do: it says it cannot be resumed from, and lists them.
    step4, err = _refused_resume(pretrained, tmp_path, capsys, lambda out: _manifest_edit(
        out / "checkpoints" / "step-4", "trainer.pt", b"not a pickle"),
        resume=("--resume-from", "step-4"))
    assert err == (f"gptlab pretrain: error: {step4 / 'trainer.pt'}, field 'resume_from': is "
                   f"damaged (UnpicklingError: invalid load key, 'n'.); it cannot be resumed "
                   f"from; the checkpoints in {step4.parent}: step-2, step-4\n")


def test_a_checkpoint_pointer_that_is_a_directory_is_refused_before_any_step(pretrained,
                                                                             tmp_path, capsys):
    # A resume fell back to the checkpoint written last, trained every step, and failed only
    # at the save that replaces the pointer: the steps were lost.
    def pointer_a_directory(out):
        (out / "checkpoints" / "latest").unlink()
        (out / "checkpoints" / "latest").mkdir()
    step4, err = _refused_resume(pretrained, tmp_path, capsys, pointer_a_directory)
    assert err == (f"gptlab pretrain: error: {step4.parent / 'latest'}: is a directory where the "
                   f"checkpoint pointer, a file, goes; remove it\n")
    # A new run into an OUT with no checkpoint but such a pointer: refused as well.
    from gptlab.cli import main
    _, args = pretrained
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / "latest").mkdir(parents=True)
    assert main([*args, "--max-steps", "2", "--out", str(fresh)]) == 2
    assert capsys.readouterr().err == (f"gptlab pretrain: error: {fresh / 'checkpoints'}"
                                       f"/latest: is a directory where the checkpoint pointer, "
                                       f"a file, goes; remove it\n")
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*")) == [
        "checkpoints", "checkpoints/latest"]


def test_a_manifest_step_of_another_type_is_named_with_its_type(tmp_path):
    # A string "6" read `step is 6, not a step number`, the quotes lost.
    c = ck.Checkpointer(tmp_path)
    path = c.save(6, tiny(), state={})
    manifest = path / "manifest.json"
    fields = json.loads(manifest.read_text())
    for step, shown in (("6", "'6'"), (6.0, "6.0"), ([6], "[6]"), (None, "None")):
        manifest.write_text(json.dumps({**fields, "step": step}))
        with pytest.raises(UserError) as err:
            c.load(path, tiny())
        assert str(err.value) == (f"{manifest}: is damaged (TypeError: step is {shown}, not a "
                                  f"step number); remove {path} to resume from the checkpoint "
                                  f"before it, if there is one")


def test_a_load_requires_the_files_of_what_it_restores_and_names_what_a_state_lacks(tmp_path):
    # PPO resumes unhashed (check_run_dir hashed it): a manifest that left out the value model
    # or the optimizer's state passed, and a trainer.pt without PPO's keys was a KeyError.
    from gptlab.train.loop import check_run_dir
    net, value = tiny(), tiny()
    opt = torch.optim.AdamW(net.parameters())
    c = ck.Checkpointer(tmp_path)
    path = c.save(1, net, optimizer=opt, state={"step": 1}, extra={"stage": "ppo"},
                  models={"value": value})
    assert ck.Checkpointer.stage_files(path) == (
        "config.json", "model.safetensors", "trainer.pt", "optimizer.pt", "value/config.json",
        "value/model.safetensors")
    advice = f"; remove {path} to resume from the checkpoint before it, if there is one"
    state = c.load(path, net, opt, models={"value": value}, verify=False)
    with pytest.raises(UserError) as err:
        state["config"]  # a key PPO reads
    assert str(err.value) == (f"{path / 'trainer.pt'}: is damaged (it holds no 'config', which "
                              f"every save writes){advice}")
    assert state.get("config") is None and state["step"] == 1
    import pickle
    assert type(pickle.loads(pickle.dumps(state))) is dict  # saved again, a plain dict
    _manifest_edit(path, "value/model.safetensors", None)
    for load in (lambda: c.load(path, net, opt, models={"value": value}, verify=False),
                 lambda: c.load(path, net, opt, models={"value": value}),
                 lambda: check_run_dir(tmp_path, True)):
        with pytest.raises(UserError) as err:
            load()
        assert str(err.value) == (f"{path / 'value' / 'model.safetensors'}: checkpoint file is "
                                  f"missing: every save writes it, and manifest.json does not "
                                  f"list it{advice}")
    # An optimizer state that does not fit the optimizer (its weights loaded) is damaged too.
    path = c.save(2, net, optimizer=opt, state={"step": 2})
    _manifest_edit(path, "optimizer.pt", _pickled({"state": {}, "param_groups": []}))
    with pytest.raises(UserError) as err:
        c.load(path, net, opt)
    assert str(err.value) == (f"{path / 'optimizer.pt'}: is damaged (ValueError: loaded state "
                              f"dict has a different number of parameter groups); remove {path} "
                              f"to resume from the checkpoint before it, if there is one")
    assert c.load(path, net)["step"] == 2  # loaded without an optimizer, it is not read
