"""Every argument of the calibration, the rank rules, the budgets and the callback checked at the boundary (issue 15, items 4 and 5):
a bad value gets an error of the right type that names the argument and says what to pass, and leaves the model as it was;
numpy numbers (np.int64 ranks, np.float64 fractions) are taken as the Python numbers they stand for."""
import math, warnings, pytest, torch, numpy as np
from collections import OrderedDict
from torch import nn
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.progress import *   # (Learner.no_bar)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fasterai_lr.layers import Factorized, check_number, checked_rank, rank_option, kernel, layer_rank
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, decompose_model
from fasterai_lr.ranks import Budget, VBMF, vbmf_rank, candidates
from fasterai_lr.calibrate import Calibration
from fasterai_lr.callback import DecomposeCallback
from fasterai_lr.latency import LatencyAware, LatencyBudget, LatencyCache

def net()->nn.Module:
    return nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, 4)))
def meta_net():
    with torch.device('meta'): return net()
def xs(n=2, shape=(4, 3, 8, 8), fill=None):
    return [torch.full(shape, fill) if fill is not None else torch.randn(*shape) for _ in range(n)]
def param_timer(mods, x): return [1e-9*sum(p.numel() for p in m.parameters()) + 1e-6*sum(1 for c in m.modules() if not c._modules) for m in mods]
def timed(cls, **kw): return cls(timer=param_timer, cache=LatencyCache(), **kw)

# ---- did anything change? (NaN- and meta-aware)
from untouched_check import _same, snapshot, assert_untouched

def test_untouched_check_can_fail():
    for change in (lambda m: m.head.weight.data.add_(1), lambda m: m.head.weight.data.fill_(float('nan')), lambda m: m.features.__setitem__(1, nn.GELU()),
                   lambda m: m.head.requires_grad_(False), lambda m: m.head.eval()):
        m = net(); before = snapshot(m); change(m)
        with pytest.raises(AssertionError): assert_untouched(before, m, 'changed')

# ---- the cases: (id, build the target, call on it, exception type, pieces the message must hold: the argument and what to pass)

NAN,INF = float('nan'),float('inf')
CASES = []
def case(id, build, call, exc, *msg): CASES.append(pytest.param(build, call, exc, msg, id=id))
none = lambda: None

# 1. calibration data: non-finite and wrong-shape batches, where the batch first meets the model (a budget's curves, a decomposer's factors)
for what,fill in (('nan', NAN), ('inf', INF)):
    bad = lambda fill=fill: Calibration(xs(fill=fill))
    case(f"budget-calib-{what}-batch", net, lambda m, bad=bad: decompose_model(m, rank=Budget(params=0.5, calib=bad()), quiet=True), ValueError,
         'calibration batch 0 has non-finite values', 'pass finite inputs')
    case(f"budget-calib-arg-{what}-batch", net, lambda m, bad=bad: decompose_model(m, rank=Budget(params=0.5), calib=bad(), quiet=True), ValueError,
         'calibration batch 0 has non-finite values', 'pass finite inputs')
    case(f"budget-plan-{what}-batch", net, lambda m, bad=bad: Budget(params=0.5, calib=bad()).plan(m), ValueError, 'non-finite values', 'pass finite inputs')
    case(f"FC-calib-{what}-batch", net, lambda m, bad=bad: FC_Decomposer().decompose(m, calib=bad(), head=True, quiet=True), ValueError,
         'non-finite values', 'pass finite inputs')
    case(f"Conv-calib-{what}-batch", net, lambda m, bad=bad: Conv_Decomposer().decompose(m, 'svd', calib=bad(), quiet=True), ValueError,
         'non-finite values', 'pass finite inputs')
case("budget-calib-nan-in-second-batch", net, lambda m: decompose_model(m, rank=Budget(params=0.5, calib=Calibration(xs() + xs(1, fill=NAN))), quiet=True),
     ValueError, 'calibration batch 2 has non-finite values', 'pass finite inputs')
case("budget-calib-nan-in-a-tuple-batch", net, lambda m: decompose_model(m, rank=Budget(params=0.5, calib=Calibration([(torch.full((4, 3, 8, 8), NAN), torch.zeros(4))])),
     quiet=True), ValueError, 'non-finite values', 'pass finite inputs')
case("latency-aware-calib-nan-batch", net, lambda m: decompose_model(m, rank=timed(LatencyAware), sample=(3, 8, 8), calib=Calibration(xs(fill=NAN)), quiet=True),
     ValueError, 'non-finite values', 'pass finite inputs')
for seq in (False, True):
    for what,shape in (('channels', (4, 5, 8, 8)), ('ndim', (3, 8, 8))):
        cal = lambda shape=shape, seq=seq: Calibration(xs(shape=shape), sequential=seq)
        case(f"budget-calib-wrong-{what}-seq={seq}", net, lambda m, cal=cal: decompose_model(m, rank=Budget(params=0.5, calib=cal()), quiet=True), ValueError,
             'calibration batch', 'does not run through the model', 'pass', 'inputs the model takes')
        case(f"Conv-calib-wrong-{what}-seq={seq}", net, lambda m, cal=cal: Conv_Decomposer().decompose(m, calib=cal(), quiet=True), ValueError,
             'does not run through the model', 'pass', 'inputs the model takes')
case("latency-budget-calib-wrong-channels", net, lambda m: decompose_model(m, rank=timed(LatencyBudget, keep=0.9), sample=(3, 8, 8), calib=Calibration(xs(shape=(4, 5, 8, 8))),
     quiet=True), ValueError, 'does not run through the model', 'pass', 'inputs the model takes')

# 2. Calibration's own arguments, refused at construction
for v,exc,say in ((NAN, ValueError, 'is not a finite number'), (INF, ValueError, 'is not a finite number'), (-1, ValueError, 'is outside [0, ∞)'),
                  (-1e-9, ValueError, 'is outside [0, ∞)'), ('x', TypeError, 'is not a number'), (True, TypeError, 'is not a number'), (None, TypeError, 'is not a number'),
                  (torch.tensor(0.01), TypeError, 'is not a number')):
    case(f"calib-damp={v!r}", none, lambda m, v=v: Calibration(xs(), damp=v), exc, f"damp={v!r} {say}", 'pass 0 (pure data fit) or a small positive ridge such as damp=0.01')
for arg,v,exc in (('n_batches', 0, ValueError), ('n_batches', 2.5, TypeError), ('n_batches', True, TypeError), ('n_batches', None, TypeError),
                  ('max_rows', 0, ValueError), ('max_rows', 1e4, TypeError), ('max_rows', '8192', TypeError), ('n_inp', 0, ValueError), ('n_inp', True, TypeError)):
    case(f"calib-{arg}={v!r}", none, lambda m, arg=arg, v=v: Calibration(xs(), **{arg: v}), exc, f"{arg}={v!r}", 'pass a positive int')
for v in ('yes', 1, None):
    case(f"calib-sequential={v!r}", none, lambda m, v=v: Calibration(xs(), sequential=v), TypeError, f"sequential={v!r} is not a bool", 'pass True')

# 3. the meta device: a model without values to calibrate, and batches without values
case("calib-prepare-meta-model", meta_net, lambda m: Calibration(xs()).prepare(m, ['features.0']), ValueError, 'on the meta device', 'materialize the model')
case("decompose-meta-model-calib", meta_net, lambda m: decompose_model(m, calib=Calibration(xs()), quiet=True), ValueError, 'on the meta device', 'materialize it')
case("budget-meta-model-calib", meta_net, lambda m: decompose_model(m, rank=Budget(params=0.5, calib=Calibration(xs())), quiet=True), ValueError, 'on the meta device', 'materialize')
case("calib-meta-buffers", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, device='meta')), lambda m: Calibration(xs()).prepare(m, ['0']),
     ValueError, '3 tensors on the meta device (1.running_mean', 'materialize the model')
for where,call in (('Conv', lambda m, c: Conv_Decomposer().decompose(m, calib=c, quiet=True)), ('FC', lambda m, c: FC_Decomposer().decompose(m, calib=c, head=True, quiet=True)),
                   ('budget', lambda m, c: decompose_model(m, rank=Budget(params=0.5, calib=c), quiet=True)), ('prepare', lambda m, c: c.prepare(m, ['features.0']))):
    case(f"{where}-meta-batches", net, lambda m, call=call: call(m, Calibration([torch.randn(4, 3, 8, 8, device='meta')])), ValueError,
         'calibration batch 0 is on the meta device', 'pass batches of real data')
case("meta-batch-in-a-dict", net, lambda m: decompose_model(m, calib=Calibration([dict(x=torch.randn(4, 3, 8, 8, device='meta'))]), quiet=True), ValueError,
     'calibration batch 0 is on the meta device', 'pass batches of real data')

# 4. VBMF: every argument
for v,exc,say in ((0, ValueError, 'is outside [1, ∞)'), (-1, ValueError, 'is outside [1, ∞)'), (2.0, TypeError, 'is not an int'), (True, TypeError, 'is not an int'),
                  ('8', TypeError, 'is not an int'), (None, TypeError, 'is not an int')):
    case(f"VBMF-round_to={v!r}", none, lambda m, v=v: VBMF(round_to=v), exc, f"round_to={v!r} {say}", 'pass a positive int')
for v,exc,say in ((2, ValueError, 'is outside (0, 1]'), (0, ValueError, 'is outside (0, 1]'), (-0.5, ValueError, 'is outside (0, 1]'), (NAN, ValueError, 'is not a finite number'),
                  (True, TypeError, 'is not a number'), ('x', TypeError, 'is not a number')):
    case(f"VBMF-energy={v!r}", none, lambda m, v=v: VBMF(energy=v), exc, f"energy={v!r} {say}", 'pass the share of squared singular values to keep')
    case(f"vbmf_rank-energy={v!r}", none, lambda m, v=v: vbmf_rank(torch.randn(6, 8), energy=v), exc, f"energy={v!r} {say}", 'pass the share of squared singular values')

# 5. numpy's bool is no rank, nor a fraction (numpy ints and floats are: see the tests below)
case("rank=np.bool_", net, lambda m: decompose_model(m, rank=np.True_, quiet=True), ValueError, 'rank=np.True_ is not a rank', 'pass a positive int')
case("keep=np.bool_", net, lambda m: decompose_model(m, keep=np.True_, quiet=True), TypeError, 'keep=np.True_ must be a number', "pass the fraction of the layer's parameters to keep")
case("rank=np.int64(0)", net, lambda m: decompose_model(m, rank=np.int64(0), quiet=True), ValueError, 'rank=np.int64(0) is not a rank', 'pass a positive int')
case("keep=np.float64(1.5)", net, lambda m: decompose_model(m, keep=np.float64(1.5), quiet=True), ValueError, 'keep=1.5 is outside (0, 1]', 'pass the fraction')
case("start_epoch=np.int64(-1)", none, lambda m: DecomposeCallback(start_epoch=np.int64(-1)), ValueError, 'start_epoch=np.int64(-1) is not an epoch', 'pass an int epoch')
case("start_epoch=np.float64(1.5)", none, lambda m: DecomposeCallback(start_epoch=np.float64(1.5)), ValueError, 'is not an epoch', 'a float fraction of training in [0, 1)')
case("start_epoch=nan", none, lambda m: DecomposeCallback(start_epoch=NAN), ValueError, 'start_epoch=nan is not an epoch', 'pass an int epoch')
case("start_epoch=np.bool_", none, lambda m: DecomposeCallback(start_epoch=np.True_), ValueError, 'is not an epoch', 'pass an int epoch')

# 6. Budget, LatencyBudget, LatencyAware: bools, NaN, out of range
for by in ('params', 'macs'):
    for v in (True, False, np.True_, 'half', [0.5]):
        case(f"Budget-{by}={v!r}", none, lambda m, by=by, v=v: Budget(**{by: v}), TypeError, f"{by}={v!r} is not a number", f"pass the fraction of the whole model's", f"{by}=0.5")
    for v,say in ((NAN, 'is not a finite number'), (INF, 'is not a finite number'), (0, 'is outside (0, 1]'), (1.5, 'is outside (0, 1]'), (-0.5, 'is outside (0, 1]')):
        case(f"Budget-{by}={v!r}", none, lambda m, by=by, v=v: Budget(**{by: v}), ValueError, f"{by}={v!r} {say}", f"pass the fraction of the whole model's")
for arg,v,exc in (('round_to', True, TypeError), ('round_to', 0, ValueError), ('round_to', 2.5, TypeError), ('res', 0, ValueError), ('res', True, TypeError), ('res', NAN, TypeError)):
    case(f"Budget-{arg}={v!r}", none, lambda m, arg=arg, v=v: Budget(params=0.5, **{arg: v}), exc, f"{arg}={v!r}", 'pass a positive int')
case("Budget-alloc", none, lambda m: Budget(params=0.5, alloc='max'), ValueError, "unknown alloc='max'", "pass 'greedy' or 'minmax'")
case("Budget-calib-not-one", none, lambda m: Budget(params=0.5, calib=3), TypeError, 'calib= takes an object with .prepare', 'Calibration(data)')
case("Budget-weights-not-a-dict", none, lambda m: Budget(params=0.5, weights=2.), TypeError, 'weights=2.0 is not a dict', 'pass {layer or module name: multiplier}')
for v,exc,say in ((-1, ValueError, 'is outside (0, ∞)'), (0, ValueError, 'is outside (0, ∞)'), (NAN, ValueError, 'is not a finite number'), (True, TypeError, 'is not a number')):
    case(f"Budget-weight={v!r}", none, lambda m, v=v: Budget(params=0.5, weights={'head': v}), exc, f"weights['head']={v!r} {say}", 'pass a positive multiplier')
case("Budget-weights-unknown-name", net, lambda m: decompose_model(m, rank=Budget(params=0.5, weights={'featurez': 2}), quiet=True), ValueError,
     "weights= names 'featurez', which is not a module of the model", 'pass names as in model.named_modules()')

for v,exc,say in ((True, TypeError, 'is not a number'), (NAN, ValueError, 'is not a finite number'), (0, ValueError, 'is outside (0, 1)'), (1, ValueError, 'is outside (0, 1)'),
                  ('0.5', TypeError, 'is not a number')):
    case(f"LatencyBudget-keep={v!r}", none, lambda m, v=v: LatencyBudget(keep=v), exc, f"keep={v!r} {say}", 'pass the fraction of the latency to keep')
    case(f"LatencyAware-keep={v!r}", none, lambda m, v=v: LatencyAware(keep=v), exc, f"keep={v!r} {say}", "pass the fraction of each layer's parameters to keep")
for v,exc,say in ((True, TypeError, 'is not a number'), (NAN, ValueError, 'is not a finite number'), (0.5, ValueError, 'is outside (1, ∞)'), (1, ValueError, 'is outside (1, ∞)'),
                  (INF, ValueError, 'is not a finite number'), ('2', TypeError, 'is not a number')):
    case(f"LatencyBudget-speedup={v!r}", none, lambda m, v=v: LatencyBudget(speedup=v), exc, f"speedup={v!r} {say}", 'pass how many times faster the model should be')
for cls in (LatencyBudget, LatencyAware):
    for arg,v,exc in (('batch', 0, ValueError), ('batch', True, TypeError), ('reps', 0, ValueError), ('reps', 2.0, TypeError)):
        case(f"{cls.__name__}-{arg}={v!r}", none, lambda m, cls=cls, arg=arg, v=v: cls(**{arg: v}, **({'keep': 0.5} if cls is LatencyBudget else {})), exc, f"{arg}={v!r}", 'pass a positive int')
    kw = {'keep': 0.5} if cls is LatencyBudget else {}
    case(f"{cls.__name__}-methods-unknown", none, lambda m, cls=cls, kw=kw: cls(methods=('tuckr',), **kw), ValueError, "methods=('tuckr',)", "pass a tuple of 'tucker', 'cp', 'svd', 'spatial'")
    case(f"{cls.__name__}-methods-empty", none, lambda m, cls=cls, kw=kw: cls(methods=(), **kw), ValueError, "methods=()", "pass a tuple of")
    case(f"{cls.__name__}-timer", none, lambda m, cls=cls, kw=kw: cls(timer=3, **kw), TypeError, 'timer=3 is not callable', 'pass (modules, input)')
    case(f"{cls.__name__}-cache", none, lambda m, cls=cls, kw=kw: cls(cache=[], **kw), TypeError, 'cache=[] is not a LatencyCache', 'pass LatencyCache()')
    case(f"{cls.__name__}-memory_format", none, lambda m, cls=cls, kw=kw: cls(memory_format='channels_last', **kw), TypeError, "memory_format='channels_last'", 'pass torch.channels_last')
for v,say in (((0.1, 0), 'fracs[1]=0 is outside (0, 1]'), ((0.1, 1.5), 'fracs[1]=1.5 is outside (0, 1]'), ((NAN,), 'fracs[0]=nan is not a finite number')):
    case(f"LatencyBudget-fracs={v!r}", none, lambda m, v=v: LatencyBudget(keep=0.5, fracs=v), ValueError, say, "pass fractions of each layer's parameters")
for arg,v,exc,say in (('fracs', (), TypeError, 'pass a non-empty tuple'), ('fracs', 0.3, TypeError, 'pass a non-empty tuple'), ('round_to', 0, ValueError, 'pass a positive int'),
                      ('rounds', 0, ValueError, 'pass a positive int'), ('rounds', True, TypeError, 'pass a positive int'), ('fold', 'yes', TypeError, 'pass True or False'),
                      ('check', 1, TypeError, 'pass True or False'), ('alloc', 'max', ValueError, "pass 'greedy' or 'minmax'")):
    case(f"LatencyBudget-{arg}={v!r}", none, lambda m, arg=arg, v=v: LatencyBudget(keep=0.5, **{arg: v}), exc, f"{arg}={v!r}", say)
for arg,v,exc,say in (('margin', NAN, ValueError, 'is not a finite number'), ('margin', -0.1, ValueError, 'is outside [0, ∞)'), ('tol', -1, ValueError, 'is outside [0, ∞)'),
                      ('tol', True, TypeError, 'is not a number'), ('steps', 8, TypeError, ': pass a tuple of positive ints'), ('steps', (8, 0), ValueError, '[1]=0 is outside [1, ∞)')):
    want = dict(margin='pass how much faster an option must be', tol='pass the relative error within which', steps='positive ints (ranks are also tried rounded down')[arg]
    case(f"LatencyAware-{arg}={v!r}", none, lambda m, arg=arg, v=v: LatencyAware(**{arg: v}), exc, f"{arg}", say, want)

# 8. one layer alone: keep= that no factorization meets
case("checked_rank-Linear(1,1)", lambda: nn.Linear(1, 1), lambda l: checked_rank(l, 'svd', 'keep', 0.5, 'fc'), ValueError,
     'fc: keep=0.5 of this Linear(1, 1): even rank 1 of svd keeps 200% of its parameters', 'too small to factorize', 'pass rank= to force a rank')
case("checked_rank-Conv-tucker", lambda: nn.Conv2d(2, 2, 1), lambda l: checked_rank(l, 'tucker', 'keep', 0.9), ValueError, 'even rank (1, 1) of tucker keeps', 'pass rank=')
case("check_number-int", none, lambda m: check_number(2.0, 'n', 'a positive int, e.g. n=2', lo=1, integer=True), TypeError, 'n=2.0 is not an int; pass a positive int, e.g. n=2')

PARAMS = CASES

@pytest.mark.parametrize('build,call,exc,msg', PARAMS)
def test_bad_value(build, call, exc, msg):
    target = build()
    before = snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(exc) as info: call(target)
    text = str(info.value)
    for piece in msg: assert piece in text, f"the error should say {piece!r}; it says: {text!r}"
    assert_untouched(before, target, f"after the error {text!r}")

def test_enough_cases(): assert len(CASES) >= 150, len(CASES)

# ---- 5. numpy numbers are the Python numbers they stand for, and the layers are built with Python ints

def _state(m): return {k: v.clone() for k,v in m.state_dict().items()}

def _equal(a, b): return a.keys()==b.keys() and all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.parametrize('kw,py', [(dict(rank=np.int64(4)), dict(rank=4)), (dict(rank=np.int32(3)), dict(rank=3)), (dict(rank=(np.int64(4), np.int64(2))), dict(rank=(4, 2))),
                                   (dict(keep=np.float64(0.5)), dict(keep=0.5)), (dict(keep=np.float32(0.25)), dict(keep=0.25)), (dict(percent_removed=np.float64(0.5)), dict(percent_removed=0.5)),
                                   (dict(energy=np.float64(0.9), round_to=1), dict(energy=0.9, round_to=1)), (dict(keep=0.5, round_to=np.int64(4)), dict(keep=0.5, round_to=4)), (dict(rank={'features.2': np.int64(3)}), dict(rank={'features.2': 3})),
                                   (dict(rank={'features.2': (np.int64(3), np.int64(2))}), dict(rank={'features.2': (3, 2)})), (dict(rank=Budget(params=np.float64(0.5))), dict(rank=Budget(params=0.5))),
                                   (dict(rank=Budget(params=0.5, round_to=np.int64(2))), dict(rank=Budget(params=0.5, round_to=2))), (dict(rank=VBMF(round_to=np.int64(4))), dict(rank=VBMF(round_to=4)))])
def test_numpy_numbers_are_numbers(kw, py):
    torch.manual_seed(0); a,ra = decompose_model(net(), 'tucker', quiet=True, **kw)
    torch.manual_seed(0); b,rb = decompose_model(net(), 'tucker', quiet=True, **py)
    assert _equal(_state(a), _state(b)), f"{kw}: not the model that {py} gives"
    assert list(ra['rank'])==list(rb['rank']), f"{kw}: ranks {list(ra['rank'])}, {py}: {list(rb['rank'])}"
    blks = [m for m in a.modules() if isinstance(m, Factorized)]
    assert blks, f"{kw}: nothing decomposed"
    for blk in blks:
        rs = blk.rank if isinstance(blk.rank, tuple) else (blk.rank,)
        assert all(type(r) is int for r in rs), f"{kw}: the block's rank {blk.rank!r} is not Python ints"
        assert all(type(v) is int for l in blk for v in (l.in_channels, l.out_channels) if isinstance(l, nn.Conv2d)), f"{kw}: a factor layer has non-int channels"

def test_numpy_numbers_per_layer_and_options():
    conv = nn.Conv2d(8, 12, 3)
    for f,r in ((Conv_Decomposer().Tucker, np.int64(3)), (Conv_Decomposer().CP, np.int64(4)), (Conv_Decomposer().SVD, np.int16(5)), (FC_Decomposer().SVD, np.int64(2))):
        layer = nn.Linear(6, 5) if f.__qualname__.startswith('FC') else conv
        blk = f(layer, rank=r)
        assert all(type(x) is int for x in (blk.rank if isinstance(blk.rank, tuple) else (blk.rank,))), f"{f.__qualname__}: rank {blk.rank!r}"
    assert rank_option(rank=np.int64(4))==('rank', 4) and type(rank_option(rank=np.int64(4))[1]) is int
    assert type(rank_option(keep=np.float64(0.5))[1]) is float and rank_option(keep=1)==('keep', 1)
    cal = Calibration(xs(4), n_batches=np.int64(2), max_rows=np.int64(64), damp=np.float64(0.01))
    assert type(cal.n_batches) is int and type(cal.max_rows) is int and type(cal.damp) is float
    assert len(cal.batches())==2, f"n_batches=np.int64(2) drew {len(cal.batches())} batches"
    cb = DecomposeCallback(start_epoch=np.int64(1))
    assert cb.starts==[1] and type(cb.starts[0]) is int
    cb = DecomposeCallback(start_epoch=np.float64(0.5))
    assert cb.starts==[0.5] and type(cb.starts[0]) is float
    assert Budget(params=np.float64(0.5)).keep==0.5 and type(Budget(macs=np.float32(0.5)).keep) is float
    assert LatencyBudget(speedup=np.int64(2)).keep==0.5 and LatencyAware(keep=np.float64(0.5), steps=(np.int64(8),)).steps==(8,)
    assert LatencyAware(methods='svd').methods==('svd',), "one method may be given as a str"

# ---- 7. any start in [0, 1) fires, at the last training iteration at the latest

def tiny_learner(n, bs, cbs):
    "A Learner on `n` random 8×8 images in batches of `bs` (the tests' seed: the same every time)"
    ds = list(zip(torch.randn(n, 3, 8, 8), torch.randint(0, 4, (n,))))
    return Learner(DataLoaders(DataLoader(ds, bs=bs), DataLoader(ds, bs=bs)), net(), loss_func=nn.CrossEntropyLoss(), cbs=cbs)

class Seen(Callback):
    "At every training batch: (epoch, iteration, is the model decomposed by now)"
    order,run_valid = 5,False   # after DecomposeCallback's before_batch
    def before_fit(self): self.seen = []
    def before_batch(self): self.seen.append((self.epoch, self.iter, any(isinstance(m, Factorized) for m in self.model.modules())))

@pytest.mark.parametrize('start', [0., 0.3, 0.5, 0.74, 0.75, 0.9, 0.99, 0.999, 1-1e-12])
@pytest.mark.parametrize('epochs,n,bs', [(2, 16, 8), (2, 24, 8), (3, 8, 8), (1, 40, 8)])
def test_every_fraction_fires(start, epochs, n, bs):
    cb,seen = DecomposeCallback(start_epoch=start, keep=0.5, verbose=False),Seen()
    learn = tiny_learner(n, bs, [cb, seen])
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    assert not [w for w in ws if 'DecomposeCallback' in str(w.message)], [str(w.message) for w in ws]
    total = epochs*(n//bs)
    want = min(math.ceil(start*total), total-1)
    case = f"start_epoch={start} in {epochs} epochs of {n//bs} batches"
    assert len(cb.totals)==1, f"{case}: {len(cb.totals)} decompositions"
    first = next(i for i,(e,it,done) in enumerate(seen.seen) if done)
    assert first==want, f"{case}: decomposed before training iteration {first}, expected {want}"
    assert int(cb.totals['iteration'][0])==want, cb.totals

def test_several_late_stages_fire():
    cb = DecomposeCallback(start_epoch=[0.5, 0.999], layers=[['features.0'], None], keep=0.5, verbose=False)
    learn = tiny_learner(16, 8, [cb])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert list(cb.totals['iteration'])==[2, 3], cb.totals
    assert all(isinstance(learn.model.get_submodule(n), Factorized) for n in ('features.0', 'features.2')), learn.model

def test_int_start_past_the_end_still_warns():
    cb = DecomposeCallback(start_epoch=2, keep=0.5, verbose=False)
    learn = tiny_learner(16, 8, [cb])
    with pytest.warns(UserWarning, match='at or past the end of this fit'):
        with learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert not len(cb.totals), "an int epoch past the fit should not decompose"

# ---- 8. a layer too small for keep=: FC_Decomposer().SVD(nn.Linear(1, 1), keep=0.5) returned a larger block

@pytest.mark.parametrize('call', [lambda: FC_Decomposer().SVD(nn.Linear(1, 1), keep=0.5), lambda: Conv_Decomposer().SVD(nn.Conv2d(2, 1, 1), keep=0.5),
                                  lambda: Conv_Decomposer().Tucker(nn.Conv2d(2, 2, 1), keep=0.9)])
def test_per_layer_keep_too_small(call):
    with pytest.raises(ValueError, match='too small to factorize'): call()

def test_checked_rank_passes_what_fits():
    "`checked_rank` is `layer_rank` wherever the block is smaller, and for the options that do not ask for a share of the parameters"
    lin = nn.Linear(12, 8)
    for opt,v in (('keep', 0.5), ('keep', 1.), ('rank', 3), ('percent_removed', 0.5), ('energy', 0.9)):
        assert checked_rank(lin, 'svd', opt, v)==layer_rank(kernel(lin), 'svd', opt, v), (opt, v)
    assert checked_rank(nn.Linear(1, 1), 'svd', 'rank', 1)==1, "rank= forces a rank"

# ---- the helper itself

def test_check_number():
    assert check_number(np.int64(3), 'n', '', lo=1, integer=True)==3 and type(check_number(np.int64(3), 'n', '', integer=True)) is int
    assert type(check_number(np.float32(0.5), 'f', '', lo=0, hi=1)) is float and check_number(1, 'f', '', lo=0, hi=1)==1
    for v,kw,exc in ((0, dict(lo=0, ends='(]'), ValueError), (1, dict(hi=1, ends='[)'), ValueError), (True, {}, TypeError), (np.bool_(False), {}, TypeError),
                     (NAN, {}, ValueError), (-INF, {}, ValueError), (torch.tensor(1.), {}, TypeError), (3+0j, {}, TypeError)):
        with pytest.raises(exc, match=r'x=.*; pass y'): check_number(v, 'x', 'y', **kw)
