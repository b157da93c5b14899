"""Command line: ``python -m vaebench {run,tune,report,data,bench}``. Argument parsing only."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vaebench.bench import cli as bench_cli
from vaebench.execution.worker_plan import AUTO, POST_RUN_CHOICES
from vaebench.fast_exit import exit_after_handlers, exit_now
from vaebench.spec.catalogue import DEFAULT_RANKING, RANKABLE, REPORTED
from vaebench.spec.config import ConfigError, VaebenchError
from vaebench.timeline import TIMELINE
from vaebench.whole_lines import write_whole_lines

# from the catalogue, which imports nothing heavy: --help does not import mlflow
DEFAULT_METRIC = DEFAULT_RANKING
METRIC_NAMES = RANKABLE
TABLE_FORMATS = ("latex", "markdown", "csv")  # the keys of vaebench.reporting.formats.FORMATS


def _metric_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in REPORTED]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or repr(text)}: choose from {', '.join(REPORTED)}"
        )
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


# options more than one command takes: name -> add_argument's keywords ("{what}": the command's)
SHARED_OPTIONS: dict[str, dict] = {
    "--tracking-uri": {
        "help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    },
    "--data-root": {"help": "data root (default: $VAEBENCH_DATA, else ./data)"},
    "--results-dir": {"default": "results", "help": "where {what} go (default: results)"},
    "--no-system-metrics": {
        "action": "store_true", "help": "do not record CPU, memory, disk, network and GPU "
        "use in each run (MLflow's system metrics, sampled every 10 s)",
    },
    "--no-register": {
        "action": "store_true", "help": "do not log {what} as an MLflow model and register "
        "it (default: a new version of a registered model named after the grid or study, "
        "seconds per model)",
    },
    "--stack": {
        "choices": ("auto", "on", "off"), "default": "auto",
        "help": "auto (default): {what} train together as one stacked model (mlp, conv, cvae, "
        "gumbel; Adam or RMSprop, elbo); on: also where auto trains them alone on the CPU; "
        "off: each alone",
    },
    "--max-stack": {
        "type": _positive, "default": None, "help": "the most runs one stack trains (default: 8)"
    },
}


def _shared(parser: argparse.ArgumentParser, *names: str, what: str = "") -> None:
    for name in names:
        options = SHARED_OPTIONS[name]
        parser.add_argument(name, **{**options, "help": options["help"].format(what=what)})


def _max_stack(args: argparse.Namespace) -> int:
    from vaebench.stacking.plan import DEFAULT_MAX_STACK

    return 1 if args.stack == "off" else args.max_stack or DEFAULT_MAX_STACK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaebench", description="Benchmark suite for VAEs.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train every variant of a grid file, tracked in MLflow")
    run.add_argument("grid", help="grid YAML file (see experiments/)")
    _shared(run, "--tracking-uri", "--data-root")
    _shared(run, "--results-dir", what="<grid>.csv and the report <grid>/")
    run.add_argument("--dry-run", action="store_true", help="print the expanded runs and exit")
    run.add_argument(
        "--no-report", action="store_true", help="skip the report written after the grid"
    )
    run.add_argument(
        "--rerun", action="store_true",
        help="train every run again as a new sample (default: runs that finished in an "
        "earlier invocation are skipped, stopped ones continue from their checkpoint)",
    )
    _shared(
        run, "--stack", "--max-stack", what="runs of one shape that differ only in seed, "
        "loss.beta, loss.recon and optim.lr (gmvae on CUDA only)",
    )
    run.add_argument(
        "--workers", default="1",
        help="processes on this machine that share the grid's runs, each run trained by one "
        "of them (default: 1); auto: one per visible GPU (one process without a GPU)",
    )
    run.add_argument(
        "--per-gpu", type=_positive, default=None,
        help="with --workers auto: this many workers on each GPU (default: 1)",
    )
    _shared(run, "--no-system-metrics")
    _shared(run, "--no-register", what="each comparison group's best run")
    run.add_argument(
        "--post-run", choices=POST_RUN_CHOICES, default=AUTO,
        help="where a trained run's clustering scores, pictures, artifacts and ending are done: "
        "background: in one background process while the next run or stack trains; inline: "
        "here, before the next starts; auto (default): background where runs train on CUDA, "
        "inline on the CPU (one process, --executor local)",
    )
    run.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="local (default): this process, or --workers processes on this machine; ray: "
        'each stack or run is a Ray task (pip install -e ".[ray]")',
    )
    run.add_argument(
        "--address",
        help="with --executor ray: the Ray cluster to join (default: $RAY_ADDRESS, else a "
        "local Ray instance with this machine's cores)",
    )
    run.add_argument(
        "--task-cpus", type=float, default=1.0,
        help="with --executor ray: CPUs each task asks for, and its torch threads (default: 1)",
    )
    run.add_argument(
        "--task-gpus", type=float, default=0.0,
        help="with --executor ray: the share of a GPU each task asks for, e.g. 0.25 puts "
        "four runs on one GPU (default: 0, CPU tasks)",
    )
    run.add_argument(
        "--checkpoint-dir",
        help="where running runs keep their checkpoints (default: checkpoints/ beside the "
        "SQLite store, else in the working folder)",
    )
    run.add_argument(
        "--profile", metavar="FILE",
        help="write where this invocation's seconds went (imports, store, data, each stack's "
        "epochs and validation, test, scoring, pictures, artifacts, report, registration) to "
        "FILE as a Chrome trace (chrome://tracing, ui.perfetto.dev), and a table to stderr",
    )

    tune = commands.add_parser(
        "tune", help="tune runs with Optuna (pruning, several objectives), every trial in MLflow"
    )
    tune.add_argument("study", help="study YAML file (see experiments/study.yaml)")
    tune.add_argument(
        "--n-trials", type=int,
        help="trials to add in this invocation (default: those still to do of the file's "
        "n_trials)",
    )
    _shared(tune, "--no-system-metrics")
    _shared(tune, "--no-register", what="the best trial's run (each run of a Pareto front)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument(
        "--workers", type=int, default=1,
        help="processes sharing the study on this machine (default: 1)",
    )
    tune.add_argument(
        "--storage",
        help="Optuna storage: SQLAlchemy URL, journal file (*.log) or memory (default: the "
        "file's storage, else optuna.db beside the MLflow SQLite file)",
    )
    _shared(
        tune, "--stack", "--max-stack", what="trials of a study whose space varies only seed, "
        "loss.beta, loss.recon and optim.lr (gmvae and studies with a pruner on CUDA only)",
    )
    _shared(tune, "--tracking-uri", "--data-root")
    _shared(tune, "--results-dir", what="<study>/trials.csv and figures")

    report = commands.add_parser(
        "report",
        help="leaderboard over seeds, figures, report.md/html of a grid's or study's runs",
    )
    report.add_argument("name", help="the grid's or study's name (its MLflow experiment)")
    report.add_argument(
        "--all", action="store_true", dest="all_invocations",
        help="cover every invocation of the experiment (default: the latest)",
    )
    report.add_argument(
        "--metric", default=None, choices=METRIC_NAMES,
        help=f"what decides the best variant, a validation metric or seconds: test metrics are "
        f"shown beside, never ranked on (default: the grid file's select, else {DEFAULT_METRIC})",
    )
    report.add_argument(
        "--tsne", action="store_true",
        help="add a t-SNE picture of each best run's latent means (seconds per picture; the "
        "runs' own latent pictures are PCA)",
    )
    report.add_argument(
        "--format", choices=TABLE_FORMATS, dest="table_format",
        help="also write the leaderboard as a table for a paper, mean ± std over seeds and "
        "their count per comparison group, with published figures beside where the runs' "
        "metrics have them: <name>/table.tex (booktabs), table.md or table.csv; printed on "
        "stdout in place of the text leaderboard (the paths go to stderr)",
    )
    report.add_argument(
        "--columns", type=_metric_list, default=(), metavar="METRIC[,METRIC...]",
        help="with --format: the metrics to show, in order (default: the ranking metric, then "
        "test_elbo, test_nll, test_accuracy, test_nmi and conditional_accuracy where the runs "
        "have them)",
    )
    report.add_argument(
        "--no-literature", action="store_true",
        help="with --format: leave the published figures out",
    )
    _shared(report, "--tracking-uri")
    _shared(report, "--results-dir", what="the report <name>/")

    data = commands.add_parser("data", help="check (and download if missing) a dataset's files")
    data.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "kmnist"])
    _shared(data, "--data-root")

    bench = commands.add_parser("bench", help="time vaebench's trainer against a conventional loop")
    _shared(bench, "--data-root")
    bench_cli.add_arguments(bench)
    return parser


def _invocation(args: argparse.Namespace) -> dict:
    """What ``run`` and ``tune`` share of their invocation (and --no-system-metrics, set)."""
    if args.no_system_metrics:  # read by every tracker, in workers and local Ray tasks too
        os.environ["VAEBENCH_SYSTEM_METRICS"] = "0"
    return dict(
        tracking_uri=args.tracking_uri, data_root=args.data_root, results_dir=args.results_dir,
        register=not args.no_register, max_stack=_max_stack(args),
        stack_everywhere=args.stack == "on",
    )


def _run(args: argparse.Namespace) -> int:
    from vaebench.execution.worker_plan import Execution, parse_workers

    shared = _invocation(args)
    if args.executor == "ray" and (args.workers != "1" or args.per_gpu is not None):
        raise VaebenchError("--workers and --per-gpu are for --executor local; Ray places tasks")
    execution = Execution(
        args.executor, parse_workers(args.workers), args.per_gpu, args.address,
        args.task_cpus, args.task_gpus, args.post_run,
    )
    if args.dry_run:  # answered without importing torch or MLflow
        from vaebench.execution.dry_run import dry_run

        dry_run(args.grid, shared["max_stack"], stack_everywhere=shared["stack_everywhere"])
        return 0
    from vaebench.lifecycle.finishing_helper import FinishingHelper

    # started first: the helper process starts and imports beside this one's imports
    here = FinishingHelper.worth_starting(args.executor, execution.workers, args.post_run)
    helper = FinishingHelper() if here else None
    from vaebench.execution.invocation import GridInvocation
    from vaebench.execution.runner import run_grid
    from vaebench.subnormals import subnormals_set

    if args.profile:
        TIMELINE.start()
    try:
        with subnormals_set():  # before torch's threads start: they inherit it
            outcome = run_grid(args.grid, GridInvocation(
                **shared, report=not args.no_report, rerun=args.rerun,
                checkpoint_dir=args.checkpoint_dir, execution=execution, finishing_helper=helper,
            ))
    finally:
        if args.profile:
            TIMELINE.write(Path(args.profile))
            TIMELINE.table(sys.stderr)
            print(f"profile: {args.profile}", file=sys.stderr)
    for line in outcome.worker_errors:
        print(f"vaebench: {line}", file=sys.stderr)
    if outcome.failed or outcome.worker_errors:
        failed = f"{len(outcome.failed)} of {len(outcome.rows)} runs failed"
        print(f"vaebench: {failed}", file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    from vaebench.execution.invocation import StudyInvocation
    from vaebench.subnormals import subnormals_set
    from vaebench.tuning.tune import run_study

    with subnormals_set():  # before torch's threads start: they inherit it
        outcome = run_study(args.study, StudyInvocation(
            **_invocation(args), n_trials=args.n_trials, timeout=args.timeout,
            workers=args.workers, storage=args.storage,
        ))
    if outcome.failed:
        failed = f"{len(outcome.failed)} of {len(outcome.trials)} trials failed"
        print(f"vaebench: {failed}", file=sys.stderr)
    return 1 if outcome.failed or outcome.worker_errors else 0


def _report(args: argparse.Namespace) -> int:
    from vaebench.reporting.report import TableRequest, make_report

    if (args.columns or args.no_literature) and not args.table_format:
        raise VaebenchError("--columns and --no-literature shape the table of --format")
    table = None
    if args.table_format:
        table = TableRequest(args.table_format, args.columns, not args.no_literature)
    make_report(
        args.name, tracking_uri=args.tracking_uri, results_dir=args.results_dir,
        metric=args.metric, all_invocations=args.all_invocations, tsne=args.tsne,
        table_request=table,
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    from vaebench.data import load_arrays, resolve_root

    for split, (images, labels) in load_arrays(args.dataset, resolve_root(args.data_root)).items():
        print(
            f"{args.dataset} {split}: {images.shape[0]} images of "
            f"{images.shape[1]}x{images.shape[2]}, {len(set(labels.tolist()))} classes"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": _run, "tune": _tune, "report": _report, "data": _data, "bench": bench_cli.run
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"vaebench: error: {line}", file=sys.stderr)
        return 2
    except VaebenchError as exc:
        print(f"vaebench: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:  # output piped into a command that stopped reading (| head)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python's exit flush quiet
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as signals.Interrupted
        what = str(exc) or "interrupted"
        resumable = args.command in ("run", "tune") and not getattr(
            exc, "nothing_to_continue", False  # stopped after the work, while registering
        )
        hint = "; rerun the same command to continue" if resumable else ""
        print(f"vaebench: {what}{hint}", file=sys.stderr)
        return getattr(exc, "exit_status", 130)


def entry() -> None:
    """:func:`main`, then exit without the module teardown (:mod:`vaebench.fast_exit`); at once
    after a signal. Under a profiler, a tracer or ``python -i`` the interpreter exits as usual,
    so that they see the end (a profile written at exit)."""
    write_whole_lines()
    status = main()
    if status in (130, 143):  # SIGINT, SIGTERM
        exit_now(status)
    if sys.getprofile() or sys.gettrace() or sys.flags.inspect:
        sys.exit(status)
    exit_after_handlers(status)
