"""Model directories and training checkpoints: exact round trips, clear errors, atomicity."""
import json

import pytest
import torch

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


def test_weights_of_another_shape_are_rejected(tmp_path):
    ck.save_model(tmp_path, tiny())
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit"):
        ck.load_model(tmp_path)


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
    assert c.load(c.latest(), tiny())["step"] == 1


def test_a_corrupted_checkpoint_is_detected(tmp_path):
    c = ck.Checkpointer(tmp_path)
    path = c.save(5, tiny(), state={})
    (path / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="missing or corrupt"):
        c.load(path, tiny())
