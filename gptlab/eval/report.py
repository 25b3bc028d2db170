"""The report of `gptlab pipeline`: report.json, plots/*.png, report.md and report.html.

`write_report(run_dir, results)` reads the stages' metrics.jsonl files under the run directory
(pretrain/, round-{r}/reward/, round-{r}/ppo/) for the curves and `results` for the numbers.
Both documents are rendered from one `ReportContent`, so the Markdown and the HTML page always
say the same thing. A result that is None (a stage that did not run) reads "n/a"; a setting
left unset (null) reads what that means (world built-in, eval_limit all: `UNSET_MEANS`); a
figure a report.json of an earlier version lacks (`corpus_ppl_pretrained`) has no line; a plot
whose data is missing is left out. The reward-model plot draws each round's held-out accuracy
with its 95% interval, the prompts as the draws (`stats.clustered_rate`). A NaN or an infinity
(a diverged model's KL) reads nan or inf; report.json, strict JSON, holds it as null named in
its `non_finite` field, which `read_report` (and `read_metric_rows`, for metrics.jsonl) turns
back into the float.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gptlab.io import (atomic_path, read_json, restore_non_finite, write_json_atomic,
                       write_text_atomic)

NA = "n/a"
MAX_SAMPLES = 10
DPI = 100
PLOT_NAMES = ("pretrain_loss", "rm_accuracy", "ppo_reward_kl", "exec_accuracy")


# ---------------------------------------------------------------------------- reading metrics

def read_metric_rows(path: Path) -> list[dict]:
    """The JSON-object rows of a metrics.jsonl; [] when absent. Broken lines are skipped: the
    report may be made while a stage is still writing its last line. A row ends at "\\n" alone
    (a sample text in it may hold U+2028, which `str.splitlines` ends a line at)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = restore_non_finite(json.loads(line))
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_report(path: str | Path) -> dict:
    """A report.json as `write_report` was given it: a NaN or an infinity, written as null and
    named in its `non_finite` field (JSON has no such numbers), is the float again. A
    report.json of an earlier version, which held the bare tokens NaN and Infinity, reads too."""
    return restore_non_finite(read_json(path, "a JSON object (the pipeline's report)"))


def as_number(value: Any) -> float | None:
    """A finite float, or None for anything else (None, bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a numeric `step` and a numeric `key`."""
    xs, ys = [], []
    for row in rows:
        x, y = as_number(row.get("step")), as_number(row.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def round_dirs(run_dir: Path, rounds: int | None = None) -> list[tuple[int, Path]]:
    """The `round-{r}` directories, in round order (round-10 after round-9); with `rounds`, only
    those up to it."""
    found = []
    for p in run_dir.glob("round-*"):
        m = re.fullmatch(r"round-(\d+)", p.name)
        if m and p.is_dir() and (rounds is None or int(m.group(1)) <= rounds):
            found.append((int(m.group(1)), p))
    return sorted(found)


def rounds_reported(results: dict) -> int | None:
    """The rounds the results are of (`config.rounds`, else one per reward-model accuracy), or
    None where they do not say. A run stopped in round 3 and finished with `--rounds 2` keeps its
    round-3 directory, whose curves are none of these results'."""
    config = results.get("config")
    rounds = config.get("rounds") if isinstance(config, dict) else None
    if isinstance(rounds, int) and not isinstance(rounds, bool):
        return rounds
    accs = results.get("rm_pairwise_acc_per_round")
    return len(accs) if isinstance(accs, list) and accs else None


# ---------------------------------------------------------------------------- plots

def new_figure(height: float = 3.2, panels: int = 1,
               own_legends: bool = False) -> tuple[Figure, list[Any]]:
    """A figure of `panels` stacked axes; with `own_legends`, each in a subfigure of its own,
    for `legend_below` to give it a legend under it."""
    # A bare Figure on an Agg canvas: no pyplot state, whatever backend the process has.
    fig = Figure(figsize=(6.4, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if own_legends:
        axes = [sub.add_subplot() for sub in fig.subfigures(panels, 1, squeeze=False).ravel()]
    else:
        axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]
    return fig, axes


def legend_below(ax: Any, ncols: int | None = None) -> None:
    """The legend of `ax` (in a figure of `own_legends`) under it, its tick labels and axis
    label, in `ncols` columns (all in one row by default): inside, a legend sits where some
    data can be (a round's accuracy, the chance line)."""
    handles, labels = ax.get_legend_handles_labels()
    ax.figure.legend(handles, labels, loc="outside lower center", ncols=ncols or len(handles))


# Fewer points than this are drawn unjoined: a line between a reward model's only two
# evaluations (before training and after it) read as a trend that nothing measured.
MIN_POINTS_JOINED = 3


def marker_style(points: int, marker: str = "o", line: str = "-") -> str:
    """A matplotlib format: `marker` joined by `line` where there are enough points, else
    markers alone."""
    return marker + line if points >= MIN_POINTS_JOINED else marker


def pretrain_losses(run_dir: Path) -> tuple[tuple[list, list], tuple[list, list]]:
    """(steps, training losses) and (steps, validation losses) of the pretraining run."""
    rows = read_metric_rows(run_dir / "pretrain" / "metrics.jsonl")
    return series(rows, "loss"), series(rows, "val_loss")


def plot_pretrain_loss(run_dir: Path) -> Figure | None:
    train_xy, val_xy = pretrain_losses(run_dir)
    if not train_xy[0] and not val_xy[0]:
        return None
    fig, (ax,) = new_figure()
    if train_xy[0]:
        ax.plot(*train_xy, label="training loss", lw=1.2)
    if val_xy[0]:
        # The evaluations are the figures; a thin dotted line between them, a guide only: a
        # straight line from step 0's loss to step 50's drew a descent nothing measured.
        ax.plot(*val_xy, marker_style(len(val_xy[0]), "o", ":"), label="validation loss",
                ms=5, lw=0.8)
    ax.set(title="Pretraining loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def every(steps: list[float]) -> str:
    """', every 50 steps from step 0' where `steps` are evenly spaced (the last may come early:
    a run's last step is logged and evaluated wherever it falls), else ''."""
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    if not gaps or any(g != gaps[0] for g in gaps[:-1]) or not 0 < gaps[-1] <= gaps[0]:
        return ""
    return f", every {gaps[0]:g} steps from step {steps[0]:g}"


def pretrain_loss_caption(run_dir: Path) -> str:
    """What the pretraining plot shows: how often each loss was measured, and that nothing
    was between the validation loss's evaluations."""
    (train_steps, _), (val_steps, _) = pretrain_losses(run_dir)
    parts = []
    if train_steps:
        parts.append(f"the training loss of a single step's batch{every(train_steps)} (the "
                     "line)")
    if val_steps:
        joined = (" joined by a dotted line only as a guide: nothing was measured between them"
                  if len(val_steps) >= MIN_POINTS_JOINED
                  else f" unjoined: fewer than {MIN_POINTS_JOINED} evaluations are no trend")
        parts.append(f"the validation loss at each of its {len(val_steps)} evaluations"
                     f"{every(val_steps)} (circles,{joined})")
    return "Pretraining: " + "; ".join(parts) + "."


def numbers_per_round(results: dict, key: str) -> list[tuple[int, float]]:
    """(round from 1, value) for each round of `results[key]` that has a number."""
    pairs = [(r, as_number(x)) for r, x in enumerate(results.get(key) or [], 1)]
    return [(r, x) for r, x in pairs if x is not None]


def rm_accuracy_data(run_dir: Path, results: dict
                     ) -> tuple[list[tuple[int, float]], list[tuple[int, tuple[list, list]]]]:
    """(round, held-out accuracy) of each round's trained reward model, and (round, (steps,
    accuracies)) of each round's evaluations during training: the two panels of the plot."""
    per_round = numbers_per_round(results, "rm_pairwise_acc_per_round")
    curves = [(r, series(read_metric_rows(d / "reward" / "metrics.jsonl"), "pairwise_acc"))
              for r, d in round_dirs(run_dir, rounds_reported(results))]
    return per_round, [(r, xy) for r, xy in curves if xy[0]]


def plot_rm_accuracy(run_dir: Path, results: dict) -> Figure | None:
    per_round, curves = rm_accuracy_data(run_dir, results)
    if not per_round and not curves:
        return None
    fig, axes = new_figure(6.4 if per_round and curves else 3.6,
                           int(bool(per_round)) + int(bool(curves)), own_legends=True)
    if per_round:
        ax = axes[0]
        rounds, accs = zip(*per_round)
        cis = results.get("rm_pairwise_acc_ci95_per_round")
        cis = cis if isinstance(cis, list) and len(cis) >= max(rounds) else []
        # Each round's 95% interval, with the prompts as the draws, where it has one.
        shown = [(r, a, b) for r, a in per_round
                 if (b := interval(cis[r - 1]) if cis else None) is not None]
        (line,) = ax.plot(rounds, accs, marker_style(len(rounds)),
                          label="judged by the noise-free labeler"
                                + (" (95% interval)" if shown else ""))
        if shown:
            ax.errorbar([r for r, _, _ in shown], [a for _, a, _ in shown],
                        yerr=[[max(a - b[0], 0.0) for _, a, b in shown],
                              [max(b[1] - a, 0.0) for _, a, b in shown]],
                        fmt="none", ecolor=line.get_color(), capsize=4)
        labelers = numbers_per_round(results, "rm_pairwise_acc_labelers_per_round")
        if labelers:  # a little to the right, not hidden behind the circle it is near
            ax.plot([r + 0.04 for r, _ in labelers], [a for _, a in labelers],
                    marker_style(len(labelers), "s", "--"),
                    label="judged by the labelers' own rankings")
        if labelers or shown:  # one a row: side by side, they are wider than the figure
            legend_below(ax, ncols=1)
        ax.set(title="Reward model: held-out pairwise accuracy per round", xlabel="round",
               ylabel="pairwise accuracy", xticks=list(rounds))
        ax.axhline(0.5, color="grey", ls=":", lw=1)  # chance for a pair
        ax.grid(alpha=0.3)
    if curves:
        ax = axes[-1]
        for r, xy in curves:
            ax.plot(*xy, marker_style(len(xy[0])), ms=5, label=f"round {r}")
        ax.set(title="Reward model: pairwise accuracy at each evaluation\n(against the "
                     "labelers' own held-out rankings)", xlabel="step (0: before training)",
               ylabel="pairwise accuracy")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        legend_below(ax)
        ax.grid(alpha=0.3)
    return fig


def rm_accuracy_caption(run_dir: Path, results: dict) -> str:
    """What each panel of the reward-model plot shows, for those it has."""
    per_round, curves = rm_accuracy_data(run_dir, results)
    parts = []
    if per_round:
        parts.append("each round's trained reward model on its held-out answer pairs, judged "
                     "by the noise-free labeler (circles, with the 95% interval that treats "
                     "the prompts as the draws) and by the labelers' own rankings (squares)")
    if curves:
        parts.append("the same reward models against the labelers' own held-out rankings at "
                     "each evaluation during their training, step 0 before any; a round "
                     f"evaluated fewer than {MIN_POINTS_JOINED} times shows its points "
                     "unjoined, since two evaluations are no trend")
    if len(parts) == 2:
        parts = [f"top, {parts[0]}", f"bottom, {parts[1]}"]
    return ("Reward model: " + "; ".join(parts)
            + ". The dotted line is chance (0.5, a coin flip for each pair).")


def ppo_curves(run_dir: Path, rounds: int | None = None
               ) -> list[tuple[int, tuple[list, list], tuple[list, list]]]:
    """(round, (steps, rewards), (steps, KLs)) of each round (up to `rounds`) whose PPO logged
    either."""
    curves = []
    for r, d in round_dirs(run_dir, rounds):
        rows = read_metric_rows(d / "ppo" / "metrics.jsonl")
        reward, kl = series(rows, "reward"), series(rows, "kl")
        if reward[0] or kl[0]:
            curves.append((r, reward, kl))
    return curves


def plot_ppo(run_dir: Path, rounds: int | None = None) -> Figure | None:
    """Reward and KL per PPO step, the rounds (up to `rounds`) one after another on a global
    step axis."""
    fig, (ax_r, ax_kl) = new_figure(5.6, panels=2)
    offset, plotted = 0.0, False
    for r, (rx, ry), (kx, ky) in ppo_curves(run_dir, rounds):
        if plotted:
            for ax in (ax_r, ax_kl):
                ax.axvline(offset + 0.5, color="grey", ls=":", lw=1)
        ax_r.plot([offset + x for x in rx], ry, label=f"round {r}")
        ax_kl.plot([offset + x for x in kx], ky, label=f"round {r}")
        offset += max(rx + kx)
        plotted = True
    if not plotted:
        return None
    ax_r.set(title="PPO: mean reward per step", xlabel="step (all rounds)", ylabel="reward")
    ax_kl.set(title="PPO: KL(policy ‖ SFT) per response, at PPO's temperature",
              xlabel="step (all rounds)", ylabel="KL (nats)")
    for ax in (ax_r, ax_kl):
        ax.grid(alpha=0.3)
    # One legend for both panels (their rounds share colours), below the axes: inside either,
    # wherever it went, it sat on some round's curve (round 2's first rewards, under "best" too).
    handles, labels = ax_r.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    return fig


def plot_exec_acc(results: dict) -> Figure | None:
    overall = results.get("exec_acc") or {}
    unseen = results.get("exec_acc_unseen_phrasing") or {}
    names = model_names(results)
    if not any(as_number(overall.get(n)) is not None or as_number(unseen.get(n)) is not None
               for n in names):
        return None
    fig, (ax,) = new_figure(3.6)
    xs = range(len(names))
    width = 0.4
    # A missing value is a gap (NaN), not a zero that would look like a measured failure; each
    # bar is labelled with its value, so that a measured 0, which draws no bar, reads 0.000 and
    # a gap n/a.
    for shift, values, label in ((-width / 2, overall, "all questions"),
                                 (width / 2, unseen, "unseen phrasing")):
        heights = [as_number(values.get(n)) for n in names]
        ax.bar([x + shift for x in xs], [math.nan if h is None else h for h in heights],
               width, label=label)
        for x, h, n in zip(xs, heights, names):
            ax.annotate(fmt(values.get(n)), (x + shift, h or 0.0), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", rotation=90,
                        fontsize=7)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    # Room above a bar at 1 for its label, and the legend below the axes, where no label is.
    ax.set(title="Execution accuracy by model", ylabel="fraction correct", ylim=(0, 1.15),
           yticks=[0, 0.2, 0.4, 0.6, 0.8, 1])
    fig.legend(loc="outside lower center", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as a PNG, in memory: nothing is written until the whole report renders."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def render_plots(run_dir: Path, results: dict) -> dict[str, bytes]:
    """The PNG of each plot that has data, by name, in PLOT_NAMES order."""
    figures = {"pretrain_loss": plot_pretrain_loss(run_dir),
               "rm_accuracy": plot_rm_accuracy(run_dir, results),
               "ppo_reward_kl": plot_ppo(run_dir, rounds_reported(results)),
               "exec_accuracy": plot_exec_acc(results)}
    return {name: png_bytes(figures[name]) for name in PLOT_NAMES if figures[name] is not None}


def plot_path(run_dir: Path, name: str) -> Path:
    """Where the plot `name` of a run is written (plots/NAME.png)."""
    return run_dir / "plots" / f"{name}.png"


def write_plots(run_dir: Path, pngs: dict[str, bytes]) -> None:
    """Write the plots that have data; remove stale ones from an earlier report of this run."""
    for name in PLOT_NAMES:
        path = plot_path(run_dir, name)
        if name not in pngs:
            path.unlink(missing_ok=True)
            continue
        with atomic_path(path) as tmp:
            tmp.write_bytes(pngs[name])


# ---------------------------------------------------------------------------- content

def minus(text: str) -> str:
    """A formatted number with the typographic minus (−0.015), as the report's prose and the
    plots' axes write it, not Python's hyphen (-0.015)."""
    return text.replace("-", "\u2212")


def fmt(value: Any, digits: int = 3, sign: bool = False) -> str:
    """`value` to `digits` decimals, a negative one with the typographic minus; n/a where there
    is no number. A NaN or an infinity was computed (a diverged model's KL, an overflowing
    perplexity) and reads nan / inf, as report.json's `non_finite` field names it, not n/a,
    which says the stage did not run."""
    x = as_number(value)
    if x is None and isinstance(value, float):
        x = value
    if x is None:
        return NA
    return minus(f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}")


def fmt_significant(value: Any, digits: int = 4) -> str:
    """`value` to `digits` significant digits (1050, 284.2, 1.596), a number of `digits` or more
    whole digits as a whole number; n/a, nan and inf as `fmt` gives them. For a perplexity,
    which runs from 1 to thousands: at a fixed 2 decimals 1049.94 showed digits no one
    measures; and for a sampled estimate, the KL at 3 (0.636, not 0.6362)."""
    x = as_number(value)
    if x is None or x == 0:
        return fmt(value, digits - 1)
    if abs(x) >= 10 ** (digits - 1):
        return minus(f"{x:.0f}")
    rounded = float(f"{x:.{digits - 1}e}")  # 9.9996 becomes 10.00, not 10.000
    return minus(f"{rounded:.{max(0, digits - 1 - math.floor(math.log10(abs(rounded))))}f}")


def model_names(results: dict) -> list[str]:
    """Models in the order the pipeline reported them, overall first, then unseen-only ones."""
    names: list[str] = []
    for key in ("exec_acc", "exec_acc_unseen_phrasing"):
        for name in (results.get(key) or {}):
            if name not in names:
                names.append(name)
    return names


def interval(ci: Any) -> tuple[float, float] | None:
    """The two bounds of a 95% interval ([lo, hi]), or None where it has no two numbers."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = as_number(ci[0]), as_number(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def describe_delta(delta: Any) -> str:
    """'+0.034, 95% CI [+0.010, +0.058]: the interval excludes 0' (or n/a), with the sign test
    where `delta` has it; without an interval (one question, or every question differing by
    the same amount) the sign test is the only verdict."""
    if not isinstance(delta, dict) or as_number(delta.get("mean")) is None:
        return NA
    text = fmt(delta["mean"], sign=True)
    better, worse, p = (delta.get(k) for k in ("better", "worse", "p_sign"))
    sign = (f"better on {better} questions, worse on {worse}; sign test p = {p:.2g}"
            if isinstance(better, int) and isinstance(worse, int) and as_number(p) is not None
            else None)
    bounds = interval(delta.get("ci95"))
    if bounds is None:
        return text + (f" (no confidence interval; {sign})" if sign else
                       " (no confidence interval)")
    lo, hi = bounds
    verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
    # A bound that rounds to ±0.000 but lies on one side of 0 is shown to its first digit,
    # so that "[-0.033, -0.000]: excludes 0" does not read as a bound at 0.
    digits = [3 if b == 0 or abs(b) >= 5e-4 else max(3, 1 - math.floor(math.log10(abs(b))))
              for b in (lo, hi)]
    text = (f"{text}, 95% CI [{fmt(lo, digits[0], sign=True)}, {fmt(hi, digits[1], sign=True)}]"
            f": the interval {verdict}")
    return text + (f" ({sign})" if sign else "")


# What a pipeline setting left unset (null) means, as `gptlab pipeline --help` says; n/a there
# read as a figure that is missing.
UNSET_MEANS = {"world": "built-in", "demonstrator_flaw": "none", "eval_limit": "all",
               "sft_examples": "all", "threads": "torch's default"}


def describe_setting(key: str, value: Any) -> str:
    """A setting's value as the report shows it: an unset one by what that means, a flag as on
    or off (not Python's True and False), a list as the counts a stage ran on in turn ("1, then
    2": the only list a run's settings hold is a stage's thread counts, in the order it ran on
    them), not as Python's [1, 2]."""
    if isinstance(value, list) and value:
        return ", then ".join(describe_setting(key, v) for v in value)
    if value is None:
        return UNSET_MEANS.get(key, "unset")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def describe_config(config: Any) -> str:
    if not isinstance(config, dict) or not config:
        return "Pipeline settings: n/a."
    parts = []
    for key, value in config.items():
        if isinstance(value, dict):  # e.g. steps per stage
            inner = ", ".join(f"{k} {describe_setting(k, v)}" for k, v in value.items())
            parts.append(f"{key}: {inner or NA}")
        else:
            parts.append(f"{key} {describe_setting(key, value)}")
    return "Pipeline settings: " + "; ".join(parts) + "."


def recorded_out(results: dict) -> str | None:
    """The run directory as the run was made with it (`config.out`), or None where the results
    do not say (a report.json of an earlier version, results made by hand)."""
    config = results.get("config")
    out = config.get("out") if isinstance(config, dict) else None
    return out if isinstance(out, str) and out else None


def report_title(run_dir: Path, results: dict) -> str:
    """The run as its settings name it (`out`), so the title and the settings agree in every
    copy of the run; the directory's own name only where the run did not record one."""
    return f"gptlab pipeline report: {recorded_out(results) or run_dir.name}"


def made_in(run_dir: Path, results: dict) -> str | None:
    """The directory the run was made in: `config.out`, absolute as the pipeline recorded it in
    the run's pipeline.json (`paths.out`) where that holds it; a relative `out` is relative to
    the directory the run started in, which the current one need not be."""
    out = recorded_out(results)
    if out is None or os.path.isabs(out):
        return out
    try:
        paths = json.loads((run_dir / "pipeline.json").read_text(encoding="utf-8"))["paths"]
        recorded = paths["out"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not as the pipeline writes it
        return out
    return recorded if isinstance(recorded, str) and os.path.isabs(recorded) else out


def describe_location(run_dir: Path, results: dict) -> str:
    """Where this report was written, where that is not the directory the run was made in (a
    copied or moved run, reported again); empty where it is."""
    out = made_in(run_dir, results)
    if out is None or os.path.realpath(out) == os.path.realpath(run_dir):
        return ""
    return f"This report was written in {run_dir}; the run was made in {out}."


def describe_time(results: dict) -> str:
    text = f"Total wall time: {fmt(results.get('minutes'), 1)} min"
    stages = results.get("stage_minutes")
    if isinstance(stages, dict) and stages:
        text += (" (by stage, in minutes: "
                 + ", ".join(f"{k} {fmt(v, 1)}" for k, v in stages.items()) + ")")
    return text + "."


def describe_headroom(h: dict) -> tuple[str, str]:
    """Best-of-K from SFT: what a perfect judge / the reward model would pick out of K samples."""
    what = (f"Best of K = {h.get('k', NA)} SFT samples at T = {h.get('temperature', NA)}: "
            "some answer correct / the reward model's pick correct / one sample correct")
    value = " / ".join(fmt(h.get(key)) for key in ("pass_at_k", "rm_best_of_k", "sample_mean"))
    return what, value + f" (greedy SFT {fmt(h.get('sft_greedy'))})"


def describe_rounds(results: dict) -> str:
    """'round 1: 0.831, 95% CI [0.702, 0.960] (28 held-out rankings, 40 pairs; 0.708 by the
    labelers' rankings), round 2: …' (the interval with the prompts as the draws, the counts
    and the labelers' figure where the run has them)."""
    accs = results.get("rm_pairwise_acc_per_round")
    if not isinstance(accs, list) or not accs:
        return NA

    def per_round(key: str) -> list:
        xs = results.get(key)
        return xs if isinstance(xs, list) and len(xs) == len(accs) else [None] * len(accs)

    parts = []
    for r, (a, ci, n, pairs, lab) in enumerate(zip(
            accs, per_round("rm_pairwise_acc_ci95_per_round"),
            per_round("rm_heldout_rankings_per_round"),
            per_round("rm_heldout_pairs_per_round"),
            per_round("rm_pairwise_acc_labelers_per_round")), 1):
        bounds = interval(ci)
        shown = f", 95% CI [{fmt(bounds[0])}, {fmt(bounds[1])}]" if bounds else ""
        notes = []
        if isinstance(n, int):
            notes.append(f"{n} held-out rankings"
                         + (f", {pairs} pairs" if isinstance(pairs, int) else ""))
        if as_number(lab) is not None:
            notes.append(f"{fmt(lab)} by the labelers' rankings")
        parts.append(f"round {r}: {fmt(a)}{shown}" + (f" ({'; '.join(notes)})" if notes else ""))
    return ", ".join(parts)


@dataclass
class Sample:
    id: str
    question: str
    gold: str
    sft: str
    ppo: str
    sft_correct: bool | None
    ppo_correct: bool | None


@dataclass
class ReportContent:
    """Everything both documents show, already formatted as plain text."""
    title: str
    summary: list[str]
    exec_rows: list[tuple[str, str, str, str, str]]  # (model, overall, on the test suite,
    #                                                   unseen, does not run)
    headlines: list[tuple[str, str]]               # (what, value)
    exec_note: str = ""                            # what a column of the table means
    exec_counts: str = ""                          # how many questions the table is over
    exec_legend: str = ""                          # what its figures and models are
    headline_note: str = ""                        # what the headline differences are of
    plots: list[tuple[str, Path]] = field(default_factory=list)  # (caption, path under run_dir)
    samples: list[Sample] = field(default_factory=list)


def text_or_na(value: Any) -> str:
    return NA if value is None else str(value)


def flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def collect_samples(results: dict) -> list[Sample]:
    rows = results.get("samples")
    if not isinstance(rows, list):
        return []
    return [Sample(text_or_na(s.get("id")), text_or_na(s.get("question")),
                   text_or_na(s.get("gold")), text_or_na(s.get("sft")), text_or_na(s.get("ppo")),
                   flag(s.get("sft_correct")), flag(s.get("ppo_correct")))
            for s in rows[:MAX_SAMPLES] if isinstance(s, dict)]


SUITE_NOTE = ("On the test suite: the answer returns the gold's result on the company and on "
              "each of {n} variant databases (same people, departments and projects, every "
              "relation and number drawn again; one where the gold's result is empty, a lone "
              "NULL or a lone 0 does not count), which a wrong query that happens to return "
              "the gold's rows on the company does not.")


# As evaluate_pipeline picks them (gptlab/eval/pipeline_eval.py).
SAMPLES_NOTE = ("The first three test questions, then the next ones where SFT and PPO (the last "
                "round's) answer differently. ✓: the answer returns the gold's result on the "
                "company database; ✗: it does not.")


PPO_CAPTION = ("PPO, step by step through the rounds (a dotted line where a round starts): top, "
               "the mean score of each step's rollouts by that round's reward model, before the "
               "KL penalty (each round has its own reward model, so scores do not compare "
               "across rounds); bottom, the policy's KL from SFT, summed over a response's "
               "tokens and averaged, at PPO's sampling temperature (the headline KL is at "
               "T = 1).")


def ppo_caption(run_dir: Path, rounds: int | None = None) -> str:
    """The PPO plot's caption; where a step's KL is below 0, why it can be."""
    kls = [k for _, _, (_, ks) in ppo_curves(run_dir, rounds) for k in ks]
    below = sum(k < 0 for k in kls)
    if not below:
        return PPO_CAPTION
    return (PPO_CAPTION + f" The KL is below 0 on {below} of {len(kls)} steps: each step's is "
            "estimated from its sampled responses (k1, the mean log-ratio of their tokens), "
            "which can fall below 0 though the KL itself cannot.")


PLOT_CAPTIONS = {
    "exec_accuracy": ("Execution accuracy by model (all questions and unseen phrasing), each "
                      "bar labelled with its share: 0.000 was measured, n/a was not."),
}


def describe_counts(results: dict) -> str:
    """'Greedy answers to the 600 held-out test questions; 145 of them in the phrasing kept
    for the test (the unseen-phrasing column).' Empty when the run has no count."""
    n, unseen = results.get("n_test"), results.get("n_unseen_phrasing")
    if not isinstance(n, int) or isinstance(n, bool):
        return ""
    text = f"Greedy answers to the {n} held-out test questions"
    if isinstance(unseen, int) and not isinstance(unseen, bool):
        text += (f"; {unseen} of them in the phrasing kept for the test (the unseen-phrasing "
                 "column)")
    return text + "."


HEADLINE_NOTE = ("The execution-accuracy differences (PPO − SFT, …) are in the share of the test "
                 "questions answered right: +0.010 is one more question right in a hundred.")


TABLE_NOTE = ("Each figure is a share from 0 to 1 of the test questions (the unseen-phrasing "
              "column: of those in the unseen phrasing). All questions: the answer returns the "
              "gold's result on the company database; does not run: its SQL fails to "
              "execute, so a wrong answer that runs is in neither.")

# Models whose names alone do not say what they are, as evaluate_pipeline names them.
MODEL_NOTES = {
    "sft_continued": "sft_continued is the control: SFT trained further on its demonstrations "
                     "for as many optimizer steps as PPO took",
    "ppo_execution_reward": "ppo_execution_reward: PPO rewarded by execution itself, a perfect "
                            "reward model",
    "ppo_execution_reward_on_test": "ppo_execution_reward_on_test: the same on the test "
                                    "questions' own prompts, a ceiling, not a model to use",
}


def describe_table(results: dict, names: list[str]) -> str:
    """What the execution table's figures are, and its models whose names do not say."""
    notes = [MODEL_NOTES[n] for n in names if n in MODEL_NOTES]
    if "ppo" in names:
        rounds = rounds_reported(results)
        last = f"ppo_round_{rounds}"
        notes.append("ppo is the last round's PPO model"
                     + (f" ({last})" if last in names else "")
                     + ", the one the headline numbers compare")
    return " ".join([TABLE_NOTE] + [f"{note}." for note in notes])


def plot_caption(name: str, run_dir: Path, results: dict) -> str:
    """The caption of the plot `name`: those that say what their data shows read it."""
    if name == "pretrain_loss":
        return pretrain_loss_caption(run_dir)
    if name == "rm_accuracy":
        return rm_accuracy_caption(run_dir, results)
    if name == "ppo_reward_kl":
        return ppo_caption(run_dir, rounds_reported(results))
    return PLOT_CAPTIONS[name]


def build_content(run_dir: Path, results: dict, plots: dict[str, Path]) -> ReportContent:
    overall = results.get("exec_acc") or {}
    unseen = results.get("exec_acc_unseen_phrasing") or {}
    errors = results.get("exec_error_rate") or {}  # absent from reports made before it
    suite = results.get("exec_acc_test_suite") or {}  # so is this
    ptx = results.get("ptx") if isinstance(results.get("ptx"), dict) else {}
    summary = [text for text in (describe_location(run_dir, results),
                                 describe_config(results.get("config")), describe_time(results))
               if text]
    headlines = [
        ("Execution accuracy, PPO − SFT", describe_delta(results.get("delta_ppo_vs_sft"))),
        ("Execution accuracy, PPO − SFT continued",
         describe_delta(results.get("delta_ppo_vs_sft_continued"))),
        ("Reward model held-out pairwise accuracy, last round (noise-free labeler)",
         fmt(results.get("rm_pairwise_acc"))),
        ("Reward model pairwise accuracy per round", describe_rounds(results)),
        ("Win rate of PPO over SFT (among answers of one verdict, the shorter wins)",
         fmt(results.get("win_rate_ppo_vs_sft"))),
        ("Win rate of PPO over SFT by verdict alone (answers of one verdict tie)",
         fmt(results.get("win_rate_ppo_vs_sft_by_verdict"))),
        ("KL(PPO ‖ SFT) per response (nats, sampled at T = 1)",
         fmt_significant(results.get("kl_ppo_vs_sft"), 3)),
    ]
    # The pretrained model's figure, the reference for the other two, is absent from the
    # report.json of a run evaluated before it was measured: no line, rather than an n/a that
    # says a stage did not run.
    if "corpus_ppl_pretrained" in ptx:
        headlines.append(("Pretraining-corpus perplexity, pretrained model",
                          fmt_significant(ptx["corpus_ppl_pretrained"])))
    headlines += [(f"Pretraining-corpus perplexity, {who}", fmt_significant(ptx.get(key)))
                  for who, key in (("SFT", "corpus_ppl_sft"), ("PPO", "corpus_ppl_ppo"))]
    if "delta_ppo_execution_reward_vs_sft" in results:
        headlines.append(("Execution accuracy, PPO on the execution reward − SFT",
                          describe_delta(results["delta_ppo_execution_reward_vs_sft"])))
    ceiling = results.get("delta_ppo_execution_reward_on_test_vs_sft")
    if ceiling is not None:
        headlines.append(("Ceiling: PPO on the execution reward, trained on the test prompts, "
                          "− SFT", describe_delta(ceiling)))
    if isinstance(results.get("headroom"), dict):
        headlines.append(describe_headroom(results["headroom"]))
    return ReportContent(
        title=report_title(run_dir, results),
        summary=summary,
        exec_rows=[(n, fmt(overall.get(n)), fmt(suite.get(n)), fmt(unseen.get(n)),
                    fmt(errors.get(n)))
                   for n in model_names(results)],
        headlines=headlines,
        headline_note=HEADLINE_NOTE,
        exec_counts=describe_counts(results),
        exec_legend=describe_table(results, model_names(results)),
        exec_note=(SUITE_NOTE.format(n=results.get("test_suite_variants", NA))
                   if suite else ""),
        plots=[(plot_caption(name, run_dir, results), path.relative_to(run_dir))
               for name, path in plots.items()],
        samples=collect_samples(results))


# ---------------------------------------------------------------------------- Markdown

def md_cell(text: str) -> str:
    # A table row is one line, and `|` would end the cell (even inside a code span in GFM).
    return " ".join(text.split()).replace("|", "\\|")


MD_SPECIAL = re.compile(r"[\\`*\[\]<&|~#]")


def md_intraword(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` has a letter or digit on both sides (CommonMark: a `_` run
    there neither opens nor closes emphasis)."""
    return (start > 0 and text[start - 1].isalnum() and end < len(text)
            and text[end].isalnum())


def md_text(text: str) -> str:
    """Plain text (a question, an id, a path) as Markdown that shows it as it is, on one line:
    `<` would start raw HTML (a `<script>` a viewer runs) and `[`/`]` a link or an image it
    fetches, `*`, `_`, `~` and backticks emphasis or code, `&` an entity, `|` a new table cell.
    Each is escaped with a backslash, as CommonMark allows for any ASCII punctuation; a run of
    `_` inside a word (`pretrain_steps`) cannot open or close emphasis and is left as it is."""
    text = MD_SPECIAL.sub(lambda m: "\\" + m.group(), " ".join(text.split()))
    return re.sub(r"_+", lambda m: m.group() if md_intraword(text, m.start(), m.end())
                  else "\\_" * len(m.group()), text)


def md_code(text: str) -> str:
    """A code span whose fence is longer than any run of backticks inside (CommonMark)."""
    if text == NA:
        return NA
    text = " ".join(text.split())
    if not text:  # CommonMark has no empty code span: "``" shows as two backticks
        return ""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return md_cell(f"{fence}{pad}{text}{pad}{fence}")


def mark(correct: bool | None) -> str:
    return {True: "✓", False: "✗", None: "?"}[correct]


def render_markdown(c: ReportContent) -> str:
    lines = [f"# {md_text(c.title)}", ""]
    for paragraph in c.summary:
        lines += [md_text(paragraph), ""]
    lines += ["## Execution accuracy", ""]
    if c.exec_rows:
        lines += ["| model | all questions | on the test suite | unseen phrasing | does not run |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {md_text(n)} | {a} | {t} | {u} | {e} |" for n, a, t, u, e in c.exec_rows]
        for note in (c.exec_counts, c.exec_legend, c.exec_note):
            if note:
                lines += ["", note]
    else:
        lines.append(NA)
    lines += ["", "## Headline numbers", ""]
    if c.headline_note:
        lines += [c.headline_note, ""]
    lines += [f"- {what}: {value}" for what, value in c.headlines]
    if c.plots:
        lines += ["", "## Plots"]
        for caption, rel in c.plots:
            lines += ["", f"![{caption}]({rel.as_posix()})"]
    lines += ["", "## Sample answers", ""]
    if c.samples:
        lines += [SAMPLES_NOTE, "", "| id | question | gold | SFT | PPO |", "|---|---|---|---|---|"]
        for s in c.samples:
            lines.append(f"| {md_text(s.id)} | {md_text(s.question)} | {md_code(s.gold)} | "
                         f"{mark(s.sft_correct)} {md_code(s.sft)} | "
                         f"{mark(s.ppo_correct)} {md_code(s.ppo)} |")
    else:
        lines.append(NA)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- HTML

HTML_TEMPLATE = ("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ c.title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id { white-space: nowrap; }
code { font-size: 0.9em; background: #f6f6f6; padding: 0 0.2rem; }
.ok { color: #1a7f37; } .bad { color: #b42318; }
figure { margin: 1rem 0; } img { max-width: 100%; }
</style>
</head>
<body>
<h1>{{ c.title }}</h1>
{% for paragraph in c.summary %}<p>{{ paragraph }}</p>
{% endfor %}
<h2>Execution accuracy</h2>
{% if c.exec_rows %}
<table>
<tr><th>model</th><th>all questions</th><th>on the test suite</th>"""
    """<th>unseen phrasing</th><th>does not run</th></tr>
{% for name, overall, suite, unseen, errors in c.exec_rows %}
<tr><td>{{ name }}</td><td class="num">{{ overall }}</td><td class="num">{{ suite }}</td>"""
    """<td class="num">{{ unseen }}</td><td class="num">{{ errors }}</td></tr>
{% endfor %}
</table>
{% if c.exec_counts %}<p>{{ c.exec_counts }}</p>{% endif %}
{% if c.exec_legend %}<p>{{ c.exec_legend }}</p>{% endif %}
{% if c.exec_note %}<p>{{ c.exec_note }}</p>{% endif %}
{% else %}<p>n/a</p>{% endif %}
<h2>Headline numbers</h2>
{% if c.headline_note %}<p>{{ c.headline_note }}</p>
{% endif %}
<ul>
{% for what, value in c.headlines %}<li>{{ what }}: {{ value }}</li>
{% endfor %}
</ul>
{% if images %}
<h2>Plots</h2>
{% for caption, uri in images %}
<figure><img src="{{ uri }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
{% endif %}
<h2>Sample answers</h2>
{% if c.samples %}
<p>{{ samples_note }}</p>
<table>
<tr><th>id</th><th>question</th><th>gold</th><th>SFT</th><th>PPO</th></tr>
{% for s in c.samples %}
<tr><td class="id">{{ s.id }}</td><td>{{ s.question }}</td><td><code>{{ s.gold }}</code></td>
<td>{{ verdict(s.sft_correct) }} <code>{{ s.sft }}</code></td>
<td>{{ verdict(s.ppo_correct) }} <code>{{ s.ppo }}</code></td></tr>
{% endfor %}
</table>
{% else %}<p>n/a</p>{% endif %}
</body>
</html>
""")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_verdict(correct: bool | None) -> Markup:
    cls = {True: "ok", False: "bad", None: ""}[correct]
    return Markup(f'<span class="{cls}">{mark(correct)}</span>')


def render_html(c: ReportContent, pngs: dict[Path, bytes]) -> str:
    """The page, self-contained: each plot of `c` (by its path under the run directory, in
    `pngs`) is embedded as a data URI, so viewing it fetches nothing."""
    # Autoescape: questions and model answers are text from the world and the model, not HTML.
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(HTML_TEMPLATE)
    images = [(caption, data_uri(pngs[rel])) for caption, rel in c.plots]
    return template.render(c=c, images=images, verdict=html_verdict, samples_note=SAMPLES_NOTE)


# ---------------------------------------------------------------------------- entry point

def write_report(run_dir: str | Path, results: dict) -> dict[str, Path]:
    """Write report.json, plots/*.png, report.md and report.html into `run_dir`.

    Returns the written files by their path relative to `run_dir`
    ("report.json", "plots/ppo_reward_kl.png", ...).
    """
    run_dir = Path(run_dir)
    # The numbers first: if anything below fails, the run's results are still on disk.
    write_json_atomic(run_dir / "report.json", results, non_finite="null")
    # Everything rendered before any file of the earlier report is replaced: a failure leaves
    # its plots, report.md and report.html as they were, one report, not half of two.
    pngs = render_plots(run_dir, results)
    plots = {name: plot_path(run_dir, name) for name in pngs}
    content = build_content(run_dir, results, plots)
    markdown = render_markdown(content)
    html = render_html(content, {plots[name].relative_to(run_dir): png
                                 for name, png in pngs.items()})
    write_plots(run_dir, pngs)
    write_text_atomic(run_dir / "report.md", markdown)
    write_text_atomic(run_dir / "report.html", html)
    written = {"report.json": run_dir / "report.json", "report.md": run_dir / "report.md",
               "report.html": run_dir / "report.html"}
    written.update({f"plots/{path.name}": path for path in plots.values()})
    return written
