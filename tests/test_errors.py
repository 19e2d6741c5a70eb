"Bad input raises a clear error that names the layer involved, and leaves the layer or model exactly as it was"
import re, warnings, pytest, torch
from collections import OrderedDict
from torch import nn
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, decompose_model

NAME = 'features.2'  # the name passed to per-layer calls, which their errors must repeat

def net()->nn.Module:
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(6, 4)))

def conv()->nn.Conv2d: return nn.Conv2d(6, 8, 3, padding=1)   # full ranks: svd 8, spatial 18, tucker (8, 6), cp 54
def lin()->nn.Linear: return nn.Linear(12, 8)                   # full rank 8

def with_weight(layer, at, value):
    with torch.no_grad(): layer.weight[at] = value
    return layer

def int8_weight(layer):
    layer.weight = nn.Parameter(torch.randint(-5, 5, layer.weight.shape, dtype=torch.int8), requires_grad=False)
    return layer

def poison(model, name, fn):
    fn(model.get_submodule(name))
    return model

def quantized_net():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), {nn.Linear}, dtype=torch.qint8)

def quantized_linear():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.ao.nn.quantized.Linear(6, 4)

def quantized_conv():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.ao.nn.quantized.Conv2d(4, 4, 3)

# ---- a snapshot that compares equal only if nothing changed (NaN-aware, quantized-aware)

def _same(a, b)->bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype!=b.dtype or a.shape!=b.shape or a.device!=b.device: return False
        if a.is_meta: return True
        if a.is_quantized: return torch.equal(a.int_repr(), b.int_repr()) and a.q_scale()==b.q_scale()
        return bool(((a==b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, (tuple, list)): return type(a)==type(b) and len(a)==len(b) and all(_same(x, y) for x,y in zip(a, b))
    return a==b

def snapshot(m:nn.Module):
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k,v in m.state_dict().items()}
    mods = [(n, type(x), id(x)) for n,x in m.named_modules()]
    params = [(n, id(p), p.requires_grad, p.dtype) for n,p in m.named_parameters()]
    return state, mods, params

def assert_untouched(before, m, case):
    state,mods,params = before
    now_state,now_mods,now_params = snapshot(m)
    assert now_mods==mods, f"{case}: the modules changed"
    assert now_params==params, f"{case}: the parameters changed (identity, requires_grad or dtype)"
    assert now_state.keys()==state.keys() and all(_same(state[k], now_state[k]) for k in state), \
        f"{case}: the state_dict changed: {[k for k in state if not _same(state[k], now_state.get(k))]}"

# ---- the cases: (id, build the target, call on it, exception type, piece of the message, must it name NAME/the layer)

cd,fc = Conv_Decomposer(),FC_Decomposer()
PER_LAYER = {'Tucker': (cd.Tucker, conv), 'CP': (cd.CP, conv), 'SVD': (cd.SVD, conv), 'Spatial': (cd.Spatial, conv), 'FC.SVD': (fc.SVD, lin)}
ABOVE_FULL = {'Tucker': [9, (9, 6), (8, 7)], 'CP': [55], 'SVD': [9], 'Spatial': [19], 'FC.SVD': [9]}

CASES = []
def case(id, build, call, exc, msg, named=None): CASES.append(pytest.param(build, call, exc, msg, named, id=id))

for meth,(f,make) in PER_LAYER.items():
    per = lambda **kw: (lambda l, f=f: f(l, name=NAME, **kw))
    for r in (0, -2, 2.5, True, 'half'): case(f"{meth}-rank={r!r}", make, per(rank=r), ValueError, 'is not a rank', NAME)
    case(f"{meth}-rank=(0,2)", make, per(rank=(0, 2)), ValueError, 'is not a rank', NAME)
    for r in ABOVE_FULL[meth]: case(f"{meth}-rank={r}-above-full", make, per(rank=r), ValueError, 'above the full', NAME)
    for k in (0, -0.1, 1.5): case(f"{meth}-keep={k}", make, per(keep=k), ValueError, 'outside (0, 1]', NAME)
    if meth!='CP':
        for e in (0, -0.2, 1.5): case(f"{meth}-energy={e}", make, per(energy=e), ValueError, 'outside (0, 1]', NAME)
    for p in (-0.1, 1, 1.5): case(f"{meth}-percent_removed={p}", make, per(percent_removed=p), ValueError, 'outside [0, 1)', NAME)
    case(f"{meth}-keep='half'", make, per(keep='half'), TypeError, 'must be a number', NAME)
    case(f"{meth}-rank-and-keep", make, per(rank=2, keep=0.5), ValueError, 'pass only one of', NAME)
    case(f"{meth}-keep-and-energy", make, per(keep=0.5, energy=0.9), ValueError, 'pass only one of', NAME)
    if meth!='Tucker': case(f"{meth}-tuple-rank", make, per(rank=(2, 3)), ValueError, 'a pair of ranks is for Tucker only', NAME)
    for bad,value in (('nan', float('nan')), ('inf', float('inf')), ('-inf', -float('inf'))):
        case(f"{meth}-{bad}-weight", lambda make=make, v=value: with_weight(make(), (0, 1), v), per(rank=2), ValueError, 'NaN or Inf', NAME)
    case(f"{meth}-int8-weight", lambda make=make: int8_weight(make()), per(rank=2), TypeError, 'torch.int8 weights', NAME)

case("CP-energy", conv, lambda l: cd.CP(l, energy=0.9, name=NAME), ValueError, 'not defined for CP', NAME)
for meth in ('Tucker', 'CP', 'SVD', 'Spatial'):
    f = getattr(cd, meth)
    case(f"{meth}-on-Linear", lin, lambda l, f=f: f(l, rank=2, name=NAME), TypeError, 'use FC_Decomposer().SVD', NAME)
    case(f"{meth}-on-Embedding", lambda: nn.Embedding(10, 4), lambda l, f=f: f(l, rank=2, name=NAME), TypeError, 'takes an nn.Conv1d or nn.Conv2d', NAME)
    case(f"{meth}-on-Bilinear", lambda: nn.Bilinear(4, 4, 3), lambda l, f=f: f(l, rank=2), TypeError, 'nn.ConvTranspose3d, but Bilinear', 'Bilinear')
    case(f"{meth}-on-quantized-Conv2d", quantized_conv, lambda l, f=f: f(l, rank=2, name=NAME), TypeError, 'quantized', NAME)
    case(f"{meth}-on-meta-device", lambda: nn.Conv2d(4, 4, 3, device='meta'), lambda l, f=f: f(l, rank=2, name=NAME), ValueError, 'meta device', NAME)
case("FC.SVD-on-meta-device", lambda: nn.Linear(4, 4, device='meta'), lambda l: fc.SVD(l, rank=2, name=NAME), ValueError, 'meta device', NAME)
case("FC.SVD-on-Conv2d", conv, lambda l: fc.SVD(l, rank=2, name=NAME), TypeError, "use Conv_Decomposer()'s methods", NAME)
case("FC.SVD-on-quantized-Linear", quantized_linear, lambda l: fc.SVD(l, rank=2, name=NAME), TypeError, 'quantized', NAME)
case("FC.SVD-on-quantized-Linear-unnamed", quantized_linear, lambda l: fc.SVD(l, rank=2), TypeError, 'quantized', 'Linear')

# whole models
for meth in ('tucker', 'cp', 'svd', 'spatial'):
    dec = lambda **kw: (lambda m, meth=meth: Conv_Decomposer().decompose(m, meth, quiet=True, **kw))
    case(f"model-{meth}-rank=0", net, dec(rank=0), ValueError, 'is not a rank')
    case(f"model-{meth}-rank-above-full", net, dec(rank=60), ValueError, 'above the full rank of every layer', 'features.0')
    for k in (0, -0.1, 1.5): case(f"model-{meth}-keep={k}", net, dec(keep=k), ValueError, 'outside (0, 1]')
    for p in (-0.1, 1): case(f"model-{meth}-percent_removed={p}", net, dec(percent_removed=p), ValueError, 'outside [0, 1)')
    if meth!='cp': case(f"model-{meth}-energy=1.5", net, dec(energy=1.5), ValueError, 'outside (0, 1]')
    case(f"model-{meth}-rank-and-energy", net, dec(rank=2, energy=0.5), ValueError, 'pass only one of')
    case(f"model-{meth}-layers-missing", net, dec(layers=['features.9']), ValueError, "no layer named 'features.9'")
    case(f"model-{meth}-exclude-missing", net, dec(exclude=['nope']), ValueError, "no layer named 'nope'")
    case(f"model-{meth}-nan-weight", lambda: poison(net(), 'features.2', lambda l: with_weight(l, (0, 0, 1, 1), float('nan'))), dec(rank=2), ValueError, 'NaN or Inf', 'features.2')
    case(f"model-{meth}-int8-weight", lambda: poison(net(), 'features.2', int8_weight), dec(rank=2), TypeError, 'torch.int8 weights', 'features.2')
    if meth!='tucker': case(f"model-{meth}-tuple-rank", net, dec(rank=(2, 2)), ValueError, 'a pair of ranks is for Tucker only', 'features.0')
case("model-cp-energy", net, lambda m: Conv_Decomposer().decompose(m, 'cp', energy=0.9, quiet=True), ValueError, 'not defined for CP')
case("model-unknown-method", net, lambda m: Conv_Decomposer().decompose(m, 'tuckr', quiet=True), ValueError, "unknown method 'tuckr'")
case("model-FC-unknown-method", net, lambda m: FC_Decomposer().decompose(m, 'tucker', quiet=True), ValueError, "unknown method 'tucker'")
case("model-FC-inf-weight", lambda: poison(net(), 'head', lambda l: with_weight(l, (1, 1), float('inf'))), lambda m: FC_Decomposer().decompose(m, rank=2, head=True, quiet=True), ValueError, 'NaN or Inf', 'head')
case("model-FC-rank-above-full", net, lambda m: FC_Decomposer().decompose(m, rank=5, head=True, quiet=True), ValueError, 'above the full rank of every layer', 'head')
case("model-FC-layers-not-Linear", net, lambda m: FC_Decomposer().decompose(m, layers=['features.0'], quiet=True), ValueError, 'no nn.Linear in it')
case("decompose_model-nan-weight", lambda: poison(net(), 'head', lambda l: with_weight(l, (0, 0), float('nan'))), lambda m: decompose_model(m, 'tucker', quiet=True, rank=2, head=True), ValueError, 'NaN or Inf', 'head')
case("model-FC-quantize_dynamic", quantized_net, lambda m: FC_Decomposer().decompose(m, rank=2, quiet=True), (TypeError, ValueError), 'quantized')
case("decompose_model-quantize_dynamic", quantized_net, lambda m: decompose_model(m, 'tucker', quiet=True, rank=2), (TypeError, ValueError), 'quantized')

CASES = [pytest.param(*c.values, id=c.id) for c in CASES]

@pytest.mark.parametrize('build,call,exc,msg,named', CASES)
def test_bad_input(build, call, exc, msg, named):
    target = build()
    before = snapshot(target)
    with pytest.raises(exc) as info: call(target)
    text = str(info.value)
    assert msg in text, f"the error should say {msg!r}; it says: {text!r}"
    if named: assert named in text, f"the error should name the layer {named!r}; it says: {text!r}"
    assert_untouched(before, target, f"after the error {text!r}")

def test_model_untouched_after_error_midway():
    "An error on the second conv, raised after the first was factorized in the copy, must not leak into the model passed in"
    m = net()                                   # svd full ranks: features.0 → 8, features.2 → 6
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"features\.2: rank=\(2, 2\): a pair of ranks is for Tucker only"): Conv_Decomposer().decompose(m, 'svd', rank={'features.0': 2, 'features.2': (2, 2)}, quiet=True)
    assert_untouched(before, m, "decompose(rank plan) failing on the second conv")

def test_model_rank_is_at_most():
    "One rank for a whole model is capped at each layer's full rank (a layer it would not shrink is left as it was)"
    cd = Conv_Decomposer(); cd.decompose(net(), 'svd', rank=7, quiet=True)   # full ranks: features.0 → 8, features.2 → 6
    r = cd.report.set_index('layer')
    assert r.loc['features.2', 'note'].startswith('rank 6 would keep'), r

def test_snapshot_sees_changes():
    "The untouched check above can fail: a changed weight, a NaN, a swapped module or a frozen parameter are all seen"
    for change in (lambda m: m.head.weight.data.add_(1), lambda m: m.head.weight.data.fill_(float('nan')),
                   lambda m: m.features.__setitem__(1, nn.GELU()), lambda m: m.head.requires_grad_(False)):
        m = net(); before = snapshot(m); change(m)
        with pytest.raises(AssertionError): assert_untouched(before, m, 'changed')
