"""The whole recipe on the built-in world, start to report:

    world → tokenizer + pretraining → SFT → round 1: sample → label → reward model → PPO
    → rounds 2..R: sample from the current policy → label → retrain the reward model → more PPO
    → the control (SFT trained further for as many optimizer steps as PPO took) → evaluation

Every stage writes its own model directory under OUT, so each can be inspected, reused or
rerun with its own verb. A stage whose output is complete is not run again: rerunning the
same pipeline into the same OUT continues where it stopped, and first removes the temporaries
that killed writes left under OUT (`remove_killed_writes_temps`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from gptlab.checkpoint import Checkpointer, is_gptlab_dir, load_model
from gptlab.errors import UserError, counted, reports_path_errors
from gptlab.io import (TEMP_NAME, check_dir_out, check_holds_none, read_jsonl,
                       remove_stale_temps, restore_non_finite, write_json_atomic,
                       write_jsonl_atomic)
from gptlab.train.loop import run_by_caller, select_device

if TYPE_CHECKING:
    from gptlab.train.ppo import PPOConfig
    from gptlab.train.pretrain import PretrainConfig
    from gptlab.train.reward import RewardConfig
    from gptlab.train.sft import SFTConfig


@dataclass
class PipelineConfig:
    """Settings of `gptlab pipeline`: the whole recipe on the built-in world."""

    preset: str = field(default="demo", metadata={"help": "model preset to pretrain"})
    out: str = field(default="runs/demo", metadata={"help": "run directory"})
    rounds: int = field(default=2, metadata={"help": "rounds of sample → label → RM → PPO"})
    seed: int = field(default=0, metadata={
        "help": "random seed of every stage (0 to 2**64 - 101: a stage's is seed + up to 100)"})
    world: str | None = field(default=None, metadata={
        "help": "an exported world directory (default: export the built-in world into OUT)"})
    world_seed: int = field(default=0, metadata={
        "help": "seed of the built-in world exported into OUT (not with --world)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's choice); a stage resumed on another "
                "count than it ran on is warned of"})
    # pretraining
    pretrain_steps: int = field(default=150, metadata={"help": "pretraining steps"})
    pretrain_batch: int = field(default=8, metadata={"help": "pretraining batch size"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "pretraining learning rate"})
    # SFT, to its validation optimum
    sft_examples: int | None = field(default=1500, metadata={  # PPO sees every prompt
        "help": "demonstrations SFT trains on (null: all of them)"})
    sft_steps: int = field(default=2000, metadata={
        "help": "SFT's step cap; it stops earlier once validation stops improving"})
    sft_patience: int = field(default=3, metadata={
        "help": "SFT evaluations without a better execution accuracy before it stops"})
    sft_batch: int = field(default=16, metadata={"help": "SFT batch size"})
    sft_lr: float = field(default=1e-3, metadata={"help": "SFT learning rate"})
    sft_eval_every: int = field(default=100, metadata={"help": "SFT steps between evaluations"})
    sft_exec_eval: int = field(default=150, metadata={
        "help": "validation questions SFT scores by execution accuracy"})
    demonstrator_flaw: str | None = field(default=None, metadata={
        "help": "a careless demonstrator's habit in part of SFT's data, which execution-based "
                "rankings reveal: order (ORDER BY direction reversed), inclusive (>= for >) "
                "or star (SELECT * for the columns asked)"})
    demonstrator_flaw_rate: float = field(default=0.8, metadata={
        "help": "share of the demonstrations --demonstrator-flaw applies to"})
    # feedback
    # Training prompts sampled per round. Most of SFT's K answers to a prompt are the same, so
    # a fifth to a half of them can be ranked: 1,024 give the reward model 210-580 rankings a
    # round (512 gave 100-320, and reward models below 0.80 on their held-out pairs).
    sample_prompts: int = field(default=1024, metadata={
        "help": "training prompts sampled per round"})
    k: int = field(default=8, metadata={"help": "responses per prompt"})
    # SFT on the demonstrations is confident: at T = 1 nearly all K answers of a prompt are the
    # same, which leaves nothing to rank and nothing for PPO to explore; 1.5 gives both.
    sample_temperature: float = field(default=1.5, metadata={
        "help": "temperature of the samples the labelers rank"})
    disagreement: float = field(default=0.1, metadata={
        "help": "the simulated labelers' noise: the expected share of pairs of levels they flip "
                "(verdict tiers; with --no-ties, single answers), in [0, 0.5]"})
    ties: bool = field(default=True, metadata={
        "help": "labelers tie answers of one verdict tier (correct / wrong / error)"})
    # reward model
    reward_epochs: float = field(default=2.0, metadata={"help": "reward model epochs per round"})
    reward_batch: int = field(default=8, metadata={"help": "rankings per reward model batch"})
    reward_lr: float = field(default=2e-4, metadata={"help": "reward model learning rate"})
    # PPO
    ppo_steps: int = field(default=20, metadata={"help": "PPO steps per round"})
    ppo_batch: int = field(default=32, metadata={"help": "prompts per PPO rollout"})
    ppo_minibatch: int = field(default=16, metadata={"help": "rollouts per PPO update"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO epochs over each rollout batch"})
    ppo_lr: float = field(default=5e-5, metadata={"help": "PPO learning rate"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta of PPO's per-token KL penalty"})
    # As sample_temperature: the labelers saw such samples too.
    ppo_temperature: float = field(default=1.5, metadata={
        "help": "PPO's temperature, in rollouts and updates alike"})
    # Chosen on validation (README, "Defaults worth knowing").
    ptx_coef: float = field(default=0.002, metadata={
        "help": "weight of PPO's language-model loss on the world's corpus (PPO-ptx)"})
    max_new_tokens: int = field(default=80, metadata={
        "help": "longest response sampled (SFT's evaluation, samples, PPO, the test)"})
    # evaluation
    eval_limit: int | None = field(default=None, metadata={
        "help": "test questions evaluated (default: the whole test split)"})
    headroom: bool = field(default=False, metadata={
        "help": "also measure what feedback could gain: best-of-K from SFT, and PPO on the "
                "execution reward (a perfect reward model) for as many steps as the rounds, on "
                "the training prompts and, as a ceiling, on the test's own prompts"})
    headroom_k: int = field(default=8, metadata={"help": "K of --headroom's best-of-K"})
    progress: bool = field(default=False, metadata={"help": "progress bars on stderr"})

    def check(self) -> None:
        """Raise a UserError naming the first option with an impossible value (before any
        stage runs), or an OUT or a world that cannot be this run's."""
        self.check_values()
        # More threads than cores only contend; 10**30 was an overflow in torch, 100000 a crash
        # of the tokenizer's thread pool, both after OUT was written. (The machine's, not the
        # value's: checked where the run starts, not as the config loads.)
        if self.threads is not None and self.threads > usable_cpus():
            raise UserError(f"must be at most {usable_cpus()}, the CPU cores this process may "
                            f"use, got {self.threads}", field="threads")
        check_dir_out(self.out, field="out")
        check_out_is_its_own(Path(self.out))
        if self.world:
            from gptlab.world.build import world_manifest
            world_manifest(self.world, field="world")

    def check_values(self) -> None:
        """Raise a UserError naming the first option whose value no run can take (`rules`, a
        demonstrator flaw unknown): reading no file, it runs in the config loader too, which
        names the YAML line or the flag that wrote the value."""
        from gptlab.train.loop import check_fields
        check_fields(self, self.rules)  # the types first: the preset is looked up by name
        if self.world and self.world_seed != 0:
            # Unused, it was recorded as the run's and shown in the report as the world's seed.
            raise UserError("is not used with world (--world), which was exported with its own "
                            "seed (its world.json); drop it, or export a world with that seed "
                            "(gptlab world export --seed)", field="world_seed")
        if self.demonstrator_flaw:
            from gptlab.world.demonstrators import check_flaw
            check_flaw(self.demonstrator_flaw, self.demonstrator_flaw_rate)

    def rules(self) -> list[tuple[str, bool, str]]:
        """(option, holds, what is expected); a preset that is no decoder-only GPT is refused."""
        from gptlab.model.gpt import GPTConfig
        from gptlab.model.presets import get_preset
        try:
            model = get_preset(self.preset)
        except UserError as e:
            raise UserError(e.message, field="preset") from None
        if not isinstance(model, GPTConfig):
            raise UserError(f"preset '{self.preset}' is not a decoder-only GPT", field="preset")
        context = model.context
        return [
            ("rounds", self.rounds >= 1, "must be >= 1"),
            # Every stage's seed is derived from it (seed + round, seed + 7, seed + 100), and a
            # stage refuses one outside [0, 2**64): numpy's generators take none below 0,
            # torch's none of 2**64 or more. Refused here, not by a later stage hours in.
            ("seed", 0 <= self.seed <= max_seed(self.rounds),
             f"must be in [0, {max_seed(self.rounds)}] (each stage's seed, up to seed + "
             f"{max(self.rounds, STAGE_SEED_OFFSET)}, must be below 2**64)"),
            ("threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            ("pretrain_steps", self.pretrain_steps >= 1, "must be >= 1"),
            ("pretrain_batch", self.pretrain_batch >= 1, "must be >= 1"),
            ("pretrain_lr", self.pretrain_lr > 0, "must be > 0"),
            ("sft_examples", self.sft_examples is None or self.sft_examples >= 1,
             "must be >= 1"),
            ("sft_steps", self.sft_steps >= 1, "must be >= 1"),
            ("sft_patience", self.sft_patience >= 0, "must be >= 0"),
            ("sft_batch", self.sft_batch >= 1, "must be >= 1"),
            ("sft_lr", self.sft_lr > 0, "must be > 0"),
            ("sft_eval_every", self.sft_eval_every >= 0, "must be >= 0"),
            ("sft_exec_eval", self.sft_exec_eval >= 0, "must be >= 0"),
            ("demonstrator_flaw_rate", 0 <= self.demonstrator_flaw_rate <= 1,
             "must be in [0, 1]"),
            ("sample_prompts", self.sample_prompts >= 1, "must be >= 1"),
            ("k", self.k >= 2, "must be >= 2 (responses to rank per prompt)"),
            ("sample_temperature", self.sample_temperature > 0, "must be > 0"),
            ("disagreement", 0 <= self.disagreement <= 0.5,
             "must be in [0, 0.5] (0.5 is a random ranking)"),
            ("reward_epochs", self.reward_epochs > 0, "must be > 0"),
            ("reward_batch", self.reward_batch >= 1, "must be >= 1"),
            ("reward_lr", self.reward_lr > 0, "must be > 0"),
            ("ppo_steps", self.ppo_steps >= 1, "must be >= 1"),
            ("ppo_batch", self.ppo_batch >= 1, "must be >= 1"),
            ("ppo_minibatch", 1 <= self.ppo_minibatch <= self.ppo_batch,
             f"must be in [1, ppo_batch ({self.ppo_batch})]"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("ppo_lr", self.ppo_lr > 0, "must be > 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("ppo_temperature", self.ppo_temperature >= 0.01, "must be >= 0.01"),
            ("ptx_coef", self.ptx_coef >= 0, "must be >= 0"),
            ("max_new_tokens", 1 <= self.max_new_tokens < context,
             f"must be in [1, {context}) (the preset's context is {context})"),
            ("eval_limit", self.eval_limit is None or self.eval_limit >= 1, "must be >= 1"),
            ("headroom_k", self.headroom_k >= 1, "must be >= 1"),
        ]


# What a model directory, a training run or an exported world holds: a pipeline's stage, or
# another verb's output, never a pipeline's OUT.
STAGE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "run.json", "checkpoints",
               "world.json")


def check_out_is_its_own(out: Path) -> None:
    """Refuse an OUT inside another pipeline run (one of its stages, or beside them: the two
    runs' files would mix, and removing a stage of one would remove the other) or one that
    holds a model, a training run or a world rather than a pipeline run."""
    where = out.resolve()
    for parent in where.parents:
        if _is_pipeline_record(parent / "pipeline.json"):
            raise UserError(f"is inside the pipeline run {parent}; choose an out (--out) "
                            f"outside it",
                            path=out, field="out")
    if where.is_dir() and not (where / "pipeline.json").exists():
        check_holds_none(out, STAGE_FILES)


def _is_pipeline_record(path: Path) -> bool:
    """Whether `path` is the pipeline.json a pipeline run keeps (its settings), not another
    tool's file of that common name in a folder above (a project's own pipeline.json)."""
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"preset", "rounds"} <= record.keys()


# Settings that add work without changing a finished stage: a rerun may change them.
ADDITIVE = ("progress", "threads", "out", "headroom", "headroom_k")

# The options each stage is made from, besides the stages before it ("world_digest" is the
# world's own identity: a re-exported world with other options is another world). A rerun may
# change an option that no started stage depends on; one that a started stage was made with is
# refused, naming the stages (remove them to redo them with the new settings).
WORLD_OPTIONS = ("world", "world_seed", "world_digest")
PRETRAIN_OPTIONS = ("preset", "seed", "pretrain_steps", "pretrain_batch", "pretrain_lr")
SFT_OPTIONS = ("sft_examples", "sft_steps", "sft_patience", "sft_batch", "sft_lr",
               "sft_eval_every", "sft_exec_eval", "demonstrator_flaw", "demonstrator_flaw_rate",
               "max_new_tokens")
FEEDBACK_OPTIONS = ("sample_prompts", "k", "sample_temperature", "disagreement", "ties")
REWARD_OPTIONS = ("reward_epochs", "reward_batch", "reward_lr")
PPO_OPTIONS = ("ppo_steps", "ppo_batch", "ppo_minibatch", "ppo_epochs", "ppo_lr", "kl_coef",
               "ppo_temperature", "ptx_coef")


def stage_dependencies(rounds: int) -> list[tuple[str, set[str]]]:
    """(a stage's path under OUT, every option it depends on), in the order the stages run."""
    sft = set(WORLD_OPTIONS + PRETRAIN_OPTIONS + SFT_OPTIONS)
    subset = set(WORLD_OPTIONS) | {"seed", "sft_examples", "demonstrator_flaw",
                                   "demonstrator_flaw_rate"}
    stages = [("world", set(WORLD_OPTIONS)), ("pretrain", set(WORLD_OPTIONS + PRETRAIN_OPTIONS)),
              ("sft_data.jsonl", subset), ("sft", sft)]
    before = sft
    for rnd in range(1, rounds + 1):
        feedback = before | set(FEEDBACK_OPTIONS)
        reward = feedback | set(REWARD_OPTIONS)
        before = reward | set(PPO_OPTIONS)
        # (A round's samples are drawn again until its rankings are written.)
        stages += [(f"round-{rnd}/rankings.jsonl", feedback), (f"round-{rnd}/reward", reward),
                   (f"round-{rnd}/ppo", before)]
    # The controls take as many steps as every round of PPO together.
    steps = {"rounds", "ppo_steps", "ppo_batch", "ppo_minibatch", "ppo_epochs"}
    stages += [("sft_continued", sft | steps),
               ("ppo_execution_reward", sft | set(PPO_OPTIONS) | steps),
               ("ppo_execution_reward_on_test", sft | set(PPO_OPTIONS) | steps)]
    return stages


def world_digest(world_dir: Path) -> str | None:
    """The exported world's identity: its manifest (options, schema, gold-SQL fingerprint)."""
    manifest = world_dir / "world.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None


def stage_done(path: Path) -> bool:
    return is_gptlab_dir(path)


# A finished model stage (config.json is written last) holds these too; a later stage or the
# evaluation reads them.
MODEL_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json")


def missing_from_finished(out: Path, world_dir: Path,
                          stages: list[str]) -> tuple[Path, Path] | None:
    """(a finished stage, the first file it lacks), for the stages at `stages` under `out` and
    the world: a finished stage is reused as it is, so one damaged or copied in part after it
    finished would fail only when a later stage reads it, or be mixed with a redone part."""
    from gptlab.world.build import FILES
    if (world_dir / "world.json").exists():
        for name in FILES:
            if not (world_dir / name).exists():
                return world_dir, world_dir / name
    for stage in stages:
        path = out / stage
        needs: tuple[str, ...] = ()
        if stage_done(path):
            needs = MODEL_FILES
        elif path.name == "rankings.jsonl" and path.exists():
            needs = ("samples.jsonl",)  # round 1's scale every reward model's scores
        for name in needs:
            file = (path if stage_done(path) else path.parent) / name
            if not file.exists():
                return path, file
        if stage.endswith("/reward") and stage_done(path) and \
                not (path.parent / "rankings_all.jsonl").exists():
            return path, path.parent / "rankings_all.jsonl"  # the evaluation reads it
    return None


def _read_record(path: Path, keeps: str) -> dict:
    """The JSON object in `path`, a record the pipeline wrote (`keeps`: what it is for); one
    edited by hand into something else is a UserError naming it."""
    try:
        record = restore_non_finite(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"is not the JSON object the pipeline wrote ({e}); {keeps}",
                        path=path) from None
    if not isinstance(record, dict):
        raise UserError(f"is not the JSON object the pipeline wrote; {keeps}", path=path)
    return record


_SETTINGS_RECORD = ("it holds the settings the run's stages were made with: put it back as it "
                    "was, or choose another out (--out)")
_MINUTES_RECORD = "it only records what the stages took: remove it to start the record anew"


def _interrupted(out: Path) -> bool:
    """A stage stopped (by Ctrl-C) after a checkpoint: rerunning continues from it."""
    return Checkpointer(out).latest() is not None


def _state(out: Path) -> dict[str, Any]:
    """`Timer.run`'s `done` and `resumes` (the checkpoint it continues from) for the training
    stage writing `out`."""
    done = stage_done(out)
    return {"done": done, "resumes": None if done else Checkpointer(out).latest()}


def _counts(value: Any, path: Path, name: str) -> list[int]:
    """A stage's thread counts as stage_threads.json (`path`) holds them at stage `name`: a
    list, in the order the stage ran on them, or (written before a resume could add one) a
    count alone. A value edited by hand into something else is a UserError naming the field:
    dropped, the stage's counts were lost from the record and report.json's `threads`."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"must be a thread count (an integer >= 1) or a list of them, got "
                            f"{value!r:.80}; {_MINUTES_RECORD}", path=path, field=name)
    return list(values)


def _minutes(record: Any, path: Path, field: str | None = None) -> dict[str, float]:
    """Minutes per stage as `path` holds them (at `field`); a record edited by hand into
    something else is a UserError naming the field (it was a TypeError as the minutes were
    added up)."""
    if not isinstance(record, dict):
        raise UserError(f"must be an object of stage name -> minutes, got {record!r:.80}; "
                        f"{_MINUTES_RECORD}", path=path, field=field)
    for name, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:  # (-5 made the report's total -4.7)
            raise UserError(f"must be a number of minutes (0 or more), got {value!r:.80}; "
                            f"{_MINUTES_RECORD}", path=path,
                            field=f"{field}.{name}" if field else name)
    return dict(record)


def _ran_on(ran: list[int], saved_on: int) -> str:
    """The counts a stage ran on, for a warning that names its checkpoint's: nothing where that
    is all it ran on."""
    return "" if ran in ([], [saved_on]) else f" (it ran on {', then '.join(map(str, ran))})"


class Timer:
    """Minutes per stage, kept in OUT/stage_minutes.json as each stage ends. A stage that a rerun
    finds finished keeps the minutes it took when it ran, so adding `--headroom` to a finished
    run (or resuming one) still reports what every stage cost. The CPU threads each stage ran
    on are kept beside them (OUT/stage_threads.json: a list, one more each time the stage is
    resumed on another count), written as it starts: `--threads` may change on a rerun,
    sampling on another thread count can draw other samples, and a stage resumed from its
    checkpoint on another count than it stopped on is warned of."""

    def __init__(self, out: Path) -> None:
        self.record, self.threads_record = out / "stage_minutes.json", out / "stage_threads.json"
        self.minutes: dict[str, float] = {}
        self.earlier: dict[str, float] = {}
        self.threads: dict[str, list[int]] = {}
        if self.threads_record.exists():
            self.threads = {name: _counts(v, self.threads_record, name) for name, v in
                            _read_record(self.threads_record, _MINUTES_RECORD).items()}
        if self.record.exists():
            self.earlier = _minutes(_read_record(self.record, _MINUTES_RECORD), self.record)
        elif (out / "report.json").exists():
            # Runs made before stage_minutes.json: their report has the same figures.
            report = _read_record(out / "report.json", _MINUTES_RECORD)
            minutes = report.get("stage_minutes")
            self.earlier = {} if minutes is None else _minutes(minutes, out / "report.json",
                                                               "stage_minutes")
        self.saved = 0.0  # minutes the reused stages took when they ran, beyond this run's

    def run(self, name: str, fn: Callable[[], Any], done: bool = False,
            resumes: Path | None = None) -> Any:
        """Time `fn`; with `done` (its output was already complete) keep the earlier minutes.
        `resumes`: the checkpoint an earlier run left, which the stage continues from."""
        t0 = time.time()
        print(f"== {name}" + (" (done)" if done else ""), file=sys.stderr)
        if not done:
            ran, now = self.threads.get(name, []) if resumes else [], torch.get_num_threads()
            # The count the checkpoint was saved on, from its manifest: the record's last can
            # be a session's that stopped before it saved. A checkpoint saved before manifests
            # had it: the record's last.
            saved_on = Checkpointer.threads_of(resumes) if resumes else None
            if saved_on is not None and saved_on != now:
                # Sums split among threads otherwise round otherwise: the last bits may differ.
                print(f"warning: {name} resumes from its checkpoint on "
                      f"{counted(now, 'CPU thread')}, but the checkpoint was saved on "
                      f"{saved_on}{_ran_on(ran, saved_on)}: its losses may differ in the last "
                      f"bits from a run that never stopped (--threads {saved_on} resumes it as "
                      f"it ran)", file=sys.stderr)
            elif saved_on is None and ran and ran[-1] != now:
                print(f"warning: {name} resumes from its checkpoint on "
                      f"{counted(now, 'CPU thread')}, but ran on {', then '.join(map(str, ran))} "
                      f"before it stopped: its losses may differ in the last bits from a run "
                      f"that never stopped (--threads {ran[-1]} resumes it as it "
                      f"{'last ' if len(ran) > 1 else ''}ran)", file=sys.stderr)
            self.threads[name] = ran if ran[-1:] == [now] else ran + [now]
            # Now, not once it ends: a stage stopped midway has the count it ran on on record.
            write_json_atomic(self.threads_record, self.threads)
        # The stage's own note of another thread count would say it again; a Ctrl-C's advice
        # is the pipeline's (it has no --resume).
        with run_by_caller("run the same command again to continue"):
            out = fn()
        took = (time.time() - t0) / 60
        if done and name in self.earlier:
            self.saved += self.earlier[name] - took
            took = self.earlier[name]
        self.minutes[name] = self.minutes.get(name, 0.0) + took
        self.keep()
        return out

    def reuse(self, *names: str) -> None:
        """Stages found finished without being run at all."""
        for name in names:
            print(f"== {name} (done)", file=sys.stderr)
            if name in self.earlier and name not in self.minutes:
                self.minutes[name] = self.earlier[name]
                self.saved += self.earlier[name]
        self.keep()

    def keep(self) -> None:
        write_json_atomic(self.record, {**self.earlier, **self.minutes})
        write_json_atomic(self.threads_record, self.threads)

    def threads_used(self) -> int | dict[str, int | list[int]]:
        """The threads every stage of this run ran on, or each stage's where they differ (a
        list for a stage resumed on other counts, in the order it ran on them)."""
        used = {k: ran for k, ran in self.threads.items() if k in self.minutes and ran}
        counts = {n for ran in used.values() for n in ran}
        if len(counts) == 1:
            return counts.pop()
        return {k: ran[0] if len(ran) == 1 else ran for k, ran in used.items()}


def _ppo_optimizer_steps(cfg: PipelineConfig) -> int:
    per_step = cfg.ppo_epochs * math.ceil(cfg.ppo_batch / cfg.ppo_minibatch)
    return cfg.rounds * cfg.ppo_steps * per_step


# Which pipeline option sets each stage setting it checks (the rest are fixed by the pipeline).
STAGE_OPTIONS = {
    "pretrain": {"max_steps": "pretrain_steps", "batch_size": "pretrain_batch",
                 "lr": "pretrain_lr", "model": "preset",
                 # pretraining's weight decay is fixed here: only the lr can make it too large
                 "weight_decay": "pretrain_lr"},
    "sft": {"max_steps": "sft_steps", "batch_size": "sft_batch", "lr": "sft_lr",
            "eval_every": "sft_eval_every", "exec_eval": "sft_exec_eval",
            "patience": "sft_patience", "max_new_tokens": "max_new_tokens"},
    "reward": {"epochs": "reward_epochs", "batch_size": "reward_batch", "lr": "reward_lr"},
    "ppo": {"steps": "ppo_steps", "batch_size": "ppo_batch", "minibatch_size": "ppo_minibatch",
            "ppo_epochs": "ppo_epochs", "lr": "ppo_lr", "kl_coef": "kl_coef",
            "temperature": "ppo_temperature", "max_new_tokens": "max_new_tokens",
            "ptx_coef": "ptx_coef"},
    "sft_continued": {"max_steps": "ppo_steps", "batch_size": "sft_batch", "lr": "sft_lr"},
}


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity where the system keeps one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The largest a stage's seed lies above the pipeline's: the execution-reward PPO's seed + 100
# (a round's stages take seed + round, the control seed + 7).
STAGE_SEED_OFFSET = 100


def max_seed(rounds: int) -> int:
    """The largest pipeline seed whose stages' seeds all lie below 2**64, torch's limit."""
    return 2**64 - 1 - max(rounds, STAGE_SEED_OFFSET)


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        cfg.check()
        self.cfg = cfg
        # Absolute, so that every stage records paths that a rerun from another directory
        # (with OUT spelled another way) still finds.
        self.out = Path(os.path.abspath(cfg.out))
        self.timer = Timer(self.out)
        self.world_dir = Path(os.path.abspath(cfg.world)) if cfg.world else self.out / "world"
        self._check_stage_configs()

    def _check_stage_configs(self) -> None:
        """Every stage's config as the run will build it, checked before any stage runs; an
        impossible value names the pipeline option that set it."""
        placeholder = self.out / "model"
        configs = {"pretrain": self.pretrain_config(),
                   "sft": self.sft_config(placeholder, placeholder),
                   "reward": self.reward_config(placeholder, placeholder, 1),
                   "ppo": self.ppo_config(placeholder, placeholder, self.out / "ppo",
                                          self.cfg.ppo_steps, self.cfg.seed, reward=placeholder),
                   "sft_continued": self.sft_continued_config(placeholder, placeholder)}
        for stage, config in configs.items():
            try:
                config.check()
            except UserError as e:
                # The options' own rules keep every field no option maps (a stage's seed)
                # in range: one that fired anyway is named as the stage names it.
                option = STAGE_OPTIONS[stage].get(e.field or "", e.field)
                raise UserError(f"gives the {stage} stage an impossible {e.field}: {e.message}",
                                field=option) from None

    # --- stages --------------------------------------------------------------------------------
    def export_world(self) -> None:
        from gptlab.world import build_world, load_world
        from gptlab.world.build import OtherVersionWorld
        if not (self.world_dir / "world.json").exists():
            build_world(seed=self.cfg.world_seed).export(self.world_dir)
        try:
            self.world = load_world(self.world_dir)
        except OtherVersionWorld as e:
            # Exported again, it would not be the world this run's stages were made from.
            todo = ("export it again into a new directory and run the pipeline into another "
                    "out (--out)" if self.cfg.world else
                    "choose another out (--out), or remove this run to start again")
            raise UserError(f"this world was exported by a different version of gptlab, or its "
                            f"options were edited: its questions or dialogs differ; {todo}",
                            path=e.path, field=e.field) from None

    def pretrain_config(self) -> PretrainConfig:
        from gptlab.train.pretrain import PretrainConfig
        out = self.out / "pretrain"
        return PretrainConfig(
            data=[str(self.world_dir / "corpus.txt")], model=self.cfg.preset, out=str(out),
            max_steps=self.cfg.pretrain_steps, batch_size=self.cfg.pretrain_batch,
            lr=self.cfg.pretrain_lr, eval_every=50, eval_batches=4, save_every=0,
            seed=self.cfg.seed, progress=self.cfg.progress, cache_dir=str(self.out / "cache"),
            resume=_interrupted(out))

    def pretrain(self) -> Path:
        from gptlab.train.pretrain import pretrain
        out = self.out / "pretrain"
        if not stage_done(out):
            pretrain(self.pretrain_config())
        return out

    def sft_config(self, model: Path, data: Path) -> SFTConfig:
        from gptlab.train.sft import SFTConfig
        out = self.out / "sft"
        return SFTConfig(model=str(model), data=str(data),
                         val_data=str(self.world_dir / "validation.jsonl"), out=str(out),
                         world=str(self.world_dir), exec_eval=self.cfg.sft_exec_eval,
                         max_new_tokens=self.cfg.max_new_tokens, max_steps=self.cfg.sft_steps,
                         batch_size=self.cfg.sft_batch, lr=self.cfg.sft_lr,
                         eval_every=self.cfg.sft_eval_every, patience=self.cfg.sft_patience,
                         seed=self.cfg.seed, progress=self.cfg.progress,
                         resume=_interrupted(out))

    def sft(self, model: Path) -> Path:
        from gptlab.train.sft import sft
        if not stage_done(self.out / "sft"):
            sft(self.sft_config(model, self.demonstrations()))
        return self.out / "sft"

    def demonstrations(self) -> Path:
        """The SFT data: the world's demonstrations, or the first `sft_examples` of them, with
        a careless demonstrator's mistake in part of them if `demonstrator_flaw` is set.

        InstructGPT had fewer demonstrations than PPO prompts (13k vs 31k); `sft_examples`
        reproduces that: SFT learns from a subset, PPO from every training prompt."""
        c = self.cfg
        full = self.world_dir / "sft.jsonl"
        if not c.sft_examples and not c.demonstrator_flaw:
            return full
        subset = self.out / "sft_data.jsonl"
        if not subset.exists():
            rows = [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(full)]
            rows = rows[:c.sft_examples] if c.sft_examples else rows
            if c.demonstrator_flaw:
                from gptlab.world.demonstrators import flaw_demonstrations
                rows, n = flaw_demonstrations(rows, c.demonstrator_flaw, c.demonstrator_flaw_rate,
                                              c.seed)
                print(f"demonstrations: {n} of {len(rows)} written with the flaw "
                      f"'{c.demonstrator_flaw}'", file=sys.stderr)
            write_jsonl_atomic(subset, rows)
        return subset

    def feedback(self, policy: Path, rnd: int) -> Path:
        """Sample K responses for this round's prompts from the current policy; rank them."""
        from gptlab.engine import SamplingParams
        from gptlab.data.instruct import SkipCounter
        from gptlab.feedback import label_samples, sample_responses, sqlworld_ranker
        d = self.out / f"round-{rnd}"
        rankings = d / "rankings.jsonl"
        if rankings.exists():
            self.timer.reuse(f"round {rnd}: sample", f"round {rnd}: label")
            return rankings
        prompts = read_jsonl(self.world_dir / "prompts.jsonl")
        chosen = random.Random(self.cfg.seed * 1000 + rnd).sample(
            prompts, min(self.cfg.sample_prompts, len(prompts)))
        model, tok, _ = load_model(policy, select_device("auto"))  # where the stages train
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens,
                                temperature=self.cfg.sample_temperature)
        # No mark_cut: a cut response is decoded whole, a split last character as U+FFFD,
        # unlike `gptlab sample`, because the demo's published samples and rankings (and all
        # trained on them) are these bytes.
        samples = self.timer.run(f"round {rnd}: sample", lambda: sample_responses(
            model, tok, chosen, self.cfg.k, params, seed=self.cfg.seed * 1000 + rnd))
        write_jsonl_atomic(d / "samples.jsonl", samples)
        rank = sqlworld_ranker(self.world, self.cfg.disagreement, self.cfg.seed + rnd,
                               self.cfg.ties)
        skips, dropped = SkipCounter(), SkipCounter()
        ranked = self.timer.run(f"round {rnd}: label",
                                lambda: label_samples(samples, rank, skips, dropped=dropped))
        print(f"round {rnd}: {len(ranked)} of {counted(len(samples), 'prompt')} ranked"
              + (f"; {skips.report('prompts')}" if skips.total else "")
              + (f"; {dropped.report('responses')}" if dropped.total else ""), file=sys.stderr)
        if not ranked:
            raise UserError(
                f"round {rnd}: the labelers ranked none of {counted(len(samples), 'prompt')} "
                f"({skips.report('prompts')}); train SFT longer, sample more prompts or a "
                f"larger k (--k), or use ties=False (--no-ties)", path=d / "samples.jsonl")
        write_jsonl_atomic(rankings, ranked)
        return rankings

    def reward(self, sft_dir: Path, rnd: int) -> Path:
        """A reward model retrained from SFT on every round's rankings so far."""
        from gptlab.train.reward import train_reward_model
        d = self.out / f"round-{rnd}"
        out = d / "reward"
        if stage_done(out):
            return out
        rows = [r for i in range(1, rnd + 1)
                for r in read_jsonl(self.out / f"round-{i}" / "rankings.jsonl")]
        data = d / "rankings_all.jsonl"
        write_jsonl_atomic(data, ({k: v for k, v in r.items() if k != "_line"} for r in rows))
        train_reward_model(self.reward_config(sft_dir, data, rnd))
        return out

    def reward_config(self, sft_dir: Path, data: Path, rnd: int) -> RewardConfig:
        from gptlab.train.reward import RewardConfig
        out = self.out / f"round-{rnd}" / "reward"
        return RewardConfig(
            model=str(sft_dir), data=str(data), out=str(out),
            # Every round's reward model scores SFT's samples mean 0, std 1: one scale for all.
            samples=str(self.out / "round-1" / "samples.jsonl"), epochs=self.cfg.reward_epochs,
            batch_size=self.cfg.reward_batch, lr=self.cfg.reward_lr, eval_every=0,
            seed=self.cfg.seed + rnd, progress=self.cfg.progress, resume=_interrupted(out))

    def ppo_config(self, policy: Path, sft_dir: Path, out: Path, steps: int, seed: int,
                   reward: Path | None = None) -> PPOConfig:
        from gptlab.train.ppo import PPOConfig
        c = self.cfg
        return PPOConfig(policy=str(policy), reference=str(sft_dir),
                         reward=str(reward) if reward else None,
                         prompts=str(self.world_dir / "prompts.jsonl"), out=str(out),
                         steps=steps, batch_size=c.ppo_batch, minibatch_size=c.ppo_minibatch,
                         ppo_epochs=c.ppo_epochs, lr=c.ppo_lr, kl_coef=c.kl_coef,
                         temperature=c.ppo_temperature, max_new_tokens=c.max_new_tokens,
                         ptx_data=[str(self.world_dir / "corpus.txt")] if c.ptx_coef else [],
                         ptx_coef=c.ptx_coef, cache_dir=str(self.out / "cache"), seed=seed,
                         # A stage that a Ctrl-C stopped continues from its checkpoint.
                         resume=_interrupted(out))

    def ppo(self, policy: Path, sft_dir: Path, rm: Path, rnd: int) -> Path:
        from gptlab.train.ppo import ppo
        out = self.out / f"round-{rnd}" / "ppo"
        if not stage_done(out):
            ppo(self.ppo_config(policy, sft_dir, out, self.cfg.ppo_steps, self.cfg.seed + rnd,
                                reward=rm))
        return out

    def ppo_execution_reward(self, sft_dir: Path, on_test: bool = False) -> Path:
        """The upper-bound control: PPO from SFT with execution itself as the reward (a
        perfect reward model), for as many steps as all rounds of PPO took, the rest the same.

        `on_test` is the ceiling: the same, trained on the test questions' own prompts. It is a
        leak on purpose, never a model to use: what PPO could do if neither the reward nor the
        prompts stood in its way."""
        from gptlab.train.ppo import ppo
        from gptlab.world.rewards import execution_reward
        out = self.out / ("ppo_execution_reward_on_test" if on_test else "ppo_execution_reward")
        if not stage_done(out):
            cfg = self.ppo_config(sft_dir, sft_dir, out, self.cfg.rounds * self.cfg.ppo_steps,
                                  self.cfg.seed + STAGE_SEED_OFFSET)
            if on_test:
                cfg.prompts = str(self.world_dir / "test.jsonl")
            ppo(cfg, reward_fn=execution_reward(self.world))
        return out

    def sft_continued(self, sft_dir: Path) -> Path:
        """The control: SFT trained further for as many optimizer steps as PPO took."""
        from gptlab.train.sft import sft
        out = self.out / "sft_continued"
        if not stage_done(out):
            sft(self.sft_continued_config(sft_dir, self.demonstrations()))
        return out

    def sft_continued_config(self, sft_dir: Path, data: Path) -> SFTConfig:
        from gptlab.train.sft import SFTConfig
        out = self.out / "sft_continued"
        return SFTConfig(model=str(sft_dir), data=str(data),
                         val_data=str(self.world_dir / "validation.jsonl"), out=str(out),
                         max_steps=_ppo_optimizer_steps(self.cfg), batch_size=self.cfg.sft_batch,
                         # Continue, not restart: SFT's final learning rate, held constant.
                         lr=self.cfg.sft_lr * 0.1, min_lr_ratio=1.0, warmup_steps=0,
                         select_best=False, exec_eval=0, eval_every=0, seed=self.cfg.seed + 7,
                         progress=self.cfg.progress, resume=_interrupted(out))

    def test_questions(self) -> list[dict]:
        """The questions the evaluation answers (`read_test_questions`): before the first
        stage trains, a test.jsonl without any, or with a line the evaluation cannot answer,
        is refused here, not after every stage has trained."""
        from gptlab.eval.pipeline_eval import read_test_questions
        path = self.world_dir / "test.jsonl"
        test = read_test_questions(self.world, path, self.cfg.eval_limit)
        if not test:
            raise UserError("has no test questions for the evaluation to answer; export the "
                            "world again (gptlab world export)", path=path)
        return test

    def check_test_prompts_fit(self, pre: Path) -> None:
        """The evaluation answers every test question: refuse now, not after every stage has
        trained, when a prompt leaves no room for max_new_tokens (once the tokenizer exists)."""
        from gptlab.data.instruct import encode_prompt
        from gptlab.model.presets import get_preset
        from gptlab.tokenizer import load_tokenizer
        tok, context = load_tokenizer(pre), get_preset(self.cfg.preset).context
        path = self.world_dir / "test.jsonl"
        test = self.test_questions()
        longest = max(len(encode_prompt(tok, r["prompt"])) for r in test)
        if longest > context - self.cfg.max_new_tokens:
            raise UserError(f"the longest test prompt has {longest} tokens, which leaves no "
                            f"room for {self.cfg.max_new_tokens} new ones in the context of "
                            f"{context}; lower max_new_tokens (--max-new-tokens)", path=path,
                            field="max_new_tokens")

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage, then the evaluation and the report. With `threads`, torch uses that many
        threads meanwhile; the caller's setting is restored after."""
        previous = torch.get_num_threads()
        try:
            return self._run()
        finally:
            torch.set_num_threads(previous)

    def _run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_run()
        remove_killed_writes_temps(self.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        start = time.time()
        self._check_finished_stages_whole()
        t = self.timer
        out = self.out
        t.run("world", self.export_world, done=(self.world_dir / "world.json").exists())
        self._record_world()
        self.test_questions()  # a test split the evaluation cannot answer, before any stage
        pre = t.run("pretrain", self.pretrain, **_state(out / "pretrain"))
        self.check_test_prompts_fit(pre)
        sft_dir = t.run("sft", lambda: self.sft(pre), **_state(out / "sft"))
        policy = sft_dir
        for rnd in range(1, cfg.rounds + 1):
            d = out / f"round-{rnd}"
            self.feedback(policy, rnd)
            rm = t.run(f"round {rnd}: reward model", lambda: self.reward(sft_dir, rnd),
                       **_state(d / "reward"))
            policy = t.run(f"round {rnd}: ppo", lambda: self.ppo(policy, sft_dir, rm, rnd),
                           **_state(d / "ppo"))
        control = t.run("sft_continued", lambda: self.sft_continued(sft_dir),
                        **_state(out / "sft_continued"))
        if cfg.headroom:
            t.run("ppo on the execution reward", lambda: self.ppo_execution_reward(sft_dir),
                  **_state(out / "ppo_execution_reward"))
            t.run("ppo on the execution reward, test prompts",
                  lambda: self.ppo_execution_reward(sft_dir, on_test=True),
                  **_state(out / "ppo_execution_reward_on_test"))
        from gptlab.eval.pipeline_eval import evaluate_pipeline
        results = t.run("evaluation", lambda: evaluate_pipeline(self, pre, sft_dir, control))
        # This invocation's wall time, plus what the stages it reused took when they ran.
        results["minutes"] = (time.time() - start) / 60 + t.saved
        # As measured, like `minutes`: the report rounds them for display, and rounding here
        # too showed 0.851 minutes (0.85) as 0.8.
        results["stage_minutes"] = dict(t.minutes)
        results["config"] = {**dataclasses.asdict(cfg), "threads": t.threads_used()}
        from gptlab.eval.report import write_report
        write_report(self.out, results)
        print(f"report: {self.out / 'report.md'} ({results['minutes']:.1f} minutes)",
              file=sys.stderr)
        return results

    def _settings(self) -> dict:
        mine = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ADDITIVE}
        # The world by where it is would miss a re-export; by its manifest it cannot.
        mine["world"] = str(self.world_dir) if self.cfg.world else None
        mine["world_digest"] = world_digest(self.world_dir)
        return mine

    def _check_same_run(self) -> None:
        """Refuse to mix two pipelines' stages in one OUT: a rerun may change the settings of
        stages that have not started, never those of a stage that has (it would be silently
        reused, or continued with other settings)."""
        path = self.out / "pipeline.json"
        mine = self._settings()
        where = {"out": str(self.out), "world": str(self.world_dir)}
        if path.exists():
            saved = _read_record(path, _SETTINGS_RECORD)
            self._check_not_moved_mid_stage(saved.pop("paths", None), where)
            # A setting newer than the run was at its default there; a world path recorded
            # relative to where that run started, or a digest it did not record, is not compared.
            defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)
                        if f.default is not dataclasses.MISSING}
            theirs = {k: v for k, v in {**defaults, **saved}.items() if k not in ADDITIVE}
            # The two settings read as what they are, not only compared: edited into another
            # type, each was a traceback.
            rounds, world = theirs.get("rounds"), theirs.get("world")
            if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                raise UserError(f"must be a number of rounds (an integer >= 1), got "
                                f"{rounds!r:.80}; {_SETTINGS_RECORD}", path=path, field="rounds")
            if world is not None and not isinstance(world, str):
                raise UserError(f"must be the world directory's path (a string) or null, got "
                                f"{world!r:.80}; {_SETTINGS_RECORD}", path=path, field="world")
            diff = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            if theirs.get("world_digest") is None or mine["world_digest"] is None:
                diff.discard("world_digest")
            elif "world_digest" not in diff:
                diff.discard("world")  # the same world, found at another path
            if theirs.get("world") and os.path.abspath(theirs["world"]) == mine["world"]:
                diff.discard("world")  # recorded as typed, by a run before paths were absolute
            started = [(stage, sorted(diff & deps)) for stage, deps in
                       stage_dependencies(max(self.cfg.rounds, theirs.get("rounds") or 1))
                       if diff & deps and (self.out / stage).exists()]
            if started:
                names = sorted({k for _, keys in started for k in keys})
                raise UserError(
                    f"holds a pipeline run whose {', '.join(stage for stage, _ in started)} "
                    f"{'was' if len(started) == 1 else 'were'} made with other settings "
                    f"({', '.join(names)}); choose another out (--out), or remove "
                    f"{'it' if len(started) == 1 else 'those'} to redo "
                    f"{'it' if len(started) == 1 else 'them'} with the new settings",
                    path=self.out, field="out")
            if diff:
                print(f"note: settings changed for stages that have not run yet: "
                      f"{', '.join(sorted(diff))}", file=sys.stderr)
        else:
            # pipeline.json is written before any stage starts: stages without it were made
            # with settings nothing records, and would be reused unchecked.
            rounds = max([self.cfg.rounds] + [int(d.name[6:]) for d in self.out.glob("round-*")
                                              if d.name[6:].isdecimal()])
            # With --world, an OUT/world is none of this run's: it reads the world given.
            found = [stage for stage, _ in stage_dependencies(rounds)
                     if (self.out / stage).exists() and not (stage == "world" and self.cfg.world)]
            if found:
                raise UserError(
                    f"holds pipeline stages ({', '.join(found)}) but no pipeline.json, which "
                    f"records the settings they were made with; choose another out (--out), or "
                    f"remove them to redo them", path=self.out, field="out")
        write_json_atomic(path, {**mine, "paths": where})

    def _check_finished_stages_whole(self) -> None:
        """Refuse, before any stage runs, to reuse a finished stage that lacks a file."""
        stages = [stage for stage, _ in stage_dependencies(self.cfg.rounds)
                  if self.cfg.headroom or "execution_reward" not in stage]
        found = missing_from_finished(self.out, self.world_dir, stages)
        if found is None:
            return
        stage, file = found
        if stage == self.world_dir:
            todo = ("export it again (gptlab world export)" if self.cfg.world else
                    f"remove {stage} to export it again")
            raise UserError(f"is missing from the world, whose world.json says it is whole; "
                            f"{todo}", path=file)
        name = stage.relative_to(self.out)
        raise UserError(f"is missing, though {name} finished: it would be reused without it; "
                        f"remove {name} to redo it", path=file)

    def _check_not_moved_mid_stage(self, before: dict | None, now: dict) -> None:
        """A finished stage does not care where the run or its world are; a PPO stage stopped
        after a checkpoint does: it continues only with the files it started with, by path."""
        if before is None or before == now:
            return
        stuck = [stage for stage, _ in stage_dependencies(self.cfg.rounds)
                 if "ppo" in stage and (self.out / stage).is_dir()
                 and not stage_done(self.out / stage) and _interrupted(self.out / stage)]
        if stuck:
            moved = " and ".join(f"{k} from {before.get(k)}" for k in ("out", "world")
                                 if before.get(k) != now[k])
            one = len(stuck) == 1
            raise UserError(
                f"moved ({moved}) while {', '.join(stuck)} {'was' if one else 'were'} stopped "
                f"after a checkpoint that names the old paths; move it back to finish "
                f"{'it' if one else 'them'}, or remove {'it' if one else 'them'} to redo "
                f"{'it' if one else 'them'}", path=self.out, field="out")

    def _record_world(self) -> None:
        """The world's digest, once it exists (the built-in world is exported by the run)."""
        path = self.out / "pipeline.json"
        settings = json.loads(path.read_text())
        if settings.get("world_digest") is None:
            settings["world_digest"] = world_digest(self.world_dir)
            write_json_atomic(path, settings)


def remove_killed_writes_temps(out: Path) -> list[Path]:
    """Remove the temporaries (`.NAME.<random>.tmp/`, `gptlab.io.TEMP_NAME`) that killed writes
    left anywhere under `out`, saying so in one line. The next write of a file removes its own,
    but a file that a finished stage never writes again (world.json, a PPO round's config.json,
    killed between its rename and its temporary's removal) would keep one for good. A temporary
    a live writer holds is left alone (`remove_stale_temps`), and so is anything else: a file
    or link of such a name, and what lies in hidden folders (`.old-files.*/`: `settle_old_files`'
    to settle)."""
    removed: list[Path] = []
    for root, folders, _ in os.walk(out):
        temps = [name for name in folders if TEMP_NAME.fullmatch(name)
                 and not os.path.islink(os.path.join(root, name))]
        for name in temps:
            removed += remove_stale_temps(root, glob.escape(name))
        folders[:] = [name for name in folders if not name.startswith(".")]
    if removed:
        names = [str(p.relative_to(out)) for p in sorted(removed)]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        n = len(removed)
        print(f"note: removed {n} temporar{'y' if n == 1 else 'ies'} that killed writes left in "
              f"{out}: {listed}", file=sys.stderr)
    return removed


@reports_path_errors
def pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage on the built-in world (reusing finished ones in `cfg.out`), evaluate
    them and write the report; returns the path of report.md."""
    Pipeline(cfg).run()
    return Path(cfg.out) / "report.md"
