"Latency-aware decomposition: the cache, the chooser, the latency budget and the exact rewrites, all under deterministic timers (no timing assertions: speed is checked in bench/speed.py)"
import copy, pytest, torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.core import *
from fasterai_lr.layers import Factorized, shell
from fasterai_lr.decompose import Conv_Decomposer, FC_Decomposer, decompose_model
from fasterai_lr.factorize import round_rank
from fasterai_lr.latency import *

def macs(m, x):
    with torch.no_grad(), FlopCounterMode(display=False) as fc: m(x)
    return fc.get_total_flops()//2

def mac_timer(mods, x, overhead=200_000):
    "A deterministic 'device': MACs plus a fixed cost per leaf layer, 1 ns each"
    return [(macs(m, x) + overhead*sum(1 for c in m.modules() if not c._modules))*1e-9 for m in mods]

class Counting:
    "A timer that counts what it is asked to time"
    def __init__(self, f=mac_timer): self.f,self.groups,self.mods = f,0,0
    def __call__(self, mods, x): self.groups += 1; self.mods += len(mods); return self.f(mods, x)

def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()

def randomize_bn(m):
    for b in m.modules():
        if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d)):
            b.running_mean.uniform_(-1, 1); b.running_var.uniform_(0.5, 2)
            if b.affine: b.weight.data.uniform_(0.5, 2); b.bias.data.uniform_(-1, 1)
    return m

# ---- measuring and caching

class CallCount(nn.Module):
    def __init__(self): super().__init__(); self.n = 0
    def forward(self, x): self.n += 1; return x

@pytest.mark.parametrize('reps,warmup', [(1, 0), (3, 2), (5, 1)])
def test_time_calls_runs_each_module_interleaved(reps, warmup):
    mods = [CallCount() for _ in range(3)]
    ts = time_calls(mods, torch.zeros(1), reps=reps, min_time=0, warmup=warmup)
    assert len(ts) == 3 and all(t >= 0 for t in ts), ts
    assert [m.n for m in mods] == [warmup + 1 + reps]*3, f"reps={reps}, warmup={warmup}: calls {[m.n for m in mods]}"

def test_cache_hits_and_keys(tmp_path):
    timer = Counting()
    lt = LayerTimer(batch=2, timer=timer, cache=LatencyCache(tmp_path/'lat.json'))
    conv, shape = nn.Conv2d(32, 32, 3, padding=1), (1, 32, 16, 16)
    opts = [('tucker', (16, 16)), ('svd', 12)]
    first = lt(conv, opts, shape)
    assert (timer.groups, timer.mods) == (1, 3), "one side-by-side measurement of the layer and its 2 options"
    assert lt(copy.deepcopy(conv), opts[::-1], shape) == [first[0], first[2], first[1]], "same geometry: answered from the cache"
    assert timer.groups == 1, "a cached option was measured again"
    lt(conv, [('tucker', (8, 8))], shape)
    assert (timer.groups, timer.mods) == (2, 5), "a new option is timed beside the layer itself (2 modules)"
    for other in (LayerTimer(batch=4, timer=timer, cache=lt.cache), ):
        other(conv, opts[:1], shape)
    assert timer.groups == 3, "another batch size is another key"
    lt(nn.Conv2d(32, 32, 3, padding=1, stride=2), opts[:1], shape)
    assert timer.groups == 4, "another stride is another geometry"
    lt.cache.save()
    assert LatencyCache(tmp_path/'lat.json') == lt.cache, "the JSON file gives back the same cache"

def test_cache_key_has_device_threads_format():
    lt = LayerTimer(timer=mac_timer, cache=LatencyCache())
    k = lt.key(nn.Conv2d(8, 8, 3), ('svd', 4), (1, 8, 10, 10))
    assert ('svd' in k and 4 in k and (1, 8, 10, 10) in k and 'cpu' in k and torch.get_num_threads() in k
            and str(torch.channels_last) in k), f"key {k} misses a field"

def test_timer_leaves_callers_layer_alone():
    conv = nn.Conv2d(8, 8, 3).train()
    w = conv.weight.detach().clone()
    LayerTimer(timer=mac_timer, cache=LatencyCache())(conv, [('svd', 4)], (1, 8, 10, 10))
    assert conv.training and conv.weight.is_contiguous() and torch.equal(conv.weight, w), "timing changed the layer"

# ---- ranks the hardware runs fast

@pytest.mark.parametrize('r,step,full,want', [(37, 8, 64, 32), (37, 16, 64, 32), (48, 16, 64, 48), (5, 8, 64, 5), (64, 8, 64, 64),
                                              (70, 16, 70, 70), ((37, 64), 8, (64, 64), (32, 64)), ((9, 100), 8, (64, 128), (8, 96))])
def test_round_rank(r, step, full, want):
    assert round_rank(r, step, full) == want, f"round_rank({r}, {step}, {full})"

@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial'])
def test_keep_options_within_budget_and_rounded(method):
    conv = nn.Conv2d(64, 96, 3)
    opts = keep_options(conv, method, 0.5, steps=(8, 16))
    p0 = conv.weight.numel()
    for m,r in opts:
        p = sum(x.numel() for x in shell(conv, m, r).parameters())
        assert p <= 0.5*p0 + 1e-9, f"{method} rank {r}: {p} parameters > half of {p0}"
    assert any(all(v % 16 == 0 for v in (r if isinstance(r, tuple) else (r,))) for _,r in opts), f"{method}: no multiple of 16 in {opts}"

# ---- choosing

@pytest.mark.parametrize('t0,times,errors,margin,tol,want', [
    (1., [1.2, 0.9], [0.1, 0.2], 0.05, 0.1, 1),           # the accurate option is slower than the layer
    (1., [0.5, 0.3], [0.100, 0.105], 0.05, 0.1, 1),       # equal error (within 10%): the faster
    (1., [0.5, 0.3], [0.100, 0.105], 0.05, 0.01, 0),      # ... but not within 1%
    (1., [0.5, 0.3], [0.10, 0.20], 0.05, 0.1, 0),         # clearly less error wins
    (1., [0.97, 1.3], [0.1, 0.1], 0.05, 0.1, None),       # within the margin: not worth an error
    (1., [0.97, 1.3], [0.1, 0.1], 0.0, 0.1, 0),
    (1., [0.4, 0.6, 0.2], [0.3, 0.1, 0.5], 0.05, 5.0, 2), # everything 'equal': the fastest
])
def test_choose(t0, times, errors, margin, tol, want):
    assert choose(t0, times, errors, margin, tol) == want, f"choose({t0}, {times}, {errors}, margin={margin}, tol={tol})"

def by_method(speed:dict, orig=1.0):
    "A timer that gives the layer `orig` and a factorized block speed[method] (and uncounted layers 1e-3)"
    def f(mods, x): return [speed[m.method] if isinstance(m, Factorized) else orig if isinstance(m, (nn.Conv2d, nn.Linear)) else 1e-3 for m in mods]
    return f

@pytest.mark.parametrize('speed,tol,want', [
    (dict(tucker=2.0, svd=2.0, spatial=2.0), 0.1, None),           # nothing pays: kept
    (dict(tucker=0.97, svd=0.97, spatial=0.97), 0.1, None),        # 3% faster: within the 5% margin, kept
    (dict(tucker=0.5, svd=2.0, spatial=2.0), 0.1, 'tucker'),       # only Tucker pays
    (dict(tucker=2.0, svd=2.0, spatial=0.5), 0.1, 'spatial'),      # only spatial pays
    (dict(tucker=0.9, svd=0.2, spatial=0.5), 10., 'svd'),          # all equal in error (tol=10): the fastest
])
def test_latency_aware_follows_the_timer(speed, tol, want):
    conv = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).eval()
    la = LatencyAware(keep=0.5, timer=by_method(speed), cache=LatencyCache(), tol=tol)
    plan = la.ranks(conv, [('0', conv[0], 'tucker', ((1, 32, 8, 8), (1, 32, 8, 8)))])
    got = plan['0'][0] if plan else None
    assert got == want, f"{speed}, tol={tol}: chose {plan}, expected {want}"

def test_latency_aware_least_error_among_paying():
    "With tol=0 the choice is the least-error option that pays, whatever the speeds"
    conv = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1)).eval()
    cands = [('0', conv[0], 'tucker', ((1, 32, 8, 8), (1, 48, 8, 8)))]
    la = LatencyAware(keep=0.5, timer=by_method(dict(tucker=0.5, svd=0.4, spatial=0.3)), cache=LatencyCache(), tol=0.)
    la.ranks(conv, cands)
    from fasterai_lr.latency import _errors
    opts = [o for m in la.methods for o in keep_options(conv[0], m, 0.5)]
    best = min(_errors(conv[0], opts))
    assert abs(la.report.error[0] - best) < 1e-12, f"chose error {la.report.error[0]}, least is {best}"

def test_latency_aware_through_decompose():
    m = cnn()
    timer = Counting()
    la = LatencyAware(keep=0.5, timer=timer, cache=LatencyCache())
    dec,rep = decompose_model(m, rank=la, sample=(3, 16, 16), quiet=True)
    r = la.report.set_index('layer')
    d = r[r.method.notna()]
    assert (d.params_after <= 0.5*d.params + 1e-9).all(), f"an option over keep=0.5: {d[['params','params_after']]}"
    assert (r.ms_after <= r.ms).all(), "a layer got slower"
    done = rep.set_index('layer').method
    for n in r.index: assert (pd_isna(done[n]) == pd_isna(r.method[n])), f"{n}: the decomposer and the plan disagree"
    assert r.method.notna().any() and r.method.isna().any(), "the MAC+overhead timer should keep some layers and decompose others"
    x = torch.randn(2, 3, 16, 16)
    assert dec(x).shape == m(x).shape
    n = timer.groups
    decompose_model(m, rank=LatencyAware(keep=0.5, timer=timer, cache=la.timer.cache), sample=(3, 16, 16), quiet=True)
    assert timer.groups == n, "a second plan of the same model measured again"

def pd_isna(v):
    import pandas as pd
    return bool(pd.isna(v))

def test_latency_aware_needs_shapes():
    m = cnn()
    with pytest.raises(ValueError, match='sample='):
        Conv_Decomposer().decompose(m, rank=LatencyAware(timer=mac_timer, cache=LatencyCache()), quiet=True)
    with pytest.raises(ValueError, match='keep='): LatencyAware(keep=1.5)

# ---- the latency budget

@pytest.mark.parametrize('keep', [0.5, 0.6, 0.75])
@pytest.mark.parametrize('check', [False, True])
@pytest.mark.parametrize('baseline', ['given', 'as_run'])
def test_latency_budget_meets_budget(keep, check, baseline):
    "The decomposed model, run as `optimize` runs it (BatchNorms folded), keeps at most `keep` of the baseline's time"
    m, x = cnn(), torch.randn(1, 3, 16, 16)
    lb = LatencyBudget(keep=keep, timer=mac_timer, cache=LatencyCache(), check=check, baseline=baseline)
    try: dec,_ = decompose_model(m, rank=lb, sample=(3, 16, 16), quiet=True)
    except ValueError as e:
        assert baseline=='as_run' and 'cannot be met' in str(e), f"keep={keep}, {baseline}: {e}"; return
    base = m if baseline=='given' else fold_bn(copy.deepcopy(m))
    t0,t1 = mac_timer([base, fold_bn(copy.deepcopy(dec))], x)
    case = f"keep={keep}, check={check}, baseline={baseline}"
    assert t1/t0 <= keep + 1e-9, f"{case}: the decomposed model takes {t1/t0:.3f} of the time"
    assert lb.achieved <= keep + 1e-9 and abs(lb.estimate - t1/t0) < 1e-6, f"{case}: achieved {lb.achieved}, estimate {lb.estimate}, real {t1/t0}"
    assert t1/t0 > keep - 0.15, f"{case}: {t1/t0:.3f}, far under the budget (the allocation wastes error)"

def test_latency_budget_met_by_folding_alone_says_so():
    "A budget the folded dense model meets by itself leaves every layer whole, and says so: optimize() gives that speed, or baseline='as_run'"
    import warnings
    m, x = cnn(), torch.randn(1, 3, 16, 16)
    bns = lambda m: sum(isinstance(c, nn.BatchNorm2d) for c in m.modules())
    timer = lambda mods, x: [t + 1e-3*bns(m) for t,m in zip(mac_timer(mods, x), mods)]   # a BatchNorm costs 1 ms: folding pays
    t_given,t_dense = timer([m, fold_bn(copy.deepcopy(m))], x)
    keep = (1 + t_dense/t_given)/2                                       # looser than what folding alone gives
    with pytest.warns(UserWarning, match=r"met with no layer decomposed.*optimize\(model\).*baseline='as_run'"):
        dec,rep = decompose_model(m, rank=LatencyBudget(keep=keep, timer=timer, cache=LatencyCache()), sample=(3, 16, 16), quiet=True)
    assert rep['method'].isna().all(), rep
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                   # as_run: the decomposition's own speed-up, no such warning
        dec,rep = decompose_model(m, rank=LatencyBudget(keep=keep, timer=timer, cache=LatencyCache(), baseline='as_run'), sample=(3, 16, 16), quiet=True)
    assert rep['method'].notna().any(), rep

def test_latency_budget_speedup_and_limits():
    m = cnn()
    a = LatencyBudget(speedup=2, timer=mac_timer, cache=LatencyCache())
    assert a.keep == 0.5
    with pytest.raises(ValueError, match='cannot be met'):
        decompose_model(m, rank=LatencyBudget(keep=0.01, timer=mac_timer, cache=LatencyCache()), sample=(3, 16, 16), quiet=True)
    with pytest.raises(ValueError, match='one of'): LatencyBudget()
    with pytest.raises(ValueError, match='speedup'): LatencyBudget(speedup=0.5)

def blocks_inside_cost(extra:float):
    "A MAC timer under which a Factorized block inside a model costs `extra` (a fraction) more than alone: <0 as a runtime that fuses the graph"
    def timer(mods, x):
        out = []
        for m,t in zip(mods, mac_timer(mods, x)):
            ins = []
            hs = [b.register_forward_hook(lambda b,i,o: ins.append((b, i[0]))) for b in m.modules() if isinstance(b, Factorized) and b is not m]
            with torch.no_grad(): m(x)
            for h in hs: h.remove()
            out.append(t + extra*sum(mac_timer([b], xb)[0] for b,xb in ins))
        return out
    return timer

def test_latency_budget_tightens_when_the_sum_misses():
    "Under a timer where a block inside a model costs more than alone, the plan by the sum of parts misses; `check` tightens it until the model meets the budget"
    lumpy = blocks_inside_cost(0.3)   # a Factorized block inside a model costs 30% more than alone
    m, x = cnn(), torch.randn(1, 3, 16, 16)
    loose = LatencyBudget(keep=0.65, timer=lumpy, cache=LatencyCache(), check=False)
    t0,t1 = lumpy([m, fold_bn(decompose_model(m, rank=loose, sample=(3, 16, 16), quiet=True)[0])], x)
    assert t1/t0 > 0.65, f"the test's timer should make the unchecked plan miss (it took {t1/t0:.3f})"
    lb = LatencyBudget(keep=0.65, timer=lumpy, cache=LatencyCache(), rounds=5)
    t0,t1 = lumpy([m, fold_bn(decompose_model(m, rank=lb, sample=(3, 16, 16), quiet=True)[0])], x)
    assert t1/t0 <= 0.65 + 1e-9 and abs(lb.achieved - t1/t0) < 1e-9, f"checked plan: {t1/t0:.3f} of the time (achieved {lb.achieved:.3f})"

def test_latency_budget_loosens_after_an_overshoot():
    "A spike in the first whole-model timing makes the correction overshoot: the next rounds loosen halfway back, and the loosest plan that meets the budget is kept"
    calls = []
    def spiky(mods, x):   # the first plan's timing reads it 2× slow
        ts = mac_timer(mods, x)
        whole = len(mods) == 2 and all(sum(1 for _ in m.modules()) > 8 for m in mods)
        if whole: calls.append(1)
        return [ts[0], 2*ts[1]] if whole and len(calls) == 2 else ts   # (the first is the baseline, the second the first plan)
    m, x = cnn(), torch.randn(1, 3, 16, 16)
    one = LatencyBudget(keep=0.6, timer=spiky, cache=LatencyCache(), rounds=2); calls.clear()
    decompose_model(m, rank=one, sample=(3, 16, 16), quiet=True)
    three = LatencyBudget(keep=0.6, timer=spiky, cache=LatencyCache(), rounds=4); calls.clear()
    decompose_model(m, rank=three, sample=(3, 16, 16), quiet=True)
    assert one.achieved <= 0.6 + 1e-9 and three.achieved <= 0.6 + 1e-9
    assert three.achieved > one.achieved + 0.05, f"the later rounds should come back towards the budget: {one.achieved:.3f} → {three.achieved:.3f}"

def test_latency_budget_loosens_when_the_first_plan_overshoots():
    "A runtime that runs factor blocks faster inside the model than alone makes the first plan far faster than asked: the next rounds loosen it towards the budget (fewer error) and it still meets it"
    fused = blocks_inside_cost(-0.6)   # 60% less than alone, as a runtime that fuses the graph
    m = cnn()
    one = LatencyBudget(keep=0.6, timer=fused, cache=LatencyCache(), rounds=1)
    decompose_model(m, rank=one, sample=(3, 16, 16), quiet=True)
    assert one.achieved < 0.9*0.6, f"the test's timer should make the first plan overshoot (it took {one.achieved:.3f})"
    four = LatencyBudget(keep=0.6, timer=fused, cache=LatencyCache(), rounds=4)
    decompose_model(m, rank=four, sample=(3, 16, 16), quiet=True)
    assert 0.9*0.6 <= four.achieved <= 0.6 + 1e-9, f"loosened: {one.achieved:.3f} → {four.achieved:.3f} (budget 0.6)"

# ---- exact rewrites

def block_model():
    from torchvision.models.resnet import BasicBlock
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), BasicBlock(16, 16), nn.Flatten(1), nn.LazyLinear(8))

MODELS = dict(
    seq=lambda: cnn(),
    bias=lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8, affine=False)),
    linear_bn=lambda: nn.Sequential(nn.Flatten(), nn.Linear(3*16*16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)),
    decomposed=lambda: decompose_model(cnn(), 'tucker', keep=0.5, quiet=True)[0],
    resblock=lambda: block_model(),
)

@pytest.mark.parametrize('name', MODELS)
def test_fold_bn_exact(name):
    m = MODELS[name]()
    x = torch.randn(3, 3, 16, 16)
    m(x)   # materialize lazy layers
    m = randomize_bn(m).eval()
    with torch.no_grad():
        y = m(x)
        f = fold_bn(copy.deepcopy(m))
        left = [n for n,b in f.named_modules() if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d))]
        assert not left, f"{name}: BatchNorms left unfolded: {left}"
        assert torch.allclose(f(x), y, atol=1e-5, rtol=1e-5), f"{name}: folded output differs by {(f(x)-y).abs().max():.2e}"

def test_fold_bn_leaves_shared_outputs():
    "A conv whose output also goes elsewhere (a branch) keeps its BatchNorm: folding would change the other reader"
    class Branch(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        def forward(self, x): y = self.conv(x); return self.bn(y) + y
    m = randomize_bn(Branch()).eval()
    x = torch.randn(2, 3, 8, 8)
    f = fold_bn(copy.deepcopy(m))
    assert isinstance(f.bn, nn.BatchNorm2d), "folded a BatchNorm whose conv output is read twice"
    assert torch.allclose(f(x), m(x), atol=1e-6)

@pytest.mark.parametrize('rank', [None, 4, 8])
def test_merge_linear_exact_and_only_when_smaller(rank):
    "A linear bottleneck (1×1 → BN → 1×1 expansion): dense, the product would be bigger and nothing merges; decomposed by SVD, the inner factors merge"
    m = nn.Sequential(nn.Conv2d(96, 24, 1), nn.BatchNorm2d(24), nn.Conv2d(24, 144, 1), nn.ReLU(), nn.Conv2d(144, 8, 3)).eval()
    dec = randomize_bn(Conv_Decomposer().decompose(m, rank={'0': rank, '2': rank}, quiet=True) if rank else copy.deepcopy(m)).eval()
    x = torch.randn(2, 96, 8, 8)
    with torch.no_grad():
        f = merge_linear(fold_bn(copy.deepcopy(dec)))
        assert torch.allclose(f(x), dec(x), atol=1e-5, rtol=1e-4), f"rank {rank}: merging changed the output by {(f(x)-dec(x)).abs().max():.2e}"
    n = lambda m: sum(p.numel() for p in m.parameters())
    ids = sum(isinstance(c, nn.Identity) for c in f.modules())
    if rank: assert n(f) < n(dec) and ids >= 2, f"rank {rank}: expected the inner factors merged: {n(dec)} → {n(f)} parameters, {ids} identities"
    else: assert ids == 1, f"dense: only the BatchNorm should be gone, got {ids} identities ({n(dec)} → {n(f)} parameters)"

def test_no_merge_across_nonlinearity():
    m = nn.Sequential(nn.Conv2d(8, 64, 1), nn.ReLU(), nn.Conv2d(64, 2, 1)).eval()
    assert linked(m) == [('0', '1'), ('1', '2')]
    f = merge_linear(copy.deepcopy(m))
    assert not any(isinstance(c, nn.Identity) for c in f.modules()), "merged across a ReLU"

def test_linked_untraceable_falls_back_to_sequential():
    class Dyn(nn.Module):
        def __init__(self): super().__init__(); self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        def forward(self, x): return self.body(x) if x.sum() > -1e9 else x   # data-dependent: fx cannot trace it
    m = randomize_bn(Dyn()).eval()
    assert linked(m) == [('body.0', 'body.1')]
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(fold_bn(copy.deepcopy(m))(x), m(x), atol=1e-5)

def test_optimize_is_exact_and_a_copy():
    m = randomize_bn(decompose_model(cnn(), 'tucker', keep=0.5, quiet=True)[0]).train()
    x = torch.randn(2, 3, 16, 16)
    o = optimize(m, (3, 16, 16), timer=lambda mods, x: [2., 1.])   # the timer says channels_last is faster
    assert o.training is False and m.training, "optimize must return an eval copy and leave the model as it was"
    assert next(p for p in o.parameters() if p.ndim==4).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(): assert torch.allclose(o(x), m.eval()(x), atol=1e-5)

# ---- torch.compile

def test_compile_traces_decomposed_model():
    "Dynamo traces a decomposed, optimized model in one graph (aot_eager: no C++ compile, seconds)"
    m = optimize(decompose_model(cnn(), 'tucker', keep=0.5, quiet=True)[0], memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    c = torch.compile(m, backend='aot_eager', fullgraph=True)
    with torch.no_grad(): assert torch.allclose(c(x), m(x), atol=1e-5)

@pytest.mark.slow
def test_compile_inductor_decomposed_model():
    "inductor compiles a decomposed model on the CPU and matches eager (tens of seconds: slow)"
    m = optimize(decompose_model(cnn(), 'tucker', keep=0.5, quiet=True)[0], memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    c = torch.compile(m)
    with torch.no_grad(): assert torch.allclose(c(x), m(x), atol=1e-4)

def test_compile_model_tuned_for_inference():
    "compile_model (inductor, frozen weights, 1×1 convs as GEMMs, channels_last) matches eager on a Tucker-decomposed conv, for either input format, and leaves the model as it was"
    m = optimize(decompose_model(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1)), 'tucker', rank=(8, 8), quiet=True)[0],
                 memory_format=torch.contiguous_format)
    x = torch.randn(2, 16, 8, 8); torch._dynamo.reset()
    c = compile_model(m, x, COMPILE_OPTIONS)
    with torch.inference_mode():
        for xi in (x, x.to(memory_format=torch.channels_last)): assert torch.allclose(c(xi), m(xi), atol=1e-4)
    assert all(p.is_contiguous() for p in m.parameters()), "the caller's model keeps its memory format"
    fastest = in_runtime(m, x, 'compile')
    assert fastest(x).shape == (2, 32, 8, 8) and fastest.options in (COMPILE_OPTIONS, None)
    with pytest.raises(TypeError, match='dict of inductor settings'): compile_model(m, x, options='freezing')

def test_compiled_models_do_not_share_a_cache():
    """Every compiled model gets dynamo's cache to itself (past 8 models through one shared function dynamo would give up and run them
    eager), and its own static shapes (layers of one kind on inputs of different sizes, as a timer compiles them)"""
    torch._dynamo.reset()
    convs = [nn.Conv2d(4, 4+i, 3, stride=2, padding=1).eval() for i in range(10)]
    xs = [torch.randn(2, 4, 6+i, 6+i).to(memory_format=torch.channels_last) for i in range(10)]
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):   # a second graph on one code object fails
        runs = [compile_model(c, x, COMPILE_OPTIONS) for c,x in zip(convs, xs)]
        with torch.inference_mode(): assert all(torch.allclose(r(x), c(x), atol=1e-5) for r,c,x in zip(runs, convs, xs))

def test_latency_budget_with_layers_timed_slow_alone():
    "Layers timed alone may add up to more than the model that holds them (load drift, per-call overhead): the budget scales them to the model's total rather than give up"
    def drift(mods, x): return [t*(4 if isinstance(m, (nn.Conv2d, nn.Linear, Factorized)) else 1) for m,t in zip(mods, mac_timer(mods, x))]
    m, x = cnn(), torch.randn(1, 3, 16, 16)
    lb = LatencyBudget(keep=0.5, timer=drift, cache=LatencyCache(), check=True, rounds=8)   # the whole models, timed as they run, settle the rest
    dec,_ = decompose_model(m, rank=lb, sample=(3, 16, 16), head=True, quiet=True)   # (with the output Linear kept the 8 rounds end 0.07% over)
    t0,t1 = mac_timer([m, fold_bn(copy.deepcopy(dec))], x)
    assert lb.achieved <= 0.5 + 1e-9 and t1/t0 <= 0.5 + 1e-9, f"achieved {lb.achieved:.3f}, the model really takes {t1/t0:.3f} of the time"

def test_planned_copies_go_to_the_timers_device():
    "`planned` builds the timing copy on the device asked for (a GPU timer for a model left on the CPU), the model untouched"
    from fasterai_lr.latency import planned
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    new = planned(net, {'2': ('tucker', (8, 8))}, 'meta')
    assert {p.device.type for p in new.parameters()} == {'meta'} and not isinstance(new[2], nn.Conv2d)
    assert {p.device.type for p in net.parameters()} == {'cpu'} and isinstance(net[2], nn.Conv2d)
    assert next(planned(net, {}).parameters()).device.type == 'cpu'
