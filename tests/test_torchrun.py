"""``torchrun --nproc-per-node 2 -m gpu_ann train`` on the CPU with gloo: the run finishes (also across
uneven epoch ends), the ranks' weights are bit-identical after every step, and two ranks of batch B train
what one process with batch 2B trains."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpu_ann.checkpoint import load_checkpoint, load_resume_state

TIMEOUT = 240  # a hang (a rank waiting for a collective the other never joins) fails instead of blocking CI


def ratings_csv(path, n_users=50, n_items=30, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["user,item,rating"]
    for u in range(n_users):
        for i in rng.choice(n_items, per_user, replace=False):
            lines.append(f"u{u},i{i},{rng.integers(1, 6)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def gpu_ann_train(out, data, *flags, nproc=None, succeed=True):
    """Run ``gpu-ann train`` (under ``torch.distributed.run`` when ``nproc`` is given); return the process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc else [sys.executable]), "-m", "gpu_ann", "train", "--backend", "cpu"]
    command += ["--data", str(data), "--out", str(out), "--hidden", "8,8,8", "--eval-batches", "2", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert (done.returncode == 0) == succeed, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ratings_csv(tmp_path_factory.mktemp("torchrun") / "ratings.csv")


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, data):
    # 300 interactions -> 240 training samples: 15 steps of 16 per epoch; 10 steps stay inside epoch 0, where
    # no sample is padded, so the two runs see exactly the same samples in the same global batches.
    common = ["--max-steps", "10", "--eval-every", "10", "--lr", "0.01", "--input-path", "dense"]
    gpu_ann_train(tmp_path / "two", data, *common, "--batch-size", "8", "--replica-check-every", "1", nproc=2)
    gpu_ann_train(tmp_path / "one", data, *common, "--batch-size", "16")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a.step == b.step == 10
    for k, v in a.model_state.items():
        # Two half-batch means averaged vs one mean: the same sum in another order, float32 rounding only.
        torch.testing.assert_close(b.model_state[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_uneven_shares_and_sparse_sampled_path_finish_with_identical_replicas(tmp_path, data):
    # 240 samples over 2 ranks of 7: 18 batches an epoch per rank, the last one partial (120 = 17 x 7 + 1).
    # Three epochs cross two epoch ends; the replica check after every step raises if the weights ever differ.
    flags = ["--batch-size", "7", "--max-epochs", "3", "--eval-every", "10", "--replica-check-every", "1"]
    flags += ["--input-path", "sparse", "--softmax", "sampled", "--negatives", "5"]
    done = gpu_ann_train(tmp_path / "run", data, *flags, nproc=2)
    assert load_checkpoint(tmp_path / "run").step <= 54
    assert "done in" in done.stdout  # both ranks returned; rank 0 printed the summary
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6  # steps 10..50 and the last step, 54, each logged once (rank 0 only)


def test_rank_0_alone_replaces_an_earlier_run_whole_and_every_rank_refuses_foreign_files(tmp_path, data):
    out = tmp_path / "run"
    gpu_ann_train(out, data, "--max-steps", "4", "--eval-every", "2", "--seed", "1")  # an earlier run, one process
    gpu_ann_train(out, data, "--max-steps", "6", "--eval-every", "3", "--batch-size", "8", nproc=2)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or set-aside directory left beside it
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.toml", "curves.png", "data.npz", "last.pt", "metrics.jsonl", "model.pt"]
    state = load_resume_state(out)
    assert state.world_size == 2 and state.step == 6 and state.config["seed"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the two ranks' run only, logged once
    (out / "notes.txt").write_text("not the run's")
    done = gpu_ann_train(out, data, "--max-steps", "6", "--batch-size", "8", nproc=2, succeed=False)
    # Both ranks refuse before joining any collective, so neither waits for the other.
    assert done.stderr.count(f"gpu-ann train: error: {out}: holds notes.txt, which a training run does not") == 2
    assert load_resume_state(out).step == 6


def test_lazy_adam_two_ranks_stay_identical_and_match_one_process(tmp_path, data):
    # The sparse gradients are gathered from both ranks (gpu_ann.distributed: Replicas._average_sparse): the
    # replica check after every step holds the ranks to identical weights, and the run matches one process
    # of the global batch, whose negatives are the same draws (every rank's sampler has the run's seed).
    common = ["--max-steps", "10", "--eval-every", "5", "--lr", "0.01", "--input-path", "sparse", "--softmax",
              "sampled", "--negatives", "6", "--optimizer", "lazy-adam"]  # fmt: skip
    gpu_ann_train(tmp_path / "two", data, *common, "--batch-size", "8", "--replica-check-every", "1", nproc=2)
    gpu_ann_train(tmp_path / "one", data, *common, "--batch-size", "16")
    # last.pt: the weights after the last step (model.pt holds the best, which may be an earlier one).
    a, b = load_resume_state(tmp_path / "one"), load_resume_state(tmp_path / "two")
    assert a.step == b.step == 10 and load_checkpoint(tmp_path / "two").config["optimizer"] == "lazy-adam"
    assert set(b.optimizer_state) == {"dense", "lazy", "lazy_names"}
    for k, v in a.model_state.items():
        torch.testing.assert_close(b.model_state[k], v, rtol=1e-4, atol=1e-6, msg=k)
