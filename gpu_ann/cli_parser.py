"""The ``gpu-ann`` command line: its parser, flag types and help formatter (:mod:`gpu_ann.cli` runs the commands)."""

from __future__ import annotations

import argparse
import re

from gpu_ann import __version__
from gpu_ann.optim import OPTIMIZERS
from gpu_ann.training import TrainConfig

DEFAULTS = TrainConfig()


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers (train,validation,test)")
    return parts


def _hidden(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated integers") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive comma-separated integers")
    return parts


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - {"biases", "ease"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline {unknown[0]!r}: choose from biases, ease")
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: cut-offs must be positive")
    return values


def _size(text: str) -> int:
    """Bytes from ``2147483648``, ``500M``, ``4G`` (powers of 1000) or ``4GiB`` (powers of 1024)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", text.strip().lower())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 2147483648, 500M, 4G, 4GiB)")
    scale = {None: 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
    return int(float(found.group(1)) * scale[found.group(2)])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default when it has a real one, written as the flag takes it (0.8,0.1,0.1)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or not action.option_strings
            or "default" in text
            or default == ()  # an empty list: "(default: )" says nothing
        ):
            return text
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple | list) else default
        return f"{text} (default: {shown})"


def _checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory written by gpu-ann train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-ann",
        description="Train a YouTube-style candidate generator on user-item ratings and recommend with it.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-ann {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train on a ratings file (default: the bundled anime ratings)",
        description="Train the candidate generator; the best model is saved in --out.",
        formatter_class=_DefaultsFormatter,
    )
    d = t.add_argument_group("data")
    d.add_argument(
        "--data",
        help="ratings file: CSV/TSV(.gz), Parquet, MovieLens ratings.csv or the anime zip "
        "(default: the bundled anime ratings)",
    )
    d.add_argument("--user-col", help="name (or 0-based position without a header) of the user id column")
    d.add_argument("--item-col", help="name (or position) of the item id column")
    d.add_argument("--rating-col", help="name (or position) of the rating column")
    d.add_argument("--sep", help="field separator (default: from the file's extension or first line)")
    d.add_argument("--no-header", dest="header", action="store_false", help="the file has no header line")
    d.add_argument(
        "--split",
        type=_fractions,
        default=DEFAULTS.split,
        metavar="TRAIN,VAL,TEST",
        help="split shares: of interactions (random), of each user's items (per-user) or of users (users)",
    )
    d.add_argument(
        "--train",
        dest="train_file",
        metavar="FILE",
        help="your own split: training interactions (with --validation [--test]; replaces --data and --protocol)",
    )
    d.add_argument("--validation", dest="validation_file", metavar="FILE", help="your own split: validation")
    d.add_argument("--test", dest="test_file", metavar="FILE", help="your own split: test (optional)")
    d.add_argument(
        "--protocol",
        choices=("random", "per-user", "leave-last", "users"),
        default=DEFAULTS.protocol,
        help="split protocol: random interactions; a share of each user's items; each user's last items by "
        "timestamp; or whole held-out users with fold-in inputs",
    )
    d.add_argument(
        "--min-user-items",
        type=_positive,
        default=DEFAULTS.min_user_items,
        help="per-user: users with fewer items stay in training",
    )
    d.add_argument(
        "--leave-last",
        type=_positive,
        default=DEFAULTS.leave_last,
        help="leave-last: items per user in each of validation and test",
    )
    d.add_argument(
        "--fold-in", type=float, default=DEFAULTS.fold_in, help="users: share of a held-out user's items used as input"
    )
    d.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the split, the sampling and the weights")
    m = t.add_argument_group("model and optimisation")
    m.add_argument(
        "--input-values",
        choices=("implicit", "rating", "residual"),
        default=DEFAULTS.input_values,
        help="what an input row holds at the user's items (over their count): 1; the rating over the largest "
        "rating; or the rating minus the bias baseline's prediction, over the same scale",
    )
    m.add_argument("--hidden", type=_hidden, default=DEFAULTS.hidden, metavar="H0,H1,H2", help="hidden sizes")
    m.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate")
    m.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULTS.optimizer,
        help="lazy-adam: the item tables a step reads only rows of (first layer on --input-path sparse, output "
        "layer under --softmax sampled) get sparse gradients and lazy Adam updates of the rows touched, Adam the "
        "rest; adam: Adam everywhere; auto (default): lazy for those tables whose step reads fewer rows than the "
        "table has, over all torchrun ranks together (at large catalogues far cheaper than Adam over every row), "
        "Adam under --compile",
    )
    m.add_argument("--batch-size", type=_positive, default=DEFAULTS.batch_size, help="training batch size")
    m.add_argument(
        "--sampling",
        choices=("epoch", "replacement"),
        default=DEFAULTS.sampling,
        help="shuffled epochs, or batches drawn with replacement (the original notebook)",
    )
    s = t.add_argument_group("evaluation and stopping")
    s.add_argument("--eval-every", type=_positive, default=DEFAULTS.eval_every, help="steps between evaluations")
    s.add_argument(
        "--eval-batches",
        type=_positive,
        default=DEFAULTS.eval_batches,
        help="fixed random batches of each split averaged per evaluation",
    )
    s.add_argument(
        "--eval-batch-size",
        type=_positive,
        default=None,
        help="rows per evaluation batch, at most --batch-size (default: --batch-size); evaluation uses the full "
        "softmax, so a smaller one saves memory at large catalogues",
    )
    s.add_argument(
        "--patience",
        type=_positive,
        default=DEFAULTS.patience,
        help="evaluations without a better validation loss before stopping early",
    )
    s.add_argument("--max-epochs", type=_positive, default=DEFAULTS.max_epochs, help="stop after this many epochs")
    s.add_argument("--max-steps", type=_positive, default=None, help="stop after this many steps (overrides epochs)")
    x = t.add_argument_group("scale: large catalogues, precision, memory, torchrun")
    x.add_argument(
        "--input-path",
        choices=("auto", "dense", "sparse"),
        default=DEFAULTS.input_path,
        help="first layer on densified rows, or EmbeddingBag over each row's items; auto picks the one that "
        "moves fewer bytes per step",
    )
    x.add_argument(
        "--softmax",
        choices=("full", "sampled"),
        default=DEFAULTS.softmax,
        help="training loss over every item, or over the target and --negatives sampled items (log-Q "
        "corrected); evaluation always uses the full softmax",
    )
    x.add_argument(
        "--negatives", type=_positive, default=DEFAULTS.negatives, help="sampled softmax: negatives per batch"
    )
    x.add_argument(
        "--negative-sampling",
        choices=("popularity", "uniform"),
        default=DEFAULTS.negative_sampling,
        help="sampled softmax: draw negatives by training count**0.75, or uniformly",
    )
    x.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=DEFAULTS.precision,
        help="bf16: bfloat16 autocast and bf16 dense batches, fp32 master weights",
    )
    x.add_argument("--compile", action="store_true", help="compile the loss computation with torch.compile")
    x.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="BYTES",
        help="refuse, before allocating, a run estimated to need more; takes 500M, 4G, 4GiB "
        "(default: 90%% of the device's free memory)",
    )
    x.add_argument(
        "--replica-check-every",
        type=int,
        default=DEFAULTS.replica_check_every,
        metavar="N",
        help="under torchrun: every N steps check that all ranks hold identical weights (0: never)",
    )
    x.add_argument(
        "--shard-users",
        action="store_true",
        help="under torchrun: each rank holds only its share of the users (balanced by training samples) on its "
        "device, instead of the whole matrix",
    )
    x.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU: deterministic torch algorithms and cuBLAS workspace, so a seed repeats a run exactly (the CPU "
        "always does)",
    )
    r = t.add_argument_group("where")
    r.add_argument(
        "--backend",
        choices=("auto", "cpu", "cuda"),
        default=DEFAULTS.backend,
        help="auto = cuda when a usable GPU is found, else cpu",
    )
    r.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR exactly where it stopped (its saved config is used; other flags ignored)",
    )
    r.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    r.add_argument(
        "--out",
        default=DEFAULTS.out,
        help="run directory: data.npz, model.pt, last.pt, config.toml, metrics.jsonl, curves.png; it appears whole "
        "at the first checkpoint, replacing an earlier run there, and one holding other files is refused",
    )

    rec = sub.add_parser(
        "recommend",
        help="top items for a user of a trained run, or for a new user given as items",
        description="Print the top-K items a user has not rated (--user), or the top-K for a new user who has "
        "the given items (--items: no retraining), with titles. Equal scores go to the lower item index.",
        formatter_class=_DefaultsFormatter,
    )
    _checkpoint_flag(rec)
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="raw user id, as in the ratings file")
    who.add_argument(
        "--items",
        nargs="+",
        metavar="ID_OR_TITLE",
        help="a new user's items: raw item ids or exact titles (any case; quote titles with spaces)",
    )
    rec.add_argument("-k", type=_positive, default=10, help="how many items")
    rec.add_argument(
        "--backend",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where to score (cpu by default: one user's scores take less than starting the GPU)",
    )

    sc = sub.add_parser(
        "score",
        help="top-K items of every user of a split to Parquet/CSV, optionally the full score matrix",
        description="Score every user with items in --split (or --all-users) in batches and write their top-K "
        "items, training items excluded, as rows user_id, rank, item_id, score (raw ids) to --out.",
        formatter_class=_DefaultsFormatter,
    )
    _checkpoint_flag(sc)
    sc.add_argument(
        "--split", choices=("train", "validation", "test"), default="test", help="score the users with items here"
    )
    sc.add_argument("--all-users", action="store_true", help="score every user of the run instead")
    sc.add_argument("-k", type=_positive, default=100, help="items per user")
    sc.add_argument("--out", required=True, metavar="FILE", help="top-K file: .parquet or .csv (by extension)")
    sc.add_argument(
        "--matrix",
        metavar="FILE.npy",
        help="also the users x items float32 score matrix (training items -inf), with FILE.users.txt and "
        "FILE.items.txt naming its rows and columns",
    )
    sc.add_argument(
        "--max-matrix-bytes",
        type=_size,
        default=2 * 1024**3,
        metavar="BYTES",
        help="refuse a larger --matrix; takes 500M, 4G, 4GiB (default: 2 GiB)",
    )
    sc.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto", help="where to score")
    sc.add_argument("--batch-size", type=_positive, default=1024, help="users per batch")

    ev = sub.add_parser(
        "evaluate",
        help="loss of a trained run on one of its splits, next to the popularity baseline",
        description="Mean cross-entropy of the run's best model on a whole split and the ranking metrics at --ks "
        "(recall, NDCG, MRR, ...), next to training popularity's; with --baselines, the same metrics for those.",
        formatter_class=_DefaultsFormatter,
    )
    _checkpoint_flag(ev)
    ev.add_argument("--split", choices=("train", "validation", "test"), default="validation", help="which split")
    ev.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    ev.add_argument("--batch-size", type=_positive, default=1024, help="rows per evaluation batch")
    ev.add_argument(
        "--ks",
        type=_ints,
        default=(20, 50, 100),
        metavar="K,K,...",
        help="cut-offs of the ranking metrics (recall, NDCG, ...); see gpu_ann.ranking",
    )
    ev.add_argument(
        "--baselines",
        type=_names,
        default=(),
        metavar="NAME,...",
        help="also rank with these baselines: biases (needs ratings), ease",
    )

    info = sub.add_parser(
        "info",
        help="the environment: versions, usable backends and why not, the device",
        description="Print the Python and platform, the versions of torch, numpy, scipy, numba, numba-cuda, cupy, "
        "pandas and pyarrow, which backends can run and why not, and the GPU with its memory and CUDA versions.",
        formatter_class=_DefaultsFormatter,
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.commands = {"train": t, "recommend": rec, "score": sc, "evaluate": ev, "info": info}  # for --config
    for command in parser.commands.values():
        command.add_argument(
            "--config", metavar="FILE", help="TOML file of options (flag names as keys); flags override it"
        )
    return parser
