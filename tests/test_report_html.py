"""`fedserver report`: report.json, report.html and plots/*.png from a real state file."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from fedserver.cli import main
from fedserver.report import build_report
from fedserver.report_html import accuracy_figure, accuracy_series, loss_series, render_plots, write_html_report
from fedserver.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "train: <script>alert('x')</script> out of memory & more"


def make_state(state_dir: Path) -> None:
    """Four rounds: train (committed), distill (failed: two schools failed), teach (committed,
    the teacher evaluated, not the schools' adapter), train (committed)."""
    state_dir.mkdir(parents=True)
    store = Store(state_dir / "state.sqlite")
    schools = ["school-1", "school-2", "school-3"]
    store.add_eval(0, "server", 40, {"accuracy": 0.25, "loss": 1.40})
    store.add_eval(0, "teacher", 40, {"accuracy": 0.50, "loss": 1.10})
    store.open_round(1, schools, "sha-0", deadline=1e12, kind="train")
    store.add_bytes(1, up=5_000_000, down=6_000_000)
    store.close_round(1, "committed", "sha-1", {"updates": 3, "train_loss": 1.2, "seconds": 30.0}, {})
    store.add_eval(1, "server", 40, {"accuracy": 0.30, "loss": 1.35})
    for school, acc in zip(schools, (0.40, 0.35, 0.20)):
        store.add_eval(1, school, 10, {"accuracy": acc, "loss": 1.3})
    store.open_round(2, schools, "sha-1", deadline=1e12, kind="distill")
    store.add_bytes(2, up=1_500_000, down=6_000_000)
    store.close_round(2, "failed", None, {"updates": 1, "seconds": 12.0}, {"school-2": EVIL, "school-3": "deadline passed"})
    store.open_round(3, schools, "sha-1", deadline=1e12, kind="teach")
    store.close_round(3, "committed", "sha-1", {"answer_sets": 3, "seconds": 50.0}, {})
    store.add_eval(3, "teacher", 40, {"accuracy": 0.55, "loss": 1.0})
    store.open_round(4, schools, "sha-1", deadline=1e12, kind="train")
    store.add_bytes(4, up=5_000_000, down=6_000_000)
    store.close_round(4, "committed", "sha-4", {"updates": 3, "train_loss": 1.1, "seconds": 28.0}, {})
    store.add_eval(4, "server", 40, {"accuracy": 0.33, "loss": 1.30})
    for school, acc in zip(schools, (0.45, 0.40, 0.25)):
        store.add_eval(4, school, 10, {"accuracy": acc, "loss": 1.2})
    store.close()


def test_report_command_writes_page_and_plots(tmp_path, capsys):
    make_state(tmp_path / "state")
    out = tmp_path / "out"
    assert main(["report", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and str(out / "report.json") in printed

    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["kind"], r["status"]) for r in report["rounds"]] == [
        (1, "train", "committed"), (2, "distill", "failed"), (3, "teach", "committed"), (4, "train", "committed")]
    page = (out / "report.html").read_text()
    # The rounds table, with format_table's columns and the numbers.
    assert '<table id="rounds">' in page
    for column in ("round", "kind", "status", "schools", "accuracy", "loss", "school acc", "train loss", "MB up", "MB down", "seconds"):
        assert f">{column}</th>" in page
    assert "<td>0.300</td>" in page and "<td>0.330</td>" in page and '<tr class="failed">' in page
    assert "0.250" in page and "40 questions" in page   # the base model on the eval set
    assert "Teacher" in page and "after teach round 3" in page and "0.550" in page
    # Failure reasons are shown, escaped: no raw tag from the network reaches the page.
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; out of memory &amp; more" in page
    assert "deadline passed" in page
    assert "<script" not in page.lower()
    # Every plot is both embedded and written beside the page, and they are the same PNG.
    linked = re.findall(r'href="(plots/[a-z]+\.png)"', page)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(linked) == ["plots/accuracy.png", "plots/bytes.png", "plots/loss.png", "plots/seconds.png"]
    assert len(embedded) == len(linked)
    for rel, data in zip(linked, embedded):
        png = out / rel
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
        assert base64.b64decode(data) == png.read_bytes()
        height, width = imread(png).shape[:2]
        assert width > 200 and height > 200


def test_plotted_series_carry_the_data(tmp_path):
    make_state(tmp_path / "state")
    store = Store(tmp_path / "state" / "state.sqlite", readonly=True)
    report, evals = build_report(store, model="m", eval_name="e"), store.evals()
    store.close()
    series = accuracy_series(report, evals)
    assert series == {
        "server": [(0, 0.25), (1, 0.30), (4, 0.33)],   # no server eval after the failed and the teach round
        "teacher": [(0, 0.50), (3, 0.55)],
        "school-1": [(1, 0.40), (4, 0.45)],
        "school-2": [(1, 0.35), (4, 0.40)],
        "school-3": [(1, 0.20), (4, 0.25)],
    }
    loss = loss_series(report)
    assert loss["server"] == [(0, 1.40), (1, 1.35), (4, 1.30)]
    assert loss["train"] == [(1, 1.2), (4, 1.1)]
    assert loss["schools"] == [(1, pytest.approx(1.3)), (4, pytest.approx(1.2))]
    # The figure draws exactly those points, one line per series, and shades the failed round.
    ax = accuracy_figure(report, evals).axes[0]
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}
    assert drawn["global adapter (coordinator's eval set)"] == series["server"]
    assert drawn["teacher (coordinator's eval set)"] == series["teacher"]
    assert drawn["school-3 (own held-out)"] == series["school-3"]
    assert len(drawn) == 5
    assert [p.get_label() for p in ax.patches] == ["failed round"]


def test_no_teacher_single_round_and_missing_values(tmp_path):
    """One round with no evaluation and no recorded time, odd school ids: still four plots."""
    report = {"model": "m", "teacher": None, "eval_set": {"name": "", "count": 0}, "base_eval_accuracy": None,
              "base_eval_loss": None,
              "rounds": [{"round": 1, "kind": "train", "status": "failed", "participants": ["$\\alpha$", "_x"],
                          "accepted": 0, "failures": {"_x": "crashed"}, "eval_accuracy": None, "eval_loss": None,
                          "school_eval_accuracy": None, "school_eval_loss": None, "train_loss": float("nan"),
                          "bytes_up": 0, "bytes_down": 1000, "seconds": None}]}
    evals = [{"round": 1, "source": "$\\alpha$", "num_examples": 3, "metrics": {"accuracy": 0.5, "loss": 1.0}},
             {"round": 1, "source": "_x", "num_examples": 3, "metrics": {"loss": 1.0}}]   # no accuracy: left out
    assert accuracy_series(report, evals) == {"$\\alpha$": [(1, 0.5)]}
    assert loss_series(report) == {}
    assert set(render_plots(report, evals)) == {"accuracy", "bytes", "seconds"}
    page = write_html_report(report, tmp_path, evals).read_text()
    assert "Teacher" not in page and "crashed" in page and "_x" in page
    assert not (tmp_path / "plots" / "loss.png").exists()


@pytest.mark.parametrize("with_base_eval", [False, True])
def test_zero_rounds(tmp_path, with_base_eval):
    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "state.sqlite")
    if with_base_eval:
        store.add_eval(0, "server", 20, {"accuracy": 0.3, "loss": 1.5})
    store.close()
    assert main(["report", "--state-dir", str(state)]) == 0   # default --out: the state dir
    page = (state / "report.html").read_text()
    assert "No rounds yet." in page
    assert json.loads((state / "report.json").read_text())["rounds"] == []
    plots = sorted(p.name for p in (state / "plots").glob("*.png"))
    assert plots == (["accuracy.png", "loss.png"] if with_base_eval else [])   # the base model at round 0
    if not with_base_eval:
        assert "Nothing to plot yet" in page


def test_keeps_what_the_demo_wrote(tmp_path):
    """The state does not record the model names or the out-of-distribution scores: an earlier
    report.json in --out keeps them; the rounds come from the state."""
    make_state(tmp_path / "state")
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({
        "model": "packaged:smollm2-135m-instruct", "rounds": [],
        "eval_set": {"name": "held-out questions", "count": 40},
        "teacher": {"model": "packaged:qwen", "quantization": "nf4"},
        "ood": {"source": "openbookqa", "count": 9, "round": 4, "base_accuracy": 0.2, "adapter_accuracy": 0.3}}))
    assert main(["report", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "packaged:smollm2-135m-instruct" and len(report["rounds"]) == 4
    assert report["teacher"]["model"] == "packaged:qwen" and report["teacher"]["before"]["accuracy"] == 0.5
    assert report["ood"]["source"] == "openbookqa"
    page = (out / "report.html").read_text()
    assert "packaged:qwen (nf4)" in page and "Out-of-distribution" in page


def test_missing_state_is_a_config_error(tmp_path, capsys):
    assert main(["report", "--state-dir", str(tmp_path / "nowhere")]) == 78
    assert "no coordinator state" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_status_names_the_model_and_eval_set_the_coordinator_recorded(tmp_path, capsys):
    """`fedserver status` (text and JSON) names what the coordinator recorded at start-up."""
    from fedserver.cli import main
    from fedserver.store import Store

    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "state.sqlite")
    store.set_meta("model", "packaged:smollm2-135m-instruct")
    store.set_meta("eval_file", "/var/lib/fedserver/eval/eval.jsonl")
    store.set_meta("teacher", json.dumps({"model": "packaged:qwen2.5-coder-1.5b-instruct", "quantization": "nf4"}))
    store.add_eval(0, "teacher", 40, {"accuracy": 0.625, "loss": 2.62})
    store.close()
    assert main(["status", "--state-dir", str(state)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("model: packaged:smollm2-135m-instruct   eval set: /var/lib/fedserver/eval/eval.jsonl")
    assert "teacher packaged:qwen2.5-coder-1.5b-instruct (nf4): accuracy / loss before 0.625 / 2.620" in text
    assert main(["status", "--state-dir", str(state), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "packaged:smollm2-135m-instruct" and doc["teacher"]["quantization"] == "nf4"
