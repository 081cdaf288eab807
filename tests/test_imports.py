"""`import batchlab` stays light: scripts and torchrun ranks must not pay for the widget and plot stack."""

import subprocess
import sys

HEAVY = ("ipywidgets", "matplotlib", "IPython")


def modules_loaded_by(code: str) -> set:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_batchlab_loads_no_widget_or_plotting_module():
    loaded = modules_loaded_by("import batchlab")
    assert not loaded & set(HEAVY), f"import batchlab loaded {sorted(loaded & set(HEAVY))}"
    assert "torch" in loaded  # the probe does see what is imported


def test_the_torchrun_script_loads_no_widget_or_plotting_module():
    code = (
        "import runpy, sys\nsys.argv = ['ddp_train', '--help']\n"
        "try:\n    runpy.run_module('batchlab.ddp_train', run_name='__main__')\nexcept SystemExit:\n    pass"
    )
    loaded = modules_loaded_by(code)
    assert not loaded & set(HEAVY), f"python -m batchlab.ddp_train --help loaded {sorted(loaded & set(HEAVY))}"


def test_lazy_names_load_on_first_use():
    loaded = modules_loaded_by("import batchlab\nbatchlab.plot_histories\nbatchlab.BatchSizeExplorer")
    assert {"matplotlib", "ipywidgets"} <= loaded
