"""bench/quality.py end to end on a tiny slice: the table's shape, and its numbers against a slow reference."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpu_ann.checkpoint import load_data
from gpu_ann.splits import TEST, TRAIN

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _load_bench()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    report = quality.main(["--quick", "--datasets", "ml-latest-small", "--out", str(out)])
    return report, out


def slow_popularity_metrics(run_dir: Path, k: int) -> tuple[float, float]:
    """Recall@k and NDCG@k of training popularity on the test split, one user at a time in plain numpy."""
    table, assignment = load_data(run_dir)
    train_items = table.item[assignment == TRAIN]
    counts = np.bincount(train_items, minlength=table.n_items)
    recalls, ndcgs = [], []
    for u in range(table.n_users):
        mine = table.user == u
        held = set(table.item[mine & (assignment == TEST)].tolist())
        if not held:
            continue
        seen = set(table.item[mine & (assignment == TRAIN)].tolist())
        # Most counted first, equal counts by the lower item index; the user's training items left out.
        ranked = [i for i in sorted(range(table.n_items), key=lambda i: (-counts[i], i)) if i not in seen][:k]
        hits = [rank for rank, i in enumerate(ranked, start=1) if i in held]
        recalls.append(len(hits) / min(k, len(held)))
        dcg = sum(1 / math.log2(rank + 1) for rank in hits)
        idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(held)) + 1))
        ndcgs.append(dcg / idcg)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def test_the_table_has_every_method_and_metric(quick_run):
    report, out = quick_run
    assert report["split"] == "test"
    assert report["protocol"]["protocol"] == "per-user" and report["protocol"]["split"] == [0.8, 0.1, 0.1]
    rows = report["table"]["ml-latest-small"]
    assert list(rows) == ["popularity", "biases", "ease", "model"]
    for metrics in rows.values():
        assert list(metrics) == ["recall@20", "ndcg@20", "recall@50", "ndcg@100"]
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    lines = (out / "results.md").read_text().splitlines()
    assert lines[0] == "| dataset | method | recall@20 | ndcg@20 | recall@50 | ndcg@100 |"
    assert [line.split(" | ")[1] for line in lines[2:]] == ["popularity", "biases", "ease", "model"]
    assert json.loads((out / "results.json").read_text())["table"] == report["table"]


def test_popularity_matches_a_slow_per_user_loop(quick_run):
    report, out = quick_run
    recall, ndcg = slow_popularity_metrics(out / "ml-latest-small", 20)
    popularity = report["table"]["ml-latest-small"]["popularity"]
    assert popularity["recall@20"] == pytest.approx(recall, abs=1e-12)
    assert popularity["ndcg@20"] == pytest.approx(ndcg, abs=1e-12)
    # On this slice EASE must rank far better than popularity, or the baselines are mis-wired.
    assert report["table"]["ml-latest-small"]["ease"]["recall@20"] > recall + 0.1


def test_tune_ranks_validation_only_and_records_the_best(tmp_path, monkeypatch):
    splits_read = []
    evaluate_run = quality.evaluate_run

    def recording(run_dir, split, **kwargs):
        splits_read.append(split)
        return evaluate_run(run_dir, split, **kwargs)

    monkeypatch.setattr(quality, "evaluate_run", recording)
    # Two settings, one of them the dropout / weight-decay prototype (its checkpoint must load as a plain model).
    grid = {"plain": {}, "prototype": {"dropout": 0.5, "weight_decay": 0.1}}
    monkeypatch.setitem(quality.GRID, "ml-latest-small", grid)
    report = quality.main(["--quick", "--tune", "--datasets", "ml-latest-small", "--out", str(tmp_path)])
    assert splits_read == ["validation", "validation"]
    runs = report["datasets"]["ml-latest-small"]["runs"]
    assert list(runs) == ["plain", "prototype"]
    assert set(runs["plain"]["ranking"]) == {"model", "popularity", "biases", "ease"}  # baselines once
    assert set(runs["prototype"]["ranking"]) == {"model", "popularity"}
    assert runs["prototype"]["settings"]["dropout"] == 0.5
    best = max(runs, key=lambda name: runs[name]["ranking"]["model"]["recall@20"])
    assert report["datasets"]["ml-latest-small"]["best"] == best
    assert (tmp_path / "tune.md").read_text().startswith(f"ml-latest-small (validation; best by recall@20: {best})")


def test_every_option_has_help():
    parser = quality.build_parser()
    options = [a for a in parser._actions if a.option_strings]
    assert {o for a in options for o in a.option_strings} >= {"--datasets", "--out", "--quick", "--tune", "--backend"}
    assert all(a.help and len(a.help) > 20 for a in options), [a.option_strings for a in options if not a.help]


def test_unknown_dataset_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        quality.main(["--datasets", "netflix"])
    assert done.value.code == 2
    assert "netflix" in capsys.readouterr().err


def test_settings_runs_only_the_named_grid_entries(tmp_path, monkeypatch):
    grid = {"plain": {}, "small batch": {"batch_size": 64}, "prototype": {"dropout": 0.5}}
    monkeypatch.setitem(quality.GRID, "ml-latest-small", grid)
    argv = ["--quick", "--tune", "--datasets", "ml-latest-small", "--out", str(tmp_path)]
    report = quality.main([*argv, "--settings", "prototype, small batch"])
    runs = report["datasets"]["ml-latest-small"]["runs"]
    assert list(runs) == ["small batch", "prototype"]  # in GRID's order, not the command's
    assert runs["small batch"]["settings"]["batch_size"] == 64
    assert set(runs["small batch"]["ranking"]) == {"model", "popularity", "biases", "ease"}  # with the first run


def test_unknown_setting_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        quality.main(["--tune", "--datasets", "ml-latest-small", "--settings", "default,no such thing"])
    assert done.value.code == 2
    assert "no such thing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--settings", "default"])  # without --tune
    assert "--tune" in capsys.readouterr().err
