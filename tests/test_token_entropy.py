"""Token soft-label entropy from a sparse soft-label store (rbkd.analysis.token_entropy, issue 16
item 6): every table against a float64 recomputation from the dense logits the tiny store was
captured from, position by position in plain Python; the CLI on a store (tables, JSON, CSV,
figure), a dense soft-label file still read as before, and a damaged store refused in one line."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import rbkd.ops as ops
from rbkd.analysis import token_entropy as te
from rbkd.lm import store as st

SHA = hashlib.sha256(b"x").hexdigest()
VOCAB, K, TEMPS = 37, 5, (0.5, 1.0, 2.0, 4.0)
DOCS = (5, 9, 1, 12, 3)  # document lengths: 30 positions over shards of 8


def corpus(seed=0):
    """Dense teacher logits [N, V], skewed input ids (a few frequent types) and doc offsets."""
    g = torch.Generator().manual_seed(seed)
    n = sum(DOCS)
    logits = torch.randn(n, VOCAB, generator=g, dtype=torch.float64) * 2.5
    logits[3] *= 6  # a peaked row: low entropy, its top-k holds nearly all the mass
    ids = (torch.rand(n, generator=g) ** 3 * VOCAB).long()  # Zipf-like: small ids frequent
    offsets = torch.cat([torch.arange(m) for m in DOCS])
    return logits, ids, offsets


def build_store(folder, logits, ids, offsets, *, config=None, nan_row=None):
    spec = st.StoreSpec(k=K, temperatures=TEMPS, topk_dtype="float32", num_tokens=len(ids),
                        shard_tokens=8, teacher_config=config or {"vocab_size": VOCAB},
                        teacher_sha256=SHA, tokenizer_sha256=SHA, corpus_sha256=SHA)  # fmt: skip
    x = logits.float()
    if nan_row is not None:
        x[nan_row, 2] = math.nan

    def compute(start, end):
        cap = ops.capture_soft_labels(x[start:end], K, list(TEMPS))
        return {"topk_ids": cap.topk_ids, "topk_logits": cap.topk_logits, "logz": cap.logz,
                "entropy": cap.entropy, "input_ids": ids[start:end].int(),
                "doc_offsets": offsets[start:end].int()}  # fmt: skip

    st.write_store(folder, spec, compute)
    return folder


@pytest.fixture
def store(tmp_path):
    logits, ids, offsets = corpus()
    return build_store(tmp_path / "store", logits, ids, offsets), (logits, ids, offsets)


def oracle(logits, ids, offsets, temps=TEMPS, skip=()):
    """Every table recomputed in float64 from the dense logits, one position at a time."""
    n = len(ids)
    rows = [r for r in range(n) if r not in skip]
    h = {}  # (row, T) -> entropy
    mass = {}  # (row, T) -> [top-1 mass, top-2 mass, ...]
    for r in rows:
        for t in temps:
            p = torch.softmax(logits[r] / t, 0)
            h[r, t] = float(-(p * p.log()).sum())
            mass[r, t] = p.sort(descending=True).values[:K].cumsum(0).tolist()
    freq = {}  # the input token's frequency counts every position, a non-finite one too
    for r in range(n):
        freq[int(ids[r])] = freq.get(int(ids[r]), 0) + 1
    order = sorted(freq, key=lambda tok: (-freq[tok], tok))
    rank = {tok: i + 1 for i, tok in enumerate(order)}

    def rank_bucket(tok):
        return max(0, math.ceil(math.log10(rank[tok])) - 1) if rank[tok] > 1 else 0

    def pos_bucket(off):
        return 0 if off == 0 else int(off).bit_length()

    def means(key_of):
        groups = {}
        for r, key in key_of:
            groups.setdefault(key, []).append(r)
        return {key: ([sum(h[r, t] for r in rs) / len(rs) for t in temps], len(rs))
                for key, rs in groups.items()}  # fmt: skip

    nxt = [(r, rank_bucket(int(ids[r + 1]))) for r in rows if r + 1 < n and offsets[r + 1] != 0]
    return {
        "mean": [sum(h[r, t] for r in rows) / len(rows) for t in temps],
        "input": means([(r, rank_bucket(int(ids[r]))) for r in rows]),
        "next": means(nxt),
        "position": means([(r, pos_bucket(int(offsets[r]))) for r in rows]),
        "mass": [[sum(mass[r, t][j] for r in rows) / len(rows) for j in range(K)] for t in temps],
        "types": len(freq),
    }


def check_buckets(table, expected, bound_key):
    got = {b: (row["mean_entropy"], row["positions"]) for b, row in enumerate(table["buckets"])
           if row["positions"]}  # fmt: skip
    assert set(got) == set(expected)
    for b, (want, count) in expected.items():
        assert got[b][1] == count
        torch.testing.assert_close(torch.tensor(got[b][0], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=2e-5)  # fmt: skip
    for row in table["buckets"]:
        lo, hi = row[bound_key]
        assert lo <= hi


def test_tables_match_a_float64_recomputation(store):
    folder, (logits, ids, offsets) = store
    res = te.token_entropy(folder)
    want = oracle(logits, ids, offsets)
    assert (
        res["positions"] == res["finite_positions"] == len(ids) and res["nonfinite_positions"] == 0
    )
    assert res["temperatures"] == list(TEMPS) and res["k"] == K
    assert res["vocab_size"] == VOCAB and res["max_entropy"] == pytest.approx(math.log(VOCAB))
    # float32 logits captured, float64 oracle: the stored H_j and logz_j agree to float32 precision
    torch.testing.assert_close(torch.tensor(res["mean_entropy"], dtype=torch.float64),
                               torch.tensor(want["mean"], dtype=torch.float64), atol=2e-5, rtol=2e-5)  # fmt: skip
    check_buckets(res["by_input_frequency"], want["input"], "ranks")
    check_buckets(res["by_next_frequency"], want["next"], "ranks")
    check_buckets(res["by_position"], want["position"], "offsets")
    assert res["by_input_frequency"]["token_types"] == want["types"]
    torch.testing.assert_close(torch.tensor(res["topk_mass"]["mean_mass"], dtype=torch.float64),
                               torch.tensor(want["mass"], dtype=torch.float64), atol=2e-6, rtol=2e-6)  # fmt: skip
    for c in range(len(TEMPS)):
        assert res["tail_mass"][c] == pytest.approx(1 - want["mass"][c][-1], abs=2e-6)
    # the entropy rises with T, the top-k mass with k: the tables are not all one number
    assert res["mean_entropy"] == sorted(res["mean_entropy"])
    assert res["topk_mass"]["mean_mass"][0][0] > res["topk_mass"]["mean_mass"][-1][0]
    # rank buckets 1-10, 11-37 (37 types at most) and position buckets 0, 1, 2-3, 4-7, 8-15
    assert [b["offsets"] for b in res["by_position"]["buckets"]] == [[0, 0], [1, 1], [2, 3],
                                                                      [4, 7], [8, 15]]  # fmt: skip


def test_limit_and_temperature_subset(store):
    folder, (logits, ids, offsets) = store
    res = te.token_entropy(folder, temperatures=[2.0, 0.5], limit=13)  # ends inside shard 1
    want = oracle(logits[:13], ids[:13], offsets[:13], temps=(2.0, 0.5))
    assert res["positions"] == 13 and res["temperatures"] == [2.0, 0.5]
    torch.testing.assert_close(torch.tensor(res["mean_entropy"], dtype=torch.float64),
                               torch.tensor(want["mean"], dtype=torch.float64), atol=2e-5, rtol=2e-5)  # fmt: skip
    check_buckets(res["by_next_frequency"], want["next"], "ranks")
    check_buckets(res["by_position"], want["position"], "offsets")


def test_chunks_smaller_than_a_shard_give_the_same_tables(store, monkeypatch):
    folder, _ = store
    whole = te.token_entropy(folder)
    monkeypatch.setattr(te, "CHUNK_ELEMENTS", 3 * K)  # three rows at a time
    assert _close(te.token_entropy(folder), whole)


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[x], b[x]) for x in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-12)
    return a == b


def test_a_nonfinite_row_counts_nowhere(tmp_path):
    logits, ids, offsets = corpus(1)
    folder = build_store(tmp_path / "s", logits, ids, offsets, nan_row=10)
    res = te.token_entropy(folder)
    assert res["nonfinite_positions"] == 1 and res["finite_positions"] == len(ids) - 1
    want = oracle(logits, ids, offsets, skip={10})
    torch.testing.assert_close(torch.tensor(res["mean_entropy"], dtype=torch.float64),
                               torch.tensor(want["mean"], dtype=torch.float64), atol=2e-5, rtol=2e-5)  # fmt: skip
    check_buckets(res["by_next_frequency"], want["next"], "ranks")


def test_vocabulary_without_a_config_is_the_largest_id_seen(tmp_path):
    logits, ids, offsets = corpus()
    folder = build_store(tmp_path / "s", logits, ids, offsets, config={"arch": "x"})
    res = te.token_entropy(folder)
    biggest = max(int(ids.max()), int(logits.float().topk(K, -1).indices.max()))
    assert res["vocab_size"] == biggest + 1 and "largest" in res["vocab_size_from"]


def test_a_temperature_off_the_grid_is_one_line(store):
    folder, _ = store
    with pytest.raises(ValueError, match=r"^T = 3 is not in the store's temperature grid "
                                         r"\(0\.5, 1, 2, 4\)"):  # fmt: skip
        te.token_entropy(folder, temperatures=[3.0])


# ---- the CLI ---------------------------------------------------------------------------------


def run_cli(*args):
    from rbkd.cli.app import app

    return CliRunner().invoke(app, ["analyze", "entropy", *map(str, args)])


def test_cli_on_a_store_writes_tables_and_figure(store, tmp_path):
    folder, (logits, ids, offsets) = store
    out = tmp_path / "out"
    result = run_cli("--soft-labels", folder, "--json", out / "e.json", "--csv", out / "e.csv",
                     "--plot", out / "e.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean token entropy" in result.output and "top-k mass" in result.output
    numbers = json.loads((out / "e.json").read_text())
    ((name, res),) = numbers["stores"].items()
    assert res["mean_entropy"] == te.token_entropy(folder)["mean_entropy"]
    with open(out / "e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == te.CSV_HEADER
    means = [float(r["value"]) for r in rows if r["table"] == "mean_entropy"]
    assert means == pytest.approx(res["mean_entropy"], rel=1e-12)
    mass = [r for r in rows if r["table"] == "topk_mass" and float(r["T"]) == 1.0]
    assert [int(r["low"]) for r in mass] == list(range(1, K + 1))
    assert (out / "e.png").read_bytes().startswith(b"\x89PNG")


def test_cli_on_a_store_at_grid_temperatures_and_pdf(store, tmp_path):
    folder, _ = store
    result = run_cli("--soft-labels", folder, "--T", "1,4", "--plot", tmp_path / "e.pdf",
                     "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert next(iter(numbers["stores"].values()))["temperatures"] == [1.0, 4.0]
    assert (tmp_path / "e.pdf").read_bytes().startswith(b"%PDF-")


def test_cli_temperature_off_the_grid(store):
    folder, _ = store
    result = run_cli("--soft-labels", folder, "--T", "3")
    assert result.exit_code == 1
    assert "T = 3 is not in the store's temperature grid" in result.output


def test_cli_two_stores_draw_one_figure(tmp_path):
    logits, ids, offsets = corpus()
    a = build_store(tmp_path / "a", logits, ids, offsets)
    b = build_store(tmp_path / "b", logits * 0.3, ids, offsets)  # a flatter teacher
    result = run_cli("--soft-labels", a, "--soft-labels", b, "--json", tmp_path / "e.json",
                     "--plot", tmp_path / "e.svg")  # fmt: skip
    assert result.exit_code == 0, result.output
    stores = json.loads((tmp_path / "e.json").read_text())["stores"]
    ha, hb = (stores[str(p)]["mean_entropy"] for p in (a, b))
    assert all(x < y for x, y in zip(ha, hb, strict=True))


def test_cli_damaged_store_is_one_line(store):
    folder, _ = store
    shard = folder / st.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("--soft-labels", folder)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not match its SHA-256" in lines[0], result.output


def test_cli_store_with_a_broken_index_is_one_line(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / st.INDEX_FILE).write_text('{"format": "something-else/9"}')
    result = run_cli("--soft-labels", folder)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "rbkd-sparse-soft-labels/1" in lines[0], result.output


def test_cli_store_and_dense_file_together_is_refused(store, tmp_path):
    folder, _ = store
    dense = tmp_path / "soft.safetensors"
    write_dense(dense)
    result = run_cli("--soft-labels", folder, "--soft-labels", dense)
    assert result.exit_code == 1 and "not both" in result.output


def write_dense(path):
    import rbkd

    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    rbkd.soft_labels(model, (x, y), out=path)


def test_cli_dense_file_still_works(tmp_path):
    dense = tmp_path / "soft.safetensors"
    write_dense(dense)
    result = run_cli("--soft-labels", dense, "--T", "1,4", "--json", "-")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert numbers["temperatures"] == [1.0, 4.0] and numbers["max_entropy"] == pytest.approx(
        math.log(4)
    )


def test_an_incomplete_store_is_one_line_unless_the_limit_stops_before(tmp_path):
    logits, ids, offsets = corpus()
    folder = build_store(tmp_path / "s", logits, ids, offsets)
    index = json.loads((folder / st.INDEX_FILE).read_text())
    del index["shards"]["2"]  # as a capture killed before shard 2 was recorded
    (folder / st.INDEX_FILE).write_text(json.dumps(index))
    (folder / st.shard_name(2)).unlink()
    with pytest.raises(st.StoreError, match=r"incomplete \(1 of the 4 shards needed never "
                                            r"written, the first 2\)"):  # fmt: skip
        te.token_entropy(folder)
    res = te.token_entropy(folder, limit=16)  # shards 0 and 1 only
    want = oracle(logits[:16], ids[:16], offsets[:16])
    torch.testing.assert_close(torch.tensor(res["mean_entropy"], dtype=torch.float64),
                               torch.tensor(want["mean"], dtype=torch.float64), atol=2e-5, rtol=2e-5)  # fmt: skip
    result = run_cli("--soft-labels", folder)
    assert result.exit_code == 1 and "incomplete" in result.output
