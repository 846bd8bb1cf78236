"""The conformance case table's representative cases hold every kind of structure the
whole table has, and every dtype (backends whose calls compile run only those by default:
each in float32, the dtype cases in each dtype they list)."""

from __future__ import annotations

from conformance.cases import CASES, DTYPE_CASES, REPRESENTATIVE, Case


def kinds(c: Case) -> set[tuple]:
    """What a case exercises, at the grain an adapter can get wrong: shapes, features,
    broadcasts and chunking, not the values of sizes, seeds and scales (dtypes: the tests
    below)."""
    return {
        ("batch axes", len(c.batch)),
        ("empty batch", 0 in c.batch),
        ("grouped heads", c.kv_heads not in (None, c.heads)),
        ("one head", c.heads == 1),
        ("d_v differs", c.d_v not in (None, c.d_k)),
        ("causal", {True: "bottom_right"}.get(c.causal, c.causal)),
        ("window sides", None if c.window is None else tuple(w is None for w in c.window)),
        ("query lengths", c.query_lengths is not None),
        ("key lengths", c.key_lengths is not None),
        ("bias ndim", None if c.bias is None else len(c.bias)),
        ("mask ndim", None if c.mask is None else len(c.mask)),
        ("bias_fn", c.bias_fn),
        ("mask_fn", c.mask_fn),
        ("masked rows", bool(c.masked_rows)),
        ("documents", c.documents is not None),
        ("kv documents", c.kv_documents is not None),
        ("shuffled ids", c.shuffled_ids),
        ("-inf bias", c.bias_minus_inf),
        ("sinks ndim", None if c.sinks is None else len(c.sinks)),
        ("softcap", c.softcap is not None),
        ("dropout", c.dropout_rate > 0),
        ("layout", c.layout),
        ("integer qk", c.integer_qk),
        ("chunk size 1", 1 in c.chunks),
        ("one row block", c.chunks[0] >= c.q_len),
        ("one key chunk", c.chunks[1] >= c.kv_len),
        ("uneven chunks", c.q_len % c.chunks[0] != 0 or c.kv_len % c.chunks[1] != 0),
        ("no queries", c.q_len == 0),
        ("no keys", c.kv_len == 0),
        ("decoding", c.q_len == 1),
    }


def test_representative_cases_exist_once():
    assert len(set(REPRESENTATIVE)) == len(REPRESENTATIVE)
    assert set(REPRESENTATIVE) <= set(CASES), set(REPRESENTATIVE) - set(CASES)
    assert set(DTYPE_CASES) <= set(REPRESENTATIVE), set(DTYPE_CASES) - set(REPRESENTATIVE)


def test_each_representative_case_runs_in_some_dtype():
    silent = [n for n in REPRESENTATIVE if "float32" not in CASES[n].dtypes]
    assert set(silent) <= set(DTYPE_CASES), silent


def test_dtype_cases_hold_every_dtype_of_the_table():
    table = {d for c in CASES.values() for d in c.dtypes}
    held = {d for n in DTYPE_CASES for d in CASES[n].dtypes}
    assert held == table, table - held


def test_representative_cases_hold_every_kind_of_the_table():
    table = set().union(*(kinds(c) for c in CASES.values()))
    held = set().union(*(kinds(CASES[n]) for n in REPRESENTATIVE))
    missing = {k: [n for n, c in CASES.items() if k in kinds(c)] for k in table - held}
    assert not missing, f"kinds no representative case holds (cases that do): {missing}"
