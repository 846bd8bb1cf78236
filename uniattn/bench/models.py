"""``models``: one training step of a small random Llama in transformers, per attention.

transformers' ``eager`` (softmax of the full score matrix), ``sdpa`` (torch's
``scaled_dot_product_attention``) and ``uniattn`` (registered by
:mod:`uniattn.integrations.transformers`), at n 4096 and 8192 (``--quick``: 1024 and
2048; ``--n`` to choose). The model: 2 layers, hidden 256, 4 query heads on 2 key/value
heads of d 64, MLP 512, vocabulary 1024, float32, batch 1, random weights (no download).
A step is forward, the language-model loss and backward (no optimizer). Each
implementation and n is measured in two fresh processes after a warm-up step: one for the
peak memory, the resident set above the model and its inputs
(:func:`uniattn._measure.timed_peak`, with freed memory returned to the OS at once, which
makes every large allocation fault its pages in afresh), and one without that setting for
the time, the median of 3 steps (``--quick``: 2).
"""

from __future__ import annotations

import importlib.util

from uniattn._measure import emit, in_fresh_process, interleaved_medians, timed_peak
from uniattn.bench._common import GiB, Progress, Report, available_bytes, mib, ms, ratio

IMPLEMENTATIONS = ("eager", "sdpa", "uniattn")
MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1024,
)


def eager_bytes(n: int) -> int:
    """What eager attention holds at its peak, float32: the probabilities of every layer,
    kept for the backward, and about four more score matrices (scores, their gradient)."""
    heads, layers = MODEL["num_attention_heads"], MODEL["num_hidden_layers"]
    return (layers + 4) * n * n * heads * 4


def run(
    names,
    quick: bool = False,
    full: bool = False,
    ns: list[int] | None = None,
) -> Report:
    ns = ns or ([1024, 2048] if quick else [4096, 8192])
    repeats = 2 if quick else 3
    report = Report(
        "models",
        "One training step (forward, loss, backward) of a random 2-layer Llama in "
        "transformers, batch 1, float32, 4 query heads on 2 key/value heads of d 64, per "
        f"attn_implementation: peak memory above the model and inputs, median of {repeats} "
        "steps. Less memory and speed-up are against eager.",
        ["n", "attention", "peak MiB", "step ms", "less memory", "speed-up"],
        raw={"lengths": ns, "model": MODEL, "steps": {}},
    )
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if "torch" not in names or missing:
        report.notes.append(
            "Not run: it needs torch and transformers"
            + (f" ({', '.join(missing)} missing)." if missing else " (torch not selected).")
        )
        return report
    progress = Progress(len(ns) * len(IMPLEMENTATIONS), "models")
    for n in ns:
        lines = {}
        for impl in IMPLEMENTATIONS:
            progress.step(f"n={n} {impl}")
            need, budget = eager_bytes(n), int(0.7 * available_bytes())
            if impl == "eager" and need > budget:
                lines[impl] = {"skipped": f"needs ~{need / GiB:.0f} GiB, {budget / GiB:.0f} free"}
            else:
                lines[impl] = {}
                for what in ("memory", "time"):
                    spec = {"backend": "torch", "impl": impl, "n": n, "what": what}
                    spec["repeats"] = repeats
                    found = in_fresh_process(f"{__name__}:measure", spec, memory=what == "memory")
                    lines[impl].update(next((x for x in found if what in x), found[-1]))
            progress.advance()
        report.raw["steps"][n] = lines
        report.rows += _rows(n, lines)
    progress.close()
    return report


def measure(backend, spec: dict) -> None:
    """The fresh process's side: the peak extra bytes (``spec["what"]`` "memory") or the
    median seconds ("time") of one training step with ``spec["impl"]`` at length
    ``spec["n"]``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from uniattn.integrations import transformers as uniattn_hf

    uniattn_hf.register("uniattn")
    n = spec["n"]
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, max_position_embeddings=n)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=spec["impl"])
    ids = torch.randint(0, MODEL["vocab_size"], (1, n))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    step()  # warm-up: first-call allocations, the parameters' gradient buffers
    result = {
        "n": n,
        "impl": spec["impl"],
        "attn_implementation": model.config._attn_implementation,
    }
    if spec["what"] == "memory":
        result["memory"] = timed_peak(backend, step, ())[1]
    else:
        repeats = spec["repeats"]
        result["time"] = interleaved_medians({"s": step}, backend.block, repeats, warm=False)["s"]
    emit(**result)


def _rows(n: int, lines: dict) -> list[list[str]]:
    eager = lines.get("eager", {})
    rows = []
    for impl in IMPLEMENTATIONS:
        line = lines.get(impl, {})
        if "memory" not in line and "time" not in line:
            why = line.get("skipped") or line.get("error") or "no result"
            rows.append([str(n), impl, why, "", "", ""])
            continue
        rows.append(
            [
                str(n),
                impl,
                mib(line.get("memory")),
                ms(line.get("time")),
                ratio(eager.get("memory"), line.get("memory")),
                ratio(eager.get("time"), line.get("time")),
            ]
        )
    return rows
