"Rank rules and budgets: totals against the budget, VBMF on known ranks and degenerate inputs, allocation optimality, search"
import itertools, math, warnings, pytest, torch, numpy as np
from torch import nn
from fasterai_lr.core import *
from fasterai_lr.factorize import tucker2, tucker2_to_tensor, svd_matrix, cp, cp_to_tensor, leading_subspace, unfold
from fasterai_lr.decompose import Conv_Decomposer, FC_Decomposer, decompose_model, report_totals
from fasterai_lr.ranks import *
from fasterai_lr.evaluate import *
from fasterai_lr.ranks import _greedy, _minmax, _spend

SAMPLE = (3, 16, 16)

def tiny_cnn(seed=0, spectra=True):
    "A small CNN with BN, a depthwise conv, a 1×1, a grouped conv and a Linear head; weights with decaying spectra"
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 48, 1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=2),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    if spectra:   # random weights have flat spectra; scale singular directions like a trained net's
        with torch.no_grad():
            for l in m.modules():
                if isinstance(l, (nn.Conv2d, nn.Linear)) and l.weight[0].numel() > 1:
                    W = l.weight.flatten(1)
                    U,S,V = torch.linalg.svd(W, full_matrices=False)
                    l.weight.copy_(((U*S*torch.linspace(1, 0.02, len(S))**1.5)@V).reshape(l.weight.shape))
    return m.eval()

def size(m): return sum(p.numel() for p in m.parameters())

# --- budgets land on what was asked -----------------------------------------------------------------------------------

@pytest.mark.parametrize('method,by,keep,round_to', [(m, b, k, 1) for m in ('tucker', 'svd') for b in ('params', 'macs') for k in (0.25, 0.4, 0.7)]
                         + [('tucker', 'params', 0.5, 4), ('spatial', 'macs', 0.5, 1)])
def test_plan_totals_within_2pct(method, by, keep, round_to):
    net = tiny_cnn()
    b = Budget(**{by: keep}, round_to=round_to, speed=None)   # how closely the allocation lands (the speed guard leaves cost unspent)
    plan = b.plan(net, method, sample=SAMPLE)
    new,rep = decompose_model(net, method, rank=plan, sample=SAMPLE, quiet=True)
    got = size(new)/size(net) if by=='params' else model_macs(new, SAMPLE)/model_macs(net, SAMPLE)
    case = f"{method} {by}={keep} round_to={round_to}"
    assert abs(got - b.achieved) < 1e-9, f"{case}: measured {got:.4f}, budget says {b.achieved:.4f}"
    assert 0.98*keep <= got <= keep, f"{case}: got {got:.4f}"
    assert set(rep.layer[rep.method.notna()]) == set(plan), f"{case}: decomposed {list(rep.layer[rep.method.notna()])}, plan {list(plan)}"

@pytest.mark.parametrize('by,keep', [('params', 0.5), ('params', 0.7), ('macs', 0.4)])
def test_decomposer_with_budget(by, keep):
    "Through Conv_Decomposer().decompose(rank=Budget): the Linear layers count as fixed; the budget is the whole model's (sample= is passed on)"
    net = tiny_cnn()
    cd = Conv_Decomposer()
    b = Budget(**{by: keep})
    new = cd.decompose(net, 'tucker', rank=b, sample=SAMPLE, quiet=True)
    got = size(new)/size(net) if by=='params' else model_macs(new, SAMPLE)/model_macs(net, SAMPLE)
    assert abs(got - b.achieved) < 1e-9 and 0.98*keep <= got <= keep, f"{by}={keep}: got {got:.4f}, budget says {b.achieved:.4f}"
    fc = FC_Decomposer()
    fc.decompose(net, rank=Budget(params=0.9), quiet=True)
    assert fc.report['method'].notna().any(), "FC_Decomposer takes a budget too"

def test_round_to_and_skips():
    net = nn.Sequential(nn.Conv2d(3, 20, 3), nn.ReLU(), nn.Conv2d(20, 40, 3), nn.ReLU(), nn.Conv2d(40, 6, 3), nn.Flatten(), nn.Linear(6*10*10, 1))
    b = Budget(params=0.5, round_to=8)
    plan = b.plan(net, 'tucker', head=True)   # the output Linear '6' too
    for n,r in plan.items(): assert all(x % 8 == 0 for x in (r if isinstance(r, tuple) else (r,))), f"{n}: rank {r} is not a multiple of 8"
    notes = b.report.set_index('layer')['note']
    for n in ('0', '4', '6'): assert notes[n].startswith('no rank is cheaper') and n not in plan, f"{n}: {notes[n]!r}"  # 3, 6, 1 channels < 8
    assert Budget(params=0.9).plan(net, 'tucker', head=True).get('6') is None, "a Linear 600→1: rank 1 costs more than the layer"
    new,_ = decompose_model(net, 'tucker', rank=plan, head=True, quiet=True)
    assert size(new)/size(net) <= 0.5 + 1e-9

def test_second_stage_plans_only_what_is_left():
    net = tiny_cnn()
    convs = Conv_Decomposer().decompose(net, 'tucker', keep=0.5, quiet=True)
    cands = candidates(convs, 'tucker', head=True)
    assert {n for n,*_ in cands} == {'12', '14'}, [n for n,*_ in cands]   # the Linears: not the factors, not the depthwise conv
    b = Budget(params=0.5, round_to=1)   # (any rank: the 2% below is the allocation's precision on two small Linears)
    plan = b.plan(convs, head=True)
    assert set(plan) <= {'12', '14'} and 0.98*0.5 <= b.achieved <= 0.5, (plan, b.achieved)

def test_budget_errors():
    net = tiny_cnn()
    with pytest.raises(ValueError, match='pass one of'): Budget()
    with pytest.raises(ValueError, match='outside'): Budget(params=1.5)
    with pytest.raises(ValueError, match='round_to'): Budget(params=0.5, round_to=0)
    with pytest.raises(ValueError, match='pass sample='): Budget(macs=0.5).plan(net)
    with pytest.raises(ValueError, match='ask for at least'): Budget(params=0.02).plan(net)
    with pytest.raises(ValueError, match="unknown method"): Budget(params=0.5).plan(net, 'tuckr')
    with pytest.raises(ValueError, match="no layer named"): Budget(params=0.5).plan(net, layers=['nope'])

def test_auto_method_picks_each_layers_method():
    "method='auto': the budget chooses each k×k conv's method with its rank (a 1×1 conv and the Linears: SVD); a {layer: (method, rank)} plan does too"
    net = tiny_cnn()
    b = Budget(params=0.4)
    new,rep = decompose_model(net, 'auto', rank=b, quiet=True)
    got = size(new)/size(net)
    assert abs(got - b.achieved) < 1e-9 and 0.98*0.4 <= got <= 0.4, f"got {got:.4f}, budget says {b.achieved:.4f}"
    done = rep.set_index('layer').method.dropna().to_dict()
    assert set(done.values()) <= set(LAYER_METHODS[nn.Conv2d]) and all(done[n]=='svd' for n in ('6', '12') if n in done), done
    new,rep = decompose_model(net, 'auto', rank={'0': ('cp', 4), '3': ('spatial', 6), '12': ('svd', 8)}, quiet=True)
    assert rep.set_index('layer').method.dropna().to_dict()=={'0': 'cp', '3': 'spatial', '12': 'svd'}, rep[['layer', 'method', 'rank']]

# --- error curves -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('G,O,I,k', [(1, 12, 8, 3), (2, 6, 5, 3), (1, 10, 4, 1)])
def test_rank_errors_exact(G, O, I, k):
    K = torch.randn(G, O, I, k, k, dtype=torch.float64)
    n2 = K.square().sum()
    for r in [(1, 1), (O, 2), (3, I), (O//2, I//2 or 1), (O, I)]:
        U,V = leading_subspace(unfold(K, 0), r[0]), leading_subspace(unfold(K, 1), r[1])   # truncated HOSVD
        e = (K-tucker2_to_tensor(torch.einsum('...oihw,...or,...is->...rshw', K, U, V), U, V)).square().sum()/n2
        assert torch.allclose(rank_errors(K, 'tucker', [r])[0], e, atol=1e-10), f"tucker {G}×{O}×{I}×{k} at {r}"
        hooi = (K-tucker2_to_tensor(*tucker2(K, r))).square().sum()/n2
        assert hooi <= e + 1e-10, f"tucker {G}×{O}×{I}×{k} at {r}: tucker2 {hooi} above the HOSVD bound {e}"
    for m in ('svd', 'spatial'):
        M = svd_matrix(K, m)
        for r in (1, min(M.shape[-2:])//2 or 1, min(M.shape[-2:])):
            U,S,V = torch.linalg.svd(M, full_matrices=False)
            e = (M - (U[...,:r]*S[...,None,:r])@V[...,:r,:]).square().sum()/n2
            assert torch.allclose(rank_errors(K, m, [r])[0], e, atol=1e-10), f"{m} {G}×{O}×{I}×{k} at {r}"

def test_cp_errors_monotone_and_fitted():
    K = torch.randn(1, 8, 6, 3, 3, dtype=torch.float64)
    ranks = list(range(2, 40, 2))
    e = rank_errors(K, 'cp', ranks)
    assert (e[1:] <= e[:-1]).all() and (e > 0).all() and (e < 1).all(), e
    r = ranks[-1]   # a fitted point: the curve goes through the ALS fit there
    fit = (K-cp_to_tensor(cp(K, r, n_iter=10))).square().sum()/K.square().sum()
    assert abs(e[-1]-fit) < 1e-9, (e[-1], fit)

# --- allocation -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(6))
def test_greedy_optimal_on_unit_steps(seed):
    "Separable convex errors, unit cost steps: greedy + fill is optimal (brute force over all allocations)"
    rng = np.random.default_rng(seed)
    L, n = 3, 6
    errs = [np.concatenate([[1.], 1-np.cumsum(np.sort(rng.random(n-1))[::-1]/rng.uniform(1, 3))]).clip(0) for _ in range(L)]
    errs = [e*rng.uniform(0.2, 5) for e in errs]
    costs = [np.arange(1., n+1) for _ in range(L)]
    for limit in range(L, L*n+1):
        pick = _spend(costs, errs, _greedy(costs, errs, limit), limit)
        best = min(sum(e[j] for e,j in zip(errs, js)) for js in itertools.product(range(n), repeat=L) if sum(js)+L <= limit)
        got = sum(e[j] for e,j in zip(errs, pick))
        assert sum(c[j] for c,j in zip(costs, pick)) <= limit and got <= best + 1e-12, f"seed {seed}, limit {limit}: {got} > {best}"

def test_fill_exchanges():
    "A layer at its original, the next step of another just too big: one moves down to pay for the other's step up"
    costs = [np.array([50., 95, 100]), np.array([10., 40])]
    errs = [np.array([0.5, 0.001, 0.]), np.array([0.005, 0.])]
    pick = _greedy(costs, errs, 135)
    assert pick == [2, 0], pick                                  # slopes sent all of A's steps first; B's step no longer fits
    assert _spend(costs, errs, pick, 135) == [1, 1]              # error 0.005 → 0.001, cost 135
    assert _spend(costs, errs, [2, 0], 130) == [2, 0]            # B's step cannot be paid for: the budget is left unspent

@pytest.mark.parametrize('seed', range(4))
def test_minmax_optimal(seed):
    rng = np.random.default_rng(seed)
    L, n = 3, 5
    costs = [np.sort(rng.uniform(1, 10, n)) for _ in range(L)]
    errs = [np.append(np.sort(rng.random(n-1))[::-1], 0.) for _ in range(L)]
    for limit in np.linspace(sum(c[0] for c in costs), sum(c[-1] for c in costs), 7):
        pick = _minmax(costs, errs, limit)
        best = min(max(e[j] for e,j in zip(errs, js)) for js in itertools.product(range(n), repeat=L) if sum(c[j] for c,j in zip(costs, js)) <= limit)
        assert sum(c[j] for c,j in zip(costs, pick)) <= limit + 1e-9 and max(e[j] for e,j in zip(errs, pick)) == best, f"seed {seed}, limit {limit:.2f}"

def unbiased(net):
    "`net` with its biases at zero: its outputs are then all signal (tiny_cnn's biases swamp what random inputs make of its weights)"
    with torch.no_grad():
        for l in net.modules():
            if isinstance(l, (nn.Conv2d, nn.Linear)): l.bias.zero_()
    return net

def calibrated_budget(k, sequential=False):
    """tiny_cnn, 4 calibration batches, the uniform data-aware decomposition at keep=`k` and a data-aware Budget of its size (each layer
    fitted alone unless `sequential`: the exact per-layer output errors the budget's curves read)"""
    from fasterai_lr.calibrate import Calibration
    net = unbiased(tiny_cnn())
    xs = list(torch.randn(128, *SAMPLE, generator=torch.Generator().manual_seed(0)).split(32))
    cal = Calibration(xs, sequential=sequential)
    uni,_ = decompose_model(net, 'tucker', keep=k, quiet=True, calib=cal)
    b = Budget(params=size(uni)/size(net), calib=cal)
    glob,_ = decompose_model(net, 'tucker', rank=b, quiet=True, calib=cal)
    return net, xs, uni, b, glob

def out_err(m, net, xs):
    x = torch.cat(xs)
    with torch.no_grad(): y = net(x); return ((m(x)-y).norm()/y.norm()).item()

@pytest.mark.parametrize('k', [0.3, 0.5])
def test_budget_beats_uniform_on_output_error(k):
    "A data-aware Budget (calib=) against the uniform data-aware decomposition of the same size: no more parameters, no more output error"
    net,xs,uni,b,glob = calibrated_budget(k)
    e,eu = out_err(glob, net, xs), out_err(uni, net, xs)
    assert size(glob) <= size(uni) and e <= eu, f"keep={k}: budget {size(glob)} parameters, output error {e:.4f}; uniform {size(uni)}, {eu:.4f}"

def test_budget_checks_plans_end_to_end():
    "`.checked`: the whole model's output error of each candidate plan on the calibration data; `.chosen`: the least; the decomposed model has that error"
    net,xs,uni,b,glob = calibrated_budget(0.4)
    assert 'greedy' in b.checked and set(b.checked) <= {'greedy', 'minmax', 'uniform', 'greedy, sensitivity'}, b.checked
    assert all(0 < v < 1 for v in b.checked.values()), b.checked
    assert b.chosen == min(b.checked, key=b.checked.get), (b.chosen, b.checked)
    e = out_err(glob, net, xs[:2])                                        # the check runs on the first 2 calibration batches
    assert abs(e - b.checked[b.chosen]) <= 1e-4*e, f"the decomposed model's output error {e:.6f}, the check says {b.checked[b.chosen]:.6f}"
    plain = Budget(params=0.4); plain.plan(net)
    assert plain.checked is None and plain.chosen is None, "a weight-only budget checks nothing"
    plain.plan(net, calib=b.calib)                                        # calib= may come with the call instead
    assert plain.chosen in plain.checked, plain.checked
    with pytest.raises(TypeError, match=r'Budget\(sensitivity=\) is replaced by calib=Calibration'): Budget(params=0.5, sensitivity=xs[0])

def test_minmax_budget_and_weights():
    net = tiny_cnn()
    b = Budget(params=0.4, alloc='minmax')
    b.plan(net)
    assert 0.98*0.4 <= b.achieved <= 0.4, b.achieved
    heavy = Budget(params=0.4, weights={'12': 100.})   # the first Linear's errors count 100×: it keeps more
    heavy.plan(net)
    plain = Budget(params=0.4); plain.plan(net)
    c = lambda b: b.report.set_index('layer').loc['12', 'params_after']
    assert c(heavy) > c(plain), (c(heavy), c(plain))

# --- VBMF -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('L,M,r,noise', [(50, 100, 5, 0.1), (50, 100, 5, 1.), (100, 100, 10, 1.), (64, 576, 8, 0.5),
                                         (200, 60, 12, 2.), (30, 30, 3, 0.5), (128, 1152, 20, 1.), (16, 40, 1, 0.3)])
def test_vbmf_recovers_rank(L, M, r, noise):
    g = torch.Generator().manual_seed(L*M+r)
    Y = torch.randn(L, r, generator=g) @ torch.randn(r, M, generator=g) + noise*torch.randn(L, M, generator=g)
    assert vbmf_rank(Y) == r, f"{L}×{M} rank {r} noise {noise}: got {vbmf_rank(Y)}"

@pytest.mark.parametrize('name,M', [('rank-1', torch.randn(6, 1)@torch.randn(1, 9)), ('zeros', torch.zeros(7, 5)), ('2x2', torch.tensor([[3., 1], [1, 2]])),
                                    ('1xN', torch.randn(1, 12)), ('Nx1', torch.randn(12, 1)), ('1x1', torch.tensor([[2.]])),
                                    ('noise', torch.randn(40, 80)), ('dead rows', torch.cat([torch.randn(30, 4)@torch.randn(4, 50)+0.1*torch.randn(30, 50), torch.zeros(5, 50)])),
                                    ('exact rank 5', torch.randn(40, 5, dtype=torch.float64)@torch.randn(5, 40, dtype=torch.float64)), ('exact rank 5 f32', torch.randn(40, 5)@torch.randn(5, 40)), ('int', torch.randint(-3, 4, (8, 8)))])
def test_vbmf_degenerate(name, M):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        r = vbmf_rank(M)
    assert isinstance(r, int) and 1 <= r <= min(M.shape), f"{name}: {r}"
    if name in ('rank-1', 'exact rank 5', 'exact rank 5 f32', 'dead rows'): assert r == {'rank-1': 1, 'exact rank 5': 5, 'exact rank 5 f32': 5, 'dead rows': 4}[name], f"{name}: {r}"

def test_vbmf_fallback_warns_and_rejects_bad_input():
    with pytest.warns(UserWarning, match='energy rule'): r = vbmf_rank(torch.tensor([[3., 1], [1, 2]]), energy=0.99)
    assert r == 2
    with pytest.raises(ValueError, match='NaN'): vbmf_rank(torch.tensor([[1., float('nan')], [0, 1]]))
    with pytest.raises(ValueError, match='matrix'): vbmf_rank(torch.randn(5))
    g = torch.Generator().manual_seed(0)
    stack = torch.stack([torch.randn(30, 2, generator=g)@torch.randn(2, 60, generator=g), torch.randn(30, 6, generator=g)@torch.randn(6, 60, generator=g)])
    assert vbmf_rank(stack + 0.05*torch.randn(2, 30, 60, generator=g)) == 6, "a stack gives the largest rank"

def test_vbmf_rule():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(24, 40, 3)
    with torch.no_grad(): conv.weight.copy_(torch.einsum('or,is,rshw->oihw', torch.randn(40, 5, generator=g), torch.randn(24, 7, generator=g),
                                                         torch.randn(5, 7, 3, 3, generator=g)) + 0.02*torch.randn(40, 24, 3, 3, generator=g))
    assert VBMF().rank(conv, 'tucker') == (5, 7)
    assert VBMF(round_to=4).rank(conv, 'tucker') == (8, 8)
    lin = nn.Linear(60, 30)
    with torch.no_grad(): lin.weight.copy_(torch.randn(30, 3, generator=g)@torch.randn(3, 60, generator=g) + 0.05*torch.randn(30, 60, generator=g))
    plan = VBMF().ranks(None, [('c', conv, 'svd', None), ('l', lin, 'svd', None)])
    assert plan == {'c': 5, 'l': 3}, plan
    with pytest.raises(ValueError, match='no CP rank'): VBMF().rank(conv, 'cp')
    new = Conv_Decomposer().decompose(nn.Sequential(conv), 'tucker', rank=VBMF(), head=True, quiet=True)   # (the one conv is the output layer)
    assert new[0].rank == (5, 7)

# --- search and sweep -------------------------------------------------------------------------------------------------

def tiny_eval():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): y = net(x)
    def evaluate(m):
        with torch.no_grad(): return 1 - ((m(x)-y).norm()/y.norm()).item()
    return net, evaluate

def test_search_reproducible_and_a_front():
    torch.manual_seed(0)
    net, evaluate = tiny_eval()
    tuned = []
    a = search_ranks(net, evaluate, sample=(3, 8, 8), n_trials=5, seed=3, finetune=lambda m: tuned.append(1))
    b = search_ranks(net, evaluate, sample=(3, 8, 8), n_trials=5, seed=3)
    assert len(tuned) == 5, "finetune runs once a trial"
    assert a.drop(columns='plan').equals(b.drop(columns='plan')) and list(a.plan) == list(b.plan), (a, b)
    assert (a.macs <= a.keep + 1e-9).all() and a.macs.is_monotonic_increasing and a.accuracy.is_monotonic_increasing, a
    new,_ = decompose_model(net, 'tucker', rank=a.plan.iloc[0], quiet=True)
    assert abs(evaluate(new) - a.accuracy.iloc[0]) < 1e-9
    c = search_ranks(net, evaluate, by='params', n_trials=3, seed=0, sampler='nsga2')
    assert len(c) >= 1 and {'params', 'keep', 'plan'} <= set(c.columns)
    with pytest.raises(ValueError, match='needs sample='): search_ranks(net, evaluate, n_trials=1)

def test_sweep_and_plot():
    import matplotlib; matplotlib.use('Agg')
    net, evaluate = tiny_eval()
    df = sweep(net, evaluate, (3, 8, 8), fractions=(0.4, 0.8), by='keep', finetune=lambda m: None)
    assert list(df.rule) == ['original', 'keep', 'keep'] and (df.latency_ms > 0).all() and (df.accuracy_ft == df.accuracy).all(), df
    df = sweep(net, evaluate, (3, 8, 8), fractions=(0.5,), by='params', latency=False)
    assert 'latency_ms' not in df and 0.45 <= df.params.iloc[1] <= 0.5, df   # the sweep's mechanics; budget accuracy (2%) is tested above on models with finer rank steps
    fig = plot_sweep(df)
    assert len(fig.axes) == 1
