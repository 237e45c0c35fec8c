from __future__ import annotations

import importlib

import pytest

import fusedformer as ff
from fusedformer import _C


def test_info_content():
    data = ff.info(measure=False)
    assert data["version"] == ff.__version__
    assert data["isa"] == _C.isa()
    assert data["isa"] in data["isas_supported"]
    assert set(data["isas_supported"]) <= set(data["isas_compiled"])
    assert data["threads"] == _C.num_threads() >= 1
    assert data["limits"] is None
    assert set(data["backends"]) == {"torch", "mlx", "coremltools", "transformers"}
    for name, status in data["backends"].items():
        if status["available"]:
            assert status["version"], name
        else:
            assert status["reason"] and status["install"].startswith("pip install"), name


def test_info_measures_limits_once():
    a = ff.info()["limits"]
    b = ff.info()["limits"]
    assert a is b or a == b  # cached
    assert a["peak_gflops"] > 0 and a["bandwidth_gbs"] > 0


def test_missing_backend_says_how_to_install(monkeypatch):
    from fusedformer import _info

    _info.backend_status.cache_clear()
    monkeypatch.setitem(_info.BACKENDS, "torch", ("definitely_not_a_module_xyz", "torch"))
    try:
        status = _info.backend_status("torch")
        assert status == {
            "available": False,
            "reason": "not installed",
            "install": "pip install 'fusedformer[torch]'",
        }
    finally:
        _info.backend_status.cache_clear()


def test_backend_import_keeps_its_log_warnings_back(monkeypatch, caplog):
    """A backend's import-time log warnings (coremltools logs ten on Linux) stay off stderr, and
    the logger's level is restored afterwards."""
    import logging
    import types

    from fusedformer import _info

    def noisy_import(name, *args, **kwargs):
        logging.getLogger(f"{name}.sub").warning("Failed to load a proxy")
        return types.ModuleType(name)

    logger = logging.getLogger("noisy_backend_xyz")
    logger.setLevel(logging.INFO)
    _info.backend_status.cache_clear()
    monkeypatch.setitem(_info.BACKENDS, "torch", ("noisy_backend_xyz", "torch"))
    monkeypatch.setattr(_info.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(_info.importlib, "import_module", noisy_import)
    try:
        status = _info.backend_status("torch")
    finally:
        _info.backend_status.cache_clear()
    assert status["available"]
    assert "Failed to load" not in caplog.text
    assert logger.level == logging.INFO
    logging.getLogger("noisy_backend_xyz.sub").warning("after the import")
    assert "after the import" in caplog.text  # logged again once the import is done


def test_lazy_submodules():
    assert ff.reference.sdpa is not None
    import pytest

    with pytest.raises(AttributeError):
        ff.not_a_thing  # noqa: B018


@pytest.mark.parametrize("package, name, needs", [
    ("fusedformer.torch", "optimize", "torch"),
    ("fusedformer.mlx", "optimize", "mlx.core"),
    ("fusedformer.coreml", "export", "coremltools"),
])
def test_public_name_survives_its_submodules_import(package, name, needs):
    # ff.torch.optimize is defined in fusedformer/torch/optimize.py: the import system binds that
    # submodule on the package under the same name when anything imports it first (here as it
    # does, by setattr), and the public function must stay what the name gives
    pytest.importorskip(needs)
    pkg = importlib.import_module(package)
    submodule = importlib.import_module(f"{package}.{name}")
    setattr(pkg, name, submodule)
    assert getattr(pkg, name) is getattr(submodule, name)
    assert callable(getattr(pkg, name))
    pkg.some_other_attribute = submodule  # only the public names are resolved
    assert pkg.some_other_attribute is submodule
    del pkg.some_other_attribute
