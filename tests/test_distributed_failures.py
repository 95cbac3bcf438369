"""An error on one rank of a 2-process gloo run stops both with a clear error instead of leaving the other
waiting in a collective: a memory plan that does not fit one rank, a training step that raises, and a
checkpoint that rank 0 cannot write. Each case runs ``train`` in 2 spawned processes with a time limit, so
a hang fails the test (``run_two_ranks``) instead of blocking CI."""

from __future__ import annotations

import dataclasses

import pytest
from test_distributed import run_two_ranks


def _train_worker(rank: int, out: str, case: str) -> tuple[str, str]:
    """``train`` on this rank, with ``case``'s failure injected into one rank: (error type, message)."""
    from test_scale import table

    from gpu_ann import run_setup, training
    from gpu_ann.objective import Objective

    cfg = training.TrainConfig(
        out=out, backend="cpu", hidden=(8, 8, 8), batch_size=8, max_steps=12, eval_every=5, eval_batches=2,
        patience=100, input_path="dense",
    )  # fmt: skip
    if case == "plan" and rank == 1:
        # Rank 1's device has less free memory than the run needs (a budget of 1 KB stands for that).
        cfg = dataclasses.replace(cfg, memory_budget=1000)
    if case == "step, replica check":
        cfg = dataclasses.replace(cfg, replica_check_every=2)  # on both ranks: they must run the same collectives
    if case == "step, lazy-adam":  # the sparse gradients' gathers: the failed rank sends no rows
        cfg = dataclasses.replace(cfg, input_path="sparse", softmax="sampled", negatives=4, optimizer="lazy-adam")
    if case.startswith("step") and rank == 1:
        loss, calls = Objective.loss, []

        def failing_loss(self, batch):
            calls.append(None)
            if len(calls) == 3:
                raise RuntimeError("injected failure in step 3 on rank 1")
            return loss(self, batch)

        Objective.loss = failing_loss  # this spawned process only
    if case == "setup" and rank == 1:

        def failing_matrix(*args, **kwargs):
            raise MemoryError("injected: out of memory building the matrix")

        run_setup.input_matrix = failing_matrix  # after the plans agreed, before the first step
    if case == "checkpoint" and rank == 0:

        def failing_save(*args):
            raise OSError("injected: no space left on the device")

        training.save_checkpoint = failing_save  # the first evaluation's checkpoint, on rank 0
    try:
        training.train(cfg, table())
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""


@pytest.mark.parametrize(
    "case, failed, error, where",
    [
        # The plans are agreed on before anything is allocated: the other rank never builds its matrix.
        ("plan", 1, "MemoryBudgetExceeded", " in its memory plan"),
        # Building its matrix fails on rank 1 after the plans agreed: rank 0 stops before the first step.
        ("setup", 1, "MemoryError", " while setting up"),
        # Step 3 fails on rank 1; rank 0 learns it at the first evaluation, step 5, before it writes anything.
        ("step", 1, "RuntimeError", " by step 5"),
        # ... or at the replica check of step 4, when there is one.
        ("step, replica check", 1, "RuntimeError", " by step 4"),
        # ... and the same with lazy Adam, whose sparse gradients are gathered rather than all-reduced.
        ("step, lazy-adam", 1, "RuntimeError", " by step 5"),
        # Rank 0's evaluation fails; rank 1 learns it in the stop agreement that follows.
        ("checkpoint", 0, "OSError", " by step 5"),
    ],
)
def test_an_error_on_one_rank_stops_both(tmp_path, case, failed, error, where):
    out = tmp_path / "run"
    got = run_two_ranks(_train_worker, tmp_path, str(out), case)
    other = 1 - failed
    assert got[failed][0] == error, got
    assert "injected" in got[failed][1] or "(--memory-budget); nothing was allocated" in got[failed][1], got
    assert got[other] == (
        "RankFailed",
        f"rank {failed} stopped with an error{where}; rank {other} stops too (rank {failed}'s output has it)",
    )
    if case != "checkpoint":
        assert not out.exists()  # no checkpoint from the steps after the failure
