"""scene3d::token_gate: native op and reference against a naive per-scene loop, gradients, opcheck, bad input."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scene3d.gating import op as gate_op
from scene3d.gating import token_gate, token_gate_reference

REPO = Path(__file__).resolve().parents[1]
NATIVE = gate_op.has_native_op()
IMPLS = {"native": token_gate, "reference": token_gate_reference}


def naive_gate(tokens, scores, offset, keep_ratio, min_keep, threshold):
    """Independent oracle: a plain Python loop over scenes, written from the rule in the docstring."""
    kept, new_offset, start = [], [], 0
    s = scores.detach().double().tolist()
    for end in offset.tolist():
        n = end - start
        ranked = sorted(range(start, end), key=lambda i: (-s[i], i))
        k = min(n, max(min_keep, math.ceil(keep_ratio * n)))
        cands = ranked[:k]
        passing = [i for i in cands if s[i] >= threshold]
        floor_keep = min(min_keep, n)
        chosen = passing if len(passing) >= floor_keep else cands[:floor_keep]
        kept += sorted(chosen)
        new_offset.append(len(kept))
        start = end
    kept_index = torch.tensor(kept, dtype=torch.long)
    gated = tokens.detach()[kept_index] * scores.detach()[kept_index, None]
    return gated, kept_index, torch.tensor(new_offset, dtype=torch.long)


def make_batch(counts, c=5, dtype=torch.float64, levels=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    m = sum(counts)
    tokens = torch.randn(m, c, generator=g, dtype=torch.float64)
    if levels:  # few distinct values -> many ties
        scores = torch.randint(0, levels, (m,), generator=g).double() / levels
    else:
        scores = torch.rand(m, generator=g, dtype=torch.float64)
    offset = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
    return tokens.to(device, dtype), scores.to(device, dtype), offset.to(device)


def assert_same(result, expected, exact=True):
    gated, kept_index, new_offset = result
    eg, ek, eo = expected
    assert kept_index.dtype == torch.int64 and new_offset.dtype == torch.int64
    assert torch.equal(kept_index.cpu(), ek.cpu()), (kept_index, ek)
    assert torch.equal(new_offset.cpu(), eo.cpu()), (new_offset, eo)
    assert gated.shape == eg.shape and gated.dtype == eg.dtype
    if exact:
        assert torch.equal(gated.cpu(), eg.cpu())
    else:
        torch.testing.assert_close(gated.cpu(), eg.cpu())


def test_native_extension_is_built():
    # tools/setup_env.sh builds scene3d._C; without it every user silently runs the slow reference.
    assert NATIVE, "scene3d._C is not built: run `pip install --no-build-isolation --no-deps -e .`"


def test_hand_computed_case():
    # scene 0: scores [.9 .1 .5 .7] keep_ratio .5 -> k=2 -> rows 0 and 3; scene 1 empty;
    # scene 2: [.2 .8 .8] -> k=ceil(1.5)=2, tie .8/.8 -> rows 5, 6 (original order)
    tokens = torch.arange(14, dtype=torch.float64).reshape(7, 2)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.8], dtype=torch.float64)
    offset = torch.tensor([4, 4, 7])
    for impl in IMPLS.values():
        gated, kept, new_offset = impl(tokens, scores, offset, 0.5, 1)
        assert kept.tolist() == [0, 3, 5, 6]
        assert new_offset.tolist() == [2, 2, 4]
        expected = torch.tensor([[0.0, 0.9], [4.2, 4.9], [8.0, 8.8], [9.6, 10.4]], dtype=torch.float64)
        torch.testing.assert_close(gated, expected)
        # threshold .75 drops candidate row 3 (.7); rows 5, 6 (.8) pass
        _, kept, new_offset = impl(tokens, scores, offset, 0.5, 1, 0.75)
        assert kept.tolist() == [0, 5, 6] and new_offset.tolist() == [1, 1, 3]
        # threshold .85: scene 2 has no candidate passing -> min_keep keeps its best, row 5 (tie, lower index)
        _, kept, new_offset = impl(tokens, scores, offset, 0.5, 1, 0.85)
        assert kept.tolist() == [0, 5] and new_offset.tolist() == [1, 1, 2]
        # min_keep 2 with the same threshold: two per non-empty scene, the best-ranked ones
        _, kept, _ = impl(tokens, scores, offset, 0.5, 2, 0.85)
        assert kept.tolist() == [0, 3, 5, 6]
        # threshold above everything: min_keep=1 keeps the best of each non-empty scene (tie -> lower index)
        _, kept, _ = impl(tokens, scores, offset, 0.5, 1, 2.0)
        assert kept.tolist() == [0, 5]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("counts", [[12, 0, 1, 30, 7], [0, 0], [1], [50]])
@pytest.mark.parametrize("keep_ratio,min_keep,threshold", [
    (0.0, 0, -math.inf), (0.0, 2, -math.inf), (1.0, 0, -math.inf), (0.3, 1, -math.inf), (0.5, 3, 0.5),
    (1.0, 1, 0.5), (0.1, 0, 0.0), (0.7, 100, 0.9), (0.25, 2, math.inf),
])
def test_matches_naive_loop(impl, counts, keep_ratio, min_keep, threshold):
    for levels in (None, 3):  # continuous scores and heavy ties
        tokens, scores, offset = make_batch(counts, levels=levels, seed=len(counts))
        got = IMPLS[impl](tokens, scores, offset, keep_ratio, min_keep, threshold)
        assert_same(got, naive_gate(tokens, scores, offset, keep_ratio, min_keep, threshold))


def test_keep_ratio_edges():
    tokens, scores, offset = make_batch([4, 0, 9], c=3)
    gated, kept, new_offset = token_gate(tokens, scores, offset, 1.0, 0)
    assert kept.tolist() == list(range(13)) and new_offset.tolist() == [4, 4, 13]
    torch.testing.assert_close(gated, tokens * scores[:, None], rtol=0, atol=0)
    gated, kept, new_offset = token_gate(tokens, scores, offset, 0.0, 0)
    assert gated.shape == (0, 3) and kept.numel() == 0 and new_offset.tolist() == [0, 0, 0]
    _, kept, new_offset = token_gate(tokens, scores, offset, 0.0, 1)
    assert new_offset.tolist() == [1, 1, 2]
    assert kept.tolist() == [int(scores[:4].argmax()), 4 + int(scores[4:].argmax())]


def test_empty_batch_and_int32_offset():
    tokens = torch.zeros(0, 4)
    out = token_gate(tokens, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 1)
    assert out.gated.shape == (0, 4) and out.kept_index.numel() == 0 and out.new_offset.numel() == 0
    tokens, scores, offset = make_batch([3, 5], dtype=torch.float32)
    a = token_gate(tokens, scores, offset.int(), 0.5, 1)
    assert_same(a, token_gate(tokens, scores, offset, 0.5, 1))


def test_ties_broken_by_lower_index():
    tokens = torch.eye(6, dtype=torch.float64)
    scores = torch.full((6,), 0.5, dtype=torch.float64)
    for impl in IMPLS.values():
        _, kept, _ = impl(tokens, scores, torch.tensor([6]), 0.5, 0)
        assert kept.tolist() == [0, 1, 2]
    scores = torch.tensor([0.1, 0.7, 0.7, 0.2, 0.7, 0.7], dtype=torch.float64)
    for impl in IMPLS.values():
        _, kept, _ = impl(tokens, scores, torch.tensor([6]), 0.5, 0)
        assert kept.tolist() == [1, 2, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes_match_reference(dtype):
    tokens, scores, offset = make_batch([40, 3, 0, 17], c=16, dtype=dtype, levels=7)
    for args in [(0.4, 2, -math.inf), (0.8, 1, 0.5)]:
        assert_same(token_gate(tokens, scores, offset, *args), token_gate_reference(tokens, scores, offset, *args))


@pytest.mark.skipif(not NATIVE, reason="scene3d._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_native_selection_on_special_values_and_large_scenes(dtype):
    # The CPU kernel ranks by integer keys (score bits and row packed in one uint64, float64 aside): signed
    # zeros must tie (then the lower row wins), infinities must rank at the ends, and scenes far larger than the
    # other tests' must select the same rows as the reference.
    g = torch.Generator().manual_seed(7)
    values = torch.tensor([-math.inf, -1.0, -0.0, 0.0, 0.25, 1.0, math.inf], dtype=torch.float64)
    counts = [5000, 1, 0, 37, 300, 2]
    m = sum(counts)
    scores = values[torch.randint(0, len(values), (m,), generator=g)].to(dtype)
    tokens = torch.randn(m, 3, generator=g, dtype=torch.float64).to(dtype)
    offset = torch.cumsum(torch.tensor(counts), 0)
    for args in [(0.5, 1, -math.inf), (0.1, 4, -math.inf), (0.3, 0, 0.0), (0.9, 2, 1.0), (0.0, 3, math.inf)]:
        got = token_gate(tokens, scores, offset, *args)
        assert_same(got, token_gate_reference(tokens, scores, offset, *args))
        assert_same(got, naive_gate(tokens, scores, offset, *args))


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=5), keep_ratio=st.floats(0, 1),
       min_keep=st.integers(0, 4), threshold=st.sampled_from([-math.inf, 0.0, 0.25, 0.5, 1.0]),
       levels=st.sampled_from([None, 2, 4]), seed=st.integers(0, 1000))
def test_property_native_equals_naive(counts, keep_ratio, min_keep, threshold, levels, seed):
    tokens, scores, offset = make_batch(counts, c=2, levels=levels, seed=seed)
    expected = naive_gate(tokens, scores, offset, keep_ratio, min_keep, threshold)
    assert_same(token_gate(tokens, scores, offset, keep_ratio, min_keep, threshold), expected)
    assert_same(token_gate_reference(tokens, scores, offset, keep_ratio, min_keep, threshold), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference(dtype):
    tokens, scores, offset = make_batch([20, 0, 1, 33], c=8, dtype=dtype, levels=5)
    grads = []
    for impl in IMPLS.values():
        t = tokens.clone().requires_grad_()
        s = scores.clone().requires_grad_()
        gated, _, _ = impl(t, s, offset, 0.4, 1, 0.3)
        w = torch.linspace(-1, 1, gated.numel(), dtype=dtype).reshape(gated.shape)
        (gated * w).sum().backward()
        grads.append((t.grad, s.grad))
    (gt_n, gs_n), (gt_r, gs_r) = grads
    torch.testing.assert_close(gt_n, gt_r)
    torch.testing.assert_close(gs_n, gs_r)
    # dropped rows get exactly zero gradient
    _, kept, _ = token_gate(tokens, scores, offset, 0.4, 1, 0.3)
    dropped = torch.ones(len(scores), dtype=torch.bool)
    dropped[kept] = False
    assert dropped.any() and (gt_n[dropped] == 0).all() and (gs_n[dropped] == 0).all()


def test_gradcheck_float64():
    tokens, scores, offset = make_batch([7, 0, 1, 9], c=3)
    t, s = tokens.requires_grad_(), scores.requires_grad_()
    fn = lambda a, b: token_gate(a, b, offset, 0.5, 1, 0.2).gated  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t, s))
    assert torch.autograd.gradgradcheck(fn, (t, s))


def test_native_backward_op_matches_torch_formula():
    tokens, scores, offset = make_batch([15, 4], c=6)
    _, kept, _ = token_gate(tokens, scores, offset, 0.5, 1)
    grad = torch.randn(len(kept), 6, dtype=torch.float64)
    gt, gs = torch.ops.scene3d.token_gate_backward(grad, tokens, scores, kept)
    et = torch.zeros_like(tokens)
    et[kept] = grad * scores[kept, None]
    es = torch.zeros_like(scores)
    es[kept] = (grad * tokens[kept]).sum(-1)
    torch.testing.assert_close(gt, et)
    torch.testing.assert_close(gs, es)


def test_opcheck():
    tokens, scores, offset = make_batch([6, 0, 1, 5], c=4)
    tokens.requires_grad_()
    scores.requires_grad_()
    for args in [(0.5, 1, -math.inf), (0.0, 0, 0.0)]:
        torch.library.opcheck(torch.ops.scene3d.token_gate.default, (tokens, scores, offset, *args))


BAD_INPUTS = [
    (lambda t, s, o: (t.int(), s, o), "tokens must be float"),
    (lambda t, s, o: (t, s.float(), o), "scores dtype"),
    (lambda t, s, o: (t[0], s, o), r"tokens must be a \[M, C\]"),
    (lambda t, s, o: (t, s[:-1], o), "scores has 9 entries but tokens has M=10"),
    (lambda t, s, o: (t, s, o.double()), "offset must be int32 or int64"),
    (lambda t, s, o: (t, s, torch.tensor([6, 4, 10])), "non-decreasing"),
    (lambda t, s, o: (t, s, torch.tensor([-1, 4, 10])), "non-negative"),
    (lambda t, s, o: (t, s, torch.tensor([4, 9])), r"offset\[-1\] must equal M=10"),
    (lambda t, s, o: (t, torch.where(torch.arange(10) == 3, torch.nan, s), o), r"NaN at rows \[3\]"),
    (lambda t, s, o: (t, s, torch.zeros(0, dtype=torch.long)), "offset is empty"),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mutate,message", BAD_INPUTS)
def test_bad_input_raises_value_error(impl, mutate, message):
    tokens, scores, offset = make_batch([4, 6])
    with pytest.raises(ValueError, match=message):
        IMPLS[impl](*mutate(tokens, scores, offset), 0.5, 1)


@pytest.mark.parametrize("kwargs,message", [
    ({"keep_ratio": 1.5}, "keep_ratio"), ({"keep_ratio": -0.1}, "keep_ratio"), ({"min_keep": -1}, "min_keep"),
    ({"threshold": math.nan}, "threshold"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    tokens, scores, offset = make_batch([4, 6])
    with pytest.raises(ValueError, match=message):
        token_gate(tokens, scores, offset, **{"keep_ratio": 0.5, "min_keep": 1, **kwargs})


def test_kernel_checks_its_own_input():
    # Without the wrapper's validation the kernel still refuses bad offsets (TORCH_CHECK -> RuntimeError).
    tokens, scores, _ = make_batch([4, 6])
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.scene3d.token_gate(tokens, scores, torch.tensor([6, 4, 10]), 0.5, 1, 0.0)
    with pytest.raises(RuntimeError, match="must equal M"):
        torch.ops.scene3d.token_gate(tokens, scores, torch.tensor([4, 9]), 0.5, 1, 0.0)


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(gate_op, "_HAS_NATIVE", False)
    monkeypatch.setattr(gate_op, "_warned_fallback", False)
    tokens, scores, offset = make_batch([5, 3])
    with pytest.warns(RuntimeWarning, match="scene3d._C is not importable"):
        out = token_gate(tokens, scores, offset, 0.5, 1)
    assert_same(out, naive_gate(tokens, scores, offset, 0.5, 1, -math.inf))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_gate(tokens, scores, offset, 0.5, 1)


@pytest.mark.slow
def test_cuda_kernel_compiles_with_nvcc():
    """nvcc compiles ops/token_gate.cu against the installed torch headers (no GPU needed; ~40 s)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or (f"{cuda_home}/bin/nvcc" if os.path.exists(f"{cuda_home}/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME); the CUDA kernel cannot be compiled here")
    env = dict(os.environ, NVCC=nvcc, VENV=str(Path(os.sys.executable).parents[1]))
    proc = subprocess.run(["bash", str(REPO / "tools" / "check_cuda_build.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "ok: ops/token_gate.cu" in proc.stdout


# --- CUDA (skipped without a device by conftest) ------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    for counts, levels in [([300, 0, 1, 2000, 57], None), ([64, 700], 3), ([5000], 2)]:
        tokens, scores, offset = make_batch(counts, c=33, dtype=dtype, levels=levels, seed=3)
        for args in [(0.25, 1, -math.inf), (0.5, 4, 0.5), (0.0, 0, 0.0), (1.0, 0, -math.inf), (0.3, 2, math.inf)]:
            expected = token_gate_reference(tokens, scores, offset, *args)
            got = token_gate(tokens.cuda(), scores.cuda(), offset.cuda(), *args)
            assert got.gated.is_cuda and got.kept_index.is_cuda
            assert_same(got, expected)


@pytest.mark.cuda
def test_cuda_gradients_and_opcheck():
    tokens, scores, offset = make_batch([30, 0, 1, 80], c=16, levels=9, device="cuda")
    t, s = tokens.clone().requires_grad_(), scores.clone().requires_grad_()
    fn = lambda a, b: token_gate(a, b, offset, 0.4, 1, 0.3).gated  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t, s))
    g = torch.randn_like(fn(t, s))
    ref_t, ref_s = tokens.clone().requires_grad_(), scores.clone().requires_grad_()
    torch.autograd.backward(token_gate_reference(ref_t, ref_s, offset, 0.4, 1, 0.3).gated, g)
    torch.autograd.backward(fn(t, s), g)
    torch.testing.assert_close(t.grad, ref_t.grad)
    torch.testing.assert_close(s.grad, ref_s.grad)
    torch.library.opcheck(torch.ops.scene3d.token_gate.default, (t, s, offset, 0.5, 1, -math.inf))
