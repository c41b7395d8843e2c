"""`prune-search`: the command line of the project (subcommands grow with the product)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class _RegistryNames:
    """A prune_core registry's names as argparse `choices`, looked up only when argparse needs them: importing
    prune_core (transformers, peft) takes about 2 s, which every other command, `data prepare` first, would pay."""

    def __init__(self, names: Callable[[Any], Iterable[str]]) -> None:
        self._names = names

    def _sorted(self) -> list[str]:
        import prune_core

        return sorted(self._names(prune_core))

    def __contains__(self, name: object) -> bool:
        return name in self._sorted()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sorted())


def _prune(args: argparse.Namespace) -> int:
    """Prune a saved model once with a scorer that needs no data, and save it with save_pruned."""
    from prune_core import attention_sparsity, macs_per_sample, prune, save_pruned, total_params
    from search.deploy import load_saved

    model = load_saved(args.model)
    before = (total_params(model), macs_per_sample(model))
    prune(model, granularity=args.granularity, scorer=args.scorer, threshold=args.threshold, amount=args.amount)
    save_pruned(model, args.out)
    after = (total_params(model), macs_per_sample(model))
    print(
        f"attention sparsity {attention_sparsity(model):.1%}; params {before[0]:,} -> {after[0]:,}; "
        f"MACs/sample {before[1]:,} -> {after[1]:,}; saved to {args.out}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    """Export a saved model to ONNX and check its logits in ONNX Runtime against PyTorch's."""
    from prune_core import attention_sparsity
    from prune_core.export import DEFAULT_OPSET, ExportError
    from search.deploy import PARITY_TOLERANCE, export_checked, load_saved

    model = load_saved(args.model)
    args.opset = args.opset or DEFAULT_OPSET
    try:
        worst = export_checked(model, args.out, tokens=args.tokens, opset=args.opset)
    except ExportError as error:
        raise ValueError(f"{args.model}: {error}") from error
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, opset {args.opset}, attention sparsity {attention_sparsity(model):.1%}); "
          f"ONNX Runtime's logits within {worst:.1e} of PyTorch's (tolerance {PARITY_TOLERANCE:g}) at batch 2 and 1")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    """Write the synthetic spoken-commands set (eSpeak NG) in the SpeechCommands layout."""
    from data_prep.synth import DEFAULT_WORDS, SynthConfig, synthesize

    words = tuple(args.words.split(",")) if args.words else DEFAULT_WORDS
    summary = synthesize(args.out, SynthConfig(words=words, clips_per_word=args.clips_per_word, seed=args.seed), workers=args.workers)
    counts = ", ".join(f"{split} {count}" for split, count in summary.clips.items())
    print(f"synthesized {sum(summary.clips.values())} clips ({counts}) into {args.out} in {summary.seconds:.1f} s")
    empty = [split for split, count in summary.clips.items() if count == 0]
    if empty:
        print(f"warning: no clips in {', '.join(empty)} (splits follow speakers); use more clips per word", file=sys.stderr)
    return 0


def _data_synth_task(args: argparse.Namespace) -> int:
    """Write a non-audio synthetic task (ViT images or BERT tokens) as a prepared data set."""
    from data_prep.synthetic_tasks import write_synthetic

    counts = {split: getattr(args, split) for split in ("train", "validation", "test")}
    manifest = write_synthetic(args.task, args.out, counts)
    features = manifest["features"]
    print(f"wrote {args.task} ({features['input_key']} {features['shape']}: train {args.train}, validation "
          f"{args.validation}, test {args.test}) into {args.out}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    """Audio folder -> Parquet shards + manifest.json; with --strict any quarantined file fails the run."""
    from data_prep.features import FeatureParams
    from data_prep.shards import PrepareConfig, prepare

    config = PrepareConfig(
        source=args.source,
        input=Path(args.input),
        out=Path(args.out),
        task=args.task,
        features=FeatureParams(num_mel_bins=args.num_mel_bins, max_length=args.max_length),
        dtype=args.dtype,
        normalization=args.normalization,
        shard_size=args.shard_size,
        workers=args.workers,
        strict=args.strict,
        engine=args.engine,
        device=args.device,
    )
    manifest = prepare(config)
    if config.strict and manifest["quarantined"]:
        print(f"error: --strict and {len(manifest['quarantined'])} files were quarantined", file=sys.stderr)
        return 1
    return 0


def _baseline(args: argparse.Namespace) -> int:
    """Train the small model for the data's input from scratch (or fine-tune --init), cached."""
    from search.baseline import BaselineConfig, train_baseline

    names = ("init", "hidden_size", "num_layers", "num_heads", "intermediate_size", "epochs", "lr", "batch_size", "seed")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = BaselineConfig(**given)
    train_baseline(args.data, args.out, config)
    return 0


def _run(args: argparse.Namespace) -> int:
    from search.runner import run
    from search.space import load_config
    from search.warm_start import WarmStart

    config = load_config(args.config, trials=args.trials, time_budget_s=args.time_budget)
    warm_start = WarmStart(args.warm_start, args.warm_start_skip_outside) if args.warm_start else None
    return run(config, address=args.address, runs_dir=Path(args.runs), warm_start=warm_start)


def _resume(args: argparse.Namespace) -> int:
    from search.runner import resume

    return resume(args.experiment, address=args.address, runs_dir=Path(args.runs))


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from error


def _report(args: argparse.Namespace) -> int:
    from search.results import Shipping, report

    out = Path(args.out) if args.out else None
    shipping = Shipping(onnx=args.onnx, register=args.register, point=args.point, best_within=args.best_within)
    return report(args.experiment, out=out, runs_dir=Path(args.runs), evaluate=args.evaluate, epsilon=args.epsilon,
                  shipping=shipping)


def _ui(args: argparse.Namespace) -> int:
    """The MLflow UI on 127.0.0.1 (unless --host says otherwise) over this project's tracking store.

    MLflow's server runs in its own process group; SIGTERM or SIGINT to this command stops the whole group
    (the server, its workers and job runners), so nothing is left serving the port.
    """
    import signal
    import subprocess

    from mlflow.tracking import MlflowClient

    from search.tracking import tracking_uri

    Path(args.runs).mkdir(parents=True, exist_ok=True)  # the embedded store's folder
    uri = tracking_uri(Path(args.runs))
    address = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {address}")
    for experiment in MlflowClient(uri).search_experiments():
        if experiment.name != "Default":  # a search's runs table (MLflow opens its GenAI view otherwise)
            print(f"  {experiment.name}: {address}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
    sys.stdout.flush()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                               "--port", str(args.port)], start_new_session=True)

    def forward(signum: int, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = server.wait()
    _wait_for_group(server.pid)
    return code if code >= 0 else 128 - code


def _wait_for_group(group: int, grace: float = 10.0) -> None:
    """Wait until no process of `group` is left (the server's children end after it); SIGKILL them after `grace` s."""
    import signal
    import time

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _profile(args: argparse.Namespace) -> int:
    """Measure this machine's latency table (prune_core.latency_model) and write it as JSON."""
    from prune_core.latency_model import QUICK, profile, save_table

    grid = dict(QUICK) if args.quick else {}
    if args.model:
        grid.update(_architecture(args.model))
    for flag, key in (("tokens", "tokens"), ("batch", "batches")):
        text = getattr(args, flag)
        if text is not None:
            try:
                grid[key] = [int(item) for item in text.split(",") if item.strip()]
            except ValueError:
                raise ValueError(f"--{flag} {text!r}: expected comma-separated ints, e.g. --{flag} "
                                 f"{'146,1214' if flag == 'tokens' else '1,8'}") from None
    table = profile(args.device, threads=args.threads, clock=args.clock,
                    progress=lambda line: print(line, file=sys.stderr, flush=True), **grid)
    save_table(table, args.out)
    done = table["profiled"]
    left_out = f"; left out (tokens, batch) {table['left_out']}, too slow here" if table["left_out"] else ""
    print(f"profiled {done['cells']} cells on {table['device']} ({table['device_name']}, {table['threads']} threads) "
          f"in {done['wall_s']:.0f} s, worst spread {done['worst_spread']:.0%}, {done['remeasured']} re-measured "
          f"alone{left_out}; wrote {args.out}")
    return 0


def _architecture(model: str) -> dict:
    """`profile`'s sizes for the AST saved in `model` (a save_pretrained or save_pruned folder, or a hub id):
    its hidden, head, layer, MLP, mel and label counts, and its own token count (2 + frequency x time patches)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    if config.model_type != "audio-spectrogram-transformer":
        raise ValueError(f"--model {model}: a {config.model_type} model; the latency model profiles ASTs only")
    patches = ((config.num_mel_bins - config.patch_size) // config.frequency_stride + 1) * (
        (config.max_length - config.patch_size) // config.time_stride + 1)
    return {"hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers, "intermediate_size": config.intermediate_size,
            "num_mel_bins": config.num_mel_bins, "num_labels": config.num_labels, "tokens": (patches + 2,)}


def _demo(args: argparse.Namespace) -> int:
    from search.demo import demo

    return demo(Path(args.runs), workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    from search.baseline import BaselineConfig

    parser = argparse.ArgumentParser(prog="prune-search", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a saved model once and save it")
    prune.add_argument("--model", required=True, help="a save_pretrained directory, a save_pruned directory or a hub id")
    prune.add_argument("--granularity", choices=_RegistryNames(lambda core: core.GRANULARITIES), default="entire_head")
    prune.add_argument("--scorer", choices=_RegistryNames(lambda core: (name for name, scorer in core.SCORERS.items()
                                                                         if not scorer.needs_data)),
                       default="magnitude", help="scorers that need no calibration data")
    prune.add_argument("--threshold", choices=_RegistryNames(lambda core: core.THRESHOLDS), default="global")
    prune.add_argument("--amount", type=float, required=True, help="fraction of the attention parameters to remove")
    prune.add_argument("--out", required=True, help="directory to write the pruned model to")
    prune.set_defaults(run=_prune)

    data = commands.add_parser("data", help="make and prepare data sets").add_subparsers(dest="data", required=True)
    synth = data.add_parser("synth", help="synthesize spoken commands with eSpeak NG (SpeechCommands layout)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--words", default=None, help="comma-separated word list (default: the 10 SpeechCommands commands)")
    synth.add_argument("--clips-per-word", type=int, default=504)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=2)
    synth.set_defaults(run=_data_synth)

    task = data.add_parser("synth-task", help="write a non-audio synthetic task (ViT images, BERT tokens) as prepared data")
    task.add_argument("--task", choices=["relations", "markers"], required=True,
                      help="relations: 16x16 images for a ViT; markers: 32-token sequences for a BERT")
    task.add_argument("--out", required=True)
    task.add_argument("--train", type=int, default=8000)
    task.add_argument("--validation", type=int, default=1000)
    task.add_argument("--test", type=int, default=2000)
    task.set_defaults(run=_data_synth_task)

    prep = data.add_parser("prepare", help="audio folder -> AST features in Parquet shards (Ray Data)")
    prep.add_argument("--source", choices=["speechcommands", "audioset"], required=True)
    prep.add_argument("--input", required=True, help="the data set folder in its real layout")
    prep.add_argument("--out", required=True)
    prep.add_argument("--task", type=int, choices=[12, 35], default=35, help="SpeechCommands task")
    prep.add_argument("--max-length", type=int, default=128, help="frames (10 ms each): 128 SpeechCommands, 1024 AudioSet")
    prep.add_argument("--num-mel-bins", type=int, default=128)
    prep.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    prep.add_argument(
        "--normalization",
        choices=["measured", "ast_speechcommands", "ast_audioset"],
        default="measured",
        help="mean/std measured on the train split, or the constants of the pretrained AST checkpoints",
    )
    prep.add_argument("--shard-size", type=int, default=512)
    prep.add_argument("--workers", type=int, default=2)
    prep.add_argument("--strict", action="store_true", help="exit non-zero if any file was quarantined")
    prep.add_argument("--engine", choices=["auto", "ray", "local"], default="auto",
                      help="ray, this process, or auto: this process for at most 5,000 clips and no RAY_ADDRESS")
    prep.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the features are computed")
    prep.set_defaults(run=_data_prepare)

    baseline = commands.add_parser("baseline", help="train the dense baseline on a prepared set (AST, ViT or BERT by its input)")
    baseline.add_argument("--data", required=True, help="a folder written by `data prepare` or `data synth-task`")
    baseline.add_argument("--out", required=True)
    baseline.add_argument("--init", default=None, help="fine-tune this pretrained checkpoint instead of training from scratch")
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        default = getattr(BaselineConfig, name)
        baseline.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"from scratch only (default {default})")
    baseline.add_argument("--epochs", type=int, default=None, help="default: 28 (the demo recipe)")
    baseline.add_argument("--lr", type=float, default=None, help="peak of the one-cycle schedule (default 2e-3)")
    baseline.add_argument("--batch-size", type=int, default=None)
    baseline.add_argument("--seed", type=int, default=None)
    baseline.set_defaults(run=_baseline)

    run = commands.add_parser("run", help="search pruning strategies (Ray Tune + Optuna + ASHA, tracked in MLflow)")
    run.add_argument("--config", required=True, help="a YAML search config, e.g. configs/demo.yaml")
    run.add_argument("--address", default=None, help="a Ray cluster address (default: RAY_ADDRESS, else local)")
    run.add_argument("--trials", type=int, default=None, help="override the config's trial count")
    run.add_argument("--time-budget", type=float, default=None, help="override the config's time budget (s)")
    run.add_argument("--warm-start", metavar="EXPERIMENT", default=None,
                     help="tell the Optuna study the trials of this earlier search (same --runs) over the same space")
    run.add_argument("--warm-start-skip-outside", action="store_true",
                     help="skip (with a warning) earlier trials outside the new space instead of refusing them")
    run.set_defaults(run=_run)

    resume = commands.add_parser("resume", help="continue a stopped search")
    resume.add_argument("--experiment", required=True)
    resume.add_argument("--address", default=None)
    resume.set_defaults(run=_resume)

    report = commands.add_parser("report", help="print the Pareto front and write the report files")
    report.add_argument("--experiment", required=True)
    report.add_argument("--out", default=None, help="default: runs/<experiment>/report")
    report.add_argument("--evaluate", metavar="SPLIT", default=None,
                        help="also evaluate the front's models on this split of the search's data (e.g. test): a "
                             "<split>_<metric> column and the front's hypervolume on it (cached per search)")
    report.add_argument("--epsilon", type=_floats, default=None, metavar="E1,E2[,E3]",
                        help="show an epsilon-net of the front, one epsilon per objective in the search's order "
                             "(e.g. 0.005,0.01 for accuracy, sparsity); the exact front stays in pareto-exact.parquet")
    report.add_argument("--onnx", action="store_true",
                        help="log every front point's model as an MLflow onnx model (onnx-model-step-<step> on its run)")
    report.add_argument("--register", metavar="NAME", default=None,
                        help="register one point's model (as an MLflow onnx model) as a new version of NAME")
    report.add_argument("--point", metavar="TRIAL/STEP", default=None, help="with --register: this point")
    report.add_argument("--best-within", type=float, metavar="POINTS", default=None,
                        help="with --register: the sparsest front point within this many accuracy points of dense")
    report.set_defaults(run=_report)

    export = commands.add_parser("export", help="export a saved model to ONNX, checked in ONNX Runtime")
    export.add_argument("--model", required=True, help="a save_pruned directory (e.g. a front point's checkpoint), a "
                        "save_pretrained directory or a hub id")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--tokens", type=int, default=None,
                        help="text models: the example's sequence length (the graph's length stays dynamic)")
    export.add_argument("--opset", type=int, default=None,
                        help="ONNX opset; 23 (default) exports attention as ONNX's Attention op, which ONNX Runtime fuses")
    export.set_defaults(run=_export)

    ui = commands.add_parser("ui", help="the MLflow UI over runs/mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run=_ui)

    profile = commands.add_parser("profile", help="measure this machine's latency table for predicted_latency")
    profile.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    profile.add_argument("--tokens", default=None, help="comma-separated token counts (default 146,1214: an AST with "
                         "128 mel bins has 2 + 12 x t tokens)")
    profile.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; on cpu, pairs with "
                         "tokens x batch > 2048 are left out)")
    profile.add_argument("--threads", type=int, default=None, help="torch threads to measure with (default: torch's)")
    profile.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                         help="wall time, or with --threads 1 on a shared CPU the thread's CPU time (steadier)")
    profile.add_argument("--quick", action="store_true", help="a tiny grid for the tests' tiny AST (seconds)")
    profile.add_argument("--model", default=None, help="profile this AST's architecture (a saved folder or hub id, e.g. "
                         "the search's baseline) at its own token count, instead of AST-base's")
    profile.add_argument("--out", required=True, help="the JSON table to write")
    profile.set_defaults(run=_profile)

    demo = commands.add_parser("demo", help="the whole embedded job: data, baseline, search, Pareto report")
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(run=_demo)

    for command in (run, resume, report, ui, demo):
        command.add_argument("--runs", default="runs", help="where runs, the MLflow store and reports live")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
