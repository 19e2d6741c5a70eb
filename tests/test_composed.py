"""The composed path: one Calibration for the factors, the budget's curves and the check of its plan; method='auto';
every kind of batch; sequential calibration in one pass; balanced data-aware factors; the callback with all of it"""
import copy, pytest, torch, numpy as np, torch.nn as nn, torch.nn.functional as F
from fastai.callback.schedule import *
from fastai.torch_core import set_seed
from fasterai_lr.layers import Factorized, component_norms, kernel
from fasterai_lr.decompose import decompose_model, Conv_Decomposer, FC_Decomposer, HEAD_NOTE
from fasterai_lr.ranks import Budget, candidates, layer_curves, n_params, rank_errors
from fasterai_lr.calibrate import Calibration, block_kernel
from fasterai_lr.callback import DecomposeCallback
from fasterai_lr.cli import digits_dls, digits_learner

def smooth(n, c=3, hw=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, c, hw+4, hw+4, generator=g), 5, 1, 0)*3

def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()

def rel(m, ref, x):
    with torch.no_grad(): y = ref(x); return ((m(x)-y).norm()/y.norm()).item()

DATA = [smooth(32, seed=s) for s in range(4)]
TEST = smooth(64, seed=9)

# ---- the budget reads output errors on the calibration data

@pytest.mark.parametrize('method', ['svd', 'spatial', 'tucker', 'cp'])
def test_curves_are_output_errors(method):
    "A data-aware curve's error at a rank is the layer's measured output error there (weight errors are not)"
    net = cnn()
    cal = Calibration(DATA, damp=0)
    cands = [c for c in candidates(net, method) if c[0]=='2']
    cal.prepare(net, ['2'])
    c, = layer_curves(cands, calib=cal)
    w, = layer_curves(cands)
    j = len(c.ranks)//3
    blk = cal.build('2', net[2], c.method if method!='svd' else 'svd', c.ranks[j])
    with torch.no_grad():
        x = torch.cat([net[:2](d) for d in DATA]); y = net[2](x) - net[2].bias[:,None,None]
        e = ((blk(x) - net[2].bias[:,None,None] - y).square().sum()/y.square().sum()).item()
    tol = 1e-3
    assert abs(e - c.err[j]) <= tol*max(e, 1e-6) + 1e-6, f"{method}: curve {c.err[j]:.5f}, measured {e:.5f}"
    if method!='cp': assert abs(w.err[0] - c.err[0]) > 1e-3, f"{method}: the curve looks like the weight curve"   # (CP at rank 1: both near 1, 0.983 and 0.978; all ranks below)
    weight = rank_errors(kernel(net[2]), method, c.ranks[:-1]).numpy()   # the weight-only curve at the same ranks (CP: from its ALS fits, as layer_curve draws it)
    gap = np.abs(c.err[:-1] - weight).max()                              # 0 if the data-aware curve fell back to the weight errors
    assert gap > 0.05, f"{method}: the curve is within {gap:.4f} of the weight-only curve at its ranks {c.ranks[:-1]}"

def separable_and_lowrank(seed=0):
    "conv '0': a spatially separable kernel of full channel rank; conv '2': channel rank 2 with random spatial taps"
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.einsum('rih,orw->oihw', torch.randn(2, 3, 3), torch.randn(24, 2, 3)))
        net[2].weight.copy_(torch.einsum('or,rihw->oihw', torch.randn(24, 2), torch.randn(2, 24, 3, 3)))
    return net

def test_auto_picks_the_method_that_wins():
    net = separable_and_lowrank()
    b = Budget(params=0.15, calib=Calibration(DATA))
    small,rep = decompose_model(net, 'auto', rank=b, quiet=True)
    meth = rep.set_index('layer')['method'].to_dict()
    assert meth['0'] == 'spatial' and meth['2'] in ('svd', 'tucker'), meth
    assert rel(small, net, TEST) < 1e-3, rel(small, net, TEST)
    assert n_params(small) <= 0.15*n_params(net) + 1, (n_params(small), n_params(net))

@pytest.mark.parametrize('method', ['tucker', 'svd', 'auto'])
@pytest.mark.parametrize('by', ['params', 'macs'])
def test_plan_never_worse_than_uniform(method, by):
    net = cnn()
    b = Budget(**{by: 0.35}, calib=Calibration(DATA), sample=(3, 12, 12), speed=None)   # the plans compared at one cost (no guard)
    decompose_model(net, method, rank=b, sample=(3, 12, 12), quiet=True)
    uniform = [v for k,v in b.checked.items() if k.startswith('uniform')]
    assert uniform and b.checked[b.chosen] <= min(uniform) + 1e-12, b.checked
    assert b.achieved <= 0.35 + 1e-9, b.achieved

def test_one_calibration_draws_once():
    "A shuffled loader gives other batches each time: the budget and the factors must see the same ones"
    draws = []
    class Shuffled:
        def __iter__(self):
            draws.append(1); g = torch.Generator().manual_seed(len(draws))
            return iter([(smooth(16, seed=int(torch.randint(100, (1,), generator=g))), None) for _ in range(3)])
    cal = Calibration(Shuffled(), n_batches=3)
    decompose_model(cnn(), 'tucker', rank=Budget(params=0.5), calib=cal, quiet=True)
    assert len(draws) == 1, f"the calibration data were drawn {len(draws)} times"

# ---- every kind of batch

class Pair(nn.Module):
    "A model of two inputs: model(a, b), or model(**dict(a=..., b=...))"
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.fa,self.fb,self.out = nn.Linear(12, 32), nn.Linear(12, 32), nn.Linear(32, 5)
    def forward(self, a, b): return self.out(torch.relu(self.fa(a) + self.fb(b)))

def correlated(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * torch.logspace(0, -1.5, d)

@pytest.mark.parametrize('form', ['tuple', 'dict'])
def test_multi_input_batches(form):
    m = Pair().eval()
    xs = [(correlated(64, seed=s), correlated(64, seed=s+10), torch.zeros(64)) for s in range(3)]
    data = [dict(a=a, b=b) for a,b,_ in xs] if form=='dict' else xs
    cal = Calibration(data, n_inp=2 if form=='tuple' else None, damp=0)
    w = FC_Decomposer().decompose(m, rank=3, quiet=True)
    c = FC_Decomposer().decompose(m, rank=3, quiet=True, calib=cal)
    a,b = correlated(128, seed=50), correlated(128, seed=60)
    with torch.no_grad():
        y = m(a, b); err = lambda n: ((n(a, b)-y).norm()/y.norm()).item()
        assert err(c) < 0.7*err(w), (form, err(c), err(w))
    assert isinstance(c.fa, Factorized) and isinstance(c.fb, Factorized) and not isinstance(c.out, Factorized)

def test_batch_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"calibration batch 0 \(\(2, 5, 8, 8\)\) does not run through the model"):
        Conv_Decomposer().decompose(cnn(), calib=Calibration([torch.randn(2, 5, 8, 8)]), quiet=True)
    with pytest.raises(ValueError, match='calibration batch 0'):
        decompose_model(Pair(), 'svd', rank=Budget(params=0.5), calib=Calibration([dict(a=torch.randn(2, 12))]), quiet=True)

# ---- sequential calibration: one pass, the same factors as a pass per layer

class Branchy(nn.Module):
    "A residual block, and a branch only some batches take (data-dependent control flow)"
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.a,self.b,self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
    def forward(self, x):
        h = torch.relu(self.a(x)); h = h + torch.relu(self.b(h))
        if x.mean() > 0: h = self.c(h)                            # taken by some batches only
        return self.head(h.mean((2, 3)))

def test_sequential_one_pass_equals_pass_per_layer():
    m = Branchy().eval()
    data = [smooth(8, seed=s) + (0.5 if s % 2 else -0.5) for s in range(4)]
    names = ['a', 'b', 'c']
    one = Calibration(data, sequential=True)
    new = copy.deepcopy(m)
    for n,blk in one.prepare(new, names).blocks([(n, new.get_submodule(n), 'svd', 5) for n in names]).items(): new.set_submodule(n, blk)
    per = Calibration(data, sequential=True)
    old = copy.deepcopy(m); per.prepare(old, names)
    for n in names: old.set_submodule(n, per.build(n, old.get_submodule(n), 'svd', 5))
    x = torch.cat(data)
    with torch.no_grad():
        for n in names:
            torch.testing.assert_close(new.get_submodule(n)(torch.randn(2, 3 if n=='a' else 16, 6, 6, generator=torch.Generator().manual_seed(1))),
                                       old.get_submodule(n)(torch.randn(2, 3 if n=='a' else 16, 6, 6, generator=torch.Generator().manual_seed(1))), atol=1e-4, rtol=1e-4, msg=n)

def test_sequential_failure_in_one_batch_raises_cleanly():
    data = [smooth(4, seed=0), torch.randn(4, 5, 12, 12)]             # the second batch does not fit the first conv
    with pytest.raises(ValueError, match='calibration batch 1'):
        Conv_Decomposer().decompose(cnn(), 'svd', keep=0.3, calib=Calibration(data, sequential=True), quiet=True)

# ---- factors that train: balanced scales, data-aware too

@pytest.mark.parametrize('method', ['svd', 'spatial', 'tucker', 'cp'])
@pytest.mark.parametrize('sequential', [False, True])
def test_data_aware_factors_are_balanced(method, sequential):
    new,_ = decompose_model(cnn(), method, keep=0.3, quiet=True, head=True, calib=Calibration(DATA, sequential=sequential))
    blocks = [m for m in new.modules() if isinstance(m, Factorized)]
    assert blocks
    for blk in blocks:
        for ns in component_norms(blk):
            ratio = (ns.max(0).values/ns.min(0).values.clamp_min(1e-30)).max().item()
            assert ratio < 1 + 1e-4, f"{blk.source} {blk.method}: component norms differ by {ratio:.3g}×"

# ---- the callback composes it all

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=128)

@pytest.mark.parametrize('calib', ['true', 'object'])
def test_callback_budget_calibration_auto(dls, calib):
    set_seed(0)
    learn = digits_learner(dls, c=8)
    cal = True if calib=='true' else Calibration(dls.train, n_batches=3)
    cb = DecomposeCallback(start_epoch=1, method='auto', rank=Budget(params=0.5), calib=cal, verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3, cbs=cb)
    assert isinstance(cb.calib_used, Calibration) and cb.calib_used.xs is not None
    rep = cb.report.set_index('layer')
    assert rep['method'].notna().sum() >= 2, rep
    head = [n for n,m in learn.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    assert rep.loc[head, 'note'] == HEAD_NOTE, rep.loc[head]
    with learn.no_bar(), learn.no_logging(): loss, acc = learn.validate()[:2]
    assert cb.totals['params_after'].iloc[0] <= 0.5*cb.totals['params'].iloc[0] + 1, cb.totals
    assert loss == loss, "the decomposed model trained into NaN"

def test_bad_input_of_the_composed_path():
    net = cnn()
    with pytest.raises(ValueError, match="method='auto' lets a rank budget choose"): decompose_model(net, 'auto', keep=0.5, quiet=True)
    with pytest.raises(ValueError, match="method='auto' lets a rank budget choose"): DecomposeCallback(method='auto', keep=0.5)
    with pytest.raises(ValueError, match='cannot be met'): decompose_model(net, 'tucker', rank=Budget(params=0.01), calib=Calibration(DATA), quiet=True)
    with pytest.raises(TypeError, match='replaced by calib=Calibration'): Budget(params=0.5, sensitivity=DATA)
    with pytest.raises(TypeError, match='pass True'): DecomposeCallback(calib='yes')
    with pytest.raises(ValueError, match='n_inp='): Calibration(DATA, n_inp=0)

class Twins(nn.Module):
    "Two identical branches, one scaled by 0.01: its errors reach the output 10⁴ times less"
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a,self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head((self.a(h) + 0.01*self.b(h)).mean((2, 3)))

def test_sensitivity_spends_where_the_output_feels_it():
    net = Twins().eval()
    b = Budget(params=0.45, calib=Calibration(DATA))
    decompose_model(net, 'svd', rank=b, quiet=True)
    r = b.report.set_index('layer')
    assert b.chosen == 'greedy, sensitivity', b.checked
    assert r.loc['b', 'params_after'] < r.loc['a', 'params_after'], r[['params', 'params_after']]

# ---- VBMF with a calibration: an SVD's rank from the layer's outputs on the data

def _low_rank_inputs(n=256, c=64, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, c, generator=g) + 0.01*torch.randn(n, c, generator=g)

def test_vbmf_with_calib_ranks_by_the_outputs():
    "Weights with no low-rank structure of their own, inputs in 6 directions: VBMF on the weights says rank 1, on the outputs 6"
    from fasterai_lr.ranks import VBMF
    torch.manual_seed(0)
    m, X = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4)), _low_rank_inputs()
    errs = {}
    for name,calib in (('weights', None), ('outputs', Calibration(X))):
        small,rep = decompose_model(m, 'svd', rank=VBMF(), calib=calib, layers=['0'], quiet=True, sample=X[:1])
        errs[name] = (rep.set_index('layer').loc['0', 'rank'], rel(small[0], m[0], X))
    assert errs['weights'][0]==1 and errs['weights'][1] > 0.5, errs
    assert errs['outputs'][0]==6 and errs['outputs'][1] < 0.01, errs

@pytest.mark.parametrize('kind', ['linear', '1x1', '3x3 stride 2', '3x1 dilated', 'grouped 1x1'])
def test_vbmf_with_calib_is_vbmf_of_the_whitened_kernel(kind):
    """The rank is empirical VBMF of the singular values of W·S (G = SSᵀ the input's patch Gram), computed here from the unfolded inputs;
    a grouped conv's groups share a rank: their spectra summed, rank by rank"""
    from fasterai_lr.ranks import VBMF, spectrum_rank
    torch.manual_seed(0)
    layer = {'linear': nn.Linear(24, 40), '1x1': nn.Conv2d(24, 40, 1), '3x3 stride 2': nn.Conv2d(6, 40, 3, stride=2, padding=1),
             '3x1 dilated': nn.Conv2d(8, 40, (3, 1), dilation=2, padding=(2, 0)), 'grouped 1x1': nn.Conv2d(24, 40, 1, groups=2)}[kind].eval()
    if isinstance(layer, nn.Linear): X = _low_rank_inputs(512, 24, 5); P = X.double()[None]   # 1 group × rows × inputs
    else:
        X = _low_rank_inputs(16*36, layer.in_channels, 5).view(16, 6, 6, -1).permute(0, 3, 1, 2).contiguous()   # channels in 5 directions
        P = F.unfold(X.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride)       # N × I·k × L
        P = P.unflatten(1, (layer.groups, -1)).permute(1, 0, 3, 2).flatten(1, 2)                       # groups × rows × I/g·k
    m = nn.Sequential(layer)
    rank = VBMF().ranks(m, candidates(m, 'svd', sample=X[:1], head=True), calib=Calibration([X], damp=0))['0']
    W = kernel(layer).flatten(2).double()                                                              # groups × O/g × I/g·k
    s2 = sum(torch.linalg.eigvalsh(w @ p.mT @ p @ w.mT).clamp_min(0).flip(0) for w,p in zip(W, P))[:min(W.shape[1:])]   # Σ_g σ², largest first
    assert rank == spectrum_rank(s2.sqrt(), *sorted(W.shape[1:])), kind
    assert 1 < rank < min(W.shape[1:]), (kind, rank)                                                     # (neither end: a real estimate)

@pytest.mark.parametrize('conv', [nn.Conv2d(8, 24, 3, padding=1), nn.Conv2d(8, 24, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), bias=False)])
def test_vbmf_with_calib_tucker_ranks_by_outputs_and_whitened_inputs(conv):
    """Tucker-2 with calib: r_out from the outputs' spectrum, r_in from the input-channel unfolding whitened by the inputs' channel Gram
    (Cin^½·K₍₁₎), both computed here from the data; spatial SVD and a layer fitted weight-only still read the weights"""
    from fasterai_lr.ranks import VBMF, spectrum_rank
    from fasterai_lr.factorize import unfold
    torch.manual_seed(0)
    X = _low_rank_inputs(16*100, 8, 3).view(16, 10, 10, 8).permute(0, 3, 1, 2).contiguous()    # channels in 3 directions
    m = nn.Sequential(conv.eval())
    cands = candidates(m, 'tucker', sample=X[:1], head=True)
    r_out,r_in = VBMF().ranks(m, cands, calib=Calibration([X], damp=0))['0']
    with torch.no_grad(): Y = (conv(X) - (0 if conv.bias is None else conv.bias[:,None,None])).double().transpose(0, 1).flatten(1)   # O × rows
    Xc = X.double().transpose(0, 1).flatten(1)                                                   # I × rows
    K = conv.weight.double()
    lam,V = torch.linalg.eigh(Xc@Xc.T)
    s_in = torch.linalg.svdvals((V*lam.clamp_min(0).sqrt())@V.T@unfold(K, 1))
    assert (r_out, r_in) == (spectrum_rank(torch.linalg.svdvals(Y), *sorted((24, 8*K[0,0].numel()))), spectrum_rank(s_in, *sorted(unfold(K, 1).shape)))
    assert r_in <= 4 and r_out > 1, (r_out, r_in)                   # (the inputs fill 3 directions)
    assert VBMF().ranks(m, candidates(m, 'spatial', sample=X[:1], head=True), calib=Calibration([X])) == {'0': VBMF().rank(conv, 'spatial')}
    lstm = nn.Sequential(nn.LSTM(16, 8, batch_first=True))
    cands = candidates(lstm, 'svd', sample=torch.randn(1, 5, 16), head=True)
    assert VBMF().ranks(lstm, cands, calib=Calibration([torch.randn(4, 5, 16)])) == VBMF().ranks(lstm, cands)

def test_callback_vbmf_calibration_fine_tunes(dls):
    """DecomposeCallback(rank=VBMF(), calib=True) on a trained learner: ranks from the outputs at the swap, factors fitted sequentially,
    four times the weights' share of the parameters, and it fine-tunes to within 3 points of the dense accuracy (from the weights: 11%;
    fitted layer by layer: 9 points under)"""
    from fasterai_lr.ranks import VBMF
    set_seed(0)
    learn = digits_learner(dls, c=8)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2); dense_acc = learn.validate()[1]
    weights = Conv_Decomposer().decompose(copy.deepcopy(learn.model), 'svd', rank=VBMF(), quiet=True)
    cb = DecomposeCallback(start_epoch=0, method='svd', rank=VBMF(), calib=True, verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3, cbs=cb); loss, acc = learn.validate()[:2]
    rep = cb.report.dropna(subset=['method']).set_index('layer')['rank']
    assert len(rep) >= 2 and (rep > 1).all(), rep                          # (on the weights: rank 1 for the first conv)
    assert n_params(learn.model) > 3*n_params(weights), (n_params(learn.model), n_params(weights))
    assert loss == loss and acc > dense_acc - 0.03, (acc, dense_acc)

def test_sequential_fits_each_layer_once(monkeypatch):
    """The lockstep fits each layer once: a batch that finished its forward right after the last layer's fit, while the others had not yet
    left that layer, fitted it again (harmless alone; under DDP a second all-reduce the other processes never join: a hang)"""
    from fasterai_lr import calibrate
    fits = []
    orig = calibrate.Stats.all_reduce
    def counted(self, paired=False):
        if paired: fits.append(id(self))
        return orig(self, paired)
    monkeypatch.setattr(calibrate.Stats, 'all_reduce', counted)
    m = cnn()
    for i in range(30):
        fits.clear()
        decompose_model(m, 'svd', keep=0.5, calib=Calibration([smooth(4, seed=s) for s in range(6)], sequential=True), quiet=True)
        assert len(fits)==len(set(fits)), f"run {i}: a layer was fitted {len(fits)-len(set(fits))} extra times"
