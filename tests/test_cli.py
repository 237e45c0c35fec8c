from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fusedformer.bench.report import validate


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fusedformer.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("info", "bench"):
        assert word in out.stdout
    out = cli("bench", "--help")
    assert out.returncode == 0 and "limits" in out.stdout and "attention" in out.stdout


def test_info_json():
    out = cli("info", "--json", "--no-measure")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["isa"] in data["isas_supported"]


def test_info_table():
    out = cli("info", "--no-measure")
    assert out.returncode == 0, out.stderr
    assert "isa" in out.stdout and "threads" in out.stdout


def test_bench_limits_writes_valid_json(tmp_path):
    out = cli("bench", "limits", "--quick", "--budget", "0.05", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "limits.json").read_text())
    validate(data)
    assert {r["case"] for r in data["rows"]} >= {"fp32 FMA throughput"}
    assert (tmp_path / "limits.png").exists()


def test_unknown_area_is_an_argparse_error():
    out = cli("bench", "nope")
    assert out.returncode == 2 and "invalid choice" in out.stderr


BAD_INVOCATIONS = [
    (["bench", "attention", "--shape", "1,2,3", "--no-save"], "[bench attention] --shape takes B,HQ,HKV,LQ,LK,D"),
    (["bench", "attention", "--shape", "1,32,5,16,16,64", "--no-save"], "HKV must divide HQ"),
    (["bench", "attention", "--rounds", "0", "--no-save"], "argument --rounds: must be an integer >= 1"),
    (["bench", "attention", "--impl", "bogus", "--no-save"], "argument --impl: invalid choice: 'bogus'"),
    (["bench", "qmatmul", "--schemes", "affineX", "--shape", "1,64,64", "--no-save"], "unknown scheme 'affineX'"),
    (["bench", "qmatmul", "--schemes", "affine7", "--shape", "1,64,64", "--no-save"], "Affine bits=7 is not supported"),
    (["bench", "model", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--target", "iOS99"], "[export] unknown target 'iOS99'"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--weights", "palettize9"], "[export] scheme 'palettize9': [quant]"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--weights", "q4"], "[export] unknown scheme 'q4': int8, affineB"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--adapter", "chat=/missing.pt"], "--adapter file '/missing.pt' does not exist"),
    (["export", "tiny-llama", "--out", "x.mlpackage", "--adapter", "foo"], "[export] --adapter takes NAME=FILE, got 'foo'"),
    (["verify", "x.mlpackage", "--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
    (["bench", "limits", "--budget", "-1", "--no-save"], "argument --budget: must be a number of seconds > 0"),
    (["bench", "limits", "--budget", "0", "--no-save"], "argument --budget: must be a number of seconds > 0"),
    (["bench", "limits", "--budget", "nan", "--no-save"], "argument --budget: must be a number of seconds > 0"),
    (["bench", "attention", "--budget", "inf", "--no-save"], "argument --budget: must be a number of seconds > 0"),
]


def test_bad_invocations_give_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    """Bad flags and shapes end in a usage error or the area's tagged message, exit status 2."""
    import importlib.util

    from fusedformer.cli import main

    monkeypatch.chdir(tmp_path)
    coreml = importlib.util.find_spec("coremltools") is not None  # (export and verify need it)
    for argv, words in BAD_INVOCATIONS:
        if argv[0] in ("export", "verify") and not coreml:
            continue
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, (argv, err)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_filter_matching_nothing_writes_nothing(tmp_path):
    out = cli("bench", "attention", "--case", "nothing matches this", "--out", str(tmp_path))
    assert out.returncode == 2 and "no case matches --case 'nothing matches this'" in out.stderr
    assert not any(tmp_path.iterdir())


def test_options_given_win_over_quick():
    import argparse

    from fusedformer.bench.harness import quick_or

    args = argparse.Namespace(quick=True, prompt=8, steps=None)
    assert quick_or(args, "prompt", 64, 256) == 8 and quick_or(args, "steps", 4, 8) == 4
    args.quick = False
    assert quick_or(args, "steps", 4, 8) == 8


_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # import name -> ModuleNotFoundError, as where it is not installed
from fusedformer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_commands_needing_a_missing_framework_say_what_to_install(tmp_path):
    """Without torch (or coremltools) the commands that need it print one line naming the extra
    that installs it, exit 2, and no traceback; `info` shows each extra's name in its table."""
    cases = [("torch", ["bench", "attention", "--quick", "--no-save"], "needs torch (pip install 'fusedformer[torch]')"),
             ("torch", ["bench", "qmatmul", "--quick", "--no-save"], "needs torch (pip install 'fusedformer[torch]')"),
             ("torch,coremltools", ["verify", str(tmp_path)], "pip install 'fusedformer[coreml]')")]
    for blocked, argv, message in cases:
        out = subprocess.run([sys.executable, "-c", _WITHOUT, blocked, *argv], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, (argv, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr[-2000:])
    out = subprocess.run([sys.executable, "-c", _WITHOUT, "torch", "info", "--no-measure"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "pip install 'fusedformer[torch]'" in out.stdout, out.stdout


def test_benchmark_json_names_a_commit_only_from_a_checkout(tmp_path):
    """git_commit() reads fusedformer's own checkout; an installed package (here a copy of the
    module in a site-packages inside someone's git repository) gives None."""
    import importlib.util
    import shutil

    from fusedformer.bench import machine

    site = tmp_path / "lib" / "python3" / "site-packages" / "fusedformer" / "bench"
    site.mkdir(parents=True)
    shutil.copy(machine.__file__, site / "machine.py")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)  # (a commit the old lookup returned)
    spec = importlib.util.spec_from_file_location("installed_machine", site / "machine.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.git_commit() is None and installed.git_dirty() is None


def test_benchmark_json_records_how_it_ran(monkeypatch):
    """The machine block says what else shaped the numbers: torch's threads, the settings in the
    environment, the command line, and whether the checkout had changes beyond its commit."""
    from fusedformer.bench import machine

    monkeypatch.setenv("FUSEDFORMER_SPIN_US", "0")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setattr(machine.sys, "argv", ["fusedformer", "bench", "attention", "--quick"])
    d = machine.describe_machine()
    assert d["environment"] == {"FUSEDFORMER_SPIN_US": "0", "OMP_WAIT_POLICY": "passive"}
    assert d["command"] == "fusedformer bench attention --quick"
    torch = pytest.importorskip("torch")  # (describe_machine does not import it: only read where loaded)
    assert machine.describe_machine()["torch_threads"] == torch.get_num_threads()
    if machine.git_commit() is not None:  # (a checkout: CI's clean clone, or a working tree)
        assert d["git_dirty"] in (True, False)


def test_bench_model_with_nothing_to_run_writes_nothing(tmp_path, capsys):
    """An empty or unknown --variants is a usage error (exit 2), as `bench attention` has it,
    and writes no report: it ran nothing and wrote an empty model.json, exiting 0."""
    from fusedformer.cli import main

    for variants, message in (("", "names none and --no-minilm; nothing run"), ("bogus", "unknown variants ['bogus']")):
        assert main(["bench", "model", "--variants", variants, "--no-minilm", "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


_TORCH_DURING_RUN = """
import sys
from fusedformer.bench import limits
from fusedformer.cli import main

area_run = limits.run

def run(args):  # an area that imports torch after making its Report, as attention and qmatmul do
    report = area_run(args)
    import torch
    torch.set_num_threads(1)
    return report

limits.run = run
sys.exit(main(["bench", "limits", "--quick", "--budget", "0.05", "--no-plot", "--out", sys.argv[1]]))
"""


def test_benchmark_json_records_torch_threads_of_torch_imported_during_the_run(tmp_path):
    """The machine block is made before an area imports torch; the JSON still says torch's threads."""
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", _TORCH_DURING_RUN, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "limits.json").read_text())["machine"]["torch_threads"] == 1
