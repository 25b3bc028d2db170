"""The pipeline report: report.json round-trips, the Markdown and HTML show the numbers, plots
are real PNGs, user text is escaped, and a run with nothing in it still gets a report."""
import base64
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from gptlab.eval.report import describe_delta, md_code, read_report, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def fake_run(run_dir: Path) -> None:
    write_rows(run_dir / "pretrain" / "metrics.jsonl", [
        {"step": 0, "val_loss": 5.0, "val_ppl": 148.4},
        {"step": 2, "event": "budget", "total_steps": 20},   # neither loss: skipped
        {"step": 10, "loss": 4.0, "lr": 1e-3},
        {"step": 20, "loss": 3.0, "lr": 1e-3},
        {"step": 20, "val_loss": 3.2, "val_ppl": 24.5},
    ])
    for r in (1, 2):
        write_rows(run_dir / f"round-{r}" / "reward" / "metrics.jsonl", [
            {"step": 0, "val_loss": 0.69, "pairwise_acc": 0.5},
            {"step": 5, "loss": 0.6},
            {"step": 10, "val_loss": 0.5, "pairwise_acc": 0.6 + 0.1 * r},
        ])
        write_rows(run_dir / f"round-{r}" / "ppo" / "metrics.jsonl",
                   [{"step": s, "reward": 0.1 * s * r, "kl": 0.01 * s} for s in range(1, 6)])
    # a stage still writing: a half line at the end must not break the report
    with open(run_dir / "round-2" / "ppo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')


def full_results() -> dict:
    names = ["pretrained", "sft", "sft_continued", "ppo_round_1", "ppo_round_2", "ppo"]
    return {
        "config": {"preset": "tiny", "seed": 7, "rounds": 2,
                   "steps": {"pretrain": 20, "sft": 10, "reward": 10, "ppo": 5}},
        "minutes": 12.34,
        "stage_minutes": {"pretrain": 5.0, "sft": 2.0, "reward": 1.5, "ppo": 3.84},
        "exec_acc": dict(zip(names, [0.05, 0.512, 0.53, 0.6, 0.625, 0.625])),
        "exec_acc_unseen_phrasing": dict(zip(names, [0.0, 0.4, 0.41, 0.45, 0.5, None])),
        "exec_error_rate": dict(zip(names, [0.9, 0.04, 0.035, 0.05, 0.0417, 0.0417])),
        "exec_acc_test_suite": dict(zip(names, [0.05, 0.5, 0.525, 0.6, 0.62, 0.62])),
        "test_suite_variants": 16,
        "n_test": 600,
        "n_unseen_phrasing": 145,
        "delta_ppo_vs_sft": {"mean": 0.113, "ci95": [0.051, 0.175]},
        "delta_ppo_vs_sft_continued": {"mean": 0.095, "ci95": [-0.02, 0.21]},
        "rm_pairwise_acc": 0.8,
        "rm_pairwise_acc_per_round": [0.7, 0.8],
        "rm_pairwise_acc_ci95_per_round": [[0.55, 0.85], None],
        "rm_heldout_rankings_per_round": [28, 66],
        "rm_heldout_pairs_per_round": [40, 131],
        "rm_pairwise_acc_labelers_per_round": [0.65, None],
        "win_rate_ppo_vs_sft": 0.64,
        "win_rate_ppo_vs_sft_by_verdict": 0.62,
        "kl_ppo_vs_sft": 1.2345,
        "ptx": {"corpus_ppl_sft": 21.456, "corpus_ppl_ppo": 22.5},
        "samples": [
            {"id": "q1", "question": "How many employees earn less than 50000?",
             "gold": "SELECT COUNT(*) FROM employees WHERE salary < 50000",
             "sft": "SELECT COUNT(*) FROM employees", "ppo":
             "SELECT COUNT(*) FROM employees WHERE salary < 50000",
             "sft_correct": False, "ppo_correct": True},
            {"id": "q2", "question": "Names joined with a pipe?",
             "gold": "SELECT first || ' ' || last FROM employees",
             "sft": "<script>alert(1)</script>", "ppo": "SELECT `name` FROM employees",
             "sft_correct": False, "ppo_correct": False},
        ] + [{"id": f"q{i}", "question": f"question {i}", "gold": "SELECT 1", "sft": "SELECT 1",
              "ppo": "SELECT 1", "sft_correct": True, "ppo_correct": True}
             for i in range(3, 15)],
    }


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    fake_run(run_dir)
    results = full_results()
    return run_dir, results, write_report(run_dir, results)


def test_report_json_round_trips(full_report):
    run_dir, results, written = full_report
    assert json.loads((run_dir / "report.json").read_text()) == results
    assert written["report.json"] == run_dir / "report.json"


def test_all_four_plots_are_png_files(full_report):
    run_dir, _, written = full_report
    plots = sorted(k for k in written if k.startswith("plots/"))
    assert plots == ["plots/exec_accuracy.png", "plots/ppo_reward_kl.png",
                     "plots/pretrain_loss.png", "plots/rm_accuracy.png"]
    for key in plots:
        assert written[key].read_bytes()[:8] == PNG_SIGNATURE
    assert not list((run_dir / "plots").glob(".*.tmp"))  # no temp files left behind


def test_markdown_exec_table_and_deltas(full_report):
    run_dir, _, _ = full_report
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# gptlab pipeline report")
    assert ("| model | all questions | on the test suite | unseen phrasing | does not run |"
            in md)
    assert "| sft | 0.512 | 0.500 | 0.400 | 0.040 |" in md
    assert "| ppo | 0.625 | 0.620 | n/a | 0.042 |" in md
    assert "| pretrained | 0.050 | 0.050 | 0.000 | 0.900 |" in md
    assert "and on each of 16 variant databases" in md
    # the questions the table is over, so a reader sees it is the whole test split
    assert ("Greedy answers to the 600 held-out test questions; 145 of them in the phrasing "
            "kept for the test (the unseen-phrasing column)." in md)
    assert "+0.113, 95% CI [+0.051, +0.175]: the interval excludes 0" in md
    assert "+0.095, 95% CI [−0.020, +0.210]: the interval includes 0" in md
    assert "Win rate of PPO over SFT (among answers of one verdict, the shorter wins): 0.640" in md
    assert "Win rate of PPO over SFT by verdict alone (answers of one verdict tie): 0.620" in md
    assert "(nats, sampled at T = 1): 1.23\n" in md
    assert "perplexity, SFT: 21.46" in md and "perplexity, PPO: 22.50" in md
    assert ("round 1: 0.700, 95% CI [0.550, 0.850] (28 held-out rankings, 40 pairs; 0.650 by the "
            "labelers' rankings), "
            "round 2: 0.800 (66 held-out rankings, 131 pairs)" in md)
    assert "Reward model held-out pairwise accuracy, last round (noise-free labeler): 0.800" in md
    assert "preset tiny; seed 7; rounds 2; steps: pretrain 20, sft 10, reward 10, ppo 5" in md
    assert ("Total wall time: 12.3 min (by stage, in minutes: pretrain 5.0, sft 2.0, reward 1.5, "
            "ppo 3.8)" in md)


def test_markdown_embeds_existing_plots(full_report):
    run_dir, _, _ = full_report
    md = (run_dir / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 4
    for rel in images:
        assert rel.startswith("plots/")
        assert (run_dir / rel).read_bytes()[:8] == PNG_SIGNATURE


def test_markdown_sample_table(full_report):
    run_dir, _, _ = full_report
    md = (run_dir / "report.md").read_text()
    assert "| id | question | gold | SFT | PPO |" in md
    # how the samples were picked and what the marks mean, above the table in both documents
    note = ("The first three test questions, then the next ones where SFT and PPO (the last "
            "round's) answer differently. ✓: the answer returns the gold's result on the company "
            "database; ✗: it does not.")
    assert f"## Sample answers\n\n{note}\n\n| id |" in md
    assert f"<p>{note.replace(chr(39), '&#39;')}</p>" in (run_dir / "report.html").read_text()
    rows = [line for line in md.splitlines() if re.match(r"\| q\d+ \|", line)]
    assert len(rows) == 10  # at most ten samples
    assert rows[0] == ("| q1 | How many employees earn less than 50000? | "
                       "`SELECT COUNT(*) FROM employees WHERE salary < 50000` | "
                       "✗ `SELECT COUNT(*) FROM employees` | "
                       "✓ `SELECT COUNT(*) FROM employees WHERE salary < 50000` |")
    # pipes escaped so the row keeps its five cells; a backtick inside gets a longer fence
    assert r"`SELECT first \|\| ' ' \|\| last FROM employees`" in rows[1]
    assert "``SELECT `name` FROM employees``" in rows[1]
    assert len(re.split(r"(?<!\\)\|", rows[1])) == 7


def test_html_is_self_contained_and_escaped(full_report):
    run_dir, _, _ = full_report
    html = (run_dir / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 4
    assert all(base64.b64decode(u)[:8] == PNG_SIGNATURE for u in uris)
    assert "plots/" not in html  # nothing linked from outside the page
    assert "WHERE salary &lt; 50000" in html and "salary < 50000" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "<td class=\"num\">0.512</td>" in html
    assert "<th>does not run</th>" in html and "<td class=\"num\">0.900</td>" in html
    assert "<th>on the test suite</th>" in html and "each of 16 variant databases" in html
    assert "<p>Greedy answers to the 600 held-out test questions; 145 of them" in html
    assert "the interval excludes 0" in html


def test_minimal_results_still_write_everything(tmp_path):
    results = {"config": None, "minutes": None, "stage_minutes": None, "exec_acc": None,
               "exec_acc_unseen_phrasing": None, "delta_ppo_vs_sft": None,
               "delta_ppo_vs_sft_continued": None, "rm_pairwise_acc": None,
               "rm_pairwise_acc_per_round": None, "win_rate_ppo_vs_sft": None,
               "kl_ppo_vs_sft": None, "ptx": None, "samples": None}
    written = write_report(tmp_path, results)
    assert sorted(written) == ["report.html", "report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text()) == results
    md = (tmp_path / "report.md").read_text()
    assert "Win rate of PPO over SFT (among answers of one verdict, the shorter wins): n/a" in md
    assert "PPO − SFT: n/a" in md
    assert "![" not in md and "held-out test questions" not in md  # no count: no sentence
    assert "data:image/png" not in (tmp_path / "report.html").read_text()
    assert write_report(tmp_path, {})["report.md"].exists()  # no keys at all


def test_stale_plot_removed_when_its_data_is_gone(tmp_path):
    fake_run(tmp_path)
    assert "plots/ppo_reward_kl.png" in write_report(tmp_path, full_results())
    for r in (1, 2):
        (tmp_path / f"round-{r}" / "ppo" / "metrics.jsonl").unlink()
    written = write_report(tmp_path, full_results())
    assert "plots/ppo_reward_kl.png" not in written
    assert not (tmp_path / "plots" / "ppo_reward_kl.png").exists()
    assert "plots/ppo_reward_kl.png" not in (tmp_path / "report.md").read_text()


def test_delta_and_code_span_edge_cases():
    assert describe_delta({"mean": -0.1, "ci95": [-0.2, -0.05]}).endswith("excludes 0")
    # A bound on one side of 0 that rounds to 0.000 is shown to its first digit.
    assert describe_delta({"mean": -0.017, "ci95": [-0.0333, -4.9e-5]}) == \
        "−0.017, 95% CI [−0.033, −0.000049]: the interval excludes 0"
    assert describe_delta({"mean": 0.1, "ci95": None}) == "+0.100 (no confidence interval)"
    for ci in ([0.1], [0.0, 0.1, 0.2], "0.1"):  # not two bounds: no interval, no crash
        assert describe_delta({"mean": 0.1, "ci95": ci}) == "+0.100 (no confidence interval)"
    assert describe_delta({"mean": -0.03, "ci95": [-0.048, -0.012], "better": 6, "worse": 24,
                           "p_sign": 0.001431}) == (
        "−0.030, 95% CI [−0.048, −0.012]: the interval excludes 0 (better on 6 questions, worse "
        "on 24; sign test p = 0.0014)")
    assert describe_delta({"mean": None, "ci95": [0, 1]}) == "n/a"
    assert md_code("`x`") == "`` `x` ``"
    assert md_code("a\nb") == "`a b`"
    assert md_code("") == md_code(" \n ") == ""  # an empty answer, not "``" (two backticks)


def test_corpus_perplexity_weighs_each_batch_by_its_tokens():
    # Five full batches at loss 1 and a last batch of one block at loss 5: per token the mean
    # loss is (40 + 5) / 41 blocks' worth; averaging batches gave (5 + 5) / 6 (exp: 5.29).
    import math

    import torch

    from gptlab.eval.pipeline_eval import corpus_perplexity

    class Model(torch.nn.Linear):  # a module: the batches go to its parameters' device
        def forward(self, x, labels, all_targets=False):
            return torch.tensor(5.0 if x.shape[0] == 1 else 1.0)
    model = Model(1, 1)
    batches = [torch.zeros(8, 17, dtype=torch.long)] * 5 + [torch.zeros(1, 17, dtype=torch.long)]
    assert corpus_perplexity(model, batches) == pytest.approx(math.exp(45 / 41))


def test_a_round_beyond_the_results_leaves_no_curve(tmp_path):
    # A run stopped in round 3 and finished with --rounds 2 keeps round-3/: its curves are none
    # of the results', and the plots showed them as a third round.
    clean, stale = tmp_path / "clean", tmp_path / "stale"
    for run_dir in (clean, stale):
        fake_run(run_dir)
    write_rows(stale / "round-3" / "reward" / "metrics.jsonl", [{"step": 0, "pairwise_acc": 0.1}])
    write_rows(stale / "round-3" / "ppo" / "metrics.jsonl", [{"step": 1, "reward": 9, "kl": 9}])
    results = full_results()
    for run_dir in (clean, stale):
        write_report(run_dir, results)
    for name in ("ppo_reward_kl", "rm_accuracy"):
        assert (stale / "plots" / f"{name}.png").read_bytes() == \
            (clean / "plots" / f"{name}.png").read_bytes()
    from gptlab.eval.report import plot_ppo, plot_rm_accuracy, rounds_reported
    assert rounds_reported(results) == 2
    labels = plot_ppo(stale, rounds_reported(results)).axes[0].get_legend_handles_labels()[1]
    assert labels == ["round 1", "round 2"]
    assert plot_rm_accuracy(stale, results).axes[-1].get_legend_handles_labels()[1] == \
        ["round 1", "round 2"]
    # Without config.rounds, the rounds are those the reward-model accuracies are of.
    assert rounds_reported({"rm_pairwise_acc_per_round": [0.7]}) == 1
    assert rounds_reported({}) is None and rounds_reported({"config": {"rounds": True}}) is None


EVIL = "a <script>alert(1)</script> ![x](http://example.invalid/x.png) *b* _c_ R&amp;D ~~d~~ `e` #"


def test_markdown_shows_user_text_as_text(tmp_path):
    # A question, an id, a model's name and a path are text: in a Markdown cell `<script>` was
    # raw HTML a viewer runs, `![x](url)` an image it fetches, `*b*` emphasis, `&amp;` an entity.
    results = full_results()
    results["samples"][0].update(id="<b>q1</b>", question=EVIL + "\nsecond line | cell")
    results["exec_acc"]["<i>m</i>"] = 0.5
    results["config"]["out"] = "/tmp/<img src=x>/my_run_"
    run_dir = tmp_path / "run_#1"
    write_report(run_dir, results)
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# gptlab pipeline report: /tmp/\\<img src=x>/my_run\\_\n")
    assert "run\\_\\#1; the run was made in /tmp/\\<img src=x>/my_run\\_.\n" in md
    assert ("out /tmp/\\<img src=x>/my_run\\_." in md)  # the `_` inside my_run stays as it is
    assert "| \\<i>m\\</i> | 0.500 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| \\<b>q1"))
    assert row.startswith(
        "| \\<b>q1\\</b> | a \\<script>alert(1)\\</script> !\\[x\\](http://example.invalid/x.png) "
        "\\*b\\* \\_c\\_ R\\&amp;D \\~\\~d\\~\\~ \\`e\\` \\# second line \\| cell | `SELECT")
    assert len(re.split(r"(?<!\\)\|", row)) == 7  # still five cells
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    for raw in ("<script>", "<img", "<b>", "<i>", "<em>", "<s>", "&amp;D"):
        assert raw not in rendered.replace("<img src=\"plots/", "")  # the report's own plots
    assert "a &lt;script&gt;alert(1)&lt;/script&gt; ![x](http://example.invalid/x.png) *b* _c_ " \
        "R&amp;amp;D ~~d~~ `e` # second line | cell</td>" in rendered
    assert "&lt;img src=x&gt;/my_run_." in rendered and "<td>&lt;i&gt;m&lt;/i&gt;</td>" in rendered


def test_every_plot_has_labelled_axes_and_titles_inside_the_figure(tmp_path):
    # The reward-model plot's second title ran past both edges of the figure, cut off.
    from gptlab.eval.report import plot_exec_acc, plot_ppo, plot_pretrain_loss, plot_rm_accuracy
    fake_run(tmp_path)
    results = full_results()
    figures = [plot_pretrain_loss(tmp_path), plot_rm_accuracy(tmp_path, results),
               plot_ppo(tmp_path), plot_exec_acc(results)]
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width = fig.bbox.width
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_title()
            # the bar chart's x axis is the models, named at each tick
            assert ax.get_xlabel() or [t.get_text() for t in ax.get_xticklabels()] == \
                ["pretrained", "sft", "sft_continued", "ppo_round_1", "ppo_round_2", "ppo"]
            box = ax.title.get_window_extent(renderer)
            assert 0 <= box.x0 and box.x1 <= width, ax.get_title()


def test_a_number_that_is_nan_or_infinite_is_shown_as_such_not_as_missing(tmp_path):
    # report.json has NaN / Infinity; the report said n/a, as if the stage had not run.
    results = full_results()
    results["kl_ppo_vs_sft"] = math.nan
    results["ptx"] = {"corpus_ppl_sft": 21.456, "corpus_ppl_ppo": math.inf}
    results["exec_acc"]["sft"] = math.nan
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert "(nats, sampled at T = 1): nan" in md
    assert "perplexity, PPO: inf" in md
    assert "| sft | nan | 0.500 | 0.400 | 0.040 |" in md
    assert "(nats, sampled at T = 1): nan" in (tmp_path / "report.html").read_text()


def test_report_json_is_strict_json_and_reads_back_its_nan_and_infinity(tmp_path):
    # Python's json wrote the bare tokens NaN and Infinity: jq and JSON.parse refused the file.
    from test_io import same, strict_loads
    results = full_results()
    results["kl_ppo_vs_sft"] = math.nan
    results["ptx"] = {"corpus_ppl_sft": 21.456, "corpus_ppl_ppo": math.inf}
    results["exec_acc"]["sft"] = math.nan
    write_report(tmp_path, results)
    doc = strict_loads((tmp_path / "report.json").read_text())
    assert doc["kl_ppo_vs_sft"] is None and doc["ptx"]["corpus_ppl_ppo"] is None
    assert doc["exec_acc"]["sft"] is None and doc["exec_acc"]["ppo"] == 0.625
    assert doc["non_finite"] == {"/exec_acc/sft": "NaN", "/kl_ppo_vs_sft": "NaN",
                                 "/ptx/corpus_ppl_ppo": "Infinity"}
    assert same(read_report(tmp_path / "report.json"), results)
    # Made again from its report.json, the report still says nan and inf, not n/a.
    first = snapshot(tmp_path)
    write_report(tmp_path, read_report(tmp_path / "report.json"))
    assert snapshot(tmp_path) == first


def test_an_earlier_report_json_with_bare_nan_still_reads(tmp_path):
    (tmp_path / "report.json").write_text('{"kl_ppo_vs_sft": NaN, "ptx": {"corpus_ppl_ppo": '
                                          'Infinity}, "minutes": 3.5}\n')
    got = read_report(tmp_path / "report.json")
    assert math.isnan(got["kl_ppo_vs_sft"]) and got["ptx"]["corpus_ppl_ppo"] == math.inf
    assert got["minutes"] == 3.5


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "metrics" not in p.name}


def test_regenerating_from_report_json_is_deterministic(tmp_path):
    # The report made again from its own report.json is the same file for file, byte for byte.
    fake_run(tmp_path)
    write_report(tmp_path, full_results())
    first = snapshot(tmp_path)
    write_report(tmp_path, json.loads((tmp_path / "report.json").read_text()))
    assert snapshot(tmp_path) == first
    assert sorted(first) == ["plots/exec_accuracy.png", "plots/ppo_reward_kl.png",
                             "plots/pretrain_loss.png", "plots/rm_accuracy.png", "report.html",
                             "report.json", "report.md"]


def test_a_report_that_fails_to_render_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    # report.md and the plots were replaced before report.html was rendered: a failure there
    # left the new Markdown and plots beside the old page.
    from gptlab.eval import report
    fake_run(tmp_path)
    write_report(tmp_path, full_results())
    before = snapshot(tmp_path)
    for r in (1, 2):  # the PPO plot would go, and the numbers change
        (tmp_path / f"round-{r}" / "ppo" / "metrics.jsonl").unlink()
    changed = {**full_results(), "win_rate_ppo_vs_sft": 0.1}

    def fail(*args):
        raise RuntimeError("rendering failed")
    monkeypatch.setattr(report, "render_html", fail)
    with pytest.raises(RuntimeError, match="rendering failed"):
        write_report(tmp_path, changed)
    after = snapshot(tmp_path)
    assert json.loads(after.pop("report.json")) == changed  # the numbers first, as before
    before.pop("report.json")
    assert after == before
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporaries


def test_the_pretrained_model_s_corpus_perplexity_leads_sft_s_and_ppo_s(tmp_path):
    # The report gave SFT's and PPO's perplexity on the pretraining corpus without the
    # pretrained model's, the figure that says what SFT forgot and PPO-ptx brought back.
    results = full_results()
    results["ptx"] = {"corpus_ppl_sft": 1049.94, "corpus_ppl_ppo": 284.237,
                      "corpus_ppl_pretrained": 1.5964}
    write_report(tmp_path, results)
    lines = ["Pretraining-corpus perplexity, pretrained model: 1.596",
             "Pretraining-corpus perplexity, SFT: 1050",
             "Pretraining-corpus perplexity, PPO: 284.2"]
    assert "\n".join(f"- {line}" for line in lines) in (tmp_path / "report.md").read_text()
    assert "\n".join(f"<li>{line}</li>" for line in lines) in \
        (tmp_path / "report.html").read_text()
    # A report.json evaluated before the figure was measured has no such line, not an n/a
    # that would say the pretrained model was never made.
    write_report(tmp_path, full_results())
    md = (tmp_path / "report.md").read_text()
    assert "pretrained model:" not in md and "Pretraining-corpus perplexity, SFT: 21.46" in md


def test_reward_model_evaluations_too_few_for_a_trend_are_not_joined(tmp_path):
    # A line joined each round's only two evaluations (step 0 and its end), and the two rounds'
    # accuracies, which read as trends nothing measured; the caption did not say which panel
    # showed what.
    from gptlab.eval.report import plot_rm_accuracy
    fake_run(tmp_path)
    results = full_results()
    write_rows(tmp_path / "round-2" / "reward" / "metrics.jsonl", [
        {"step": s, "pairwise_acc": a} for s, a in ((0, 0.5), (5, 0.6), (10, 0.7))])
    top, bottom = plot_rm_accuracy(tmp_path, results).axes
    curves = {line.get_label(): line for line in bottom.get_lines()
              if line.get_label().startswith("round")}
    assert list(curves["round 1"].get_xdata()) == [0, 10]
    assert curves["round 1"].get_linestyle() == "None"           # two evaluations: points
    assert curves["round 1"].get_marker() == "o"
    assert list(curves["round 2"].get_xdata()) == [0, 5, 10]
    assert curves["round 2"].get_linestyle() == "-"              # three: a curve
    per_round = {line.get_label(): line for line in top.get_lines()}
    noise_free = per_round["judged by the noise-free labeler (95% interval)"]
    assert list(noise_free.get_ydata()) == [0.7, 0.8] and noise_free.get_linestyle() == "None"
    assert per_round["judged by the labelers' own rankings"].get_linestyle() == "None"
    # Round 1's interval [0.55, 0.85] as an error bar; round 2 has none (null) and gets none.
    (bars,) = [c for c in top.collections if len(c.get_segments()) == 1]
    assert bars.get_segments()[0].tolist() == [[1.0, 0.55], [1.0, 0.85]]

    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    caption = re.search(r"!\[(Reward model: [^]]*)\]\(plots/rm_accuracy\.png\)", md).group(1)
    assert caption.startswith("Reward model: top, each round's trained reward model on its "
                              "held-out answer pairs")
    assert "; bottom, the same reward models against the labelers' own held-out rankings at " \
           "each evaluation during their training, step 0 before any; a round evaluated fewer " \
           "than 3 times shows its points unjoined" in caption
    assert f"<figcaption>{caption.replace(chr(39), '&#39;')}</figcaption>" in \
        (tmp_path / "report.html").read_text()


def test_settings_left_unset_say_what_that_means_in_both_documents(tmp_path):
    # `world n/a; ... demonstrator_flaw n/a; ... eval_limit n/a; headroom False`: n/a read as a
    # figure missing, and True / False as Python's.
    results = full_results()
    results["config"] = {"preset": "demo", "world": None, "threads": 2, "sft_examples": None,
                         "demonstrator_flaw": None, "ties": True, "eval_limit": None,
                         "headroom": False, "new_option": None,
                         "steps": {"pretrain": 20, "sft": None}}
    write_report(tmp_path, results)
    settings = ("Pipeline settings: preset demo; world built-in; threads 2; sft_examples all; "
                "demonstrator_flaw none; ties on; eval_limit all; headroom off; new_option unset; "
                "steps: pretrain 20, sft unset.")
    md = (tmp_path / "report.md").read_text()
    assert f"\n\n{settings}\n\nTotal wall time: 12.3 min (by stage, in minutes: " in md
    html = (tmp_path / "report.html").read_text()
    assert f"<p>{settings.replace(chr(39), '&#39;')}</p>\n<p>Total wall time: 12.3 min" in html
    assert "n/a" not in md.split("## Execution accuracy")[0]


def test_thread_counts_of_a_resumed_stage_read_in_turn_not_as_a_python_list(tmp_path):
    # A stage resumed on another thread count showed as "pretrain [1, 2]" in report.md and
    # report.html; report.json keeps the list a script reads.
    results = full_results()
    results["config"] = {"preset": "demo", "threads": {"pretrain": [1, 2, 4], "sft": 2}}
    write_report(tmp_path, results)
    settings = "Pipeline settings: preset demo; threads: pretrain 1, then 2, then 4, sft 2."
    md = (tmp_path / "report.md").read_text()
    assert f"\n\n{settings}\n\n" in md and "[" not in md.split("\n\n")[1]
    assert f"<p>{settings}</p>" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["config"]["threads"] == {
        "pretrain": [1, 2, 4], "sft": 2}


def test_the_execution_table_says_what_its_figures_and_models_are(tmp_path):
    # "does not run", the figures' scale, sft_continued (the control) and ppo (a second row of
    # the last round's model) were named nowhere in the report.
    fake_run(tmp_path)
    results = full_results()
    write_report(tmp_path, results)
    legend = ("Each figure is a share from 0 to 1 of the test questions (the unseen-phrasing "
              "column: of those in the unseen phrasing). All questions: the answer returns the "
              "gold's result on the company database; does not run: its SQL fails to execute, "
              "so a wrong answer that runs is in neither. sft_continued is the control: SFT "
              "trained further on its demonstrations for as many optimizer steps as PPO took. "
              "ppo is the last round's PPO model (ppo_round_2), the one the headline numbers "
              "compare.")
    md = (tmp_path / "report.md").read_text()
    assert f"kept for the test (the unseen-phrasing column).\n\n{legend}\n\nOn the test suite" in md
    assert f"<p>{legend.replace(chr(39), '&#39;')}</p>" in (tmp_path / "report.html").read_text()
    # The reward the PPO plot shows is each round's own reward model's: no trend across rounds.
    assert "by that round's reward model, before the KL penalty (each round has its own reward " \
           "model, so scores do not compare across rounds)" in md
    # A table of other models explains only those it has.
    results["exec_acc"] = {"sft": 0.5, "ppo_execution_reward": 0.6}
    results["exec_acc_unseen_phrasing"] = {}
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert "so a wrong answer that runs is in neither. ppo_execution_reward: PPO rewarded by " \
           "execution itself, a perfect reward model.\n" in md
    assert "sft_continued is" not in md and "ppo is" not in md


def test_each_execution_bar_is_labelled_so_a_measured_zero_is_not_a_missing_value(tmp_path):
    # The pretrained model's unseen-phrasing accuracy, a measured 0.000, drew no bar, as a
    # missing value did: the two looked the same.
    from gptlab.eval.report import plot_exec_acc
    results = full_results()
    results["exec_acc"]["ppo"] = 1.0  # its label still inside the figure, clear of the legend
    fig = plot_exec_acc(results)
    (ax,) = fig.axes
    labels = {(round(t.xy[0], 1), t.get_text()): t for t in ax.texts}
    assert sorted(labels) == sorted(
        [(x - 0.2, v) for x, v in enumerate(["0.050", "0.512", "0.530", "0.600", "0.625",
                                             "1.000"])]
        + [(x + 0.2, v) for x, v in enumerate(["0.000", "0.400", "0.410", "0.450", "0.500",
                                               "n/a"])])
    assert labels[(0.2, "0.000")].xy == (0.2, 0.0)  # pretrained, unseen phrasing: measured 0
    assert labels[(5.2, "n/a")].xy == (5.2, 0.0)    # ppo, unseen phrasing: not measured
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        assert not box.overlaps(legend)
    write_report(tmp_path, results)
    assert "each bar labelled with its share: 0.000 was measured, n/a was not" in \
        (tmp_path / "report.md").read_text()


def test_the_ppo_caption_says_why_a_step_s_kl_can_be_below_zero(tmp_path):
    # The KL panel showed steps below 0 (a sampled batch's k1 estimate) with no word on why,
    # which read as a bug in a quantity that cannot be negative.
    from gptlab.eval.report import PPO_CAPTION, ppo_caption
    fake_run(tmp_path)
    assert ppo_caption(tmp_path, 2) == PPO_CAPTION  # no step below 0: no word of it
    write_rows(tmp_path / "round-1" / "ppo" / "metrics.jsonl",
               [{"step": s, "reward": 0.1, "kl": k} for s, k in ((1, -0.02), (2, 0.0),
                                                                 (3, -0.001), (4, 0.05))])
    write_report(tmp_path, full_results())
    note = ("(the headline KL is at T = 1). The KL is below 0 on 2 of 9 steps: each step's is "
            "estimated from its sampled responses (k1, the mean log-ratio of their tokens), "
            "which can fall below 0 though the KL itself cannot.](plots/ppo_reward_kl.png)")
    assert note in (tmp_path / "report.md").read_text()
    assert "which can fall below 0 though the KL itself cannot.</figcaption>" in \
        (tmp_path / "report.html").read_text()


def test_the_headline_differences_say_once_what_they_are_differences_of(tmp_path):
    # "PPO − SFT: +0.000 ..." did not say +0.000 of what: the share of the test questions
    # answered right.
    write_report(tmp_path, full_results())
    note = ("The execution-accuracy differences (PPO − SFT, …) are in the share of the test "
            "questions answered right: +0.010 is one more question right in a hundred.")
    md = (tmp_path / "report.md").read_text()
    assert f"## Headline numbers\n\n{note}\n\n- Execution accuracy, PPO − SFT: +0.113" in md
    assert md.count("share of the test questions answered right") == 1
    assert f"<h2>Headline numbers</h2>\n<p>{note}</p>\n<ul>" in \
        (tmp_path / "report.html").read_text()


def test_perplexities_are_shown_to_four_significant_digits():
    # At a fixed 2 decimals SFT's 1049.94 showed six digits, and a pretrained model's 1.5964
    # only three.
    from gptlab.eval.report import fmt_significant
    cases = {1049.939925645905: "1050", 284.23776173397204: "284.2", 1.5964: "1.596",
             21.456: "21.46", 22.5: "22.50", 9.99996: "10.00", 999.96: "1000", 12345.6: "12346",
             1.0: "1.000", 0.0: "0.000", None: "n/a", math.nan: "nan", math.inf: "inf"}
    assert {x: fmt_significant(x) for x in cases} == cases


def test_the_title_names_the_run_as_its_settings_do_and_a_copy_says_where_it_is(tmp_path,
                                                                               monkeypatch):
    # The title came from the directory's name and the settings' `out` from the run: a copy of
    # runs/demo reported again in archive/demo-copy was titled demo-copy over "out runs/demo".
    monkeypatch.chdir(tmp_path)
    results = full_results()
    results["config"]["out"] = "runs/demo"
    write_report(Path("runs/demo"), results)  # as the pipeline writes it: no word of where
    md = (tmp_path / "runs/demo/report.md").read_text()
    assert md.startswith("# gptlab pipeline report: runs/demo\n\nPipeline settings: preset ")
    assert "<title>gptlab pipeline report: runs/demo</title>" in \
        (tmp_path / "runs/demo/report.html").read_text()
    write_report(tmp_path / "runs/demo", results)  # the same directory by another path
    assert (tmp_path / "runs/demo/report.md").read_text() == md

    write_report(Path("archive/demo-copy"), results)
    where = "This report was written in archive/demo-copy; the run was made in runs/demo."
    md = (tmp_path / "archive/demo-copy/report.md").read_text()
    assert md.startswith(f"# gptlab pipeline report: runs/demo\n\n{where}\n\nPipeline settings")
    html = (tmp_path / "archive/demo-copy/report.html").read_text()
    assert f"<h1>gptlab pipeline report: runs/demo</h1>\n<p>{where}</p>" in html

    del results["config"]["out"]  # a run that did not record it: the directory's name
    write_report(Path("archive/demo-copy"), results)
    md = (tmp_path / "archive/demo-copy/report.md").read_text()
    assert md.startswith("# gptlab pipeline report: demo-copy\n\nPipeline settings")


def test_a_run_reported_again_from_another_directory_is_not_said_to_be_elsewhere(tmp_path,
                                                                                  monkeypatch):
    # `out` is recorded as typed (runs/demo, relative to where the run started): read from
    # another current directory, the run's own report said it was written in runs/demo's
    # absolute path "; the run was made in runs/demo", another directory.
    run_dir = tmp_path / "proj" / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"paths": {"out": str(run_dir)}}))
    results = full_results()
    results["config"]["out"] = "runs/demo"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    write_report(run_dir, results)
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# gptlab pipeline report: runs/demo\n\nPipeline settings: ")
    copy = tmp_path / "archive" / "demo-copy"  # a copy is still told apart, by where it was made
    shutil.copytree(run_dir, copy)
    write_report(copy, results)
    assert (f"\n\nThis report was written in {copy}; the run was made in {run_dir}.\n\n"
            in (copy / "report.md").read_text())


def test_pretraining_validation_evaluations_are_points_and_the_caption_says_when_they_were(
        tmp_path):
    # The validation loss, evaluated every 50 steps, was a solid line from step 0's 7.1 to step
    # 50's 0.96: a descent nothing measured (the training loss was 2.2 by step 20).
    from gptlab.eval.report import plot_pretrain_loss, pretrain_loss_caption
    fake_run(tmp_path)  # evaluated at steps 0 and 20 only
    (ax,) = plot_pretrain_loss(tmp_path).axes
    train, val = ax.get_lines()
    assert list(val.get_xdata()) == [0, 20] and val.get_marker() == "o"
    assert val.get_linestyle() == "None"                    # two evaluations: no line
    write_report(tmp_path, full_results())
    caption = ("Pretraining: the training loss of a single step's batch, every 10 steps from "
               "step 10 (the line); the validation loss at each of its 2 evaluations, every 20 "
               "steps from step 0 (circles, unjoined: fewer than 3 evaluations are no trend).")
    assert f"![{caption}](plots/pretrain_loss.png)" in (tmp_path / "report.md").read_text()
    assert f"<figcaption>{caption.replace(chr(39), '&#39;')}</figcaption>" in \
        (tmp_path / "report.html").read_text()

    for val_steps, when in (((0, 50, 100, 150), ", every 50 steps from step 0"),
                            ((0, 50, 100, 120), ", every 50 steps from step 0"),  # last early
                            ((0, 30, 100), "")):                                 # irregular
        write_rows(tmp_path / "pretrain" / "metrics.jsonl",
                   [{"step": s, "loss": 7.0 - s / 100} for s in range(10, 160, 10)]
                   + [{"step": s, "val_loss": 7.0 - s / 100} for s in val_steps])
        (ax,) = plot_pretrain_loss(tmp_path).axes
        train, val = ax.get_lines()
        assert list(val.get_xdata()) == list(val_steps) and val.get_marker() == "o"
        assert val.get_linestyle() == ":" and val.get_linewidth() < train.get_linewidth()
        assert pretrain_loss_caption(tmp_path).endswith(
            f"the validation loss at each of its {len(val_steps)} evaluations{when} (circles, "
            "joined by a dotted line only as a guide: nothing was measured between them).")


def test_negative_figures_use_the_typographic_minus_in_both_documents(tmp_path):
    # The deltas printed Python's hyphen (-0.015, [-0.028, -0.002]) beside the prose's and the
    # plots' minus (PPO − SFT, the axes' −0.2); report.json keeps plain numbers.
    results = full_results()
    results["delta_ppo_vs_sft_continued"] = {"mean": -0.015, "ci95": [-0.028, -0.002],
                                             "better": 4, "worse": 13, "p_sign": 0.049}
    results["kl_ppo_vs_sft"] = -0.0123
    write_report(tmp_path, results)
    md, html = ((tmp_path / name).read_text() for name in ("report.md", "report.html"))
    for text in (md, html):
        assert ("PPO − SFT continued: −0.015, 95% CI [−0.028, −0.002]: the interval excludes 0 "
                "(better on 4 questions, worse on 13; sign test p = 0.049)") in text
        assert "+0.095, 95% CI [−0.020, +0.210]" not in text  # the fixture's other delta
        assert re.search(r"per response \(nats, sampled at T = 1\)\W+ −0\.0123", text)
        assert not re.search(r"(?<![\w-])-\d", text)  # no figure with a hyphen for its sign
    assert json.loads((tmp_path / "report.json").read_text())[
        "delta_ppo_vs_sft_continued"]["ci95"] == [-0.028, -0.002]


def test_the_ppo_legend_is_below_the_panels_not_on_a_curve(tmp_path):
    # Each panel's legend sat inside it, on round 2's first rewards in the demo's report.
    from gptlab.eval.report import plot_ppo
    fake_run(tmp_path)
    fig = plot_ppo(tmp_path)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["round 1", "round 2"]
    box = legend.get_window_extent(renderer)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    for ax in fig.axes:  # below every panel, its tick labels and axis label included
        assert box.y1 <= ax.get_tightbbox(renderer).y0


def test_the_reward_model_legends_are_below_their_panels_not_on_the_data(tmp_path):
    # The top panel's legend sat in its lower left corner, on the chance line, where a lower
    # bound under 0.6 would have put round 1's error bar; the bottom one's, upper left, where a
    # high step-0 accuracy would be.
    from gptlab.eval.report import plot_rm_accuracy
    fake_run(tmp_path)
    write_rows(tmp_path / "round-1" / "reward" / "metrics.jsonl",
               [{"step": 0, "pairwise_acc": 0.95}, {"step": 10, "pairwise_acc": 0.2}])
    results = full_results()
    results["rm_pairwise_acc_ci95_per_round"] = [[0.3, 0.95], [0.5, 0.9]]
    fig = plot_rm_accuracy(tmp_path, results)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top, bottom = fig.axes
    assert top.get_legend() is None and bottom.get_legend() is None
    legends = [legend for sub in fig.subfigs for legend in sub.legends]
    assert [[t.get_text() for t in legend.get_texts()] for legend in legends] == [
        ["judged by the noise-free labeler (95% interval)", "judged by the labelers' own rankings"],
        ["round 1", "round 2"]]
    for legend, ax in zip(legends, (top, bottom)):
        box = legend.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        assert box.y1 <= ax.get_tightbbox(renderer).y0  # under its panel, axis label included
        assert not any(box.overlaps(other.get_tightbbox(renderer)) for other in fig.axes)
    # A single panel keeps its legend below it too.
    del results["rm_pairwise_acc_per_round"]
    fig = plot_rm_accuracy(tmp_path, results)
    fig.canvas.draw()
    (ax,) = fig.axes
    (legend,) = fig.subfigs[0].legends
    box = legend.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.contains(box.x0, box.y0) and box.y1 <= ax.get_tightbbox().y0


def test_the_kl_is_shown_to_three_significant_digits_as_an_estimate(tmp_path):
    # A sampled estimate read 0.6362, four decimals no sample of 600 answers measures.
    from gptlab.eval.report import build_content
    what = "KL(PPO ‖ SFT) per response (nats, sampled at T = 1)"
    cases = {0.6362: "0.636", 1.2345: "1.23", 12.345: "12.3", 0.01234: "0.0123",
             -0.0123: "−0.0123", 0.0: "0.00", None: "n/a", math.nan: "nan"}
    results = full_results()
    got = {}
    for kl in cases:
        results["kl_ppo_vs_sft"] = kl
        got[kl] = dict(build_content(tmp_path, results, {}).headlines)[what]
    assert got == cases


def test_every_plot_caption_ends_as_a_sentence_does(tmp_path):
    # The reward-model caption ended with a period; the pretraining, PPO and execution-accuracy
    # ones did not, the PPO one not after its note on a KL below 0 either.
    fake_run(tmp_path)
    write_rows(tmp_path / "round-1" / "ppo" / "metrics.jsonl",
               [{"step": s, "reward": 0.1, "kl": k} for s, k in ((1, -0.02), (2, 0.05))])
    write_report(tmp_path, full_results())
    md = (tmp_path / "report.md").read_text()
    captions = dict((name, caption) for caption, name in
                    re.findall(r"!\[([^]]*)\]\(plots/(\w+)\.png\)", md))
    assert sorted(captions) == ["exec_accuracy", "ppo_reward_kl", "pretrain_loss", "rm_accuracy"]
    assert "The KL is below 0 on 1 of 7 steps" in captions["ppo_reward_kl"]
    for caption in captions.values():
        assert caption.endswith(".") and not caption.endswith(".."), caption
    html = (tmp_path / "report.html").read_text()
    assert [c.replace("&#39;", "'") for c in re.findall(r"<figcaption>(.*?)</figcaption>", html)] \
        == list(captions.values())


def test_a_sample_s_id_stays_on_one_line_in_the_html(tmp_path):
    # The id column, the narrowest, wrapped "s0-test-00001" at its hyphens over three lines.
    results = full_results()
    results["samples"][0]["id"] = "s0-test-00001"
    write_report(tmp_path, results)
    html = (tmp_path / "report.html").read_text()
    assert "td.id { white-space: nowrap; }" in html
    ids = re.findall(r"<tr><td( class=\"id\")?>([^<]*)</td><td>", html)
    assert ids == [(' class="id"', i) for i in ["s0-test-00001"] + [f"q{n}" for n in range(2, 11)]]


def test_an_evaluation_whose_sample_holds_a_unicode_line_separator_is_a_point(tmp_path):
    # Pretraining logs its sample text as it is: a U+2028 in it (a corpus of web text has them)
    # split the row where str.splitlines ends a line, and the evaluation was left out.
    from gptlab.eval.report import plot_pretrain_loss
    path = tmp_path / "pretrain" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"step": 0, "val_loss": 5.0, "sample": "a\u2028b"},
        {"step": 10, "loss": 4.0},
        {"step": 20, "val_loss": 3.2, "sample": "c\x85d"}]), encoding="utf-8")
    (ax,) = plot_pretrain_loss(tmp_path).axes
    _, val = ax.get_lines()
    assert list(val.get_xdata()) == [0, 20]
