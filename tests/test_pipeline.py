"""Issue 16: every layer kind through the whole pipeline at once. A model with an embedding, a bag, a Conv1d, a self-attention and
Linears through `Budget` (weight-only, by parameters and MACs, data-aware), `VBMF`, `LatencyBudget`, `LatencyAware` and the callback;
an attention's projections in the rank rules; data-aware embeddings (row counts, the weighted fit, its optimality); calibration of
timm's dynamic-'same' convs"""
import importlib.util, math, sys, pytest, torch
from pathlib import Path
from torch import nn
from fasterai_lr.core import Factorized, FactorizedBag
from fasterai_lr.layers import FactorizedMHA, PROJECTIONS, SameConv2d, embedding_svd, kernel, linear_svd, projections
from fasterai_lr.decompose import decompose_model, candidates, split_attention, join_attention
from fasterai_lr.ranks import Budget, VBMF, n_params, model_macs, layer_curves
from fasterai_lr.calibrate import (Calibration, lookups, embedding_data, embedding_errors, row_weights, patch_rows, n_rows)
from fasterai_lr.latency import LatencyAware, LatencyBudget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
TOL = 1e-5
V,D,L = 120, 32, 12

def rel(y, ref): return ((y-ref).norm()/ref.norm()).item()

class Mix(nn.Module):
    "Tokens → an embedding (and a bag of them) → a Conv1d → self-attention (residual) → a Linear → the output Linear"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb,self.bag = nn.Embedding(V, D, padding_idx=0),nn.EmbeddingBag(V, D, mode='mean')
        self.conv,self.attn = nn.Conv1d(D, D, 3, padding=1),nn.MultiheadAttention(D, 4, batch_first=True)
        self.fc,self.out = nn.Linear(D, 2*D),nn.Linear(2*D, 3)
    def forward(self, x):
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2).relu()
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(self.fc(h.mean(1) + self.bag(x)).relu())

def tokens(n=16, seed=0):
    "Token ids with Zipf frequencies (row counts that differ by orders of magnitude; some rows never seen)"
    p = 1/torch.arange(1, V+1).double()**1.2
    return torch.multinomial(p, n*L, replacement=True, generator=torch.Generator().manual_seed(seed)).view(n, L)

XS = [tokens(16, s) for s in range(3)]
X = torch.cat(XS)

def param_timer(mods, x):
    "A deterministic stand-in for time_calls: seconds ∝ parameters (a smaller factorization is faster)"
    return [1e-6*(n_params(m) + 200) for m in mods]

def attn_rank(rep):
    r = rep.set_index('layer').loc['attn']
    return r['method'], r['rank']

# ---- an attention in the rank rules: its four projections

def test_split_join():
    "An attention candidate is its four projections to a rule (shapes in tokens, costs summing to the attention's); a plan joins back"
    m = Mix().eval()
    cands = candidates(m, sample=X[:1])
    assert [n for n,*_ in cands] == ['emb', 'bag', 'conv', 'attn', 'fc'], cands
    flat,parts = split_attention(cands)
    names = [n for n,*_ in flat]
    assert names == ['emb', 'bag', 'conv', 'attn.q_proj', 'attn.k_proj', 'attn.v_proj', 'attn.out_proj', 'fc'], names
    assert all(s == ((1, L, D), (1, L, D), 1) for n,_,_,s in flat if n.startswith('attn.')), flat
    from fasterai_lr.decompose import layer_costs
    a = dict((n, (l, s)) for n,l,_,s in cands)['attn']
    by_proj = [layer_costs(l, 'svd', 5, s) for n,l,_,s in flat if n in parts]
    whole = layer_costs(a[0], 'svd', {p: 5 for p in PROJECTIONS}, a[1])
    assert sum(p for p,_ in by_proj) == whole[0] and whole[1] - sum(q for _,q in by_proj) == 2*L*L*D, (by_proj, whole)
    assert join_attention({'attn.q_proj': 4, 'attn.out_proj': ('svd', 6), 'fc': 3}, parts) == {'attn': ('svd', dict(q=4, out=6)), 'fc': 3}

@pytest.mark.parametrize('by,keep', [('params', 0.5), ('params', 0.3), ('macs', 0.6)])
def test_budget(by, keep):
    "A weight-only Budget allocates over the projections too: within the budget, the plan's attention entry a {projection: rank}"
    m = Mix().eval()
    b = Budget(**{by: keep})
    new,rep = decompose_model(m, 'tucker', rank=b, sample=X[:1], quiet=True)
    assert b.achieved <= keep, (by, keep, b.achieved)
    total = n_params if by=='params' else (lambda mm: model_macs(mm, X[:1]))
    assert total(new) <= keep*total(m) + 1e-9*total(m), f"{by}={keep}: {total(new)} of {total(m)}"
    rows = b.report.set_index('layer')
    assert {f'attn.{p}_proj' for p in PROJECTIONS} <= set(rows.index), rows
    meth,r = attn_rank(rep)
    chosen = {p: rows.loc[f'attn.{p}_proj', 'rank'] for p in PROJECTIONS if rows.loc[f'attn.{p}_proj', 'rank'] is not None}
    assert (r if isinstance(meth, str) else {}) == chosen, (r, chosen)
    assert isinstance(new.attn, FactorizedMHA) == bool(chosen) and torch.isfinite(new(X)).all()
    if keep <= 0.3: assert chosen, f"at {by}={keep} the attention should be decomposed\n{rows}"

def test_budget_calib():
    """decompose_model(model, 'tucker', rank=Budget(params=0.5, calib=Calibration(...)), calib=Calibration(...)): every kind in the data-
    aware curves and fits, the plan checked on the data, no layer weight-only, nearer the dense outputs than the weight-only budget"""
    m = Mix().eval()
    b = Budget(params=0.4, calib=Calibration(XS))
    new,rep = decompose_model(m, 'tucker', rank=b, calib=Calibration(XS), sample=X[:1], quiet=True)
    assert b.achieved <= 0.4 and n_params(new) <= 0.4*n_params(m), (b.achieved, n_params(new), n_params(m))
    assert b.checked and b.chosen in b.checked, b.checked
    r = rep.set_index('layer')
    assert not r['note'].str.contains('weight-only').any(), r['note']
    assert isinstance(new.attn, FactorizedMHA) and isinstance(new.emb, Factorized), rep
    plain,_ = decompose_model(m, 'tucker', rank=Budget(params=0.4), sample=X[:1], quiet=True)
    with torch.no_grad(): e_data,e_plain = rel(new(X), m(X)),rel(plain(X), m(X))
    assert e_data < e_plain, f"data-aware budget {e_data:.3f}, weight-only {e_plain:.3f}"

def test_budget_calib_errors_are_the_fits():
    "The data-aware curves' errors are those of the blocks built: an embedding's weighted row error, a projection's output error"
    m = Mix().eval()
    cal = Calibration(XS).prepare(m, [n for n,*_ in candidates(m)])
    curves = {c.name: c for c in layer_curves(candidates(m, sample=X[:1]), calib=cal)}
    e = curves['emb']
    n = cal.layer_stats('emb', m.emb, 'svd').N
    Dw = row_weights(n, cal.damp)[:,None]
    for j in (0, len(e.ranks)//2):
        blk = cal.build('emb', m.emb, 'svd', e.ranks[j])
        W,Wh = m.emb.weight.double(),(blk[0].weight@blk[1].weight.T).double()
        assert math.isclose(e.err[j], ((Dw*(W-Wh)).square().sum()/(Dw*W).square().sum()).item(), rel_tol=1e-6), (j, e.err[j])
    q = curves['attn.q_proj']
    assert q.part == ('attn', 'q') and 0 < q.err[0] < 1 and q.err[-1] == 0, q.err

def test_vbmf():
    "VBMF gives the attention a rank per projection (within each one's full rank), and every other kind its rank"
    m = Mix().eval()
    new,rep = decompose_model(m, 'tucker', rank=VBMF(), sample=X[:1], quiet=True)
    meth,r = attn_rank(rep)
    assert meth == 'svd' and isinstance(r, dict) and r and set(r) <= set(PROJECTIONS) and all(1 <= v <= D for v in r.values()), r
    assert isinstance(new.attn, FactorizedMHA) and new.attn.rank == r and torch.isfinite(new(X)).all()
    assert rep.set_index('layer').loc[['emb', 'bag', 'conv', 'fc'], 'method'].notna().all(), rep

@pytest.mark.parametrize('rule', ['budget', 'aware'])
@pytest.mark.parametrize('calib', [False, True])
def test_latency(rule, calib):
    "LatencyBudget and LatencyAware time each projection beside its options: the attention is planned as the other layers are"
    m = Mix().eval()
    r = LatencyBudget(keep=0.3, timer=param_timer, round_to=1) if rule=='budget' else LatencyAware(keep=0.5, timer=param_timer)
    new,rep = decompose_model(m, 'tucker', rank=r, calib=Calibration(XS) if calib else None, sample=X[:1], quiet=True)
    rows = r.report.set_index('layer')
    assert {f'attn.{p}_proj' for p in PROJECTIONS} <= set(rows.index), rows
    meth,ranks = attn_rank(rep)
    assert meth == 'svd' and isinstance(new.attn, FactorizedMHA) and new.attn.rank == ranks, rep
    if rule=="budget": assert r.achieved <= 0.3, r.achieved
    assert torch.isfinite(new(X)).all()
    if calib: assert not rep['note'].str.contains('weight-only').any(), rep['note']

def test_full_rank_calibrated_exact():
    "rank='full' with a Calibration (sequential or not): the model computes what it computed, every kind decomposed"
    m = Mix().eval()
    for seq in (False, True):   # (sequential: with the ridge, as in test_kinds; at damp=0 it divides float32 noise by a near-singular Gram)
        cal = Calibration(XS, damp=0.01 if seq else 0., sequential=seq)
        new,rep = decompose_model(m, 'tucker', rank='full', calib=cal, head=True, quiet=True)
        assert rep['method'].notna().all(), rep
        with torch.no_grad(): assert (e := rel(new(X), m(X))) <= TOL, f"sequential={seq}: {e:.2e}"

def test_attention_data_aware_better():
    "Each projection fitted to its inputs: at keep=0.3 the attention's output is nearer the dense one than weight-only; sequential too"
    torch.manual_seed(1)
    mix = torch.randn(D, D)*torch.logspace(0, -2, D)           # inputs that occupy few directions: where data-aware fits pay
    class A(nn.Module):
        def __init__(self): super().__init__(); self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        def forward(self, x): return self.attn(x@mix, x@mix, x@mix, need_weights=False)[0]
    m,xs = A().eval(),[torch.randn(8, L, D) for _ in range(3)]
    x = torch.cat(xs)
    weight,_ = decompose_model(m, keep=0.3, head=True, quiet=True)
    for seq in (False, True):
        data,rep = decompose_model(m, keep=0.3, calib=Calibration(xs, sequential=seq), head=True, quiet=True)
        with torch.no_grad(): ed,ew = rel(data(x), m(x)),rel(weight(x), m(x))
        assert ed < ew, f"sequential={seq}: data-aware {ed:.3f}, weight-only {ew:.3f}"
        assert ("sequential" in rep.note[0]) == seq, rep.note[0]

# ---- data-aware embeddings: row counts, the weighted fit

BAGS = {'sum': dict(mode='sum'), 'mean': dict(mode='mean'), 'padding': dict(mode='mean', padding_idx=3),
        'last': dict(mode='sum', include_last_offset=True), 'weights': dict(mode='sum')}

@pytest.mark.parametrize('case', ['embedding', *BAGS])
@pytest.mark.parametrize('flat', [False, True])
def test_lookups_are_the_gram_diagonal(case, flat):
    "Σ coefficient² per row = the diagonal of CᵀC, C the bag matrix that maps the weight to the outputs (read with W = I): repeats too"
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(10, 10) if case=='embedding' else nn.EmbeddingBag(10, 10, **BAGS[case])
    with torch.no_grad(): emb.weight.copy_(torch.eye(10))
    x = torch.randint(0, 10, (6, 5), generator=g)
    args = (x,)
    if flat and case!='embedding':
        offs = torch.tensor([0, 3, 3, 9, 20])
        args = (x.flatten(), torch.cat([offs, torch.tensor([30])]) if case=='last' else offs)
    if case=='weights': args = (*args, *[None]*(len(args)==1), torch.rand(args[0].shape, generator=g))   # (input, offsets, weights)
    C = emb(*args).double().reshape(-1, 10)                   # each output row: Σ coefficient · e_v
    rows,c = lookups(emb, *args)
    n = torch.zeros(10, dtype=torch.float64).index_add_(0, rows, c.square())
    torch.testing.assert_close(n, C.square().sum(0), msg=f"{case} flat={flat}")

def test_embedding_fit_optimal():
    "embedding_data: exact at full rank (V > d, V < d); at rank r no random rank-r alternative has a smaller weighted error (Eckart–Young)"
    g = torch.Generator().manual_seed(0)
    for Vn,d in ((50, 12), (8, 20)):
        W,n = torch.randn(Vn, d, generator=g, dtype=torch.float64),torch.randint(0, 40, (Vn,), generator=g).double()
        A,B = embedding_data(W, n, min(Vn, d), damp=0.01)
        assert rel(A@B, W) < 1e-10, (Vn, d)
        Dw = row_weights(n, 0.01)[:,None]
        werr = lambda Wh: ((Dw*(W-Wh)).norm()/(Dw*W).norm()).item()
        errs = embedding_errors(W, n, 0.01)
        for r in (1, 3, min(Vn, d)-1):
            A,B = embedding_data(W, n, r, damp=0.01)
            best = werr(A@B)
            assert math.isclose(best, errs[r].item(), rel_tol=1e-6, abs_tol=1e-9), (r, best, errs[r])
            others = [torch.randn(Vn, r, generator=g, dtype=W.dtype)@torch.randn(r, d, generator=g, dtype=W.dtype) for _ in range(50)]
            others += [A@B + 1e-3*torch.randn(Vn, r, generator=g, dtype=W.dtype)@B for _ in range(50)]   # near it, still rank r
            others += [(lambda a,b: a@b)(*embedding_data(W, torch.zeros(Vn), r))]                    # the weight-only fit
            assert min(map(werr, others)) >= best - 1e-12, (Vn, d, r, best, min(map(werr, others)))

@pytest.mark.parametrize('kind', ['embedding', 'bag'])
def test_embedding_data_aware(kind):
    "A calibrated embedding (bag) block: exact at full rank; at a low rank nearer the layer's outputs on the data than weight-only"
    m = Mix().eval()
    layer,name = (m.emb, 'emb') if kind=='embedding' else (m.bag, 'bag')
    cal = Calibration(XS).prepare(m, [name])
    full = cal.build(name, layer, 'svd', D)
    with torch.no_grad():
        assert rel(full(X), layer(X)) < TOL and isinstance(full, FactorizedBag) == (kind=='bag')
        data,weight = cal.build(name, layer, 'svd', 4),embedding_svd(layer, 4)
        ed,ew = rel(data(X), layer(X)),rel(weight(X), layer(X))
    assert ed < ew, f"{kind}: data-aware {ed:.3f}, weight-only {ew:.3f}"
    if kind=='embedding': assert not data[0].weight[0].any(), "the zero padding row stays zero"

# ---- the callback, with each rule

@pytest.mark.parametrize('rule', ['budget-calib', 'vbmf', 'latency-budget', 'latency-aware'])
def test_callback(rule):
    "DecomposeCallback at epoch 1 with each rule on the mixed model: every kind decomposed where the rule says, training goes on finite"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.torch_core import set_seed
    from fasterai_lr.callback import DecomposeCallback
    set_seed(0)
    x = tokens(192, seed=7)
    y = (x[:,0] % 3)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:160], ds[160:], bs=32, device='cpu')
    r = dict(vbmf=VBMF(), **{'budget-calib': Budget(params=0.5), 'latency-budget': LatencyBudget(keep=0.3, timer=param_timer, round_to=1),
                             'latency-aware': LatencyAware(keep=0.5, timer=param_timer)})[rule]
    cb = DecomposeCallback(start_epoch=1, rank=r, calib=True if rule=='budget-calib' else None, verbose=False)
    learn = Learner(dls, Mix(), loss_func=nn.CrossEntropyLoss(), cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    rep = cb.report.set_index('layer')
    assert isinstance(learn.model.attn, FactorizedMHA) == isinstance(rep.loc['attn', 'method'], str), rep
    if rule!='budget-calib': assert isinstance(learn.model.attn, FactorizedMHA), f"{rule}: the attention should be decomposed\n{rep}"
    assert not rep['note'].str.contains('weight-only').any(), rep['note']
    assert all(math.isfinite(v) for v in learn.recorder.values[-1][:2]), learn.recorder.values

# ---- timm's dynamic-'same' convs, calibrated

if importlib.util.find_spec('timm') is None and Path('/tmp/timm_pkg').is_dir(): sys.path.append('/tmp/timm_pkg')
needs_timm = pytest.mark.skipif(importlib.util.find_spec('timm') is None, reason="timm is not installed (a dev dependency)")

def same_net():
    from timm.layers import Conv2dSame, StdConv2dSame
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(6, 24, 3, stride=2), nn.ReLU(), StdConv2dSame(24, 24, 5, stride=2), nn.ReLU(),
                         Conv2dSame(24, 8, (3, 5), dilation=(1, 2))).eval()

@needs_timm
@pytest.mark.parametrize('hw', [(15, 15), (16, 17)])
def test_same_patches(hw):
    "The calibration reads a dynamic-'same' conv's patches padded as `pad_same` pads: patches × kernel = the layer's output, all rows"
    from fasterai_lr.core import equivalent
    from fasterai_lr.calibrate import Stats
    for layer in same_net()[::2]:
        conv,x = Stats(layer, 'patch').conv,torch.randn(2, layer.in_channels, *hw)
        assert isinstance(conv, SameConv2d) or layer.stride==(1, 1), conv
        rows = patch_rows(x, conv)
        with torch.no_grad(): y = layer(x) - (layer.bias.view(-1, 1, 1) if layer.bias is not None else 0)
        got = (rows[:,0] @ kernel(layer)[0].flatten(1).T).T.reshape(y.shape[1], y.shape[0], *y.shape[2:]).transpose(0, 1)
        assert len(rows) == n_rows(x, conv) == y[:,0].numel() and rel(got, y) < TOL, (type(layer).__name__, hw, rel(got, y))

@needs_timm
@pytest.mark.parametrize('method', ['svd', 'spatial', 'cp', 'tucker'])
def test_same_calibrated(method):
    "timm's Conv2dSame/StdConv2dSame: exact at rank='full' under a calibration, and no further from the outputs at keep=0.3 than weight-only"
    net = same_net()
    xs = [torch.randn(8, 6, 15, 15).cumsum(-1) for _ in range(3)]
    x = torch.cat(xs)
    full,_ = decompose_model(net, method, rank='full', calib=Calibration(xs, damp=0., sequential=False), head=True, quiet=True)
    seq,_ = decompose_model(net, method, rank='full', calib=Calibration(xs), head=True, quiet=True)   # (sequential: the ridge keeps it exact)
    data,_ = decompose_model(net, method, keep=0.3, calib=Calibration(xs), head=True, quiet=True)
    weight,_ = decompose_model(net, method, keep=0.3, head=True, quiet=True)
    with torch.no_grad(): ef,es,ed,ew = rel(full(x), net(x)),rel(seq(x), net(x)),rel(data(x), net(x)),rel(weight(x), net(x))
    assert ef <= TOL and es <= TOL, f"{method} at rank='full': {ef:.2e}, sequential {es:.2e}"
    assert ed <= ew, f"{method}: data-aware {ed:.3f}, weight-only {ew:.3f}"
