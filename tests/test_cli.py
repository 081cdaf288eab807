"""`python -m batchlab estimate | plan | explain`, run as a learner runs it: in a subprocess, on their own model."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

import batchlab
from batchlab.cli import parse_shape
from batchlab.reference import GPUS, gpu_memory

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin=None, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "batchlab", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_estimate_torchvision_model_equals_estimate_memory():
    done = run_cli(
        "estimate",
        "--model",
        "torchvision.models:resnet18",
        "--input",
        "3x64x64",
        "--batch-size",
        "8",
        "--optimizer",
        "adam",
        "--gpu",
        "T4",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    batch = (torch.empty(8, 3, 64, 64, device="meta"), torch.empty(8, dtype=torch.long, device="meta"))
    expected = batchlab.estimate_memory(torchvision.models.resnet18(), batch, optimizer="adam")
    assert result["peak_bytes"] == expected.peak_bytes
    assert result["reserved_bytes"] == expected.reserved_bytes
    assert result["breakdown"]["parameters"] == expected.breakdown["parameters"]
    assert result["fits"] is True
    assert result["budget"]["budget_bytes"] == GPUS["T4"][0] - batchlab.CUDA_CONSTANTS["cuda_context"][0]


def test_estimate_human_output_says_what_to_do_when_it_does_not_fit():
    done = run_cli(
        "estimate",
        "--model",
        "torchvision.models:resnet18",
        "--input",
        "3x64x64",
        "--batch-size",
        "8",
        "--budget",
        "100MiB",
    )
    assert done.returncode == 0, done.stderr
    assert "Does not fit" in done.stdout
    assert (
        "batchlab plan --model torchvision.models:resnet18 --input 3x64x64 --effective-batch 8 --budget 100MiB"
        in done.stdout
    )


USER_FILE = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    """Returns a dict, which the default loss cannot read: the file's own loss must be used."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(10, 32)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(32, 32))
        self.pred = nn.Linear(32, 1)
        self.aux = nn.Linear(32, 1)

    def forward(self, x):
        h = self.block(self.body(x))
        return {"pred": self.pred(h), "aux": self.aux(h)}


def make_batch(n):
    return torch.randn(n, 10), torch.randn(n, 1)


def loss(output, targets):
    return nn.functional.mse_loss(output["pred"], targets) + 0.1 * output["aux"].pow(2).mean()


def not_a_model():
    return 42
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def test_plan_for_a_model_in_a_file_with_its_own_batch_and_loss(user_file):
    done = run_cli(
        "plan",
        "--model",
        f"{user_file}:TwoHeads",
        "--batch",
        f"{user_file}:make_batch",
        "--loss",
        f"{user_file}:loss",
        "--effective-batch",
        "40",
        "--budget",
        "2GiB",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sum(result["micro_batches"]) == 40
    assert result["accumulation_steps"] == len(result["micro_batches"]) == 1
    assert {o["precision"] for o in result["options"]} == {"fp32"}
    assert result["train_kwargs"]["batch_size"] == 40
    assert result["peak_bytes"] > 0


def test_plan_prints_a_table_and_a_progress_line(user_file):
    done = run_cli(
        "plan",
        "--model",
        f"{user_file}:TwoHeads",
        "--batch",
        f"{user_file}:make_batch",
        "--loss",
        f"{user_file}:loss",
        "--effective-batch",
        "16",
        "--budget",
        "1GiB",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--no-checkpointing",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("planning 16 samples per step in 1.00 GiB")
    assert "planned in" in done.stderr
    table = done.stdout.splitlines()
    assert table[1].split() == ["micro-batches", "steps", "precision", "checkpointing", "peak", "reserved", "cost"]
    assert table[2].split()[:5] == ["*", "16", "x", "1", "1"]
    assert "batch_size=16" in done.stdout


def test_default_loss_on_a_dict_output_is_refused_in_one_line(user_file):
    done = run_cli(
        "estimate", "--model", f"{user_file}:TwoHeads", "--batch", f"{user_file}:make_batch", "--batch-size", "4"
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "loss_fn" in done.stderr and "['pred', 'aux']" in done.stderr


OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB total capacity;\n"
    "3.40 GiB already allocated; 12.00 MiB free; 3.50 GiB reserved in total by PyTorch)\n"
)


def test_explain_reads_standard_input():
    done = run_cli("explain", "--json", stdin=OOM)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = batchlab.explain_oom(OOM)
    assert result["cause"] == expected.cause == "out_of_memory"
    assert result["requested_bytes"] == 20 * 2**20
    assert result["reserved_bytes"] == expected.reserved_bytes
    assert result["advice"] == list(expected.advice)


def test_explain_takes_the_message_as_arguments():
    done = run_cli("explain", *OOM.split())
    assert done.returncode == 0, done.stderr
    assert done.stdout == str(batchlab.explain_oom(OOM)) + "\n"


@pytest.mark.parametrize(
    "args, argument, hint",
    [
        (["--model", "no_such_package.models:net", "--input", "3x8x8"], "--model", "package.module:callable"),
        (["--model", "builtins:dict", "--input", "3x8x8"], "--model", "not a torch.nn.Module"),
        (["--model", "torchvision.models:resnet18", "--input", "3by8"], "--input", "3x224x224"),
        (["--model", "torchvision.models:resnet18", "--input", "3x8x8", "--gpu", "GTX9999"], "--gpu", "RTX4090"),
    ],
)
def test_bad_arguments_are_one_line_with_status_2(args, argument, hint):
    done = run_cli("estimate", *args, "--batch-size", "2")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"batchlab estimate: error: {argument}: ")
    assert hint in done.stderr


def test_a_file_model_that_does_not_return_a_module(user_file):
    done = run_cli("estimate", "--model", f"{user_file}:not_a_model", "--input", "10", "--batch-size", "2")
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "returned int, not a torch.nn.Module; give a class or function that returns the model"
    )


def test_explain_of_text_that_is_no_oom_message():
    done = run_cli("explain", stdin="Segmentation fault\n")
    assert done.returncode == 2
    assert done.stderr.startswith("batchlab explain: error: message: must be an out-of-memory error")


def test_cli_loads_no_widgets_or_plots():
    probe = "import sys, batchlab.cli; print(sorted({'ipywidgets', 'matplotlib', 'IPython'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_parse_shape():
    assert parse_shape("3x224x224") == (3, 224, 224)
    assert parse_shape("784") == (784,)
    for bad in ("3x0x4", "3x", "-3x4", "a"):
        with pytest.raises(ValueError, match="--input: .* is not a shape"):
            parse_shape(bad)


def test_gpu_memory_names_and_sizes():
    assert gpu_memory("rtx 4090")["gpu"] == "RTX4090"
    assert gpu_memory("h100")["total_bytes"] == batchlab.gpu_reference()["context"]["total"]
    twelve = gpu_memory("12GiB")
    assert twelve["budget_bytes"] == 12 * 2**30 - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    with pytest.raises(ValueError, match="A100-40GB, A100-80GB"):
        gpu_memory("A100")
    with pytest.raises(ValueError, match="smaller than the CUDA context"):
        gpu_memory("512MiB")


LM_FILE = """
from torch import nn


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(100, 16), nn.Linear(16, 100)

    def forward(self, ids):
        return self.head(self.embed(ids))
"""


def test_tokens_use_the_token_level_loss(tmp_path, capsys):
    from batchlab.cli import main, token_loss

    path = tmp_path / "lm.py"
    path.write_text(LM_FILE)
    assert (
        main(
            ["estimate", "--model", f"{path}:TinyLM", "--tokens", "16", "--vocab", "100", "--batch-size", "4", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    ids, targets = (torch.empty(4, 16, dtype=torch.long, device="meta") for _ in range(2))
    model = batchlab.cli.load_model(f"{path}:TinyLM")
    assert next(model.parameters()).device.type == "meta"  # built without initialising weights
    assert result["peak_bytes"] == batchlab.estimate_memory(model, (ids, targets), loss_fn=token_loss).peak_bytes
    assert main(["estimate", "--model", f"{path}:TinyLM", "--tokens", "16", "--batch-size", "4"]) == 2
    assert capsys.readouterr().err == (
        "batchlab estimate: error: --vocab: --tokens needs --vocab V, the number of token ids (e.g. 50257 for GPT-2)\n"
    )


def test_the_console_script_is_the_command_line():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"batchlab": "batchlab.cli:main"}
    assert (ROOT / "batchlab" / "__main__.py").read_text().count("main()") == 1
