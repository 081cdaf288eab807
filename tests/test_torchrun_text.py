"""Chapter 7, README and ``python -m batchlab.ddp_train --help`` show the same several-machines command.

Each of the three places shows the two-machine ``torchrun`` command and says which of its options the
rendezvous flags replace; the test reads the text of all three, checks that they agree, and lets
torchrun's own argument parser read the command before and after the replacement.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from batchlab.ddp_train import parse_args

ROOT = Path(__file__).resolve().parent.parent
REPLACED = ["--node_rank", "--master_addr", "--master_port"]


def readme_text():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Distributed training with torchrun")
    return text[start : text.index("\n## ", start + 1)]


def notebook_text():
    notebook = json.loads((ROOT / "notebooks" / "07_distributed.ipynb").read_text())
    return "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown")


def help_text(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def several_machines_command(text):
    """The torchrun command with --nnodes, its continuation line joined, as a list of arguments."""
    joined = text.replace("\\\\\n", " ").replace("\\\n", " ")  # the docstring doubles its backslash
    lines = [line.strip() for line in joined.splitlines()]
    found = [line for line in lines if line.startswith("python -m torch.distributed.run --nnodes")]
    assert len(found) == 1, f"expected one several-machines command, found {found}"
    return shlex.split(found[0])


def rendezvous(text):
    """(the rendezvous flags, the options they replace) as the prose states them."""
    flat = " ".join(text.split())
    flags = re.search(r"`+(--rdzv-backend=\S+ --rdzv-endpoint=\S+ --rdzv-id=[^`\s]+)`+", flat)
    assert flags, "the rendezvous flags are not shown"
    after = flat[flags.end() : flags.end() + 200]
    replaced = re.match(r"\s*in place of `+(--\w+)`+, `+(--\w+)`+ and `+(--\w+)`+", after)
    assert replaced, f"the text after the rendezvous flags does not say what they replace: {after!r}"
    return flags.group(1).split(), list(replaced.groups())


def torchrun_options(arguments):
    """torchrun's parsed options for a 'python -m torch.distributed.run ...' command."""
    assert arguments[:3] == ["python", "-m", "torch.distributed.run"]
    return get_args_parser().parse_args(arguments[3:])


@pytest.fixture
def places(capsys):
    return {"README.md": readme_text(), "chapter 7": notebook_text(), "ddp_train --help": help_text(capsys)}


def test_the_three_places_show_the_same_several_machines_command_and_rendezvous(places):
    commands = {name: several_machines_command(text) for name, text in places.items()}
    rendezvous_text = {name: rendezvous(text) for name, text in places.items()}
    assert len({tuple(command) for command in commands.values()}) == 1, commands
    assert len({tuple(flags) for flags, _ in rendezvous_text.values()}) == 1, rendezvous_text
    for name, (_, replaced) in rendezvous_text.items():
        assert replaced == REPLACED, f"{name} says the rendezvous flags replace {replaced}"


def test_the_replaced_options_are_in_the_command_and_the_rest_still_parses(places):
    command = several_machines_command(places["README.md"])
    flags, replaced = rendezvous(places["README.md"])
    kept = [arg for arg in command if arg.split("=")[0] not in replaced]
    assert len(kept) == len(command) - len(replaced), "each replaced option appears once, as --name=value"
    before = torchrun_options(command)
    assert (before.nnodes, before.node_rank, before.master_addr, before.master_port) == ("2", 0, "10.0.0.1", 29500)
    module = len(kept) - 1 - kept[::-1].index("-m")  # the script's -m, after torchrun's options
    after = torchrun_options(kept[:module] + flags + kept[module:])
    assert (after.rdzv_backend, after.rdzv_endpoint) == ("c10d", "10.0.0.1:29400")
    assert (after.nnodes, after.nproc_per_node) == (before.nnodes, before.nproc_per_node)  # these stay
    assert after.training_script_args == before.training_script_args  # the same script and its options
