"""The flow benchmark cannot rot: every installed implementation of ``benchmarks/bench_flows.py``
builds at a tiny size, its ``log_prob`` / inverse run, the round trip holds, a training step reaches
every trainable parameter, and the report (tables and target verdicts) is produced."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_flows", REPO / "benchmarks" / "bench_flows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_flows"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
NAMES = list(bench.IMPLEMENTATIONS)


def _require(name: str) -> None:
    library = bench.IMPLEMENTATIONS[name].library
    if not bench.installed(library):
        pytest.skip(f"{library} is not installed (pip install -e '.[bench]')")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the libraries' own (torch.lu, softmax scaling)
@pytest.mark.parametrize("name", NAMES)
def test_implementation_runs_and_inverts(name):
    _require(name)
    s = bench.TINY
    torch.manual_seed(0)
    built = bench.IMPLEMENTATIONS[name].build(s)
    x = built.layout(torch.randn(s.batch, s.channels, s.length))
    y = torch.randint(s.classes, (s.batch,))
    bench.initialise(built, x, y)
    built.module.eval()
    with torch.no_grad():
        lp = built.log_prob(x, y)
        z = built.to_latent(x)
        back = built.from_latent(z)
        sample = built.from_latent(torch.randn_like(x))
    assert lp.shape == (s.batch,) and torch.isfinite(lp).all()
    assert z.shape == x.shape and back.shape == x.shape and torch.isfinite(sample).all()
    assert not torch.allclose(z, x, atol=1e-3), "the flow should not be the identity after initialise"
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)

    built.module.train()
    built.module.zero_grad(set_to_none=True)
    loss = -built.log_prob(x, y).mean() / (s.channels * s.length * math.log(2.0))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in built.module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"


@pytest.mark.parametrize("name", ["flowtransfer-spline", "flowtransfer-affine-k1"])
def test_prepared_figures_run(name):
    fns = bench.prepare(name, bench.TINY)
    assert set(fns) == set(bench.FIGURES)
    for setup, run in fns.values():
        setup()
        run()


def test_report_tiny(tmp_path, monkeypatch, capsys):
    """The whole report at the tiny size, one round, one thread, one library reported missing."""
    monkeypatch.setattr(bench, "installed", lambda lib: lib != "zuko" and (
        lib == "flowtransfer" or importlib.util.find_spec(lib) is not None))
    out = tmp_path / "bench.txt"
    lines = bench.main(["--tiny", "--rounds", "1", "--threads", "1", "--no-memory", "--out", str(out)])
    text = out.read_text()
    assert text.splitlines() == lines
    assert "zuko not installed (rows skipped)" in text and "zuko-spline" not in text
    assert "flowtransfer-spline" in text and "flowtransfer-affine-k1" in text
    assert "FrEIA spline" in text  # said, not silently dropped
    gflop = {line.split()[0]: float(line.split()[1]) for line in lines if " GFLOP" in line}
    assert gflop["flowtransfer-spline"] > gflop["flowtransfer-affine"] > 0  # the spline predicts 3K-1 parameters
    verdicts = [line for line in lines if line.strip().startswith(("PASS", "FAIL"))]
    assert any("flowtransfer-spline / flowtransfer-affine" in v for v in verdicts)
    assert any("fastest library affine (temporal)" in v for v in verdicts) or not any(
        bench.installed(lib) for lib in ("nflows", "FrEIA", "normflows"))


def test_peak_memory_child():
    mb = bench.peak_memory("flowtransfer-spline", 1, tiny=True)
    assert math.isfinite(mb) and mb >= 0
