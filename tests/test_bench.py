"""The benchmark's plumbing, on NumPy at tiny sizes: its workers measure, its reports
format, its progress bar draws. (Its figures belong in README, not in assertions.)"""

from __future__ import annotations

import io
import json
import os

import pytest

from uniattn import backends
from uniattn._measure import gradients, in_fresh_process, interleaved_medians
from uniattn.bench import models, peers, speed
from uniattn.bench._common import Progress, Report, attention_flops, machine, ratio, too_big


def test_memory_worker_measures_both_implementations_in_a_fresh_process():
    spec = {"backend": "numpy", "task": "forward", "ns": [512], "repeats": 1}
    lines = in_fresh_process("uniattn.bench.memory:measure", spec, memory=True, timeout=300)
    by_impl = {line["impl"]: line for line in lines if "impl" in line}
    assert set(by_impl) == {"uniattn", "plain"}, lines
    # Plain attention holds 512 x 512 float32 scores (1 MiB); uniattn one chunk at a time.
    assert by_impl["plain"]["peak_bytes"] > 512 * 512 * 4
    assert all(line["seconds"] > 0 for line in by_impl.values())


def test_speed_worker_times_every_available_implementation():
    spec = {
        "backend": "numpy", "ns": [256], "heads": 2, "d": 16, "repeats": 1,
        "modes": ["forward", "gradient"],
    }  # fmt: skip
    lines = in_fresh_process("uniattn.bench.speed:measure", spec, timeout=300)
    rates = [line["matmul_flops_per_s"] for line in lines if "matmul_flops_per_s" in line]
    assert len(rates) == 2 and min(rates) > 0  # before and after the timings
    assert "matmul_flops_per_s" in lines[0] and "matmul_flops_per_s" in lines[-1]
    timed = [line for line in lines if "seconds" in line]
    assert len(timed) == 1 and timed[0]["mode"] == "forward"  # NumPy has no autodiff
    assert {"uniattn", "plain"} <= set(timed[0]["seconds"])


def test_speed_times_the_default_and_the_chunked_implementation_where_they_differ():
    """On torch's CPU the default is SDPA's flash kernel (causal, layout BHTD here), so the
    chunked algorithm gets its own row; NumPy has no fused kernel, so no second row."""
    pytest.importorskip("torch")
    spec = {
        "backend": "torch", "ns": [128], "heads": 2, "d": 16, "repeats": 1,
        "modes": ["forward"], "causal": True, "layout": "BHTD",
    }  # fmt: skip
    lines = in_fresh_process("uniattn.bench.speed:measure", spec, timeout=300)
    (timed,) = [line["seconds"] for line in lines if "seconds" in line]
    assert {"uniattn", "uniattn chunked", "torch sdpa"} <= set(timed)
    skipped = {line["impl"] for line in lines if "skipped" in line and "n" not in line}
    assert {"plain", "keras"} <= skipped  # measured in BTHD without causal only
    assert "uniattn chunked" not in peers.implementations(backends.harness("numpy"))


def test_speed_report_states_the_matmul_rate_its_percentages_use():
    report = speed.run(["numpy"], ns=[128])
    (note,) = [n for n in report.notes if "matmul rate" in n]
    rate = float(note.rsplit("numpy ", 1)[1]) * 1e9
    row = next(r for r in report.rows if r[3] == "uniattn" and r[1] == "fwd")
    assert float(row[6]) * 1e9 / rate == pytest.approx(float(row[7].rstrip("%")) / 100, abs=0.01)


def test_speed_report_takes_the_faster_matmul_rate():
    lines = [{"matmul_flops_per_s": 3e11}, {"n": 1, "seconds": {}}, {"matmul_flops_per_s": 4e11}]
    assert speed._matmul_rate(lines) == 4e11
    assert speed._matmul_rate([{"n": 1}]) is None


def test_worker_errors_come_back_as_lines():
    lines = in_fresh_process("uniattn.bench.scale:measure", {"backend": "numpy", "n": -1})
    assert "error" in lines[-1]


def test_peers_say_why_they_are_missing():
    found = peers.implementations(backends.harness("numpy"))
    assert callable(found["uniattn"]) and callable(found["plain"])
    assert all(callable(fn) or isinstance(fn, str) for fn in found.values())


def test_report_markdown_and_json(tmp_path):
    report = Report(
        "demo", "caption", ["a", "b"], [["1", "2"]], raw={"x": [1.5]}, notes=["n"], machine="cpu"
    )
    assert report.markdown().splitlines() == [
        "caption",
        "",
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "",
        "n",
        "",
        "Machine: cpu.",
    ]
    md, raw = report.write(tmp_path)
    assert json.loads(raw.read_text()) == {"x": [1.5], "machine": "cpu"}
    assert md.read_text().startswith("caption")


def test_progress_bar_counts_steps():
    stream = io.StringIO()
    progress = Progress(4, "demo", stream=stream)
    progress.advance(2)
    progress.step("half")
    assert "[##########..........] 2/4" in stream.getvalue() and "demo: half" in stream.getvalue()


def test_machine_names_the_cpu_count():
    assert f"{os.cpu_count()} CPUs" in machine()
    assert Report("demo", "", []).machine == machine()


def test_helpers():
    assert attention_flops(2, 1, 1) == 16 and attention_flops(2, 1, 1, gradient=True) == 56
    assert ratio(3.0, 2.0) == "1.50x" and ratio(None, 1.0) == "—"
    assert too_big(256, 1, False) is None and "GiB" in too_big(2**22, 64, True)


@pytest.mark.parametrize("settle", [False, True])
def test_interleaved_medians_take_turns(settle):
    """The functions take turns after one warm-up call each; with ``settle`` each timed
    call follows an untimed call of the same function (so two calls a turn)."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    seconds = interleaved_medians(fns, lambda x: x, repeats=3, settle=settle)
    assert set(seconds) == {"a", "b"} and all(t >= 0 for t in seconds.values())
    turn = ["a", "a", "b", "b"] if settle else ["a", "b"]
    assert calls == ["a", "b"] + turn * 3


def test_torch_gradients_reach_peers_that_checkpoint_reentrantly():
    pytest.importorskip("torch", reason="the torch path of the bench's gradient")
    import torch
    import torch.utils.checkpoint

    backend = backends.harness("torch")

    def dense(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    def reentrant(q, k, v):  # as memory-efficient-attention 0.1.3 checkpoints
        return torch.utils.checkpoint.checkpoint(dense, q, k, v, use_reentrant=True)

    q, k, v, d_out = (torch.randn(2, 5, 3, dtype=torch.float64) for _ in range(4))
    with pytest.raises(RuntimeError, match="use_reentrant"):
        backend.vjp(reentrant, q, k, v)[1](d_out)  # what the bench used to call
    got = gradients(backend, reentrant)(q, k, v, d_out)
    want = backend.vjp(dense, q, k, v)[1](d_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert not any(x.requires_grad for x in (q, k, v))  # the inputs are left as they were


def test_device_and_dtype_options_are_checked():
    from uniattn.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["scale", "--device", "cuda"])  # scale does not take a device
    with pytest.raises(SystemExit):
        main(["memory", "--dtype", "bfloat16"])  # only speed takes a dtype


def test_speed_runs_on_a_named_device_and_dtype():
    report = speed.run(["numpy"], ns=[128], device="cpu", dtype="float32")
    assert "on cpu" in report.caption and report.raw["device"] == "cpu"
    assert any(r[3] == "uniattn" for r in report.rows)


def test_fused_gpu_kernels_are_listed_on_cuda_only():
    pytest.importorskip("torch")
    torch_backend = backends.harness("torch")
    on_cpu = peers.implementations(torch_backend, "cpu", "float32")
    assert not any(name.startswith("torch sdpa ") for name in on_cpu)
    on_gpu = peers.implementations(torch_backend, "cuda", "float32")
    # FlashAttention and cuDNN take 16-bit floats only: said, not attempted.
    assert isinstance(on_gpu["torch sdpa flash"], str)
    assert isinstance(on_gpu["torch sdpa cudnn"], str)
    assert callable(on_gpu["torch sdpa efficient"])
    assert all(
        callable(f)
        for n, f in peers.implementations(torch_backend, "cuda", "bfloat16").items()
        if n.startswith("torch sdpa")
    )


def test_speed_plot_leaves_a_backend_without_autodiff_blank(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uniattn.bench import plots

    report = speed.run(["numpy"], ns=[128])
    (path,) = plots.plot(report, tmp_path)
    assert path.stat().st_size > 0
    fig = plots._speed(plt, report.raw)
    forward, gradient = fig.axes  # NumPy: a forward panel, and no gradient to plot
    assert forward.axison and forward.get_lines()
    assert not gradient.axison and not gradient.get_lines()
    plt.close(fig)


def test_ring_bench_counts_the_bytes_its_formula_states():
    pytest.importorskip("torch")
    from uniattn.bench import ring

    lines = ring.measure(256, 2, "zigzag", repeats=1)
    assert sorted(x["rank"] for x in lines) == [0, 1]
    assert all(x["sent"] == ring.sent_formula(256, 2) for x in lines)
    assert all(x["seconds"] > 0 for x in lines)
    assert ring.work(4096, 8, "zigzag")[1] <= 1.05 < ring.work(4096, 8, "contiguous")[1]


def test_models_worker_steps_a_transformers_llama_through_uniattn():
    pytest.importorskip("torch", reason="the models benchmark trains a PyTorch model")
    pytest.importorskip("transformers", reason="the models benchmark runs transformers' Llama")
    spec = {"backend": "torch", "impl": "uniattn", "n": 32, "what": "memory", "repeats": 1}
    lines = in_fresh_process("uniattn.bench.models:measure", spec, memory=True, timeout=300)
    (line,) = [line for line in lines if "memory" in line]
    assert line["attn_implementation"] == "uniattn"
    assert line["memory"] > 0  # the gradients' buffers, at least


def test_models_report_compares_with_eager_and_says_what_was_not_run():
    lines = {
        "eager": {"skipped": "needs ~9 GiB, 4 free"},
        "sdpa": {"memory": 2 * 2**20, "time": 0.5},
        "uniattn": {"memory": 2**20, "time": 1.0},
    }
    rows = models._rows(8192, lines)
    assert rows[0][:3] == ["8192", "eager", "needs ~9 GiB, 4 free"]
    assert rows[2][:4] == ["8192", "uniattn", "1.0", "1000"] and rows[2][4] == "—"
    lines["eager"] = {"memory": 8 * 2**20, "time": 2.0}
    assert models._rows(8192, lines)[2][4:] == ["8.00x", "2.00x"]
    report = models.run(["numpy"], ns=[64])
    assert not report.rows and "Not run" in report.notes[0]
