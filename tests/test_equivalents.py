"""Layers whose class has its own forward but computes a plain conv or Linear (`equivalent`, `EQUIVALENTS`): timm's weight-standardized
and TF-'same'-padded convs, transformers' Conv1D. Exact at rank='full' for every method, geometry and input size; ranks of the effective
kernel; the per-layer calls; ONNX of a dynamic padding"""
import importlib.util, itertools, sys, pytest, torch
from pathlib import Path
from torch import nn
from transformers.pytorch_utils import Conv1D
from fasterai_lr.core import *
from fasterai_lr.factorize import ROUND_TO
from fasterai_lr.layers import *
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer

# timm is a dev dependency (CI installs it); on a machine without it, its copy in /tmp/timm_pkg, else its tests skip with a reason
if importlib.util.find_spec('timm') is None and Path('/tmp/timm_pkg').is_dir(): sys.path.append('/tmp/timm_pkg')
HAS_TIMM = importlib.util.find_spec('timm') is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (a dev dependency: pip install timm) and /tmp/timm_pkg is missing")
if HAS_TIMM: from timm.layers import Conv2dSame, StdConv2d, ScaledStdConv2d, StdConv2dSame, ScaledStdConv2dSame

TOL = 1e-5
METHODS = ('tucker', 'cp', 'svd', 'spatial')
CALLS = dict(tucker='Tucker', cp='CP', svd='SVD', spatial='Spatial')
CLASSES = ('Conv2dSame', 'StdConv2d', 'ScaledStdConv2d', 'StdConv2dSame', 'ScaledStdConv2dSame')
# (kernel, stride, dilation, groups, bias): each setting at both values at least once, 'same' fixed and dynamic, a non-square kernel
GEOMS = [(3, 1, 1, 1, True), (3, 2, 1, 1, False), (5, 1, 2, 2, True), (5, 2, 2, 1, True), (3, 2, 2, 2, False), (5, 2, 1, 2, True),
         (4, 1, 1, 1, True), ((3, 5), (2, 1), (1, 2), 2, True)]
SIZES = [(15, 15), (16, 16), (17, 16), (16, 15)]

def pair(v): return (v, v) if isinstance(v, int) else tuple(v)
def relerr(y, ref): return ((y-ref).norm()/ref.norm()).item()
def gid(g): return 'k{}-s{}-d{}-g{}-{}'.format(*g[:4], 'bias' if g[4] else 'nobias').replace(' ', '')

def make(cls:str, geom, cin=4, cout=6)->nn.Conv2d:
    "A timm `cls` with random weights, a random gain (the scaled ones) and bias"
    k,s,d,g,b = geom
    m = getattr(sys.modules['timm.layers'], cls)(cin, cout, k, stride=s, dilation=d, groups=g, bias=b)
    with torch.no_grad():
        if hasattr(m, 'gain'): m.gain.uniform_(0.5, 2)   # (initialized to ones: a scale of one would hide a gain left out)
        if b: m.bias.normal_()
    return m.eval()

@needs_timm
@pytest.mark.parametrize('geom', GEOMS, ids=gid)
@pytest.mark.parametrize('cls', CLASSES)
def test_equivalent_exact(cls, geom):
    "The plain layer computes what the timm layer computes, at odd and even input sizes"
    m = make(cls, geom)
    eq = equivalent(m)
    fixed = all(s==1 and (k-1)*d % 2==0 for k,s,d in zip(*map(pair, geom[:3])))   # 'same' of stride 1, even (k-1)·d: a fixed padding
    dynamic = cls.endswith('Same') and not fixed
    assert type(eq) is (SameConv2d if dynamic else nn.Conv2d), f"{cls} {gid(geom)}: equivalent is a {type(eq).__name__}"
    for hw in SIZES:
        x = torch.randn(2, 4, *hw)
        with torch.no_grad(): err = relerr(eq(x), m(x))
        assert err <= TOL, f"{cls} {gid(geom)} input {hw}: equivalent differs by {err:.1e}"

@needs_timm
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('geom', GEOMS, ids=gid)
@pytest.mark.parametrize('cls', CLASSES)
def test_full_rank_exact(cls, geom, method):
    "Every method's block at rank='full' (the per-layer call, and `builder`) computes what the layer computes, at each input size"
    m = make(cls, geom)
    blk = getattr(Conv_Decomposer(), CALLS[method])(m, rank='full')
    blk2 = builder(m, method)(m, checked_rank(m, method, 'rank', 'full'))
    assert blk.source.startswith(cls + '('), f"{cls}: source {blk.source!r}"
    for hw in SIZES:
        x = torch.randn(2, 4, *hw)
        with torch.no_grad(): y,errs = m(x),[relerr(b(x), m(x)) for b in (blk, blk2)]
        assert max(errs) <= TOL, f"{cls} {gid(geom)} {method} input {hw}: the full-rank block differs by {max(errs):.1e}"

@needs_timm
@pytest.mark.parametrize('method', METHODS)
def test_same_factors(method):
    "A dynamic 'same' padding goes to the factors that carry the kernel (SameConv2d), the 1×1 factors stay plain convs"
    m = make('Conv2dSame', (3, 2, 1, 1, True), 6, 8)
    blk = builder(m, method)(m, checked_rank(m, method, 'rank', 'full'))
    for l in blk:
        spatial = any(k > 1 for k in l.kernel_size)
        assert (type(l) is SameConv2d)==spatial and l.padding==(0, 0), f"{method}: {l} (a kernel: {spatial})"

@needs_timm
@pytest.mark.parametrize('cls', CLASSES)
def test_kernel_is_effective(cls):
    "`kernel` gives the effective kernel: standardized filters (× gain × scale), so ranks are those of the plain layer"
    m = make(cls, (3, 2, 1, 1, True), 8, 12)
    eq = equivalent(m)
    assert torch.equal(kernel(m), kernel(eq)), f"{cls}: kernel is not the equivalent's"
    if 'Std' in cls:
        w = kernel(m).flatten(2)
        gain = (m.gain.detach()*m.scale).view(1, -1, 1) if hasattr(m, 'gain') else 1
        assert torch.allclose(w.mean(-1), torch.zeros(1, 12), atol=1e-5), f"{cls}: filters not centred"
        assert torch.allclose((w/gain).var(-1, unbiased=False), torch.ones(1, 12), atol=1e-3), f"{cls}: filters not standardized"
    for method,opt,v in [('svd', 'energy', 0.9), ('tucker', 'energy', 0.8), ('cp', 'keep', 0.5), ('spatial', 'percent_removed', 0.5)]:
        assert checked_rank(m, method, opt, v)==checked_rank(eq, method, opt, v), f"{cls} {method} {opt}={v}: ranks differ"

@needs_timm
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('cls', CLASSES)
def test_keep_half(cls, method):
    "keep=0.5 holds at most half of the (effective) weights, and the block runs at odd and even sizes"
    m = make(cls, (3, 2, 1, 1, True), 16, 32)
    blk = getattr(Conv_Decomposer(), CALLS[method])(m, keep=0.5)
    p,p0 = sum(l.weight.numel() for l in blk),m.weight.numel()
    assert p <= 0.5*p0, f"{cls} {method}: keep=0.5 holds {p}/{p0} weights"
    for hw in [(15, 15), (16, 16)]:
        x = torch.randn(1, 16, *hw)
        with torch.no_grad(): assert blk(x).shape==m(x).shape, f"{cls} {method} input {hw}: output shapes differ"

@needs_timm
def test_rank_truncation_error():
    "Below full rank, a StdConv2d's channel SVD misses its effective kernel by the SVD tail (Eckart–Young)"
    m = make('StdConv2d', (3, 1, 1, 1, False), 8, 12)
    W = kernel(m)[0].flatten(1).double()
    s = torch.linalg.svdvals(W)
    for r in (1, 3, 6):
        blk = Conv_Decomposer().SVD(m, rank=r)
        A,B = blk[0].weight.detach().flatten(1).double(),blk[1].weight.detach().flatten(1).double()
        got,want = (B@A - W).norm().item(),s[r:].norm().item()
        assert abs(got-want) <= 1e-5*s.norm().item(), f"rank {r}: weight error {got:.6f}, SVD tail {want:.6f}"

@needs_timm
def test_untouched_and_copies():
    "Building a block leaves the timm layer as it was; the equivalent holds copies, trainable as the source's weights are"
    m = make('ScaledStdConv2dSame', (3, 2, 1, 1, True), 8, 12)
    before = {k: v.clone() for k,v in m.state_dict().items()}
    eq = equivalent(m)
    with torch.no_grad(): eq.weight.zero_(); eq.bias.zero_()
    Conv_Decomposer().CP(m, keep=0.5)
    assert all(torch.equal(before[k], v) for k,v in m.state_dict().items()), "the source layer changed"
    assert equivalent(m.requires_grad_(False)).weight.requires_grad is False and equivalent(m.requires_grad_(True)).weight.requires_grad

@needs_timm
def test_shell_loads_block():
    "`shell` (what load_decomposed builds) lays out the same block as the builder: the block's state_dict loads into it"
    m = make('StdConv2dSame', (5, 2, 1, 1, True), 6, 8)
    x = torch.randn(2, 6, 17, 16)
    for method in METHODS:
        blk = builder(m, method)(m, checked_rank(m, method, 'keep', 0.5))
        sh = shell(m, method, blk.rank)
        sh.load_state_dict(blk.state_dict())
        assert [type(l) for l in sh]==[type(l) for l in blk], f"{method}: shell {sh} is not the block {blk}"
        with torch.no_grad(): assert torch.equal(sh(x), blk(x)), f"{method}: the loaded shell computes something else"

@needs_timm
def test_bad_input():
    "The checks see the effective weights and name the right call"
    m = make('ScaledStdConv2d', (3, 1, 1, 1, True))
    with torch.no_grad(): m.gain[0] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'): Conv_Decomposer().Tucker(m, keep=0.5)
    with pytest.raises(TypeError, match=r"use Conv_Decomposer\(\)'s methods"): FC_Decomposer().SVD(make('StdConv2d', (3, 1, 1, 1, True)))

@needs_timm
def test_not_in_registry():
    "A class that is not one of them, timm's or ours, has no equivalent"
    from timm.layers import MixedConv2d
    from timm.layers.conv2d_same import Conv2dSameExport
    class StdConv2d(nn.Conv2d): pass   # timm's name, not timm's class
    class Sub(sys.modules['timm.layers'].StdConv2d): pass   # a subclass may compute something else
    for m in [nn.Conv2d(4, 6, 3), nn.Linear(4, 6), StdConv2d(4, 6, 3), Sub(4, 6, 3), Conv2dSameExport(4, 6, 3), MixedConv2d(4, 6, 3),
              SameConv2d(4, 6, 3), nn.Embedding(5, 3)]:
        assert equivalent(m) is None, f"{type(m).__qualname__} from {type(m).__module__} got an equivalent"

def test_not_in_registry_plain():
    "Without timm too: plain layers and our own classes have no equivalent"
    for m in [nn.Conv2d(4, 6, 3), nn.Linear(4, 6), SameConv2d(4, 6, 3), nn.Embedding(5, 3), nn.Conv1d(3, 4, 3)]:
        assert equivalent(m) is None, f"{type(m).__name__} got an equivalent"

# ---- transformers' Conv1D: a Linear of the transposed weight

@pytest.mark.parametrize('nx,nf', [(16, 48), (20, 7), (7, 20)])
def test_conv1d_exact(nx, nf):
    "GPT-2's Conv1D: its equivalent Linear and its full-rank SVD block compute what it computes"
    c = Conv1D(nf, nx)
    with torch.no_grad(): c.bias.normal_()
    x = torch.randn(2, 5, nx)
    eq = equivalent(c)
    assert type(eq) is nn.Linear and (eq.in_features, eq.out_features)==(nx, nf), f"{eq}"
    with torch.no_grad():
        assert relerr(eq(x), c(x)) <= TOL, "the equivalent Linear differs"
        for blk in [FC_Decomposer().SVD(c, rank='full'), builder(c, 'svd')(c, checked_rank(c, 'svd', 'rank', 'full'))]:
            assert relerr(blk(x), c(x)) <= TOL, f"{nx}→{nf}: the full-rank SVD block differs"
            assert blk.source==f"Conv1D({nx}, {nf})" and [type(l) for l in blk]==[nn.Linear]*2, f"{blk}"

def test_conv1d_truncation():
    "Below full rank, the output error is the SVD tail of Wᵀ (x = the identity: the weight error itself)"
    c = Conv1D(24, 16)
    s = torch.linalg.svdvals(c.weight.detach().double())
    eye = torch.eye(16)
    for r in (1, 4, 12):
        blk = FC_Decomposer().SVD(c, rank=r)
        with torch.no_grad(): got = (blk(eye) - c(eye)).double().norm().item()
        assert abs(got - s[r:].norm().item()) <= 1e-5*s.norm().item(), f"rank {r}: error {got:.6f}, SVD tail {s[r:].norm():.6f}"
    assert FC_Decomposer().SVD(c, energy=0.9).rank==checked_rank(equivalent(c), 'svd', 'energy', 0.9, round_to=ROUND_TO)

def test_conv1d_keep_and_checks():
    "keep=0.5 holds at most half of the weights; a conv method names the right call; NaN weights are refused"
    c = Conv1D(64, 32)
    blk = FC_Decomposer().SVD(c, keep=0.5)
    assert sum(l.weight.numel() for l in blk) <= 0.5*c.weight.numel(), f"{blk}"
    with pytest.raises(TypeError, match=r"use FC_Decomposer\(\)\.SVD"): Conv_Decomposer().Tucker(c, keep=0.5)
    assert builder(c, 'svd') is linear_svd
    with torch.no_grad(): c.weight[0, 0] = float('inf')
    with pytest.raises(ValueError, match='NaN or Inf'): FC_Decomposer().SVD(c, keep=0.5)

# ---- ONNX: the dynamic padding is in the graph, so one file serves every input size

@needs_timm
@pytest.mark.parametrize('dynamo', [False, pytest.param(True, marks=pytest.mark.skipif(importlib.util.find_spec('onnxscript') is None,
                                                                                        reason='onnxscript not installed'))])
@pytest.mark.parametrize('method', ['tucker', 'cp'])
def test_onnx_dynamic_same(tmp_path, method, dynamo):
    "A block with dynamic 'same' padding exported once with free height and width matches onnxruntime at odd and even sizes"
    ort = pytest.importorskip('onnxruntime')
    m = make('StdConv2dSame', (3, 2, 1, 1, True), 6, 8)
    blk = builder(m, method)(m, checked_rank(m, method, 'rank', 'full')).eval()
    path,x0 = str(tmp_path/'b.onnx'),torch.randn(1, 6, 16, 16)
    if dynamo:
        A = torch.export.Dim.AUTO
        torch.onnx.export(blk, (x0,), path, dynamo=True, dynamic_shapes=({0: A, 2: A, 3: A},), verbose=False)
    else: torch.onnx.export(blk, (x0,), path, dynamo=False, input_names=['x'], output_names=['y'],
                            dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}, 'y': {0: 'n', 2: 'oh', 3: 'ow'}})
    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for hw in [(15, 16), (17, 17), (16, 15)]:
        x = torch.randn(2, 6, *hw)
        got = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad(): ref = m(x)
        assert got.shape==ref.shape and relerr(got, ref) <= 1e-5, f"{method} dynamo={dynamo} input {hw}: onnxruntime {tuple(got.shape)} differs"
