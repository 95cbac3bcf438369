"""The gpu-ann command: help text, a tiny training run, recommend, and clear errors."""

import json
import os
import subprocess
import sys

import pytest

from gpu_ann.cli import build_parser, main


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["recommend", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: gpu-ann" in text
    if argv[0] == "train":
        for flag in (
            "--data",
            "--user-col",
            "--split",
            "--seed",
            "--batch-size",
            "--hidden",
            "--lr",
            "--eval-every",
            "--patience",
            "--max-epochs",
            "--max-steps",
            "--backend",
            "--out",
        ):
            assert flag in text


def write_ratings(path, n_users=60, n_items=25, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["user,item,rating"]
    for u in range(n_users):
        for i in rng.choice(n_items, size=8, replace=False):
            lines.append(f"u{u},i{i},{rng.integers(1, 6)}")
    path.write_text("\n".join(lines) + "\n")


def train_tiny(data, out, steps, eval_every):
    """A few steps of the real command on a small synthetic CSV."""
    return main(
        [
            "train",
            "--data",
            str(data),
            "--backend",
            "cpu",
            "--out",
            str(out),
            "--batch-size",
            "32",
            "--hidden",
            "8,8,8",
            "--max-steps",
            str(steps),
            "--eval-every",
            str(eval_every),
            "--eval-batches",
            "2",
        ]
    )


def test_train_then_recommend_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "ratings.csv"
    write_ratings(data)
    out = tmp_path / "run"
    code = train_tiny(data, out, steps=6, eval_every=3)
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation loss (best model, whole split)" in printed and "popularity baseline loss" in printed
    assert "6 steps" in printed and "--user u0)" in printed  # the hint names a user that exists
    assert (out / "model.pt").is_file() and (out / "data.npz").is_file() and (out / "config.toml").is_file()
    assert main(["recommend", "--checkpoint", str(out), "--user", "u3", "-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top 4 for user u3")
    assert [line.split()[0] for line in lines[1:]] == ["1.", "2.", "3.", "4."]
    assert all(line.split()[1].startswith("i") for line in lines[1:])


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "empty"),
        ("user,item\nu1,i1\n", "--rating-col"),
        ("user,item,rating\nu1,i1,5\nu2,i2,abc\n", "line 3, column 'rating': 'abc' is not a number"),
    ],
)
def test_bad_input_files_give_a_clear_error_and_exit_code_2(tmp_path, capsys, content, expected):
    data = tmp_path / "bad.csv"
    data.write_text(content)
    args = ["train", "--data", str(data), "--backend", "cpu", "--out", str(tmp_path / "run")]
    if "--rating-col" in expected:
        args += ["--rating-col", "stars"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-ann train: error: ") and "bad.csv" in err and expected in err
    assert not (tmp_path / "run").exists()


def test_a_run_over_the_memory_budget_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    data = tmp_path / "ratings.csv"
    write_ratings(data)
    args = ["train", "--data", str(data), "--backend", "cpu", "--out", str(tmp_path / "run")]
    assert main([*args, "--memory-budget", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-ann train: error: ") and "Traceback" not in err
    assert "but the limit is 1000 B (--memory-budget); nothing was allocated" in err
    assert not (tmp_path / "run").exists()


def test_recommend_for_an_unknown_run_directory(tmp_path, capsys):
    assert main(["recommend", "--checkpoint", str(tmp_path), "--user", "1"]) == 2
    assert "data.npz: not found" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "gpu_ann", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("gpu-ann ")


def test_help_shows_real_defaults_the_way_flags_take_them(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.8,0.1,0.1)" in text and "(default: 256,512,256)" in text
    assert "default: None" not in text and "default: True" not in text and "default: False" not in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 20,50,100)" in text and "(default: )" not in text  # --ks has one, --baselines none


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `gpu-ann info --json | head -1`: the pipe closes before the report is written.
    # Buffered output (no PYTHONUNBUFFERED) reaches the pipe only at the end: the case that used to escape.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "gpu_ann", "info", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_info_reports_this_machine(capsys):
    import json

    import torch

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert torch.__version__ in text and "backend cpu" in text
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["torch"] == torch.__version__
    assert report["backends"]["cpu"]["usable"] is True


def test_evaluate_scores_a_split_against_popularity(tmp_path, capsys):
    import scipy.sparse as sp

    data = tmp_path / "ratings.csv"
    write_ratings(data)
    out = tmp_path / "run"
    train_tiny(data, out, steps=4, eval_every=2)
    capsys.readouterr()
    from gpu_ann.evaluate import evaluate_run

    direct = evaluate_run(out, "test", backend="cpu", ks=(3, 10))
    assert main(["evaluate", "--checkpoint", str(out), "--split", "test", "--backend", "cpu", "--ks", "3,10"]) == 0
    text = capsys.readouterr().out
    assert f"test split, {direct['samples']:,} samples" in text
    assert f"model loss       {direct['loss']:.4f}" in text
    assert f"popularity loss  {direct['popularity_loss']:.4f}" in text
    # 60 users x 8 items, 10% test; the popularity loss is the smoothed cross-entropy by hand.
    import numpy as np

    from gpu_ann.checkpoint import load_data
    from gpu_ann.splits import splits_from_assignment

    table, assignment = load_data(out)
    splits = splits_from_assignment(table, assignment)
    counts = np.bincount(splits.train.item, minlength=table.n_items) + 1.0
    expected = -np.log(counts[splits.test.item] / counts.sum()).mean()
    assert direct["popularity_loss"] == pytest.approx(expected)
    assert direct["samples"] == len(splits.test) == 48
    # Popularity's ranking metrics against the slow per-user reference (same counts, ties by index).
    from test_ranking import reference

    seen = [set(splits.train.item[splits.train.user == u].tolist()) for u in range(table.n_users)]
    held = [set(splits.test.item[splits.test.user == u].tolist()) for u in range(table.n_users)]
    scores = np.tile(np.log(counts / counts.sum()), (table.n_users, 1))
    want = reference(scores, seen, held, [3, 10], table.n_items)
    for name, value in want.items():
        assert direct["ranking"]["popularity"][name] == pytest.approx(value, abs=1e-9), name
    # The model's: its scores on reference-built input rows (whole training rows), ranked by the reference.
    import torch
    from reference import assemble_reference

    from gpu_ann.checkpoint import load_checkpoint
    from gpu_ann.model import CandidateGenerator

    train_csr = sp.csr_matrix(
        (np.ones(len(splits.train)), (splits.train.user, splits.train.item)), shape=(table.n_users, table.n_items)
    )
    users = np.arange(table.n_users)
    X, _ = assemble_reference(
        train_csr.indptr, train_csr.indices, users, np.full(table.n_users, -1), users, table.n_items
    )
    model = CandidateGenerator(table.n_items, (8, 8, 8)).double()
    model.load_state_dict(load_checkpoint(out).model_state)
    with torch.no_grad():
        model_scores = model(torch.from_numpy(X)).numpy()
    want = reference(model_scores, seen, held, [3, 10], table.n_items)
    for name, value in want.items():
        assert direct["ranking"]["model"][name] == pytest.approx(value, abs=1e-9), name
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("recall@3 "))
    assert row == [
        "recall@3",
        f"{direct['ranking']['model']['recall@3']:.4f}",
        f"{direct['ranking']['popularity']['recall@3']:.4f}",
    ]


@pytest.mark.parametrize("world_size, finalised", [(None, True), ("2", False)])
def test_a_torchrun_rank_ends_without_the_interpreters_finalisation(tmp_path, world_size, finalised):
    # At finalisation gloo's threads can still be releasing a collective's tensors, which aborted finished
    # runs: a rank ends with os._exit once its output is flushed. An atexit hook (from sitecustomize) shows
    # whether finalisation ran; the output and the exit code must come through either way.
    marker = tmp_path / "finalised"
    (tmp_path / "sitecustomize.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    if world_size:
        env["WORLD_SIZE"] = world_size
    done = subprocess.run([sys.executable, "-m", "gpu_ann", "info", "--json"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backends"]["cpu"]["usable"] is True  # all of it, flushed
    assert marker.exists() == finalised
    bad = subprocess.run([sys.executable, "-m", "gpu_ann", "recommend", "--checkpoint", str(tmp_path / "none"),
                          "--user", "1"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "error" in bad.stderr
    assert marker.exists()  # a failed rank exits as usual (see gpu_ann.cli.entry)
