"""The top passes on tiny-llama's block and decode block, as model_transform writes them. fuse-flash-attention:
one FAttention replaces the MatMul/Softmax/MatMul, and TPU-MLIR's fp32 interpreter gives the
same outputs as onnxruntime before and after the rewrite."""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphopt.checks import sample_inputs
from graphopt.models import open_model
from graphopt.runtime import ort_session
from graphopt.targets import get_target
from graphopt.targets.bm1684x import contract, top_passes
from graphopt.targets.bm1684x.interpreter import run_mlir
from graphopt.export import export_networks

SEQ = 32
NETS = ("block_0", "block_cache_0")


def _transform(tools, root, model: str, names) -> dict:
    """{net: (folder, top mlir, export result)} after model_transform, before any top pass."""
    results = export_networks(open_model(model, random_weights=True), list(names), SEQ, root / "onnx",
                              target=get_target("bm1684x"))
    out = {}
    for name in names:
        result, folder = results[name], root / name
        folder.mkdir()
        spec = contract.DeploySpec(name, name, tuple(s.shape for s in result.inputs), "BF16", ())
        assert tools.run("model_transform", spec.transform_args(str(result.files[0]), f"{name}.mlir"), folder,
                         folder / "log.txt") == 0, (folder / "log.txt").read_text()[-3000:]
        out[name] = (folder, folder / f"{name}.mlir", result)
    return out


@pytest.fixture(scope="module")
def transformed(tools, tmp_path_factory):
    return tools, _transform(tools, tmp_path_factory.mktemp("fuse-flash-attention"), "tiny-llama", NETS)


def _interpret(tools, folder, mlir, result):
    """Max abs error per output of `mlir` in TPU-MLIR's fp32 interpreter against onnxruntime."""
    feeds = {s.name: v.numpy() for s, v in zip(result.inputs, sample_inputs(result.inputs, SEQ, 256))}
    got = run_mlir(tools, mlir, feeds, [o.name for o in result.outputs], folder / "log.txt")
    reference = ort_session(result.files[0]).run(None, feeds)
    return {o.name: float(np.abs(got[o.name].reshape(ref.shape) - ref).max()) for o, ref in zip(result.outputs, reference)}


@pytest.mark.parametrize("name", NETS)
def test_attention_becomes_one_fattention_with_the_same_outputs(transformed, name):
    tools, nets = transformed
    folder, mlir, result = nets[name]
    before = _interpret(tools, folder, mlir, result)

    (report,) = top_passes.apply(tools, mlir, ("fuse-flash-attention",), folder / "log.txt")

    assert report["pass"] == "fuse-flash-attention" and report["changed"] == 1, report
    assert report["skipped"] == [], report
    text = mlir.read_text()
    assert text.count('"top.FAttention"') == 1
    assert '"top.Softmax"' not in text and '"top.Tile"' not in text  # scores, probabilities and the K/V repeat are gone
    # The new K's permute to [1,S,KV,D] is the one the network makes for its past_k output, not a
    # second one (which TPU-MLIR folds into the past_k Store, where its interpreter loses the output).
    permutes = re.findall(r'"top.Permute"\((%\w+)\) \{order = (\[[^\]]*\])', text)
    assert len(permutes) == len(set(permutes)), permutes
    # A decode block's new K and V are already in the cache's layout (sink-head-transpose), so none is left.
    assert bool(permutes) == (name == "block_0"), permutes
    assert (folder / f"{name}_unfused.mlir").is_file()
    after = _interpret(tools, folder, mlir, result)
    assert max(before.values()) < 1e-4, before
    assert max(after.values()) < 1e-4, after


def test_small_multi_head_prefill_attention_stays_unfused_and_decode_is_fused(tools, tmp_path_factory):
    """tiny-marian's decoder: 4 heads, no K/V repeat. Its prefill self- and cross-attention scores fit in
    local memory, where TPU-MLIR runs them faster unfused; its decode ones are fused."""
    nets = _transform(tools, tmp_path_factory.mktemp("fuse-flash-attention-mha"), "tiny-marian",
                      ("decoder_block_0", "decoder_block_cache_0"))
    reports = {}
    for name, (folder, mlir, _) in nets.items():
        (reports[name],) = top_passes.apply(tools, mlir, ("fuse-flash-attention",), folder / "log.txt")

    prefill, decode = reports["decoder_block_0"], reports["decoder_block_cache_0"]
    assert prefill["changed"] == 0 and len(prefill["skipped"]) == 2, prefill
    assert all("fit in local memory" in reason for reason in prefill["skipped"]), prefill
    assert decode["changed"] == 2 and decode["skipped"] == [], decode
    folder, mlir, result = nets["decoder_block_cache_0"]
    assert mlir.read_text().count('"top.FAttention"') == 2
    assert max(_interpret(tools, folder, mlir, result).values()) < 1e-4


def test_the_decode_cache_concats_merge_in_place_with_the_same_outputs(tools, tmp_path_factory):
    """merge-cache-concat after fuse-flash-attention: both of a decode block's [history ; new row] concats
    marked only_merge (TPU-MLIR then writes the new row after the cache instead of copying the cache), the
    prefill block left alone, the outputs unchanged in TPU-MLIR's interpreter."""
    nets = _transform(tools, tmp_path_factory.mktemp("merge-cache-concat"), "tiny-llama", NETS)
    folder, mlir, result = nets["block_cache_0"]
    fused, merged = top_passes.apply(tools, mlir, top_passes.passes_for("block_cache"), folder / "log.txt")
    assert (fused["pass"], merged["pass"]) == ("fuse-flash-attention", "merge-cache-concat")
    assert merged["changed"] == 2 and merged["skipped"] == [], merged
    text = mlir.read_text()
    assert len(re.findall(r'"top.Concat"\(%\w+, %\w+\) \{axis = 1 : si32, [^}]*only_merge = true', text)) == 2
    assert max(_interpret(tools, folder, mlir, result).values()) < 1e-4
    assert top_passes.passes_for("block") == ("fuse-flash-attention",)  # a prefill block has no cache to merge
    # a dynamic one (--dynamic, --history-kv) makes its baked mask and its shapes length-free after fusing
    assert top_passes.passes_for("block", dynamic=True) == ("fuse-flash-attention", "small-causal-mask",
                                                            "dynamic-sequence")
    assert top_passes.passes_for("block_cache", dynamic=True) == top_passes.passes_for("block_cache")


def _tpu_mlirs_int4(weight_kn: np.ndarray, group: int):
    """TPU-MLIR's A16MatMulAdjust for int4 groups, element by element in float32, as its C++ loops compute it."""
    import math

    def c_round(x) -> float:  # C's round of a float: half away from zero (exact in double for a float32 x)
        return math.copysign(math.floor(abs(float(x)) + 0.5), float(x))

    w = np.ascontiguousarray(weight_kn.T)  # [N, K]
    n, k = w.shape
    codes, scales, zeros = np.zeros(n * k, np.uint8), [], []
    flat = w.reshape(-1)
    for g in range(n * k // group):
        values = flat[g * group:(g + 1) * group]
        low, high = values.min(), values.max()
        scale = np.float32(max(np.float32(high - low), np.float32(1e-5)) / np.float32(15))
        zero = min(max(-int(c_round(np.float32(low / scale))), 0), 15)
        scales.append(scale), zeros.append(zero)
        for i, v in enumerate(values):
            codes[g * group + i] = min(max(c_round(np.float32(v / scale)) + zero, 0), 15)
    packed = codes[0::2] | (codes[1::2] << 4)
    return (packed.reshape(n, k // 2), np.array(scales, np.float32).reshape(n, -1),
            np.array(zeros, np.uint8).reshape(n, -1))


def test_int4_groups_are_tpu_mlirs_codes_ties_included():
    """quantize-weights' arithmetic (int4_groups.py: quantize, and quantize_rows, which the pass checks each result
    against) against TPU-MLIR's loops written out element by element, on a
    weight whose groups put values exactly halfway between two codes (where numpy's rint and C's round part): the
    bmodel test (tests/test_bm1684x.py) holds whole nets to TPU-MLIR's own output, ties are rare there."""
    from graphopt.targets.bm1684x.top_passes.int4_groups import quantize, quantize_rows

    rng = np.random.default_rng(0)
    k, n, group = 128, 64, 64
    weight = rng.standard_normal((n, k)).astype(np.float32) * 0.02  # [N, K] as a Linear holds it
    weight[0, :group] = np.linspace(0, 15, group, dtype=np.float32)  # scale 1: no tie yet
    weight[0, 3], weight[0, 4] = 2.5, 7.5  # codes halfway: rint gives 2 and 8, C gives 3 and 8
    weight[1, :group] = -np.linspace(0, 15, group, dtype=np.float32)
    weight[1, 3] = -2.5  # zero point 15: rint -2 -> 13, C -3 -> 12
    weight[2, :group] = np.linspace(-6.5, 8.5, group, dtype=np.float32)  # the zero point itself a tie: -round(-6.5)
    expected = _tpu_mlirs_int4(weight.T, group)
    got = quantize(np.ascontiguousarray(weight.T), group)
    for name, a, b in zip(("codes", "scales", "zero points"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    rows = [0, 1, 2, n - 1]  # the pass's own check of its result, the same arithmetic row by row
    by_rows = quantize_rows(np.ascontiguousarray(weight.T), group, rows)
    for name, a, b in zip(("codes", "scales", "zero points"), by_rows, expected):
        assert a.dtype == b.dtype and np.array_equal(a, b[rows]), name
    # The ties went C's way: element 3 (byte 1's high nibble) 3, element 4 8; row 1's element 3 12; row 2's zero 7.
    assert (expected[0][0, 1] >> 4, expected[0][0, 2] & 0xF, expected[0][1, 1] >> 4, expected[2][2, 0]) == (3, 8, 12, 7)
