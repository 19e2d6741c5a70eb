"""Embeddings and EmbeddingBags: exact at rank='full' for every setting kept, Eckart–Young below it, costs vs FlopCounterMode, clear
refusals that leave the layer as it was, training, ONNX"""
import pandas as pd
import itertools, io, pytest, torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.core import EMBEDDING_KINDS, LAYER_METHODS, Factorized, FactorizedBag, layer_method
from fasterai_lr.layers import kernel, layer_rank, checked_rank, builder, shell, embedding_svd, component_norms
from fasterai_lr.decompose import Embedding_Decomposer, FC_Decomposer, layer_costs

TOL = 1e-5   # float32: the factors are computed in float64 and rounded once, the block runs a lookup and one Linear

def relerr(y, ref): return ((y-ref).norm()/ref.norm().clamp_min(1e-30)).item()
def svd(emb, **opts): return Embedding_Decomposer().SVD(emb, **opts)
def state(m): return {k: (v.dequantize() if v.is_quantized else v).clone() if torch.is_tensor(v) else v for k,v in m.state_dict().items()}
def same(a, b): return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) if torch.is_tensor(a) else a==b   # (a NaN weight is the same)
def same_state(a, b): return a.keys()==b.keys() and all(same(a[k], b[k]) for k in a)

SHAPES = [(5, 12), (12, 5), (8, 8), (1, 6), (40, 3), (3, 40)]   # V < d and V > d, square, a single row
PADS = [None, 0, 'last', -2]

def pad_idx(V, pad): return V-1 if pad=='last' else pad
CASES = [(V, d, pad) for V,d in SHAPES for pad in PADS if pad is None or -V <= pad_idx(V, pad) < V]   # (a 1-row table: no row -2)

# ---- exact at rank='full'

@pytest.mark.parametrize('V,d,pad', CASES, ids=[f"{V}x{d}-pad{p}" for V,d,p in CASES])
@pytest.mark.parametrize('scale,sparse', list(itertools.product([False, True], [False, True])), ids=lambda v: str(v))
def test_exact_full(V, d, pad, scale, sparse):
    emb = nn.Embedding(V, d, padding_idx=pad_idx(V, pad), scale_grad_by_freq=scale, sparse=sparse)
    case = f"Embedding({V}, {d}, padding_idx={emb.padding_idx}, scale_grad_by_freq={scale}, sparse={sparse})"
    blk = svd(emb, rank='full')
    assert type(blk) is Factorized and blk.rank == min(V, d), f"{case}: {blk!r}"
    e,lin = blk
    kept = (e.padding_idx, e.scale_grad_by_freq, e.sparse, e.num_embeddings, e.embedding_dim)
    assert kept == (emb.padding_idx, scale, sparse, V, min(V, d)), f"{case}: factor embedding {e!r}"
    assert lin.bias is None and not getattr(lin, 'sparse', False), case
    for idx in (torch.randint(0, V, (3, 7)), torch.arange(V), torch.randint(0, V, (2, 3, 4))):   # 2-D (batch, tokens), 1-D, 3-D
        assert relerr(blk(idx), emb(idx)) <= TOL, f"{case}, indices {tuple(idx.shape)}: relative error {relerr(blk(idx), emb(idx)):.1e}"
    if emb.padding_idx is not None:
        assert not e.weight[emb.padding_idx].any(), f"{case}: the padding row of the factor embedding is not zero"
        assert not blk(torch.tensor([emb.padding_idx])).any(), f"{case}: the padding output is not zero"

def test_float64():
    emb = nn.Embedding(30, 9, dtype=torch.float64)
    blk,idx = svd(emb, rank='full'),torch.randint(0, 30, (4, 5))
    assert all(p.dtype==torch.float64 for p in blk.parameters()) and relerr(blk(idx), emb(idx)) < 1e-12

def test_nonzero_padding_row_kept():
    "A padding row a user set to non-zero values is factorized like any row (the lookup returns it; only its gradient is masked)"
    emb = nn.Embedding(10, 6, padding_idx=2)
    with torch.no_grad(): emb.weight[2] = 1.
    blk = svd(emb, rank='full')
    assert relerr(blk(torch.tensor([2])), emb(torch.tensor([2]))) <= TOL

def test_sparse_backward():
    emb = nn.Embedding(50, 16, sparse=True, padding_idx=0)
    blk = svd(emb, rank=4)
    blk(torch.randint(0, 50, (3, 9))).square().sum().backward()
    assert blk[0].weight.grad.is_sparse, "the factor embedding of a sparse embedding must get a sparse gradient"
    assert not blk[1].weight.grad.is_sparse, "the Linear is dense"
    torch.optim.SGD(blk.parameters(), lr=0.1).step()   # plain SGD takes sparse gradients

# ---- EmbeddingBag

BAGS = [(V, d, dict(mode=m, padding_idx=p, include_last_offset=l)) for V,d in [(20, 9), (6, 15)]   # V > d and V < d
        for m in ('sum', 'mean') for p in (None, 0, 5, -1) for l in (False, True)]

@pytest.mark.parametrize('V,d,opts', BAGS, ids=lambda v: '-'.join(f"{k}={a}" for k,a in v.items()) if isinstance(v, dict) else str(v))
def test_bag_exact_full(V, d, opts):
    bag = nn.EmbeddingBag(V, d, **opts)
    blk = svd(bag, rank='full')
    assert type(blk) is FactorizedBag and isinstance(blk, Factorized), repr(blk)
    assert (blk[0].mode, blk[0].padding_idx, blk[0].include_last_offset) == (opts['mode'], bag.padding_idx, opts['include_last_offset'])
    flat = torch.randint(0, V, (13,))
    flat[[1, 5]] = bag.padding_idx or 0                         # padding entries: left out of a bag's sum and mean
    offsets = torch.tensor([0, 4, 4, 9] + ([13] if opts['include_last_offset'] else []))   # an empty bag too
    calls = [((flat, offsets), {})]
    if opts['mode']=='sum': calls.append(((flat, offsets), dict(per_sample_weights=torch.rand(13))))
    if not opts['include_last_offset']: calls.append(((torch.randint(0, V, (4, 5)),), {}))   # 2-D: fixed-size bags, no offsets
    for args,kw in calls:
        y,ref = blk(*args, **kw),bag(*args, **kw)
        assert relerr(y, ref) <= TOL, f"{opts}, {[tuple(a.shape) for a in args]}, {list(kw)}: relative error {relerr(y, ref):.1e}"

def test_bag_positional_weights():
    "FactorizedBag takes `per_sample_weights` by position too, as nn.EmbeddingBag does"
    bag = nn.EmbeddingBag(12, 5, mode='sum')
    flat,offsets,w = torch.randint(0, 12, (8,)),torch.tensor([0, 3]),torch.rand(8)
    assert relerr(svd(bag, rank='full')(flat, offsets, w), bag(flat, offsets, w)) <= TOL

# ---- below full rank

@pytest.mark.parametrize('V,d', [(60, 20), (20, 60), (32, 32)])
def test_eckart_young(V, d):
    "At rank r the relative weight error is sqrt(Σ_{i>r} σᵢ² / Σ σᵢ²), and the outputs err as the looked-up rows do"
    g = torch.Generator().manual_seed(V*d)
    W = torch.randn(V, d, generator=g) * torch.logspace(0, -2, d)   # a decaying spectrum
    emb = nn.Embedding.from_pretrained(W, freeze=False)
    S2 = torch.linalg.svdvals(W.double()).square()
    for r in range(1, min(V, d)+1):
        blk = svd(emb, rank=r)
        What = blk[0].weight.double() @ blk[1].weight.double().T
        want = (S2[r:].sum()/S2.sum()).sqrt().item()
        got = relerr(What, W.double())
        assert abs(got-want) <= 1e-4*max(want, 1e-3), f"{V}x{d} rank {r}: weight error {got:.6e}, Eckart–Young {want:.6e}"
        idx = torch.arange(V)
        assert abs(relerr(blk(idx).double(), W.double()) - got) <= 1e-4 + 1e-4*got

def test_rank_options():
    "rank=, keep=, energy=, percent_removed= and rank='full' read the V×d matrix: full rank min(V, d)"
    emb = nn.Embedding(200, 24)
    K = kernel(emb)
    assert K.shape == (1, 24, 200, 1, 1) and torch.equal(K[0,:,:,0,0], emb.weight.detach().T), "kernel: the d×V Linear of a one-hot index"
    assert svd(emb, rank='full').rank == 24
    r = svd(emb, keep=0.3).rank
    assert r*(200+24) <= 0.3*200*24 < (r+1)*(200+24), f"keep=0.3 gave rank {r}"
    assert svd(emb, percent_removed=0.75).rank == 6
    S2 = torch.linalg.svdvals(emb.weight.detach().double()).square()
    e = (S2.cumsum(0)/S2.sum())
    r = svd(emb, energy=0.8, round_to=1).rank
    assert e[r-1] >= 0.8-1e-9 and (r==1 or e[r-2] < 0.8), f"energy=0.8 gave rank {r}, energies {e.tolist()}"
    assert layer_rank(K, 'svd', 'rank', 'full') == checked_rank(nn.EmbeddingBag(24, 200), 'svd', 'rank', 'full') == 24

@pytest.mark.parametrize('cls', EMBEDDING_KINDS)
def test_balanced(cls):
    "Component i has one norm in A (column i) and in B (row i), as every builder's factors, and `component_norms` reads them"
    blk = svd(cls(40, 16), rank=6)
    a,b = blk[0].weight.norm(dim=0),blk[1].weight.norm(dim=0)
    assert torch.allclose(a, b, rtol=1e-4), (a, b)
    assert torch.allclose(component_norms(blk)[0], torch.stack([a, b])[:,None], rtol=1e-6), component_norms(blk)

# ---- registry: builder, shell, layer_method

@pytest.mark.parametrize('cls', EMBEDDING_KINDS)
def test_builder_and_shell(cls):
    emb = cls(30, 10)
    assert builder(emb, 'svd') is embedding_svd and layer_method(emb, 'tucker') == 'svd'
    blk = builder(emb, 'svd')(emb, 4)
    sh = shell(emb, 'svd', 4)
    assert type(sh) is type(blk) and [tuple(p.shape) for p in sh.parameters()] == [(30, 4), (10, 4)], repr(sh)
    sh.load_state_dict(blk.state_dict())   # as export loads a saved block into its shell
    idx = torch.randint(0, 30, (3, 5))
    assert torch.equal(sh(idx), blk(idx))
    frozen = cls(30, 10).requires_grad_(False)
    assert not any(p.requires_grad for p in svd(frozen, rank=3).parameters()), "factors of a frozen table stay frozen"

# ---- in the model walk, with every rank option, budget and the calibration

class Tab(nn.Module):
    "A tabular-style model: an embedding, a bag, one with max_norm (left, with the reason), Linears"
    def __init__(self):
        super().__init__()
        self.emb,self.bag,self.mx = nn.Embedding(500, 64, padding_idx=0),nn.EmbeddingBag(300, 32, mode='mean'),nn.Embedding(50, 64, max_norm=1.)
        self.fc,self.out = nn.Linear(160, 64),nn.Linear(64, 3)
    def forward(self, x): return self.out(torch.relu(self.fc(torch.cat([self.emb(x[:,0]), self.bag(x[:,1:4]), self.mx(x[:,4] % 50)], 1))))

def tab_input(n=32): return torch.randint(0, 300, (n, 5), generator=torch.Generator().manual_seed(0))

def test_walked():
    "decompose_model takes embeddings: exact at rank='full', the max_norm one left with the reason, MACs counted"
    from fasterai_lr.decompose import decompose_model
    m,x = Tab().eval(),tab_input()
    new,rep = decompose_model(m, rank='full', sample=x, quiet=True)
    r = rep.set_index('layer')
    assert (new(x)-m(x)).norm()/m(x).norm() < 1e-5
    assert r.loc['emb','method']=='svd' and r.loc['bag','method']=='svd' and pd.isna(r.loc['mx','method']), r
    assert 'max_norm' in r.loc['mx','note'] and r.loc['emb','macs']==0 and r.loc['emb','macs_after']==64*64, r
    assert isinstance(new.emb, Factorized) and new.emb[0].padding_idx==0 and new.mx is not m.mx and type(new.mx) is nn.Embedding

@pytest.mark.parametrize('rule', ['keep', 'budget', 'budget-calib', 'budget-sequential', 'vbmf', 'latency'])
def test_walked_with_rules(rule):
    "Each rank rule on a model with embeddings; the calibration fits the embeddings too (from their row counts): no weight-only note"
    from fasterai_lr.decompose import decompose_model
    from fasterai_lr.ranks import Budget, VBMF
    from fasterai_lr.calibrate import Calibration
    from fasterai_lr.latency import LatencyAware
    m,x = Tab().eval(),tab_input()
    rank = dict(keep=None, budget=Budget(params=0.5), vbmf=VBMF(energy=0.9), latency=LatencyAware(keep=0.5, timer=lambda mods, x: [1.]*len(mods)),
                **{'budget-calib': Budget(params=0.5, calib=Calibration([x])), 'budget-sequential': Budget(params=0.5, calib=Calibration([x], sequential=True))})[rule]
    new,rep = decompose_model(m, rank=rank, sample=x, quiet=True) if rank is not None else decompose_model(m, keep=0.5, sample=x, quiet=True)
    y = new(x)
    assert y.shape==(32, 3) and y.isfinite().all()
    if rule.startswith('budget'): assert 0.45 <= rank.achieved <= 0.5, rank.achieved
    if 'calib' in rule or 'sequential' in rule:
        notes = rep.set_index('layer')['note']
        assert not any('weight-only' in notes[n] for n in ('emb','bag')), notes

def test_walked_plan_onnx(tmp_path):
    "A decomposed model with embeddings: its plan reloads with equal outputs and it exports to ONNX"
    from fasterai_lr.decompose import decompose_model
    from fasterai_lr.export import save_decomposed, load_decomposed, to_onnx, onnx_error
    m,x = Tab().eval(),tab_input()
    new,_ = decompose_model(m, keep=0.5, quiet=True)
    save_decomposed(new, tmp_path/'m.pth')
    back = load_decomposed(Tab(), tmp_path/'m.pth').eval()
    torch.testing.assert_close(back(x), new(x), rtol=0, atol=0)
    assert onnx_error(to_onnx(new, x, tmp_path/'m.onnx', dynamo=False), new, x) < 1e-5

def test_tied_embedding_left():
    "An embedding tied to a Linear decoder (a language model's tie_weights) is left on both sides, with the reason: never untied"
    from fasterai_lr.decompose import decompose_model
    class LM(nn.Module):
        def __init__(self):
            super().__init__(); self.enc,self.mid,self.dec = nn.Embedding(100, 16),nn.Linear(16, 16),nn.Linear(16, 100)
            self.dec.weight = self.enc.weight
        def forward(self, x): return self.dec(torch.relu(self.mid(self.enc(x))))
    m,x = LM().eval(),torch.randint(0, 100, (4, 7))
    new,rep = decompose_model(m, keep=0.5, head=True, quiet=True)
    r = rep.set_index('layer')
    assert pd.isna(r.loc['enc','method']) and pd.isna(r.loc['dec','method']) and 'tied to' in r.loc['enc','note'], r
    assert new.dec.weight is new.enc.weight, "the tie was broken"

# ---- refusals, each leaving the layer as it was

REFUSED = {
    'max_norm': (lambda: nn.Embedding(10, 4, max_norm=1.), lambda e: svd(e, rank=2), ValueError, 'set layer.max_norm = None first'),
    'bag max_norm': (lambda: nn.EmbeddingBag(10, 4, max_norm=2.), lambda e: svd(e, rank=2), ValueError, 'max_norm=2.0'),
    "mode='max'": (lambda: nn.EmbeddingBag(10, 4, mode='max'), lambda e: svd(e, rank=2), ValueError, "mode='max'"),
    "builder mode='max'": (lambda: nn.EmbeddingBag(10, 4, mode='max'), lambda e: embedding_svd(e, 2), ValueError, 'not linear'),
    'builder max_norm': (lambda: nn.Embedding(10, 4, max_norm=1.), lambda e: embedding_svd(e, 2), ValueError, 'renormalizes the rows'),
    'quantized': (lambda: torch.ao.nn.quantized.Embedding(10, 4), lambda e: svd(e, rank=2), TypeError, 'decompose the float model first'),
    'meta': (lambda: nn.Embedding(10, 4, device='meta'), lambda e: svd(e, rank=2), ValueError, 'on the meta device'),
    'rank above full': (lambda: nn.Embedding(10, 4), lambda e: svd(e, rank=5), ValueError, 'above the full rank 4'),
    'keep too small': (lambda: nn.Embedding(2, 2), lambda e: svd(e, keep=0.5), ValueError, 'too small to factorize'),
    'energy=0': (lambda: nn.Embedding(10, 4), lambda e: svd(e, energy=0), ValueError, 'outside (0, 1]'),
    'a Linear': (lambda: nn.Linear(4, 4), lambda e: svd(e, rank=2), TypeError, 'use FC_Decomposer().SVD'),
    'to FC_Decomposer': (lambda: nn.Embedding(10, 4), lambda e: FC_Decomposer().SVD(e, rank=2), TypeError, 'Embedding_Decomposer().SVD'),
    'tucker': (lambda: nn.Embedding(10, 4), lambda e: builder(e, 'tucker'), ValueError, "pass method='svd'"),
    'shell cp': (lambda: nn.Embedding(10, 4), lambda e: shell(e, 'cp', 2), ValueError, "SVD only, not 'cp'"),
    'NaN': (lambda: nn.Embedding.from_pretrained(torch.tensor([[1., torch.nan], [0., 1.]])), lambda e: svd(e, rank=1), ValueError, 'NaN'),
}

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize('case', REFUSED)
def test_refused(case):
    make,call,err,msg = REFUSED[case]
    layer = make()
    before = state(layer) if case!='meta' else None
    with pytest.raises(err) as info: call(layer)
    assert msg in str(info.value), f"{case}: {info.value}"
    if case=='meta': assert all(p.is_meta for p in layer.parameters())
    else: assert same_state(before, state(layer)), f"{case}: the layer changed"

# ---- costs

@pytest.mark.parametrize('V,d,r', [(100, 16, 4), (16, 100, 8), (50, 50, 50)])
def test_costs_vs_flop_counter(V, d, r):
    "Parameters r(V+d); multiply-adds r·d a looked-up token (a bag for an EmbeddingBag), none for the lookup, as FlopCounterMode counts"
    B,L = 3,7
    emb,idx = nn.Embedding(V, d),torch.randint(0, V, (B, L))
    shapes = ((B, L), (B, L, d), 1)
    blk = svd(emb, rank=r)
    with FlopCounterMode(display=False) as fc: blk(idx)
    p,m = layer_costs(emb, 'svd', r, shapes)
    held,counted = sum(q.numel() for q in blk.parameters()),fc.get_total_flops()//2
    assert (p, m*B) == (held, counted) == (r*(V+d), B*L*r*d), f"layer_costs {(p, m)}, block {held} parameters, {counted} multiply-adds"
    with FlopCounterMode(display=False) as fc: emb(idx)
    assert layer_costs(emb, shapes=shapes) == (V*d, 0) and fc.get_total_flops() == 0, "a lookup costs no multiply-adds"
    assert layer_costs(emb, 'svd', r) == (r*(V+d), None), "no shapes: no multiply-adds counted"
    bag,flat,offsets = nn.EmbeddingBag(V, d, mode='mean'),torch.randint(0, V, (20,)),torch.tensor([0, 5, 11])
    blk = svd(bag, rank=r)
    with FlopCounterMode(display=False) as fc: y = blk(flat, offsets)
    p,m = layer_costs(bag, 'svd', r, ((20,), tuple(y.shape), 1))
    assert (p, m*len(y)) == (r*(V+d), fc.get_total_flops()//2) == (r*(V+d), 3*r*d), (p, m, fc.get_total_flops())

# ---- training and export

def test_trains():
    "One SGD step changes both factors but not the padding row, which gets no gradient"
    emb = nn.Embedding(30, 12, padding_idx=3)
    blk = svd(emb, rank=5)
    A0,B0 = blk[0].weight.detach().clone(),blk[1].weight.detach().clone()
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 3, 3]])
    opt = torch.optim.SGD(blk.parameters(), lr=0.1)
    (blk(idx) - torch.randn(2, 5, 12)).square().mean().backward()
    assert not blk[0].weight.grad[3].any(), "the padding row got a gradient"
    opt.step()
    A,B = blk[0].weight.detach(),blk[1].weight.detach()
    assert not torch.equal(A, A0) and not torch.equal(B, B0), "SGD moved neither factor"
    assert torch.equal(A[3], A0[3]) and not A[3].any(), "the padding row moved"
    assert not torch.equal(A[1], A0[1]) and torch.equal(A[0], A0[0]), "only the looked-up rows move"

def _onnx_outputs(blk, args, names):
    onnxruntime = pytest.importorskip('onnxruntime')
    f = io.BytesIO()
    torch.onnx.export(blk.eval(), args, f, input_names=names, output_names=['y'], dynamo=False)
    sess = onnxruntime.InferenceSession(f.getvalue(), providers=['CPUExecutionProvider'])
    return torch.from_numpy(sess.run(None, {n: a.numpy() for n,a in zip(names, args)})[0])

def test_onnx_embedding():
    emb = nn.Embedding(40, 12, padding_idx=0)
    blk,idx = svd(emb, rank=5),torch.randint(0, 40, (3, 6))
    y = _onnx_outputs(blk, (idx,), ['idx'])
    assert relerr(y, blk(idx).detach()) <= 1e-6, "onnxruntime differs from PyTorch"

@pytest.mark.parametrize('mode', ['sum', 'mean'])
def test_onnx_bag(mode):
    bag = nn.EmbeddingBag(40, 12, mode=mode)
    blk,flat,offsets = svd(bag, rank=5),torch.randint(0, 40, (11,)),torch.tensor([0, 4, 7])
    y = _onnx_outputs(blk, (flat, offsets), ['flat', 'offsets'])
    assert relerr(y, blk(flat, offsets).detach()) <= 1e-6, "onnxruntime differs from PyTorch"

def test_tied_embeddings_share_factors():
    "Two embeddings holding one weight (T5's shared token table): one factor pair for both, the tie kept, exact at full rank"
    from fasterai_lr.decompose import decompose_model
    class Shared(nn.Module):
        def __init__(self):
            super().__init__(); self.enc,self.dec,self.out = nn.Embedding(60, 16),nn.Embedding(60, 16),nn.Linear(16, 3)
            self.dec.weight = self.enc.weight
        def forward(self, x): return self.out(self.enc(x) + self.dec(x.flip(-1)))
    m,x = Shared().eval(),torch.randint(0, 60, (4, 9))
    new,rep = decompose_model(m, rank='full', quiet=True)
    assert ((new(x)-m(x)).norm()/m(x).norm()).item() < 1e-5
    assert new.dec[0].weight is new.enc[0].weight and new.dec[1].weight is new.enc[1].weight, "the tied tables no longer share factors"
    assert 'tied to enc' in rep.set_index('layer').loc['dec', 'note'], rep
