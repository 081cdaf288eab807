"""``python -m batchlab`` (or ``batchlab``): estimate, plan and explain for your own model, from the shell.

* ``estimate``: one training step's peak and reserved memory by category (:func:`batchlab.estimate_memory`),
  and whether it fits a budget or a GPU;
* ``plan``: the ways to keep an effective batch inside a budget (:func:`batchlab.plan_fit`);
* ``explain``: what an out-of-memory message means and what to do (:func:`batchlab.explain_oom`), for a
  message given as an argument or pasted on standard input.

The work is done by plain functions that return data (:func:`estimate_command`, :func:`plan_command`,
:func:`explain_command`); :func:`main` parses the arguments and prints, as a short table or as one JSON
object (``--json``). A bad argument is one line on standard error naming it and what works, exit status 2.
This module loads no widget or plotting library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .estimate import estimate_memory
from .memory import CATEGORIES
from .oom import explain_oom
from .plan import describe_micro_batches, plan_fit
from .precision import PRECISIONS
from .reference import GPUS, gpu_memory
from .validation import format_bytes, parse_bytes


class UsageError(ValueError):
    """A command-line argument that cannot be used: ``main`` prints its message alone and exits with 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")


# -- loading the learner's model, batch and loss ---------------------------------------------------


def load_callable(spec: str, argument: str):
    """The object ``spec`` names: ``package.module:name`` or ``path/to/file.py:name`` (a dotted name works too)."""
    where, colon, attribute = spec.rpartition(":")
    if not colon or not where or not attribute:
        raise UsageError(
            argument,
            f"{spec!r} is not MODULE:NAME; write package.module:callable "
            f"(e.g. torchvision.models:resnet18) or path/to/file.py:callable",
        )
    if where.endswith(".py"):
        module = _import_file(where, argument)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as error:  # noqa: BLE001 (any failure while importing is the learner's to see)
            raise UsageError(
                argument,
                f"cannot import {where!r} ({type(error).__name__}: {error}); give an "
                f"importable package.module:callable or path/to/file.py:callable",
            ) from error
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))][:8]
            raise UsageError(argument, f"{where!r} has no {attribute!r}; it has {', '.join(names) or 'no callables'}")
        value = getattr(value, part)
    if not callable(value):
        raise UsageError(argument, f"{spec!r} is a {type(value).__name__}, not a class or function")
    return value


def _import_file(path: str, argument: str):
    file = Path(path)
    if not file.is_file():
        raise UsageError(argument, f"no file {path!r}; give path/to/file.py:callable with an existing file")
    sys.path.insert(0, str(file.resolve().parent))  # the file may import its neighbours
    try:
        loaded = importlib.util.spec_from_file_location(f"batchlab_user_{file.stem}", file)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001
        raise UsageError(argument, f"running {path!r} failed ({type(error).__name__}: {error})") from error
    return module


def load_model(spec: str) -> nn.Module:
    """``--model``: a class or a function returning an ``nn.Module``, called with no arguments."""
    factory = load_callable(spec, "--model")
    try:
        model = _build(factory)
    except TypeError as error:
        raise UsageError(
            "--model",
            f"{spec}() cannot be called without arguments ({error}); give a class or function "
            f"that builds the model with no arguments (write one in a file.py)",
        ) from error
    if not isinstance(model, nn.Module):
        raise UsageError(
            "--model",
            f"{spec}() returned {type(model).__name__}, not a torch.nn.Module; give a class "
            f"or function that returns the model",
        )
    return model


def _build(factory):
    """``factory()`` on PyTorch's meta device where it can be (no weights are initialised: the estimator only
    reads shapes, and a 160M-parameter model builds in a fraction of a second); as it is otherwise."""
    try:
        with torch.device("meta"):
            return factory()
    except TypeError:
        raise  # it needs arguments: the caller says so
    except Exception:  # noqa: BLE001 (a constructor that computes with values, or loads weights)
        return factory()


def load_loss(spec: str):
    """``--loss``: a function ``(output, targets) -> mean loss``, or a loss class (built with no arguments)."""
    loss = load_callable(spec, "--loss")
    if inspect.isclass(loss) and issubclass(loss, nn.Module):
        loss = loss()
    return loss


def parse_shape(text: str, argument: str = "--input") -> tuple:
    """``"3x224x224"`` -> ``(3, 224, 224)``: one sample's shape, positive integers joined by ``x``."""
    parts = text.lower().replace("×", "x").split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(
            argument,
            f"{text!r} is not a shape; write one sample's size as positive integers joined "
            f"by x, e.g. 3x224x224 (channels x height x width) or 784",
        )
    return tuple(int(p) for p in parts)


def token_loss(logits, targets):
    """Token-level cross-entropy: every position of ``(batch, length, vocab)`` logits is one prediction."""
    logits = logits.logits if hasattr(logits, "logits") else logits[0] if isinstance(logits, tuple) else logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch_maker(args):
    """``(make_batch, loss_fn, what)`` from ``--input``/``--classes``, ``--tokens``/``--vocab`` or ``--batch``.

    Images and tokens are built on the meta device: shapes only, so a batch of any size costs nothing.
    """
    given = [
        flag
        for flag, value in (("--input", args.input), ("--tokens", args.tokens), ("--batch", args.batch))
        if value is not None
    ]
    if len(given) != 1:
        raise UsageError(
            "--input",
            f"give exactly one of --input CxHxW, --tokens L (with --vocab V) or "
            f"--batch module:callable, got {', '.join(given) or 'none'}",
        )
    loss = load_loss(args.loss) if args.loss else None
    if args.input is not None:
        shape, classes = parse_shape(args.input), _positive("--classes", args.classes)
        make = lambda n: (torch.empty(n, *shape, device="meta"), torch.empty(n, dtype=torch.long, device="meta"))
        return make, loss, f"inputs {'x'.join(map(str, shape))}, {classes} classes"
    if args.tokens is not None:
        length = _positive("--tokens", args.tokens)
        if args.vocab is None:
            raise UsageError("--vocab", "--tokens needs --vocab V, the number of token ids (e.g. 50257 for GPT-2)")
        _positive("--vocab", args.vocab)
        make = lambda n: (
            torch.empty(n, length, dtype=torch.long, device="meta"),
            torch.empty(n, length, dtype=torch.long, device="meta"),
        )
        return make, loss or token_loss, f"{length} tokens, vocabulary {args.vocab}"
    make = load_callable(args.batch, "--batch")
    return make, loss, f"batches from {args.batch}"


def _positive(argument: str, value: int) -> int:
    if value is None or value < 1:
        raise UsageError(argument, f"must be a positive integer, got {value}")
    return value


def budget_of(args) -> dict | None:
    """``--budget SIZE`` (what PyTorch may use) or ``--gpu NAME`` (a card, minus its CUDA context), or None."""
    if args.budget is not None and args.gpu is not None:
        raise UsageError(
            "--gpu",
            "give --gpu NAME or --budget SIZE, not both (the budget of a GPU is its memory minus the CUDA context)",
        )
    if args.gpu is not None:
        try:
            return gpu_memory(args.gpu, "--gpu")
        except (TypeError, ValueError) as error:
            raise UsageError("--gpu", str(error).removeprefix("--gpu ")) from error
    if args.budget is not None:
        try:
            size = parse_bytes("--budget", args.budget)
        except (TypeError, ValueError) as error:
            raise UsageError("--budget", str(error).removeprefix("--budget ")) from error
        return {"gpu": None, "total_bytes": None, "context_bytes": None, "budget_bytes": size, "source": "given"}
    return None


# -- the commands: data in, data out --------------------------------------------------------------


def estimate_command(args) -> dict:
    """One step of ``--batch-size`` samples: peak and reserved bytes, the breakdown, and ``fits`` with a budget."""
    model = load_model(args.model)
    make_batch, loss_fn, what = batch_maker(args)
    n = _positive("--batch-size", args.batch_size)
    budget = budget_of(args)
    common = dict(
        optimizer=args.optimizer,
        loss_fn=loss_fn,
        device=args.device,
        precision=args.precision,
        checkpointing="blocks" if args.checkpointing else None,
    )
    report = estimate_memory(model, make_batch(n), **common)
    result = {
        "command": "estimate",
        "model": args.model,
        "batch": what,
        "batch_size": n,
        **_settings(args),
        "peak_bytes": report.peak_bytes,
        "reserved_bytes": report.reserved_bytes,
        "breakdown": {c: b for c, b in report.breakdown.items() if b or c in CATEGORIES},
        "peak_phase": report.peak_phase,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if budget is not None:
        fits = max(report.peak_bytes, report.reserved_bytes or 0) <= budget["budget_bytes"]
        if not fits and report.reserved_bytes is not None:  # over only by its cache: CUDA frees it before failing
            try:
                estimate_memory(model, make_batch(n), budget=budget["budget_bytes"], **common)
                fits = True
            except torch.OutOfMemoryError:
                pass
        result.update(budget=budget, fits=fits)
    return result


def plan_command(args, progress=None) -> dict:
    """:func:`batchlab.plan_fit` for the parsed arguments; ``progress(text)`` hears when the search starts and ends."""
    model = load_model(args.model)
    make_batch, loss_fn, what = batch_maker(args)
    effective = _positive("--effective-batch", args.effective_batch)
    budget = budget_of(args)
    if budget is None:
        raise UsageError(
            "--budget",
            f"plan needs --budget SIZE (e.g. 8GiB, what PyTorch may use) or --gpu NAME (one of {', '.join(GPUS)})",
        )
    precisions = tuple(p.strip() for p in args.precision.split(","))
    for p in precisions:
        if p not in PRECISIONS:
            raise UsageError(
                "--precision",
                f"{p!r} is not a precision; give one or more of {', '.join(PRECISIONS)} separated by commas",
            )
    checkpointing = (False, True) if args.checkpointing is None else args.checkpointing
    if progress:
        progress(
            f"planning {effective} samples per step in {format_bytes(budget['budget_bytes'])}: precision "
            f"{', '.join(precisions)} x checkpointing {checkpointing} ..."
        )
    start = time.perf_counter()
    plan = plan_fit(
        model,
        make_batch,
        budget=budget["budget_bytes"],
        effective_batch=effective,
        optimizer=args.optimizer,
        loss_fn=loss_fn,
        device=args.device,
        precisions=precisions,
        checkpointing=checkpointing,
        progress=progress is not None,
    )
    if progress:
        progress(f"planned in {time.perf_counter() - start:.1f} s")
    options = [
        {
            "micro_batches": list(o.micro_batches),
            "micro_batch": o.micro_batch,
            "accumulation_steps": o.accumulation_steps,
            "precision": o.precision,
            "checkpointing": o.checkpointing,
            "peak_bytes": o.peak_bytes,
            "reserved_bytes": o.reserved_bytes,
            "cost": round(o.cost, 4),
            "max_micro_batch": o.max_micro_batch,
        }
        for o in plan.options
    ]
    return {
        "command": "plan",
        "model": args.model,
        "batch": what,
        "effective_batch": effective,
        "budget": budget,
        "optimizer": args.optimizer,
        "device": args.device,
        **options[0],
        "options": options,
        "train_kwargs": plan.train_kwargs(),
        "notes": list(plan.notes),
        "learning_rate_note": plan.learning_rate_note(),
    }


def explain_command(args, stdin=None) -> dict:
    """:func:`batchlab.explain_oom` on the message given, or on standard input when none is."""
    text = " ".join(args.message) if args.message else (stdin or sys.stdin).read()
    if not text.strip():
        raise UsageError(
            "message",
            "give the out-of-memory message as an argument or on standard input (e.g. batchlab explain < error.log)",
        )
    try:
        report = explain_oom(text)
    except ValueError as error:
        raise UsageError("message", str(error).removeprefix("error ")) from error
    fields = (
        "cause",
        "reason",
        "advice",
        "requested_bytes",
        "total_bytes",
        "free_bytes",
        "allocated_bytes",
        "reserved_bytes",
        "unallocated_bytes",
        "outside_bytes",
        "process_bytes",
        "other_processes",
        "allowed_bytes",
        "needed_bytes",
        "missing",
        "notes",
        "simulated",
    )
    result = {name: getattr(report, name) for name in fields}
    result["advice"], result["missing"], result["notes"] = (list(result[k]) for k in ("advice", "missing", "notes"))
    if result["other_processes"] is not None:
        result["other_processes"] = [list(pair) for pair in result["other_processes"]]
    return {"command": "explain", **result, "report": str(report)}


def _settings(args) -> dict:
    return {
        "optimizer": args.optimizer,
        "device": args.device,
        "precision": args.precision,
        "checkpointing": bool(args.checkpointing),
    }


# -- printing -------------------------------------------------------------------------------------


def _size(n) -> str:
    return "-" if n is None else format_bytes(n)


def _budget_line(budget: dict) -> str:
    if budget["gpu"] is None:
        return f"budget {format_bytes(budget['budget_bytes'])} (given)"
    return (
        f"GPU {budget['gpu']}: {format_bytes(budget['total_bytes'])} ({budget['source']}) - CUDA context "
        f"{format_bytes(budget['context_bytes'])} = budget {format_bytes(budget['budget_bytes'])}"
    )


def _command_line(args, **changes) -> str:
    words = ["batchlab", changes.pop("command"), "--model", args.model]
    for flag in ("input", "tokens", "vocab", "batch", "loss"):
        value = getattr(args, flag)
        if value is not None and not (flag == "vocab" and args.tokens is None):
            words += [f"--{flag}", str(value)]
    for flag, value in changes.items():
        words += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(words)


def format_estimate(result: dict, args) -> str:
    lines = [
        f"{result['model']} ({result['parameters']:,} parameters), {result['batch']}, batch {result['batch_size']}"
        f", {result['optimizer']}, {result['precision']}{', checkpointed' if result['checkpointing'] else ''}, "
        f"estimated for {result['device']}"
    ]
    width = max(len(c) for c in result["breakdown"])
    lines += [f"  {c.ljust(width)}  {_size(b):>11}" for c, b in result["breakdown"].items()]
    lines.append(f"  {'peak'.ljust(width)}  {_size(result['peak_bytes']):>11}  (during {result['peak_phase']})")
    if result["reserved_bytes"] is not None:
        lines.append(f"  {'reserved'.ljust(width)}  {_size(result['reserved_bytes']):>11}  (the caching allocator's)")
    budget = result.get("budget")
    if budget is None:
        lines.append("Next: add --budget SIZE or --gpu NAME to see whether it fits.")
        return "\n".join(lines)
    lines.append(_budget_line(budget))
    if result["fits"]:
        lines.append(
            "Fits. Next: try a larger --batch-size, or `batchlab plan --effective-batch N` for the "
            "micro-batches that keep a larger batch per step."
        )
    else:
        flag = f"--gpu {budget['gpu']}" if budget["gpu"] else f"--budget {args.budget}"
        lines.append("Does not fit. Next: keep the batch with accumulation, precision or checkpointing:")
        lines.append("  " + _command_line(args, command="plan", effective_batch=result["batch_size"]) + f" {flag}")
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    header = ("", "micro-batches", "steps", "precision", "checkpointing", "peak", "reserved", "cost")
    rows = [
        (
            "*" if i == 0 else "",
            describe_micro_batches(o["micro_batches"]),
            str(o["accumulation_steps"]),
            o["precision"],
            "blocks" if o["checkpointing"] else "no",
            _size(o["peak_bytes"]),
            _size(o["reserved_bytes"]),
            f"{o['cost']:.2f}",
        )
        for i, o in enumerate(result["options"])
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        f"{result['model']}, {result['batch']}: effective batch {result['effective_batch']}, "
        + _budget_line(result["budget"]),
        *("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]),
        "(cost = predicted step time / one fp32 step of the whole batch; best first)",
    ]
    lines += [f"note: {note}" for note in result["notes"]]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in result["train_kwargs"].items())
    lines.append(f"Next: batchlab.train(model, data, {kwargs}), or train(..., **plan.train_kwargs()) in Python.")
    lines.append(result["learning_rate_note"])
    return "\n".join(lines)


# -- the command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchlab",
        description="Memory of a training step for your own model and GPU: estimate "
        "it, plan an effective batch, explain an out-of-memory error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    estimate = commands.add_parser("estimate", help="one step's peak and reserved memory, and whether it fits")
    plan = commands.add_parser("plan", help="micro-batches, precision and checkpointing that keep an effective batch")
    for sub in (estimate, plan):
        _model_arguments(sub)
    estimate.add_argument("--batch-size", type=int, required=True, help="samples in the step")
    estimate.add_argument("--precision", choices=PRECISIONS, default="fp32")
    estimate.add_argument("--checkpointing", action="store_true", help="checkpoint every block (chapter 8)")
    plan.add_argument("--effective-batch", type=int, required=True, help="samples per optimizer step, kept exactly")
    plan.add_argument("--precision", default="fp32,bf16", help="precisions to try, e.g. fp32,bf16 (default)")
    plan.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only with (--checkpointing) or without (--no-checkpointing); default: both",
    )
    explain = commands.add_parser("explain", help="what an out-of-memory message means and what to do")
    explain.add_argument("message", nargs="*", help="the message; read from standard input when not given")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _model_arguments(sub) -> None:
    sub.add_argument(
        "--model",
        required=True,
        help="package.module:callable or path/to/file.py:callable, "
        "a class or function returning an nn.Module (no arguments)",
    )
    sub.add_argument("--input", help="one sample's shape, e.g. 3x224x224 (float inputs, class targets)")
    sub.add_argument("--classes", type=int, default=1000, help="classes of the targets with --input (1000)")
    sub.add_argument("--tokens", type=int, help="sequence length L: token ids in, next-token targets")
    sub.add_argument("--vocab", type=int, help="vocabulary size V with --tokens")
    sub.add_argument("--batch", help="module:callable, n -> (inputs, targets), for any other batch")
    sub.add_argument("--loss", help="module:callable, (output, targets) -> mean loss (default cross-entropy)")
    sub.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    sub.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="estimate for this device (cuda)")
    sub.add_argument("--budget", help="memory PyTorch may use, e.g. 12GiB")
    sub.add_argument("--gpu", help=f"a card ({', '.join(GPUS)}) or its memory, e.g. 12GiB; minus the CUDA context")
    sub.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 1 when the library refuses, 2 for a bad argument)."""
    args = build_parser().parse_args(argv)
    progress = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.json else None
    try:
        if args.command == "estimate":
            result = estimate_command(args)
            text = format_estimate(result, args)
        elif args.command == "plan":
            result = plan_command(args, progress)
            text = format_plan(result)
        else:
            result = explain_command(args)
            text = result["report"]
    except UsageError as error:
        print(f"batchlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, NotImplementedError, torch.OutOfMemoryError) as error:
        print(f"batchlab {args.command}: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else text)
    return 0
