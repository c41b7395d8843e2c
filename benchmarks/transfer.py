"""Does Fisher's advantage over magnitude transfer to a non-audio transformer? (the paper's open question)

Builds a synthetic task that only attention can solve (the label is a relation between two tokens),
trains a small ViT (or BERT, `--model bert`) on it from scratch (cached under --work), then runs
prune_core's iterative recipe for magnitude and Fisher scoring x entire_head / per_head x a global
threshold (10% compounding steps to 50% attention sparsity, a short LoRA recovery after each step),
for a few seeds, and answers from the results, whichever way they come out:
  - does Fisher beat magnitude at 50% attention sparsity?
  - (with both granularities / thresholds in the run) does entire-head beat channel pruning,
    does a global threshold beat a local one?
Each question pairs runs that differ only in that factor (same seed); the answer is "yes" when the
first side is more accurate on the test split in at least 3 pairs of 4, "no" when it is less
accurate in 3 of 4, else "unclear (within noise)" (the rule of benchmarks/paper_proxy.py).

Tasks (fixed seeds, made here, no download):
  vit:  16x16 RGB noise with a red square A, a blue square B and two green distractor squares at
        random pixel positions (straddling 4x4 patches); label = where B lies from A (right, left,
        below, above). No patch decides it alone: the model must find A and B and compare their places.
  bert: 32 random tokens with markers A and B; label = their order x distance bin (<=4, 7-10, >=13).

    python benchmarks/transfer.py [--model vit|bert] [--seeds 4] [--thresholds global,local] [--threads 2]
    python benchmarks/transfer.py --quick --seeds 1          # tiny sizes: a fast check of the whole path
    python benchmarks/transfer.py --from-json benchmarks/results/transfer-vit.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from prune_core.accounting import layer_sparsity
from prune_core.finetune import LoraSettings
from prune_core.metrics import evaluate
from prune_core.session import PruningSession, SessionConfig, Strategy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECORD_FILE = "transfer.json"  # beside the cached dense model: its settings, training log and accuracy
SCORERS = ("magnitude", "fisher")
STEP_RATIO = 0.1
# The LoRA recovery of paper_proxy's SPACE (rank 8, alpha 16, lr 1e-3, one pass per step).
LORA = LoraSettings(rank=8, alpha=16, lr=1e-3, epochs=1)
MIN_DENSE_ACCURACY = 0.8  # below this the comparison says little: warn (full size only)
# (question, factor, first side, second side): the first side "wins" a pair when it is more accurate
QUESTIONS = (
    ("Fisher beats magnitude", "scorer", ("fisher",), ("magnitude",)),
    ("entire head beats channel pruning", "granularity", ("entire_head",), ("per_head", "same_channel")),
    ("global beats local", "threshold", ("global",), ("local",)),
)

Split = dict[str, torch.Tensor]  # model inputs and "labels", one row per sample


@dataclass(frozen=True)
class Sizes:
    """Data, model and budget sizes of one run (the full benchmark or the --quick check)."""

    train: int
    validation: int
    test: int
    hidden: int
    layers: int
    heads: int
    epochs: int
    lr: float
    batch_size: int
    lora_batches: int  # LoRA batches per prune step
    calib_batches: int  # Fisher calibration batches per prune step


SIZES = {
    "full": Sizes(train=8000, validation=1000, test=2000, hidden=96, layers=4, heads=6, epochs=12, lr=2e-3,
                  batch_size=64, lora_batches=24, calib_batches=8),
    "quick": Sizes(train=128, validation=64, test=64, hidden=32, layers=2, heads=8, epochs=1, lr=2e-3,
                   batch_size=32, lora_batches=2, calib_batches=1),
}


# --- the synthetic tasks -------------------------------------------------------------------------

IMAGE, PATCH, MARKER, MARGIN = 16, 4, 3, 2
COLORS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])  # A red, B blue, distractors green
DIRECTIONS = ("right", "left", "below", "above")


def direction(dy: int, dx: int) -> int | None:
    """Class of B's offset from A, or None when the markers overlap or the dominant axis is ambiguous."""
    if max(abs(dx), abs(dy)) < MARKER or abs(abs(dx) - abs(dy)) < MARGIN:
        return None
    if abs(dx) > abs(dy):
        return 0 if dx > 0 else 1
    return 2 if dy > 0 else 3


def vit_split(count: int, seed: int) -> Split:
    """`count` noise images with markers A, B and two distractors; label = direction of B from A."""
    rng = random.Random(seed)
    pixels = torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)) * 0.35
    labels = torch.empty(count, dtype=torch.long)
    spots = IMAGE - MARKER + 1
    for index in range(count):
        while True:
            (ay, ax), (by, bx) = [(rng.randrange(spots), rng.randrange(spots)) for _ in range(2)]
            label = direction(by - ay, bx - ax)
            if label is not None:
                break
        places = [(ay, ax), (by, bx)]
        while len(places) < 4:  # distractors never cover A or B, so the two markers always read clearly
            y, x = rng.randrange(spots), rng.randrange(spots)
            if all(max(abs(y - py), abs(x - px)) >= MARKER for py, px in places[:2]):
                places.append((y, x))
        for color, (y, x) in zip((0, 1, 2, 2), places):
            pixels[index, :, y:y + MARKER, x:x + MARKER] += COLORS[color].view(3, 1, 1)
        labels[index] = label
    return {"pixel_values": pixels, "labels": labels}


def build_vit(sizes: Sizes, classes: int) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=sizes.hidden, num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        intermediate_size=2 * sizes.hidden, image_size=IMAGE, patch_size=PATCH, num_channels=3,
        num_labels=classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config)


LENGTH, VOCAB, CLS, MARKER_A, MARKER_B = 32, 64, 1, 2, 3  # filler tokens are 4..VOCAB-1
DISTANCE_BINS = ((1, 4), (7, 10), (13, LENGTH))  # gaps between bins keep the classes unambiguous


def distance_bin(distance: int) -> int | None:
    return next((i for i, (low, high) in enumerate(DISTANCE_BINS) if low <= distance <= high), None)


def bert_split(count: int, seed: int) -> Split:
    """`count` random token sequences with markers A and B; label = order x distance bin of the two."""
    rng = random.Random(seed)
    ids = torch.randint(MARKER_B + 1, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = CLS
    labels = torch.empty(count, dtype=torch.long)
    for index in range(count):
        while True:
            a, b = rng.sample(range(1, LENGTH), 2)
            distance = distance_bin(abs(a - b))
            if distance is not None:
                break
        ids[index, a], ids[index, b] = MARKER_A, MARKER_B
        labels[index] = (0 if a < b else len(DISTANCE_BINS)) + distance
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_bert(sizes: Sizes, classes: int) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=sizes.hidden, num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        intermediate_size=2 * sizes.hidden, max_position_embeddings=LENGTH, num_labels=classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


@dataclass(frozen=True)
class Task:
    """A synthetic task: its classes, how to draw a split, and the model family that learns it."""

    classes: tuple[str, ...]
    make: Callable[[int, int], Split]
    build: Callable[[Sizes, int], nn.Module]
    model_class: type[transformers.PreTrainedModel]


TASKS = {
    "vit": Task(DIRECTIONS, vit_split, build_vit, transformers.ViTForImageClassification),
    "bert": Task(tuple(f"{order} {low}-{high}" for order in ("A<B", "B<A") for low, high in DISTANCE_BINS),
                 bert_split, build_bert, transformers.BertForSequenceClassification),
}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def make_splits(task: Task, sizes: Sizes) -> dict[str, Split]:
    return {name: task.make(getattr(sizes, name), seed) for name, seed in SPLIT_SEEDS.items()}


class Batches:
    """Re-iterable mini-batches of a split: reshuffled every pass when given a generator, and at most
    `limit` per pass (sized, so LoRA's schedule fits the budget: the idea of search.trainable.FirstBatches)."""

    def __init__(self, split: Split, size: int, generator: torch.Generator | None = None, limit: int | None = None):
        self.split, self.size, self.generator = split, size, generator
        self.count = len(split["labels"])
        full = math.ceil(self.count / size)
        self.length = full if limit is None else min(limit, full)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shuffled = self.generator is not None
        order = torch.randperm(self.count, generator=self.generator) if shuffled else torch.arange(self.count)
        for start in range(0, self.length * self.size, self.size):
            rows = order[start:start + self.size]
            yield {key: value[rows] for key, value in self.split.items()}


# --- the dense model -----------------------------------------------------------------------------


def train_dense(task: Task, sizes: Sizes, splits: dict[str, Split], seed: int) -> tuple[nn.Module, list[dict]]:
    """Train the task's model from scratch: AdamW, warm-up then cosine decay (one-cycle), fixed seed."""
    torch.manual_seed(seed)
    model = task.build(sizes, len(task.classes))
    train = Batches(splits["train"], sizes.batch_size, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, sizes.lr, total_steps=sizes.epochs * len(train),
                                                   pct_start=0.1)
    log = []
    for epoch in range(sizes.epochs):
        started = time.perf_counter()
        model.train()
        for batch in train:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        validation = evaluate(model, Batches(splits["validation"], 256))["accuracy"]
        log.append({"epoch": epoch + 1, "last_loss": loss.item(), "validation": validation,
                    "seconds": time.perf_counter() - started})
        print(f"  epoch {epoch + 1}/{sizes.epochs}: loss {loss.item():.3f}, validation {validation:.2%}", flush=True)
    return model.eval(), log


def dense_model(task_name: str, sizes: Sizes, splits: dict[str, Split], work: Path) -> tuple[nn.Module, dict]:
    """The trained dense model: loaded from --work when trained on the same data with the same sizes before
    (the directory name hashes both), else trained and cached."""
    task = TASKS[task_name]
    data = hashlib.sha256(b"".join(value.numpy().tobytes() for value in splits["train"].values())).hexdigest()
    settings = {"task": task_name, "sizes": asdict(sizes), "train_data_sha256": data, "train_seed": 0}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    directory = work / f"dense-{task_name}-{digest}"
    record_path = directory / RECORD_FILE  # written last: its presence means the model was saved whole
    if record_path.is_file():
        print(f"dense model: cached in {directory}", flush=True)
        record = json.loads(record_path.read_text())
        return task.model_class.from_pretrained(directory).eval(), {**record, "cached": True}
    print(f"dense model: training ({sizes.train} samples, {sizes.epochs} epochs) into {directory}", flush=True)
    started = time.perf_counter()
    model, log = train_dense(task, sizes, splits, seed=settings["train_seed"])
    record = {
        "settings": settings,
        "train_seconds": time.perf_counter() - started,
        "epoch_log": log,
        "validation": evaluate(model, Batches(splits["validation"], 256))["accuracy"],
        "test": evaluate(model, Batches(splits["test"], 256))["accuracy"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(directory)
    record_path.write_text(json.dumps(record, indent=2))
    return model, {**record, "cached": False}


# --- pruning ----------------------------------------------------------------------------------------


def steps_to_target(target: float) -> int:
    """Compounding steps of STEP_RATIO to reach `target` (the last one is capped there), as search.space counts them."""
    return math.ceil(math.log(1 - target) / math.log(1 - STEP_RATIO) - 1e-9)


def prune_run(dense: nn.Module, strategy: Strategy, seed: int, splits: dict[str, Split], sizes: Sizes,
              target: float) -> dict:
    """One strategy, one seed: the paper's iterative recipe on a copy of the dense model, evaluated every step.

    The seed fixes LoRA's initialisation and the order of its batches; Fisher's calibration batches
    come from the training split through their own generator, so runs paired on the seed see the
    same LoRA batches whichever scorer they use.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    config = SessionConfig(strategy=strategy, step_ratio=STEP_RATIO, steps=steps_to_target(target),
                           schedule="compound", lora=LORA, calib_batches=sizes.calib_batches, final_sparsity=target)
    session = PruningSession(
        copy.deepcopy(dense),
        config,
        train=Batches(splits["train"], sizes.batch_size, torch.Generator().manual_seed(seed), sizes.lora_batches),
        evaluation=Batches(splits["validation"], 256),
        calib=Batches(splits["train"], sizes.batch_size, torch.Generator().manual_seed(10_000 + seed),
                      sizes.calib_batches),
    )
    test = Batches(splits["test"], 256)
    steps = []
    for result in session:
        steps.append({
            "step": result.step, "target_sparsity": result.target_sparsity,
            "attention_sparsity": result.attention_sparsity, "validation": result.metric,
            "test": evaluate(session.model, test)["accuracy"],
        })
    last = steps[-1]
    return {
        "granularity": strategy.granularity, "scorer": strategy.scorer, "threshold": strategy.threshold, "seed": seed,
        "attention_sparsity": last["attention_sparsity"], "validation": last["validation"], "test": last["test"],
        "layer_sparsity": layer_sparsity(session.model), "steps": steps, "seconds": time.perf_counter() - started,
    }


# --- answers and tables ---------------------------------------------------------------------------


def compare(rows: list[dict]) -> list[dict]:
    """Each question whose factor the run varies, over pairs of runs that differ only in it (same seed)."""
    answers = []
    for question, factor, first, second in QUESTIONS:
        others = [k for k in ("granularity", "scorer", "threshold") if k != factor]
        pairs = [(a, b) for a in rows if a[factor] in first for b in rows
                 if b[factor] in second and b["seed"] == a["seed"] and all(a[k] == b[k] for k in others)]
        if not pairs:
            continue
        answer = {"question": question, "pairs": len(pairs)}
        for split in ("validation", "test"):
            diffs = [a[split] - b[split] for a, b in pairs]
            answer[f"{split}_mean_diff"] = statistics.fmean(diffs)
            answer[f"{split}_wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)} (ties {sum(d == 0 for d in diffs)})"
        answer["verdict"] = verdict([a["test"] - b["test"] for a, b in pairs])
        answers.append(answer)
    return answers


def verdict(diffs: list[float]) -> str:
    """'yes' / 'no' when the paired test differences agree in sign at least 3 times in 4, else 'unclear'."""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if wins >= 0.75 * len(diffs):
        return "yes"
    if losses >= 0.75 * len(diffs):
        return "no"
    return "unclear (within noise)"


def strategy_name(row: dict) -> str:
    return f"{row['granularity']}/{row['scorer']}/{row['threshold']}"


def layer_summary(rows: list[dict]) -> list[dict]:
    """Per strategy: mean per-layer attention sparsity at the end over seeds, and the layer it prunes most."""
    by_strategy: dict[str, list[list[float]]] = {}
    for row in rows:
        by_strategy.setdefault(strategy_name(row), []).append(row["layer_sparsity"])
    summary = []
    for strategy, profiles in sorted(by_strategy.items()):
        mean = [statistics.fmean(values) for values in zip(*profiles)]
        summary.append({"strategy": strategy, "mean_layer_sparsity": mean, "most_pruned_layer": mean.index(max(mean))})
    return summary


def tables(results: dict) -> str:
    """Markdown: dense accuracy, every run's curve, the means at the target, the answers, the layer profiles."""
    dense = results["dense"]
    rows = results["rows"]
    targets = [step["target_sparsity"] for step in rows[0]["steps"]]
    lines = [
        f"{results['settings']['model']}: dense validation {dense['validation']:.2%}, test {dense['test']:.2%} "
        f"({dense['parameters']:,} parameters, trained in {dense['train_seconds']:.0f} s"
        f"{', cached' if dense['cached'] else ''})",
        "",
        "validation / test accuracy after each prune step (column: target attention sparsity)",
        "",
        "| strategy | seed | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for row in rows:
        cells = " | ".join(f"{100 * s['validation']:.1f} / {100 * s['test']:.1f}" for s in row["steps"])
        lines.append(f"| {strategy_name(row)} | {row['seed']} | {cells} |")
    target, seeds = results["settings"]["target"], results["seeds"]
    lines += ["", f"at the target ({target:.0%}), mean ± sd over {seeds} seed(s)", "",
              "| strategy | attention sparsity | validation | test | seconds per run |", "|---|---|---|---|---|"]
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(strategy_name(row), []).append(row)
    for name, runs in sorted(grouped.items(), key=lambda kv: -statistics.fmean(r["test"] for r in kv[1])):
        sparsity = statistics.fmean(r["attention_sparsity"] for r in runs)
        seconds = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {sparsity:.1%} | {_spread([r['validation'] for r in runs])} | "
                     f"{_spread([r['test'] for r in runs])} | {seconds:.0f} |")
    lines += ["", "each question pairs runs that differ only in its factor (same seed); answer: on the test split",
              "", "| question | pairs | mean diff (validation) | wins (validation) | mean diff (test) | wins (test) "
              "| answer |", "|---|---|---|---|---|---|---|"]
    for a in results["answers"]:
        lines.append(f"| {a['question']} | {a['pairs']} | {100 * a['validation_mean_diff']:+.2f} pt | "
                     f"{a['validation_wins']} | {100 * a['test_mean_diff']:+.2f} pt | {a['test_wins']} | "
                     f"{a['verdict']} |")
    lines += ["", "| strategy | most pruned layer | per-layer attention sparsity (layer 0 first) |", "|---|---|---|"]
    for s in results["layers"]:
        lines.append(f"| {s['strategy']} | {s['most_pruned_layer']} | "
                     f"{' '.join(f'{v:.2f}' for v in s['mean_layer_sparsity'])} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%}"
    return f"{statistics.fmean(values):.2%} ± {100 * statistics.stdev(values):.2f}"


# --- command line ---------------------------------------------------------------------------------


def _choices(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated subset of `allowed`, refusing anything else by name."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated list of {', '.join(allowed)}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TASKS), default="vit")
    parser.add_argument("--seeds", type=int, default=4, help="pruning seeds per strategy (LoRA init and batch order)")
    parser.add_argument("--target", type=float, default=0.5, help="attention sparsity to reach")
    parser.add_argument("--granularities", type=_choices(("entire_head", "per_head", "same_channel")),
                        default=("entire_head", "per_head"), help="comma-separated (default entire_head,per_head)")
    parser.add_argument("--thresholds", type=_choices(("global", "local")), default=("global",),
                        help="comma-separated (default global)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, model and budgets: checks the path, not the answer")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-transfer", help="cached dense models")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/transfer-MODEL.json; with --quick, in --work)")
    parser.add_argument("--from-json", type=Path, default=None, help="print the tables of a results file and stop")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.threads < 1:
        parser.error("--seeds and --threads must be >= 1")
    if not 0 < args.target < 1:
        parser.error(f"--target must be in (0, 1), got {args.target}")
    if args.out is None:
        args.out = (args.work / f"transfer-{args.model}-quick.json" if args.quick
                    else RESULTS / f"transfer-{args.model}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        if not args.from_json.is_file():
            print(f"error: --from-json: {args.from_json} does not exist", file=sys.stderr)
            return 2
        print(tables(json.loads(args.from_json.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    started = time.perf_counter()
    splits = make_splits(TASKS[args.model], sizes)
    args.work.mkdir(parents=True, exist_ok=True)
    dense, record = dense_model(args.model, sizes, splits, args.work)
    print(f"dense model: validation {record['validation']:.2%}, test {record['test']:.2%}", flush=True)
    if not args.quick and record["validation"] < MIN_DENSE_ACCURACY:
        print(f"warning: the dense model reached only {record['validation']:.2%} validation accuracy; pruning "
              "comparisons on a model that has not learned the task say little", file=sys.stderr)
    strategies = [Strategy(g, s, t) for g in args.granularities for t in args.thresholds for s in SCORERS]
    rows = []
    for seed in range(args.seeds):
        for strategy in strategies:
            print(f"\n=== {strategy.name}, seed {seed} ===", flush=True)
            row = prune_run(dense, strategy, seed, splits, sizes, args.target)
            print(f"  {row['attention_sparsity']:.1%} attention sparsity: validation {row['validation']:.2%}, "
                  f"test {row['test']:.2%} ({row['seconds']:.0f} s)", flush=True)
            rows.append(row)
    results = {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        },
        "settings": {
            "model": args.model, "classes": list(TASKS[args.model].classes), "quick": args.quick,
            "sizes": asdict(sizes), "target": args.target, "step_ratio": STEP_RATIO, "schedule": "compound",
            "steps": steps_to_target(args.target), "lora": asdict(LORA), "granularities": list(args.granularities),
            "thresholds": list(args.thresholds), "scorers": list(SCORERS),
        },
        "dense": record,
        "seeds": args.seeds,
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "answers": compare(rows),
        "layers": layer_summary(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n" + tables(results))
    print(f"\nresults: {args.out} ({results['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
