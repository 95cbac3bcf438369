"""The ``gpu-ann`` command: ``train``, ``recommend``, ``score``, ``evaluate`` and ``info``.

The parser and its flag types are in :mod:`gpu_ann.cli_parser`; this module runs what it parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gpu_ann.cli_parser import DEFAULTS, build_parser
from gpu_ann.training import TrainConfig

__all__ = ["build_parser", "main", "parse_args"]


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from pathlib import Path

    fields = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    # The saved config must repeat the run from any directory: relative data paths are made absolute.
    for name in ("data", "train_file", "validation_file", "test_file"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    return cfg


def _train(args: argparse.Namespace) -> int:
    import os

    from gpu_ann.config import ConfigError, to_toml
    from gpu_ann.training import train

    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; a plain run is rank 0

    if args.resume:
        from gpu_ann.training import resume_run

        changed = [
            f"--{k.replace('_', '-')}" for k, v in vars(_train_config(args)).items() if v != getattr(DEFAULTS, k)
        ]
        if changed:
            raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join(changed)}")

        print(f"gpu-ann train: resuming {args.resume} with its saved config")
        result = resume_run(args.resume)
    else:
        cfg = _train_config(args)
        if main_rank:
            print("gpu-ann train, effective config (saved as config.toml in the run directory once it is written):")
            print(to_toml(cfg.to_dict(), "train"), end="")
        result = train(cfg)
    if not main_rank:  # under torchrun only rank 0 reports (the others' results hold no evaluation)
        return 0
    verdict = "below" if result.final_validation_loss < result.popularity_validation_loss else "NOT below"
    steps = f"{result.steps} step{'s' if result.steps != 1 else ''}"
    print(
        f"done in {result.seconds:.0f} s, {steps}, "
        f"{result.samples_per_second:,.0f} training samples/s (evaluation and start-up included)\n"
        f"validation loss (best model, whole split): {result.final_validation_loss:.4f}  "
        f"(the log lines average {result.config.eval_batches} fixed batches)\n"
        f"popularity baseline loss (same split):     {result.popularity_validation_loss:.4f}  ({verdict}; "
        f"training counts, add-one smoothed)\n"
        f"checkpoint: {result.run_dir}  "
        f"(try: gpu-ann recommend --checkpoint {result.run_dir} --user {result.example_user})"
    )
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from gpu_ann.recommend import Recommender

    rec = Recommender(args.checkpoint, backend=args.backend)
    if args.items is not None:
        items = rec.for_items(args.items, args.k)
        print(f"top {len(items)} for a new user with {len(args.items)} given item(s) (excluding them):")
    else:
        items = rec.for_user(args.user, args.k)
        print(f"top {len(items)} for user {args.user} (excluding the items the user rated):")
    width = max(len(str(r.item_id)) for r in items) if items else 0
    for r in items:
        print(f"{r.rank:3d}. {str(r.item_id):>{width}}  {r.title}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from gpu_ann.scoring import score_run

    s = score_run(
        args.checkpoint,
        args.out,
        k=args.k,
        split=args.split,
        all_users=args.all_users,
        matrix=args.matrix,
        max_matrix_bytes=args.max_matrix_bytes,
        backend=args.backend,
        batch_size=args.batch_size,
    )
    who = "all users" if args.all_users else f"users with {args.split} items"
    print(f"scored {s.users:,} users ({who}) in {s.seconds:.1f} s")
    print(f"top-{args.k}: {s.rows:,} rows (user_id, rank, item_id, score) -> {s.out}")
    if s.matrix is not None:
        print(f"score matrix: {s.users:,} x {s.items:,} float32 -> {s.matrix} (ids: {', '.join(map(str, s.id_files))})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from gpu_ann.evaluate import evaluate_run

    r = evaluate_run(args.checkpoint, args.split, args.backend, args.batch_size, args.ks, args.baselines)
    print(f"{r['split']} split, {r['samples']:,} samples")
    print(f"  model loss       {r['loss']:.4f}")
    print(f"  popularity loss  {r['popularity_loss']:.4f}  (training counts, add-one smoothed)")
    ranking = r["ranking"]
    print(
        f"ranking over {ranking['model']['users']:,} users with {r['split']} items "
        "(training items excluded; definitions: gpu_ann.ranking)"
    )
    print("  " + f"{'metric':<18}" + "".join(f"{name:>12}" for name in ranking))
    for metric in ranking["model"]:
        if metric != "users":
            print("  " + f"{metric:<18}" + "".join(f"{values[metric]:>12.4f}" for values in ranking.values()))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from gpu_ann.info import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse flags, with a command's ``--config FILE`` values placed before its own flags (flags win)."""
    from gpu_ann.config import config_to_argv, read_toml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # A first look for the command and its --config, before required flags are checked: the file may
    # be what provides them.
    command = next((a for a in argv if a in parser.commands), None)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if command and config:
        tokens = config_to_argv(read_toml(config, command), parser.commands[command], config)
        at = argv.index(command) + 1
        argv = argv[:at] + tokens + argv[at:]
    return parser.parse_args(argv)


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone: what is still buffered cannot be written."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    from gpu_ann.backend import BackendUnavailable
    from gpu_ann.checkpoint import CheckpointError
    from gpu_ann.config import ConfigError
    from gpu_ann.data.table import DataError
    from gpu_ann.distributed import RankFailed
    from gpu_ann.planner import MemoryBudgetExceeded
    from gpu_ann.recommend import UnknownId
    from gpu_ann.scoring import ScoringError
    from gpu_ann.training import TrainingDiverged

    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"gpu-ann: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        commands = {"train": _train, "recommend": _recommend, "score": _score, "evaluate": _evaluate, "info": _info}
        rc = commands[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, inside this handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe (a worker's, a socket's) broke: that is an error of its own
        # The reader went away (gpu-ann info --json | head): stop quietly, as other command-line tools do, and
        # point stdout at /dev/null so that the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except (
        DataError,
        CheckpointError,
        BackendUnavailable,
        UnknownId,
        ScoringError,
        TrainingDiverged,
        ConfigError,
        RankFailed,
        MemoryBudgetExceeded,  # its message names the estimate, the limit and settings that fit
    ) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else exc  # KeyError's str() adds quotes
        print(f"gpu-ann {args.command}: error: {message}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``gpu-ann`` program (console script and ``python -m gpu_ann``): :func:`main`, then the exit.

    A ``torchrun`` rank (``WORLD_SIZE`` above 1) that succeeded ends with ``os._exit`` once its output is
    flushed, without the interpreter's finalization: gloo's worker threads can still be releasing a finished
    collective's tensors then, and a release during finalization aborts the finished run ("terminate called
    without an active exception", seen about once in 30 two-rank runs before the collectives' tensors were
    held, and again once under torch 2.11 after). Every file the run writes is complete before ``main``
    returns. A failed rank exits as usual: torchrun stops the other ranks when the first one fails, and the
    time an ordinary exit takes lets each rank that fails alike say why before that.
    """
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()  # flush the log handlers: atexit, which would, does not run after os._exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
