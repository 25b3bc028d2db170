"""SFT's run: which records it measures execution accuracy on."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import gptlab.eval.execution as execution
import gptlab.train.sft as sft_module
from gptlab.checkpoint import Checkpointer, save_model
from gptlab.data.instruct import Example
from gptlab.errors import UserError
from gptlab.io import read_jsonl
from gptlab.model import GPT, get_preset
from gptlab.tokenizer import train_tokenizer
from gptlab.train.sft import SFTConfig, sft

import instruct_task as task


class _Stop(Exception):
    pass


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, demonstrations whose first line is too long for its context, and `sft`
    stopped where training would start, with what it measures execution accuracy on."""
    paths = task.write_task(tmp_path, n=60)
    rows = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    rows.insert(0, {"id": "long", "prompt": "cat " * 100, "completion": " yes"})
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(tmp_path / "base", GPT(config), tok)
    seen = {}

    def evaluator(world, tokenizer, records, max_new_tokens=96, path=None, context=None):
        seen["exec"] = records
        return lambda model: 0.0

    def train(model, batches, *args, **kwargs):
        seen["train"] = batches.items
        raise _Stop

    monkeypatch.setattr(execution, "world_exec_evaluator", evaluator)
    monkeypatch.setattr(sft_module, "train", train)
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(paths["sft"]), out=str(tmp_path / "sft"),
                    world="builtin", val_fraction=0.2, progress=False, device="cpu")
    return cfg, seen


def test_execution_accuracy_without_val_data_is_on_the_held_out_records(setup):
    cfg, seen = setup
    with pytest.raises(_Stop):
        sft(cfg)
    trained = {ex.id for ex in seen["train"]}
    measured = [r["id"] for r in seen["exec"]]
    usable = [r["id"] for r in read_jsonl(cfg.data) if r["id"] != "long"]
    assert len(trained) == 48 and len(measured) == 12      # 60 usable: 20% held out
    assert not trained & set(measured)
    assert measured == [i for i in usable if i not in trained]   # in file order
    assert all(isinstance(ex, Example) and ex.line is not None for ex in seen["train"])


def test_execution_accuracy_of_a_directory_of_shards_is_on_its_held_out_records(setup, tmp_path):
    # Each shard numbers its lines from 1: a held-out record is its shard's line, not the line
    # alone, which every shard has (line 5 held out in one was measured in both).
    cfg, seen = setup
    rows = [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(cfg.data)]
    d = tmp_path / "shards"
    d.mkdir()
    for i, part in enumerate((rows[:31], rows[31:])):
        (d / f"train-{i:05d}-of-00002.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part))
    with pytest.raises(_Stop):
        sft(dataclasses.replace(cfg, data=str(d)))
    trained = {ex.id for ex in seen["train"]}
    measured = [r["id"] for r in seen["exec"]]
    assert len(trained) == 48 and len(measured) == 12
    assert not trained & set(measured)
    assert measured == [r["id"] for r in rows if r["id"] not in trained | {"long"}]


def test_execution_accuracy_with_val_data_is_on_its_first_records(setup, tmp_path):
    cfg, seen = setup
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"id": f"v{i}", "prompt": "Is the owl happy?",
                                       "completion": " no"}) + "\n" for i in range(8)))
    with pytest.raises(_Stop):
        sft(dataclasses.replace(cfg, val_data=str(val), exec_eval=5))
    assert seen["exec"] == read_jsonl(val)[:5]
    assert len(seen["train"]) == 60                        # all of --data is trained on


def test_each_files_skipped_records_are_counted_and_reported_on_that_file(setup, tmp_path,
                                                                           capsys):
    cfg, seen = setup  # --data has one demonstration too long for the context
    long = json.dumps({"id": "v-long", "prompt": "owl " * 100, "completion": " no"}) + "\n"
    val = tmp_path / "val_long.jsonl"
    val.write_text(long)
    with pytest.raises(UserError) as e:
        sft(dataclasses.replace(cfg, val_data=str(val)))
    assert str(e.value) == (f"{val}: no usable demonstrations (skipped 1 record: 1 longer "
                            "than the context of 64)")
    val.write_text(long + long + json.dumps({"id": "v0", "prompt": "Is the owl happy?",
                                             "completion": " no"}) + "\n")
    with pytest.raises(_Stop):
        sft(dataclasses.replace(cfg, val_data=str(val)))
    err = capsys.readouterr().err
    assert (f"{cfg.data}: skipped 1 demonstration: 1 longer than the context of 64\n"
            f"{val}: skipped 2 demonstrations: 2 longer than the context of 64\n") in err
    assert len(seen["train"]) == 60
    data = json.loads((tmp_path / "sft" / "run.json").read_text())["data"]
    assert data["skipped"] == {"longer than the context of 64": 1}
    assert data["val_skipped"] == {"longer than the context of 64": 2}


# --- bad input: exit code 2, a message naming the field, nothing new in --out -------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model directory and demonstrations that fit its context."""
    d = tmp_path_factory.mktemp("sft_cli")
    paths = task.write_task(d, n=40)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(d / "base", GPT(config), tok)
    return d, paths


def run_sft(base, out, *args):
    from gptlab.cli import main
    d, paths = base
    return main(["sft", "--model", str(d / "base"), "--data", str(paths["sft"]), "--out",
                 str(out), "--max-steps", "1", "--batch-size", "4", "--no-progress",
                 "--device", "cpu", *args])


def snapshot(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else None


@pytest.mark.parametrize("args,message", [
    (["--beta2", "-1"], "field '--beta2': must be in [0, 1), got -1.0"),
    (["--val-fraction", "1"], "field '--val-fraction': must be in [0, 1), got 1.0"),
    (["--val-fraction", "-0.5"], "field '--val-fraction': must be in [0, 1), got -0.5"),
    (["--epochs", "0", "max_steps=null"], "field '--epochs': must be > 0, got 0.0"),
    (["--epochs", "-1", "max_steps=null"], "field '--epochs': must be > 0, got -1.0"),
    (["--patience", "-1"], "field '--patience': must be >= 0, got -1"),
    (["--exec-eval", "-1"], "field '--exec-eval': must be >= 0, got -1"),
    (["--lr", "inf"], "field '--lr': must be a finite number, got inf"),
    (["--resume"], "checkpoints, field '--resume': nothing to resume: no checkpoint in this run "
                   "directory"),
])
def test_impossible_settings_fail_before_anything_is_written(base, tmp_path, capsys, args,
                                                             message):
    out = tmp_path / "sft"
    assert run_sft(base, out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_world_id_in_val_data_fails_before_training_naming_its_line(base, tmp_path,
                                                                            capsys):
    from gptlab.world import build_world
    world = build_world(0, n_train=20, n_validation=5, n_test=5, n_dialogs=1, corpus_chars=500,
                        db_path=tmp_path / "db.sqlite")
    world.export(tmp_path / "w")
    q = world.validation[0]
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"id": q.id, "prompt": "Is the owl happy?", "completion": " no"})
                   + "\n" + json.dumps({"id": "s0-train-99999", "prompt": "Is the cat happy?",
                                       "completion": " yes"}) + "\n")
    out = tmp_path / "sft"
    assert run_sft(base, out, "--world", str(tmp_path / "w"), "--val-data", str(val),
                   "--max-new-tokens", "8") == 2
    assert (f"{val}:2, field 'id': no question with id 's0-train-99999' in this world"
            in capsys.readouterr().err)
    assert not out.exists()
    # The answers must fit the context (64) too: checked before training, not at evaluation.
    val.write_text(val.read_text().splitlines()[0] + "\n")
    assert run_sft(base, out, "--world", str(tmp_path / "w"), "--val-data", str(val),
                   "--max-new-tokens", "60") == 2
    err = capsys.readouterr().err
    assert (f"{val}:1, field 'prompt': the prompt's " in err and "tokens leave no room for "
            "max_new_tokens 60 in the model's context of 64" in err)
    assert not out.exists()


def test_a_finished_run_or_the_input_model_is_never_overwritten(base, tmp_path, capsys):
    d, _ = base
    out = tmp_path / "sft"
    assert run_sft(base, out) == 0
    files = snapshot(out)
    assert run_sft(base, out) == 2
    assert (f"{out}, field '--out': already holds a training run; pass resume (--resume) to "
            "continue it, or choose another out (--out)") in capsys.readouterr().err
    assert snapshot(out) == files
    model = d / "base"
    before = snapshot(model)
    assert run_sft(base, model) == 2
    assert (f"{model}, field '--out': is the input model (model, --model); training would "
            "overwrite it; choose another out (--out)") in capsys.readouterr().err
    assert snapshot(model) == before
    # --resume continues the finished run to a later step.
    assert run_sft(base, out, "--resume", "--max-steps", "2") == 0
    assert json.loads((out / "config.json").read_text())["step"] == 2


def test_resuming_keeps_the_best_evaluation_of_the_run_so_far(base, tmp_path, monkeypatch):
    """A learning rate this large makes every evaluation after the first worse: a run stopped
    at step 3 and resumed must still end on the first evaluation's weights, exactly as the
    straight run does; so must a finished run continued to more steps. At 0.3 the first was
    the best for model seed 0 alone, and the test passed on 3 of 8 seeds: a diverging run
    there can come back below its start (seed 3: 5.50 at step 0, 3.66 at step 4). At 3, every
    later evaluation of the 8 seeds, to step 6, is 26 or more, against 5.5 at the start."""
    from safetensors.torch import load_file
    args = ("--lr", "3", "--warmup-steps", "0", "--eval-every", "1", "--save-every", "2",
            "--val-fraction", "0.25", "--max-steps", "4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_sft(base, straight, *args) == 0
    evaluate = sft_module.BestKeeper.__call__

    def interrupted(self, model, step, val_loss):
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C: the loop saves step 3, then stops
        return evaluate(self, model, step, val_loss)

    monkeypatch.setattr(sft_module.BestKeeper, "__call__", interrupted)
    assert run_sft(base, resumed, *args) == 130
    monkeypatch.setattr(sft_module.BestKeeper, "__call__", evaluate)
    assert (resumed / "best").is_dir() and not (resumed / "model.safetensors").exists()
    assert run_sft(base, resumed, *args, "--resume") == 0
    meta = [json.loads((d / "config.json").read_text()) for d in (straight, resumed)]
    assert meta[0]["best_step"] == 0 and meta[0]["step"] == 4
    assert [m["best_step"] for m in meta] == [meta[0]["best_step"]] * 2
    assert [m["best_score"] for m in meta] == [meta[0]["best_score"]] * 2
    a, b = (load_file(d / "model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run has no OUT/best: continuing it to more steps still keeps its best.
    assert run_sft(base, straight, *args[:-1], "6", "--resume") == 0
    assert json.loads((straight / "config.json").read_text())["best_step"] == meta[0]["best_step"]
    c = load_file(straight / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_ctrl_c_mid_accumulation_and_mid_epoch_resumed_ends_as_a_straight_run(base, tmp_path,
                                                                               monkeypatch):
    """SFT's resume was only checked where the run kept step 0's weights, which any resume
    gives back. Here the last weights are kept, and the Ctrl-C comes in step 5's second
    micro-batch, in the second epoch (30 demonstrations, 4 a batch, 2 a step): the resumed run
    ends with the straight run's weights, optimizer moments and rows, bit for bit."""
    from safetensors.torch import load_file
    from gptlab.train.loop import read_metrics
    args = ("--max-steps", "8", "--grad-accum", "2", "--val-fraction", "0.25", "--eval-every",
            "4", "--save-every", "100", "--log-every", "1", "--lr", "3e-3", "--seed", "2",
            "--no-select-best")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_sft(base, straight, *args) == 0
    calls = [0]

    class Interrupted(sft_module.ListBatches):
        def __next__(self):
            calls[0] += 1
            if calls[0] == 10:  # step 5's second micro-batch
                raise KeyboardInterrupt
            return super().__next__()

    monkeypatch.setattr(sft_module, "ListBatches", Interrupted)
    assert run_sft(base, resumed, *args) == 130
    monkeypatch.undo()
    assert [p.name for p in (resumed / "checkpoints").glob("step-*")] == ["step-4"]
    state = torch.load(resumed / "checkpoints" / "step-4" / "trainer.pt", weights_only=False)
    assert state["data"]["epoch"] == 1 and state["data"]["index"] > 0  # mid epoch
    assert run_sft(base, resumed, *args, "--resume") == 0

    def rows(run):
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
                for r in read_metrics(run / "metrics.jsonl")]
    assert rows(straight) == rows(resumed) and len(rows(straight)) == 8 + 3
    a, b = (load_file(run / "model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (torch.load(run / "checkpoints" / "step-8" / "optimizer.pt", weights_only=False)
              for run in (straight, resumed))
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k])
               for i in oa["state"] for k in oa["state"][i])


def test_a_kill_while_out_best_is_removed_leaves_a_run_its_resume_finishes(base, tmp_path,
                                                                          monkeypatch):
    # OUT/best was removed file by file once OUT held the model: killed midway, it kept its
    # config.json without its weights, which the resume took for the best evaluation's and
    # then failed to load ("model weights are missing", exit 2), every time.
    import shutil
    from safetensors.torch import load_file
    out = tmp_path / "sft"
    args = ("--max-steps", "2", "--eval-every", "1", "--val-fraction", "0.25")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):
        path = Path(path)
        if path.parent == out and "best" in path.name and (out / "config.json").exists():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt  # as a kill: nothing after the first file is removed
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    assert run_sft(base, out, *args) == 130
    monkeypatch.undo()
    finished = load_file(out / "model.safetensors")
    assert run_sft(base, out, *args, "--resume") == 0
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(finished[k], again[k]) for k in finished)
    assert sorted(p.name for p in out.iterdir() if "best" in p.name) == []


def test_a_resume_on_other_demonstrations_says_so(base, tmp_path, capsys):
    d, paths = base
    out, data = tmp_path / "sft", tmp_path / "sft.jsonl"
    data.write_text(paths["sft"].read_text())
    resume = ("--save-every", "1", "--resume", "--max-steps")
    assert run_sft(base, out, "--data", str(data), "--save-every", "1") == 0
    assert run_sft(base, out, "--data", str(data), *resume, "2") == 0
    assert "warning" not in capsys.readouterr().err
    data.write_text("".join(data.read_text().splitlines(keepends=True)[1:]))
    assert run_sft(base, out, "--data", str(data), *resume, "3") == 0
    assert ("warning: the demonstrations changed since the checkpoint; the data position now "
            "points into other demonstrations") in capsys.readouterr().err


def test_resume_from_names_a_checkpoint_of_out_or_is_refused_listing_them(base, tmp_path,
                                                                            capsys):
    d, paths = base
    out = tmp_path / "sft"
    assert run_sft(base, out, "--save-every", "1", "--max-steps", "2",
                   "--keep-checkpoints", "5") == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    ckpts = out / "checkpoints"
    assert run_sft(base, out, "--max-steps", "2", "--resume-from", "step-3") == 2
    assert (f"{ckpts / 'step-3'}, field '--resume-from': no such checkpoint; the checkpoints in "
            f"{ckpts}: step-1, step-2") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert run_sft(base, out, "--max-steps", "2", "--keep-checkpoints", "5",
                   "--resume-from", "1") == 0
    assert f"resuming from {ckpts / 'step-1'} (step 1 of 2)" in capsys.readouterr().err
    assert Checkpointer(out).latest() == ckpts / "step-2"


def _scored_by_step(monkeypatch, scores: dict[int, float]) -> None:
    """Execution accuracy `scores[step]` at each evaluation, on the world's questions (none is
    answered: only the score matters here)."""
    evaluate, step = sft_module.BestKeeper.__call__, [None]

    def at_step(self, model, s, val_loss):
        step[0] = s
        return evaluate(self, model, s, val_loss)

    monkeypatch.setattr(sft_module.BestKeeper, "__call__", at_step)
    monkeypatch.setattr(execution, "world_exec_evaluator",
                        lambda *a, **k: lambda model: scores[step[0]])


def test_resume_from_a_step_after_the_best_takes_the_best_weights_from_its_checkpoint(
        base, tmp_path, monkeypatch, capsys):
    """A run evaluated every step has its best at step 5 (OUT holds step 5's weights), and
    step 2 best up to step 4. Resumed from step-4 evaluating every 2 steps, its best is step 2:
    OUT/best held step 5's, and the run said the best could no longer be selected and ended on
    step 6's weights. Now they are step-2's checkpoint's: those of the run that evaluated every
    2 steps from the start, whose best is step 2 too."""
    from safetensors.torch import load_file
    _scored_by_step(monkeypatch, {0: 0.0, 1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    args = ("--lr", "1e-3", "--warmup-steps", "0", "--val-fraction", "0.25", "--world",
            "builtin", "--exec-eval", "2", "--max-steps", "6", "--log-every", "1")
    straight, out = tmp_path / "straight", tmp_path / "sft"
    assert run_sft(base, straight, *args, "--eval-every", "2") == 0
    assert json.loads((straight / "config.json").read_text())["best_step"] == 2
    assert run_sft(base, out, *args, "--eval-every", "1", "--save-every", "1",
                   "--keep-checkpoints", "10") == 0
    assert json.loads((out / "config.json").read_text())["best_step"] == 5
    capsys.readouterr()
    assert run_sft(base, out, *args, "--eval-every", "2", "--save-every", "1",
                   "--keep-checkpoints", "10", "--resume-from", "step-4") == 0
    assert "can no longer be selected" not in capsys.readouterr().err
    meta = json.loads((out / "config.json").read_text())
    assert (meta["step"], meta["best_step"], meta["best_score"]) == (6, 2, 0.5)
    a, b = (load_file(run / "model.safetensors") for run in (straight, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("damage", ["removed", "corrupt", "another line's"])
def test_a_best_step_whose_checkpoint_is_gone_or_not_its_own_is_no_longer_selected(
        base, tmp_path, monkeypatch, capsys, damage):
    """Where step-2's checkpoint is gone, fails its manifest or holds another line's weights,
    the note stays, saying why, and the run keeps the best of its own later evaluations."""
    import shutil
    _scored_by_step(monkeypatch, {0: 0.0, 1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    args = ("--lr", "1e-3", "--warmup-steps", "0", "--val-fraction", "0.25", "--world",
            "builtin", "--exec-eval", "2", "--max-steps", "6", "--log-every", "1",
            "--save-every", "1", "--keep-checkpoints", "10")
    out = tmp_path / "sft"
    assert run_sft(base, out, *args, "--eval-every", "1") == 0
    ckpt = out / "checkpoints" / "step-2"
    if damage == "removed":
        shutil.rmtree(ckpt)
        why = f"no checkpoint holds them ({ckpt} is not there)"
    elif damage == "corrupt":
        (ckpt / "model.safetensors").write_bytes(b"0")
        why = (f"their checkpoint fails its manifest check ({ckpt / 'model.safetensors'}: "
               f"checkpoint file is missing or corrupt)")
    else:  # as a line of the run left with other steps would: here another run's step 2
        other = tmp_path / "other"
        assert run_sft(base, other, *args, "--eval-every", "1", "--max-steps", "2",
                       "--seed", "1") == 0
        shutil.rmtree(ckpt)
        shutil.copytree(other / "checkpoints" / "step-2", ckpt)
        why = f"{ckpt} is another line's (its training row differs from metrics.jsonl's)"
    capsys.readouterr()
    assert run_sft(base, out, *args, "--eval-every", "2", "--resume-from", "step-4") == 0
    assert (f"note: {out / 'best'} is missing or holds another evaluation's weights, and {why}; "
            f"the best evaluation so far (step 2) can no longer be selected"
            ) in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["best_step"] == 6


@pytest.mark.parametrize("input_model", ["the same", "changed"])
def test_a_best_at_step_0_is_restored_from_the_input_model_where_it_still_holds_it(
        base, tmp_path, monkeypatch, capsys, input_model):
    """Resumed from step-4, a run evaluated every step (best step 5) has its best so far at
    step 0, whose weights no checkpoint holds: the run said it could no longer be selected
    and ended on step 6's. They are --model's, which still holds them (its weights' digest is
    the run's): the run ends as the one evaluated every 2 steps from the start, on them. Where
    --model changed, the note stays, saying so."""
    import shutil
    from safetensors.torch import load_file
    _scored_by_step(monkeypatch, {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    d, paths = base
    mine = (tmp_path, paths)  # a copy of the input model, which this test may change
    shutil.copytree(d / "base", tmp_path / "base")
    args = ("--lr", "1e-3", "--warmup-steps", "0", "--val-fraction", "0.25", "--world",
            "builtin", "--exec-eval", "2", "--max-steps", "6", "--log-every", "1",
            "--save-every", "1", "--keep-checkpoints", "10")
    straight, out = tmp_path / "straight", tmp_path / "sft"
    assert run_sft(mine, straight, *args, "--eval-every", "2") == 0
    assert json.loads((straight / "config.json").read_text())["best_step"] == 0
    assert run_sft(mine, out, *args, "--eval-every", "1") == 0
    assert json.loads((out / "config.json").read_text())["best_step"] == 5
    if input_model == "changed":
        torch.manual_seed(1)
        tok = sft_module.load_language_model(tmp_path / "base")[1]
        config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
        save_model(tmp_path / "base", GPT(config), tok)
    capsys.readouterr()
    assert run_sft(mine, out, *args, "--eval-every", "2", "--resume-from", "step-4") == 0
    err = capsys.readouterr().err
    meta = json.loads((out / "config.json").read_text())
    if input_model == "changed":
        assert (f"note: {out / 'best'} is missing or holds another evaluation's weights, and no "
                f"checkpoint holds them ({out / 'checkpoints' / 'step-0'} is not there), and "
                f"{tmp_path / 'base'} (--model) no longer holds the weights the run started "
                f"from; the best evaluation so far (step 0) can no longer be selected") in err
        assert meta["best_step"] == 6
        return
    assert "can no longer be selected" not in err
    assert (meta["step"], meta["best_step"], meta["best_score"]) == (6, 0, 0.5)
    a, b = (load_file(run / "model.safetensors") for run in (straight, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(d / "base" / "model.safetensors")
    assert all(torch.equal(c[k], b[k]) for k in c)


def test_a_finished_run_that_kept_its_last_weights_resumed_selecting_ends_on_the_best(base,
                                                                                     tmp_path):
    """A run finished with --no-select-best records its best step (0 here, at lr 3) in OUT's
    config.json, but holds its last weights. Resumed to more steps selecting the best, it took
    OUT for the finished run's best weights: it ended on step 4's, saying it held step 0's,
    the starting weights. It ends on the starting weights, as the run selecting from the
    start does."""
    from safetensors.torch import load_file
    d, _ = base
    args = ("--lr", "3", "--warmup-steps", "0", "--eval-every", "1", "--save-every", "2",
            "--val-fraction", "0.25")
    straight, out = tmp_path / "straight", tmp_path / "sft"
    assert run_sft(base, straight, *args, "--max-steps", "6") == 0
    assert run_sft(base, out, *args, "--max-steps", "4", "--no-select-best") == 0
    assert json.loads((out / "config.json").read_text())["best_step"] == 0
    assert run_sft(base, out, *args, "--max-steps", "6", "--resume") == 0
    metas = [json.loads((run / "config.json").read_text()) for run in (straight, out)]
    assert [(m["step"], m["best_step"]) for m in metas] == [(6, 0)] * 2
    assert metas[0]["val_loss"] == metas[1]["val_loss"]
    start = load_file(d / "base" / "model.safetensors")
    for run in (straight, out):
        got = load_file(run / "model.safetensors")
        assert got.keys() == start.keys() and all(torch.equal(start[k], got[k]) for k in start)


class _Crash(Exception):
    pass


def test_a_later_best_left_by_a_crashed_run_is_not_taken_for_the_checkpoints(base, tmp_path,
                                                                             monkeypatch):
    """A run that died after its checkpoint (step 4) left OUT/best with step 6's weights. Resumed
    to end at the checkpoint's step, it kept those weights under step 4's name and score: OUT
    must hold the weights step 4's evaluation measured, the checkpoint's own."""
    from safetensors.torch import load_file
    args = ("--lr", "1e-3", "--warmup-steps", "0", "--eval-every", "1", "--save-every", "4",
            "--val-fraction", "0.25")
    out = tmp_path / "sft"
    evaluate = sft_module.BestKeeper.__call__

    def crashing(self, model, step, val_loss):
        if step == 7:
            raise _Crash  # the process dies: nothing is saved
        return evaluate(self, model, step, val_loss)

    monkeypatch.setattr(sft_module.BestKeeper, "__call__", crashing)
    with pytest.raises(_Crash):
        run_sft(base, out, *args, "--max-steps", "8")
    monkeypatch.setattr(sft_module.BestKeeper, "__call__", evaluate)
    assert json.loads((out / "best" / "config.json").read_text())["step"] == 6
    assert json.loads((out / "checkpoints" / "latest").read_text().strip()[5:]) == 4
    assert run_sft(base, out, *args, "--max-steps", "4", "--resume") == 0
    meta = json.loads((out / "config.json").read_text())
    assert (meta["step"], meta["best_step"]) == (4, 4)
    a = load_file(out / "model.safetensors")
    b = load_file(out / "checkpoints" / "step-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_evaluation_prints_execution_accuracy_and_a_starting_model_kept_is_named(
        tmp_path, monkeypatch, capsys):
    # The console showed only val_loss although execution accuracy picks the weights, and a
    # run whose best evaluation was step 0 handed back the untrained model without a word.
    paths = task.write_task(tmp_path, n=40)
    tok = train_tokenizer([paths["corpus"]], vocab_size=300)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(tmp_path / "base", GPT(config), tok)
    scores = iter([0.5, 0.25, 0.25])

    def evaluator(world, tokenizer, records, max_new_tokens=96, path=None, context=None):
        return lambda model: next(scores)

    monkeypatch.setattr(execution, "world_exec_evaluator", evaluator)
    sft(SFTConfig(model=str(tmp_path / "base"), data=str(paths["sft"]), out=str(tmp_path / "sft"),
                  world="builtin", val_fraction=0.2, progress=False, device="cpu",
                  max_steps=4, eval_every=2, batch_size=4))
    cap = capsys.readouterr()
    err = cap.err  # the evaluations' lines go to stderr, as the summary does
    assert "exec_acc 0.5000" in err.split("step 0: val_loss", 1)[1].splitlines()[0]
    assert "exec_acc 0.2500" in err.split("step 2: val_loss", 1)[1].splitlines()[0]
    assert "SFT: 4 steps; best evaluation at step 0 (exec_acc 0.5000)" in err
    assert "note: no evaluation after step 0 beat the starting model" in err


def test_a_full_disk_while_a_new_best_is_saved_leaves_the_old_best_whole(base, tmp_path,
                                                                         monkeypatch, capsys):
    """OUT/best was written file by file: a disk full at its config.json left step 5's weights
    under step 4's config.json. Resumed to end at the checkpoint (step 4), the run took them for
    step 4's evaluation and handed them out as its best. Now OUT/best is swapped in whole."""
    import errno

    from safetensors.torch import load_file

    from gptlab import checkpoint as ck
    args = ("--lr", "1e-3", "--warmup-steps", "0", "--eval-every", "1", "--save-every", "4",
            "--val-fraction", "0.25")
    out = tmp_path / "sft"
    write_json = ck.write_json_atomic

    def full_at_step_5(path, obj, **options):
        if obj.get("step") == 5 and "checkpoints" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, obj, **options)
    monkeypatch.setattr(ck, "write_json_atomic", full_at_step_5)
    assert run_sft(base, out, *args, "--max-steps", "8") == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"gptlab sft: error: {out / 'best' / 'config.json'}, ")
    assert error.endswith(": No space left on device")
    monkeypatch.undo()
    step_4 = load_file(out / "checkpoints" / "step-4" / "model.safetensors")
    best = load_file(out / "best" / "model.safetensors")
    assert json.loads((out / "best" / "config.json").read_text())["step"] == 4
    assert all(torch.equal(best[k], step_4[k]) for k in step_4)  # every evaluation improved
    assert run_sft(base, out, *args, "--max-steps", "4", "--resume") == 0
    meta = json.loads((out / "config.json").read_text())
    assert (meta["step"], meta["best_step"]) == (4, 4)
    final = load_file(out / "model.safetensors")
    assert final.keys() == step_4.keys() and all(torch.equal(final[k], step_4[k]) for k in final)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def _keeper(tmp_path, monkeypatch, **kw):
    saved = []
    monkeypatch.setattr(sft_module, "replace_model",
                        lambda d, m, t, extra: saved.append(extra["step"]))
    return sft_module.BestKeeper(tmp_path, None, **kw), saved


def test_an_equal_evaluation_neither_replaces_the_best_nor_counts_as_progress(tmp_path,
                                                                               monkeypatch):
    # The untrained model's step 0 is kept when nothing after it does strictly better, and an
    # evaluation that only matches the best loss so far is one without progress.
    keeper, saved = _keeper(tmp_path, monkeypatch, exec_eval=lambda m: 0.5, patience=2)
    stops = [keeper(None, 100 * i, 2.0).get("stop", False) for i in range(3)]
    assert saved == [0] and keeper.best_step == 0 and keeper.best_val_loss == 2.0
    assert stops == [False, False, True]


def test_resuming_replays_the_evaluation_at_the_checkpoints_own_step(tmp_path, monkeypatch):
    save_model(tmp_path / "best", GPT(get_preset("tiny")),  # OUT/best of the interrupted run
               extra={"stage": "sft", "step": 200})
    keeper, saved = _keeper(tmp_path, monkeypatch)
    rows = [{"step": s, "val_loss": v} for s, v in ((0, 3.0), (100, 2.0), (200, 1.0), (300, 0.5))]
    keeper.restore(rows, upto=200)  # step 300 came after the checkpoint: not counted
    assert keeper.best_step == 200 and keeper.best == -1.0
    keeper(None, 300, 1.5)  # worse than step 200's: OUT/best keeps step 200's weights
    assert saved == [] and keeper.best_step == 200


def test_a_small_data_set_still_holds_out_one_demonstration():
    examples = [Example([1, 2, 3], [0, 1, 1], id=i, line=i + 1) for i in range(10)]
    train, val = sft_module.split_examples(examples, 0.05, seed=0)
    assert len(val) == 1 and len(train) == 9
    assert sorted(e.id for e in train + val) == list(range(10))
    assert sft_module.split_examples(examples[:1], 0.05, seed=0) == (examples[:1], [])


@pytest.mark.parametrize("select_best", [True, False])
def test_out_holds_the_best_or_the_last_weights_with_their_own_validation_loss(
        base, tmp_path, monkeypatch, capsys, select_best):
    from safetensors.torch import load_file
    from gptlab.checkpoint import read_meta
    from gptlab.train.loop import TrainResult

    def train(model, batches, loss_fn, cfg, out, on_eval=None, **kwargs):
        on_eval(model, 0, 2.0)                 # the best evaluation
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        on_eval(model, 1, 3.0)                 # a worse one, the last
        return TrainResult(step=1, total_steps=1, loss=1.0, val_loss=3.0, tokens=0,
                           tokens_per_s=0.0, elapsed_s=0.0, checkpoint=None)

    monkeypatch.setattr(sft_module, "train", train)
    d, paths = base
    out = tmp_path / "sft"
    sft(SFTConfig(model=str(d / "base"), data=str(paths["sft"]), out=str(out), val_fraction=0.2,
                  select_best=select_best, progress=False, device="cpu"))
    meta = read_meta(out)
    assert meta["best_step"] == 0 and meta["best_score"] == -2.0
    assert meta["val_loss"] == (2.0 if select_best else 3.0)
    start, got = load_file(d / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    shift = 0.0 if select_best else 0.01
    assert all(torch.allclose(got[k], start[k] + shift, atol=1e-6) for k in start)
    # The summary says which weights OUT holds (the control's said "best evaluation at step 0").
    err = capsys.readouterr().err
    assert ("SFT: 1 step; best evaluation at step 0 (val_loss 2.0000); saved" if select_best
            else "SFT: 1 step; the last weights, step 1 (best evaluation at step 0 (val_loss "
            "2.0000), not selected); saved") in err


def test_a_keeper_that_does_not_select_writes_no_weights(tmp_path, monkeypatch):
    keeper, saved = _keeper(tmp_path, monkeypatch, keep_weights=False)
    for step, loss in ((0, 2.0), (100, 1.0)):
        keeper(None, step, loss)
    assert saved == [] and keeper.best_step == 100


def test_a_resume_refuses_what_evaluations_measure_and_notes_when_they_are_made(base, tmp_path,
                                                                                 capsys):
    """val_data, world (and, with a world, exec_eval and max_new_tokens) decide what an
    evaluation measures: changed on resume, one best-step choice compared evaluations of two
    kinds. They are refused, naming the field, before anything is written; eval_every, patience
    and select_best decide when evaluations are made and what is done with them: allowed, with
    a note."""
    import hashlib
    d, paths = base
    out, val = tmp_path / "sft", tmp_path / "val.jsonl"
    val.write_text("".join(paths["sft"].read_text().splitlines(keepends=True)[:5]))
    other = tmp_path / "other-val.jsonl"  # not --data itself, which is refused on any run
    other.write_text("".join(paths["sft"].read_text().splitlines(keepends=True)[5:10]))
    keep = ("--save-every", "1", "--keep-checkpoints", "10")
    first = (*keep, "--eval-every", "1", "--val-data", str(val))
    assert run_sft(base, out, *first) == 0
    (out / "checkpoints" / "latest").write_text("step-1\n")  # the first run's end, continued to 3
    files = snapshot(out)
    step1 = out / "checkpoints" / "step-1"
    for args, field, shown in (
            ([], "val_data", f"val_data: {str(val)!r} there, None now"),
            (["--val-data", str(other)], "--val-data",
             f"val_data: {str(val)!r} there, {str(other)!r} now"),
            (["--val-data", str(val), "--world", "builtin"], "--world",
             "world: None there, 'builtin' now")):
        assert run_sft(base, out, "--resume", "--max-steps", "3", *keep,
                       *args) == 2
        err = capsys.readouterr().err
        assert f"{step1}, field '{field}': was written with other settings ({shown}); they " \
               f"decide what each evaluation measures" in err
        assert snapshot(out) == files  # nothing written
    # The same file spelled another way is the same setting; the others are noted.
    rel = str(val.relative_to(tmp_path.parent))
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path.parent)
    try:
        assert run_sft(base, out, "--resume", "--max-steps", "3", *keep,
                       "--val-data", rel, "--eval-every", "2", "--patience", "3",
                       "--no-select-best") == 0
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "note: eval_every changed from 1 to 2 on resume; the best step is chosen among " \
           "evaluations at both intervals" in err
    assert "note: patience changed from 0 to 3 on resume" in err
    assert "note: select_best changed from True to False on resume" in err
    assert json.loads((out / "config.json").read_text())["step"] == 3
    # A checkpoint from before these settings were recorded resumes, on any.
    config = step1 / "config.json"
    meta = json.loads(config.read_text())
    del meta["eval_settings"]
    config.write_text(json.dumps(meta))
    manifest = json.loads((step1 / "manifest.json").read_text())
    manifest["sha256"]["config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (step1 / "manifest.json").write_text(json.dumps(manifest))
    (out / "checkpoints" / "latest").write_text("step-1\n")
    assert run_sft(base, out, "--resume", "--max-steps", "2", *keep) == 0
    assert "on resume;" not in capsys.readouterr().err


def test_with_a_world_its_question_count_and_answer_length_are_kept_on_resume(tmp_path, capsys):
    from gptlab.train.sft import check_resume_settings
    settings = {"val_data": None, "world": "builtin", "exec_eval": 200, "max_new_tokens": 96,
                "eval_every": 100, "patience": 0, "select_best": True}
    (tmp_path / "config.json").write_text(json.dumps({"eval_settings": settings}))
    cfg = SFTConfig(world="builtin")
    check_resume_settings(cfg, tmp_path)
    for change in ({"exec_eval": 50}, {"max_new_tokens": 32}):
        with pytest.raises(UserError) as err:
            check_resume_settings(dataclasses.replace(cfg, **change), tmp_path)
        [(field, value)] = change.items()
        assert err.value.field == field and f"{field}: {settings[field]} there, {value} now" \
            in str(err.value)
    # Without a world they measure nothing.
    settings["world"] = None
    (tmp_path / "config.json").write_text(json.dumps({"eval_settings": settings}))
    check_resume_settings(SFTConfig(exec_eval=5, max_new_tokens=8), tmp_path)
    assert capsys.readouterr().err == ""


def test_a_resume_without_max_steps_keeps_the_runs_own_length_not_the_epochs(base, tmp_path):
    """A fixed-length run resumed with the same command less --max-steps continues to its own
    length, as pretraining's does; --epochs (here 28 steps) sets only a new run's."""
    from gptlab.cli import main
    d, paths = base
    out = tmp_path / "sft"
    args = ["sft", "--model", str(d / "base"), "--data", str(paths["sft"]), "--out", str(out),
            "--batch-size", "4", "--eval-every", "0", "--no-progress", "--device", "cpu"]
    assert main(args + ["--max-steps", "2"]) == 0
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 2


def test_batch_size_times_grad_accum_trains_as_one_batch_of_them_all(base, tmp_path):
    # The demonstrations' completions differ in length, so two micro-batches of 2 hold unequal
    # numbers of target tokens: the loss is the per-token mean over all 4, as in a batch of 4.
    from safetensors.torch import load_file
    weights = []
    for name, args in (("one", ["--batch-size", "4"]),
                       ("accumulated", ["--batch-size", "2", "--grad-accum", "2"])):
        assert run_sft(base, tmp_path / name, *args, "--max-steps", "3",
                       "--no-select-best", "--lr", "1e-2", "--warmup-steps", "0") == 0
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    start = load_file(base[0] / "base" / "model.safetensors")
    assert max(float((weights[0][k] - start[k]).abs().max()) for k in start) > 1e-3  # it trained
    for k in start:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=2e-5)
    rows = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text()
             .splitlines()] for n in ("one", "accumulated")]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_the_validation_loss_does_not_depend_on_how_the_validation_set_is_batched(base, tmp_path):
    # Completions differ in length: the step-0 validation loss is the per-token mean over the
    # whole held-out set whatever the batch size (a mean of batch means was not).
    losses = []
    for size in ("1", "3", "64"):
        assert run_sft(base, tmp_path / size, "--batch-size", size, "--val-fraction", "0.25",
                       "--no-select-best") == 0
        rows = [json.loads(line) for line in (tmp_path / size / "metrics.jsonl").read_text()
                .splitlines()]
        losses.append(next(r["val_loss"] for r in rows if r["step"] == 0 and "val_loss" in r))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)


def _swap_input_model(tmp_path, seed: int) -> None:
    """tmp_path/base: the base fixture's model with other weights (seed 0: the base's own)."""
    tok = sft_module.load_language_model(tmp_path / "base")[1]
    torch.manual_seed(seed)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, context=64)
    save_model(tmp_path / "base", GPT(config), tok)


_STEP0_ARGS = ("--lr", "1e-3", "--warmup-steps", "0", "--val-fraction", "0.25", "--world",
               "builtin", "--exec-eval", "2", "--log-every", "1", "--eval-every", "1",
               "--save-every", "1", "--keep-checkpoints", "10")


def test_a_session_resumed_on_another_input_model_still_records_the_runs_start(
        base, tmp_path, monkeypatch, capsys):
    """Steps 0 to 2 on the input model (best: step 0), 3 and 4 resumed on another one (best:
    step 4), then resumed from step-3 on the first again: step-3, the second session's, records
    the digest of the weights the run started from, not the second input's, so step 0's best is
    taken from --model. Recording the session's own input passed every test (mutation testing):
    the last resume said step 0 could no longer be selected."""
    import shutil
    from safetensors.torch import load_file
    _scored_by_step(monkeypatch, {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.2, 4: 0.9})
    d, paths = base
    shutil.copytree(d / "base", tmp_path / "base")
    mine, out = (tmp_path, paths), tmp_path / "sft"
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "2") == 0
    _swap_input_model(tmp_path, 1)
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "4", "--resume") == 0
    assert json.loads((out / "config.json").read_text())["best_step"] == 4
    _swap_input_model(tmp_path, 0)
    capsys.readouterr()
    restored = []
    replace = sft_module.replace_model
    monkeypatch.setattr(sft_module, "replace_model", lambda path, model, tok, extra: (
        restored.append((extra["step"], {k: v.clone() for k, v in model.state_dict().items()})),
        replace(path, model, tok, extra=extra))[1])
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "4", "--resume-from", "step-3") == 0
    assert "can no longer be selected" not in capsys.readouterr().err
    step, weights = restored[0]  # OUT/best held step 4's: step 0's came back first
    c = load_file(d / "base" / "model.safetensors")
    assert step == 0 and all(torch.equal(c[k], weights[k]) for k in c)


def test_a_run_whose_checkpoints_record_no_start_digest_says_so_of_step_0(
        base, tmp_path, monkeypatch, capsys):
    """A checkpoint from before checkpoints recorded the input model's digest: a best at step 0
    that OUT/best no longer holds cannot be checked against --model, and the note says that
    (not that --model changed: each message in the other's place passed every test)."""
    _scored_by_step(monkeypatch, {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    out = tmp_path / "sft"
    assert run_sft(base, out, *_STEP0_ARGS, "--max-steps", "6") == 0
    read_meta = sft_module.read_meta
    monkeypatch.setattr(sft_module, "read_meta", lambda p: {
        k: v for k, v in read_meta(p).items() if k != "start_key"})
    capsys.readouterr()
    assert run_sft(base, out, *_STEP0_ARGS, "--max-steps", "6", "--eval-every", "2",
                   "--resume-from", "step-4") == 0
    assert (f"note: {out / 'best'} is missing or holds another evaluation's weights, and no "
            f"checkpoint holds them ({out / 'checkpoints' / 'step-0'} is not there), and the "
            f"run's checkpoints record no digest of the input model's weights to check it by; "
            f"the best evaluation so far (step 0) can no longer be selected"
            ) in capsys.readouterr().err


def test_a_changed_input_model_is_not_named_in_the_note_of_a_best_after_step_0(
        base, tmp_path, monkeypatch, capsys):
    """--model matters to step 0's weights alone: where step 2's cannot be found, the note says
    why and names no change of --model (naming it for any best step passed every test)."""
    import shutil
    _scored_by_step(monkeypatch, {0: 0.0, 1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    d, paths = base
    shutil.copytree(d / "base", tmp_path / "base")
    mine, out = (tmp_path, paths), tmp_path / "sft"
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "6") == 0
    ckpt = out / "checkpoints" / "step-2"
    shutil.rmtree(ckpt)
    _swap_input_model(tmp_path, 1)
    capsys.readouterr()
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "6", "--eval-every", "2",
                   "--resume-from", "step-4") == 0
    assert (f"note: {out / 'best'} is missing or holds another evaluation's weights, and no "
            f"checkpoint holds them ({ckpt} is not there); the best evaluation so far (step 2) "
            f"can no longer be selected") in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["best_step"] == 6


def test_an_input_model_changed_past_its_head_no_longer_holds_the_runs_start(
        base, tmp_path, monkeypatch, capsys):
    """One weight of a block changed in --model (its embeddings and head as they were) is
    another start: the digest covers every weight (one of the head alone passed every test,
    and step 0's best came back from the changed model)."""
    import shutil
    from gptlab.checkpoint import load_model
    _scored_by_step(monkeypatch, {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.2, 4: 0.3, 5: 0.9, 6: 0.2})
    d, paths = base
    shutil.copytree(d / "base", tmp_path / "base")
    mine, out = (tmp_path, paths), tmp_path / "sft"
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "6") == 0
    model, tok, _ = load_model(tmp_path / "base")
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] += 0.5
    save_model(tmp_path / "base", model, tok)
    capsys.readouterr()
    assert run_sft(mine, out, *_STEP0_ARGS, "--max-steps", "6", "--eval-every", "2",
                   "--resume-from", "step-4") == 0
    assert (f"{tmp_path / 'base'} (--model) no longer holds the weights the run started from; "
            f"the best evaluation so far (step 0) can no longer be selected"
            ) in capsys.readouterr().err


def test_a_resume_replays_its_checkpoints_evaluations_not_an_abandoned_lines(
        base, tmp_path, monkeypatch):
    """metrics.jsonl with step 1's evaluation rewritten, as a line forked before it and
    abandoned would leave it (execution accuracy 0.9, the best of all): resumed from step-2,
    whose rows are the run's own, the best is the run's step 4, not that step 1 (replaying
    metrics.jsonl up to the step passed every test)."""
    from gptlab.train.loop import read_metrics
    _scored_by_step(monkeypatch, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5})
    out = tmp_path / "sft"
    assert run_sft(base, out, *_STEP0_ARGS, "--max-steps", "4") == 0
    rows = read_metrics(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text("".join(json.dumps(
        {**r, "exec_acc": 0.9} if r["step"] == 1 and "exec_acc" in r else r) + "\n"
        for r in rows))
    assert run_sft(base, out, *_STEP0_ARGS, "--max-steps", "4", "--resume-from", "step-2") == 0
    meta = json.loads((out / "config.json").read_text())
    assert (meta["best_step"], meta["best_score"]) == (4, 0.5)
    assert [r["exec_acc"] for r in read_metrics(out / "metrics.jsonl") if "exec_acc" in r] == [
        0.1, 0.2, 0.3, 0.4, 0.5]
