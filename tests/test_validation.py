"""Malformed input fails at the public boundary with an error naming what to fix."""

from __future__ import annotations

import pytest
import torch

from distil_kernels import SparseTarget, linear_cross_entropy

V, D, N = 12, 4, 5


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=dtype)
    w = torch.randn(V, D, generator=gen, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:3] for _ in range(N)])
    probs = torch.full((N, 3), 0.3, dtype=dtype)
    return x, w, y, SparseTarget(ids, probs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, w, y: (x.long(), w, y), TypeError, r"input must be float16.*got torch.int64"),
        (lambda x, w, y: (x, w[:, :3], y), ValueError,
         r"weight must have shape \[V, d\] with d = input.shape\[-1\] = 4"),
        (lambda x, w, y: (x, w.double(), y), TypeError, r"weight must have input's dtype torch.float32"),
        (lambda x, w, y: (x, w[0], y), ValueError, r"weight must have shape \[V, d\], got \(4,\)"),
        (lambda x, w, y: (x, w.to("meta"), y), ValueError, r"weight must be on input's device cpu"),
        (lambda x, w, y: (x, w, y[:3]), ValueError, r"target must be class ids of shape input.shape\[:-1\] = \(5,\)"),
        (lambda x, w, y: (x, w, y.float()), TypeError, r"target must have an integer dtype"),
        (lambda x, w, y: (x, w, y.to("meta")), ValueError, r"target must be on input's device"),
        (lambda x, w, y: (x, w, torch.tensor([0, 1, 12, 3, 4])), IndexError,
         r"target must hold ids in \[0, 12\) or ignore_index=-100; got 12 at index \(2,\)"),
        (lambda x, w, y: (x, w, torch.tensor([0, -1, 2, 3, 4])), IndexError, r"got -1 at index \(1,\)"),
        (lambda x, w, y: (torch.tensor(1.0), w, y), ValueError, r"input must have shape \[\.\.\., d\], got a scalar"),
        (lambda x, w, y: (x, "w", y), TypeError, r"weight must be a torch.Tensor, got str"),
    ],
)
def test_bad_hard_inputs(change, error, match):
    x, w, y, _ = inputs()
    x, w, y = change(x, w, y)
    with pytest.raises(error, match=match):
        linear_cross_entropy(x, w, y)


def test_zero_hidden_dimension():
    """d = 0 once reached input.reshape(-1, 0), a RuntimeError from inside the op."""
    from distil_kernels import linear_topk

    x, w, y, _ = inputs()
    with pytest.raises(ValueError, match=r"input must have a hidden dimension d >= 1, got shape \(5, 0\)"):
        linear_cross_entropy(x[:, :0], w[:, :0], y)
    with pytest.raises(ValueError, match=r"input must have a hidden dimension d >= 1"):
        linear_topk(x[:, :0], w[:, :0], 2)


@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_meta_tensors_skip_the_value_checks(kind):
    """Meta tensors have shapes but no values: validate=True checks what it can, as validate=False
    does, where reading the ids back once raised from inside torch (Tensor.item() on meta)."""
    x, w, y, target = inputs()
    meta = torch.device("meta")
    target = y.to(meta) if kind == "hard" else SparseTarget(target.ids.to(meta), target.probs.to(meta))
    loss = linear_cross_entropy(x.to(meta), w.to(meta), target, reduction="none")
    assert loss.device == meta and loss.shape == (N,)


def test_bad_bias():
    x, w, y, _ = inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[12\], got \(11,\)"):
        linear_cross_entropy(x, w, y, bias=torch.zeros(V - 1))
    with pytest.raises(TypeError, match="bias must be a floating tensor"):
        linear_cross_entropy(x, w, y, bias=torch.zeros(V, dtype=torch.long))


def test_sparse_target_construction():
    with pytest.raises(ValueError, match=r"same shape \[\.\.\., k\], got \(5, 3\) and \(5, 2\)"):
        SparseTarget(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 2))
    with pytest.raises(TypeError, match="SparseTarget.ids must have an integer dtype"):
        SparseTarget(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="SparseTarget.probs must have a floating dtype"):
        SparseTarget(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="k >= 1"):
        SparseTarget(torch.zeros(5, 0, dtype=torch.long), torch.zeros(5, 0))
    with pytest.raises(TypeError, match="SparseTarget.ids must be a torch.Tensor"):
        SparseTarget([1, 2], torch.zeros(2))


def test_sparse_target_shape_and_values():
    x, w, _, target = inputs()
    with pytest.raises(ValueError, match=r"leading dims input.shape\[:-1\] = \(5,\), got ids of shape \(4, 3\)"):
        linear_cross_entropy(x, w, SparseTarget(target.ids[:4], target.probs[:4]))
    ids = target.ids.clone()
    ids[3, 2] = V + 5
    with pytest.raises(IndexError, match=r"target.ids must hold ids in \[0, 12\).*got 17 at index \(3, 2\)"):
        linear_cross_entropy(x, w, SparseTarget(ids, target.probs))
    probs = target.probs.clone()
    probs[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"target.probs must be finite; first NaN/inf at index \(1, 1\)"):
        linear_cross_entropy(x, w, SparseTarget(target.ids, probs))
    probs = target.probs.clone()
    probs[2, 0] = -0.1
    with pytest.raises(ValueError, match=r"target.probs must be >= 0 with tail='bucket'.*row 2"):
        linear_cross_entropy(x, w, SparseTarget(target.ids, probs))
    with pytest.raises(ValueError, match=r"with tail='renormalize'"):
        linear_cross_entropy(x, w, SparseTarget(target.ids, probs), tail="renormalize")
    linear_cross_entropy(x, w, SparseTarget(target.ids, probs), tail="ignore")  # signed weights are fine
    probs = target.probs.clone()
    probs[4] = 0.5
    with pytest.raises(ValueError, match=r"sum to at most 1 per row with tail='bucket'.*row 4 sums to 1.500000"):
        linear_cross_entropy(x, w, SparseTarget(target.ids, probs))
    linear_cross_entropy(x, w, SparseTarget(target.ids, probs), tail="renormalize")


def test_bucket_mass_slack_and_padding_excluded():
    x, w, _, target = inputs()
    probs = torch.full((N, 3), (1.0 + 5e-5) / 3)
    linear_cross_entropy(x, w, SparseTarget(target.ids, probs))  # rounding slack of 1e-4 is allowed
    ids = target.ids.clone()
    ids[:, 2] = -100
    heavy = target.probs.clone()
    heavy[:, 2] = 5.0  # a padding slot's prob is ignored, in validation too
    linear_cross_entropy(x, w, SparseTarget(ids, heavy))
    zero = target.probs.clone()
    zero[:, 2] = 0.0
    for tail in ("bucket", "renormalize", "ignore"):
        want = linear_cross_entropy(x, w, SparseTarget(ids, zero), tail=tail)
        for junk in (-5.0, float("nan"), float("inf")):
            heavy[:, 2] = junk
            torch.testing.assert_close(linear_cross_entropy(x, w, SparseTarget(ids, heavy), tail=tail), want,
                                       rtol=0, atol=0)


def test_duplicate_ids_rejected_only_with_bucket():
    x, w, _, target = inputs()
    ids = target.ids.clone()
    ids[2, 1] = ids[2, 0]
    with pytest.raises(ValueError, match=rf"unique within a row with tail='bucket'.*row 2 repeats id {int(ids[2, 0])}"):
        linear_cross_entropy(x, w, SparseTarget(ids, target.probs))
    for tail in ("renormalize", "ignore"):
        linear_cross_entropy(x, w, SparseTarget(ids, target.probs), tail=tail)
    ids[2, 1] = -100
    ids[2, 2] = -100  # repeated padding is not a duplicate
    linear_cross_entropy(x, w, SparseTarget(ids, target.probs))


def test_renormalize_needs_positive_mass():
    x, w, _, target = inputs()
    probs = target.probs.clone()
    probs[3] = 0.0
    with pytest.raises(ValueError, match="positive mass on every non-ignored row with tail='renormalize'; row 3"):
        linear_cross_entropy(x, w, SparseTarget(target.ids, probs), tail="renormalize")
    loss = linear_cross_entropy(x, w, SparseTarget(target.ids, probs), tail="renormalize", validate=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(tail="drop"), ValueError, "tail must be one of"),
        (dict(backend="cuda-magic"), ValueError,
         r"backend must be one of 'auto', 'torch', 'chunked', 'triton', 'cuda'; got 'cuda-magic'"),
        (dict(backend=3), TypeError, "backend must be a str"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(softcap=-1.0), ValueError, "softcap must be None or > 0"),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be >= 0"),
        (dict(filter_eps=2.0), ValueError, r"filter_eps must be None, 'auto' or in \(0, 1\)"),
        (dict(filter_eps="sometimes"), TypeError, "filter_eps must be a real number"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64, got 1180591620717411303424"),
        (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index must fit in int64"),
        (dict(workspace_bytes=10), ValueError, "workspace_bytes must be at least 4096"),
        (dict(temperature="1"), TypeError, "temperature must be a real number, got str"),
        (dict(validate="no"), TypeError, "validate must be True or False, got 'no'"),
        (dict(return_stats=1), TypeError, "return_stats must be True or False, got 1"),
    ],
)
def test_bad_options(options, error, match):
    x, w, y, _ = inputs()
    with pytest.raises(error, match=match):
        linear_cross_entropy(x, w, y, **options)


def test_validate_false_never_indexes_out_of_range():
    """Without validation, out-of-range ids are padding: no crash, no out-of-bounds read."""
    x, w, y, target = inputs(torch.float64)
    bad = y.clone()
    bad[1] = 10**9
    bad[3] = -7
    for backend in ("torch", "chunked"):
        got = linear_cross_entropy(x, w, bad, validate=False, backend=backend, reduction="none")
        ref = linear_cross_entropy(x, w, torch.where((bad < 0) | (bad >= V), -100, bad), backend=backend,
                                   reduction="none")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        ids = target.ids.clone()
        ids[0, 0] = V
        ids[2, 1] = -7
        got = linear_cross_entropy(x, w, SparseTarget(ids, target.probs), validate=False, backend=backend,
                                   reduction="none")
        padded = torch.where((ids < 0) | (ids >= V), -100, ids)
        ref = linear_cross_entropy(x, w, SparseTarget(padded, target.probs), backend=backend, reduction="none")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_ignore_index_is_configurable():
    x, w, y, _ = inputs(torch.float64)
    y = y.clone()
    y[0] = 7
    a = linear_cross_entropy(x, w, y, ignore_index=7, reduction="none")
    assert a[0] == 0 and (a[y != 7] > 0).all()


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    x, w, y, _ = inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from distil_kernels.backends import triton_supported

    if triton_supported():
        with pytest.raises(ValueError, match=r"backend='triton' runs on cuda tensors.*input is on cpu"):
            linear_cross_entropy(x, w, y, backend="triton")
    else:
        with pytest.raises(ValueError, match=r"backend='triton' needs (the triton package|triton >= 3.2)"):
            linear_cross_entropy(x, w, y, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_supported():
        with pytest.raises(TypeError, match=r"backend='triton' takes float16, bfloat16 or float32 input"):
            linear_cross_entropy(x.double(), w.double(), y, backend="triton")


def test_auto_takes_chunked_for_float64_on_cuda():
    """The triton and cuda kernels take no float64: `auto` must not hand such input to them."""
    from distil_kernels.backends import resolve_backend, triton_supported

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float64) == "chunked"
    assert resolve_backend("auto", cuda, torch.bfloat16) == ("triton" if triton_supported() else "chunked")
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "chunked"


@pytest.mark.parametrize("version, supported", [(None, False), ((3, 0), False), ((3, 1), False),
                                                 ((3, 2), True), ((3, 9), True), ((4, 0), True)])
def test_triton_versions_before_3_2_are_refused_and_skipped_by_auto(monkeypatch, version, supported):
    """torch 2.4 and 2.5 bring Triton 3.0 and 3.1, under which the kernels do not compile:
    `auto` must take chunked there, and `triton` must say which version it needs."""
    from distil_kernels import backends

    monkeypatch.setattr(backends, "_TRITON_VERSION", version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", cuda, torch.bfloat16) == ("triton" if supported else "chunked")
    if supported:
        assert backends.resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    elif version is None:
        with pytest.raises(ValueError, match=r"needs the triton package \(pip install 'triton>=3.2'\)"):
            backends.resolve_backend("triton", cuda, torch.bfloat16)
    else:
        found = f"{version[0]}.{version[1]}"
        with pytest.raises(ValueError, match=rf"backend='triton' needs triton >= 3.2, found {found} .*"
                                             r"pip install 'triton>=3.2'"):
            backends.resolve_backend("triton", cuda, torch.bfloat16)


def test_installed_triton_version_matches_the_imported_module():
    triton = pytest.importorskip("triton")
    from distil_kernels import backends

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    assert backends._installed_triton_version() == (major, minor)


def test_major_minor_reads_release_local_and_dev_versions():
    from distil_kernels.backends import major_minor

    assert major_minor("3.2.0") == (3, 2)
    assert major_minor("2.4.1+cu121") == (2, 4)
    assert major_minor("4.53.0.dev0") == (4, 53)
    assert major_minor("3.10") == (3, 10)
