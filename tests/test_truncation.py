"Below full rank: SVD errors are the singular-value tails (Eckart–Young); Tucker-2 and CP errors fall with the rank and match TensorLy"
import warnings, pytest, torch, numpy as np
import tensorly as tl
from tensorly.decomposition import partial_tucker, parafac
from torch import nn
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer

def rel(A, B)->float: return ((A-B).norm()/B.norm()).item()

def block_kernel(blk, G:int=1)->torch.Tensor:
    "The G×O×I×kh×kw kernels (float64) that the factor convs of a Factorized conv block compose to, read from their weights"
    w = [f.weight.detach().double() for f in blk]
    per_group = lambda t: t.unflatten(0, (G, -1))
    if blk.method=='svd':      # k×k conv (r filters) → 1×1
        return torch.einsum('gor,grihw->goihw', per_group(w[1])[...,0,0], per_group(w[0]))
    if blk.method=='spatial':  # kh×1 → 1×kw
        return torch.einsum('gorx,griy->goiyx', per_group(w[1])[:,:,:,0], per_group(w[0])[...,0])
    if blk.method=='tucker':   # 1×1 → kh×kw core → 1×1, a factor at full rank folded into the core
        (ro,ri),first,last = blk.rank, blk[0].in_channels//G, blk[-1].out_channels//G
        core = per_group(w[1 if ri<first else 0])
        if ri<first: core = torch.einsum('grshw,gsi->grihw', core, per_group(w[0])[...,0,0])
        if ro<last: core = torch.einsum('gor,grihw->goihw', per_group(w[-1])[...,0,0], core)
        return core
    if blk.method=='cp':       # 1×1 → depthwise kh×1 → depthwise 1×kw → 1×1
        return torch.einsum('gor,gri,grh,grw->goihw', per_group(w[3])[...,0,0], per_group(w[0])[...,0,0],
                            per_group(w[1])[:,:,0,:,0], per_group(w[2])[:,:,0,0,:])

def conv_with(K:torch.Tensor, groups:int=1)->nn.Conv2d:
    "A Conv2d whose weight is K (O×I/groups×kh×kw)"
    O,I,kh,kw = K.shape
    conv = nn.Conv2d(I*groups, O, (kh,kw), groups=groups, bias=False, dtype=K.dtype)
    with torch.no_grad(): conv.weight.copy_(K)
    return conv

def randk(*shape, seed=0, dtype=torch.float32)->torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)

def tail(S:torch.Tensor, r:int)->float: return S[...,r:].square().sum().sqrt().item()

# float32 factors carry one rounding (~6e-8 relative per entry): 1e-5·‖W‖ is far below any tail, 1e-10 in float64
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['f32', 'f64'])

# ---- Eckart–Young: the truncated SVD's error is exactly the tail of the singular values

@DTYPES
@pytest.mark.parametrize('rank', [1, 3, 7, 11])
@pytest.mark.parametrize('out_f,in_f', [(12,20), (20,12), (16,16)])
def test_linear_svd_error_is_tail(out_f, in_f, rank, dtype):
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad(): lin.weight.copy_(randk(out_f, in_f, seed=rank, dtype=dtype))
    W = lin.weight.detach().double()
    blk = FC_Decomposer().SVD(lin, rank=rank)
    W_hat = blk[1].weight.detach().double() @ blk[0].weight.detach().double()
    err,want = (W_hat-W).norm().item(), tail(torch.linalg.svdvals(W), rank)
    assert abs(err-want) <= ATOL[dtype]*W.norm().item(), f"Linear({in_f}, {out_f}) {dtype} rank {rank}: error {err:.8g}, Eckart–Young tail {want:.8g}"

# (O, I per group, kh, kw, groups)
CONVS = [(8,6,3,3,1), (6,10,3,5,1), (12,4,1,1,1), (5,7,5,3,1), (8,4,3,3,2), (6,3,1,5,3)]
def conv_id(s): return f"O{s[0]}-I{s[1]}-k{s[2]}x{s[3]}-g{s[4]}"

def svd_matrices(K:torch.Tensor, method:str)->torch.Tensor:
    "G×m×n matrices whose truncated SVDs channel SVD (O×(I·kh·kw)) and spatial SVD ((I·kh)×(O·kw)) are, written out here"
    G,O,I,kh,kw = K.shape
    return K.reshape(G, O, I*kh*kw) if method=='svd' else K.permute(0,2,3,1,4).reshape(G, I*kh, O*kw)

@DTYPES
@pytest.mark.parametrize('frac', [0.15, 0.5, 0.8])
@pytest.mark.parametrize('method', ['SVD', 'Spatial'])
@pytest.mark.parametrize('shape', CONVS, ids=[conv_id(s) for s in CONVS])
def test_conv_svd_error_is_tail(shape, method, frac, dtype):
    O,I,kh,kw,G = shape
    conv = conv_with(randk(G*O, I, kh, kw, seed=O*I+kh, dtype=dtype), G)
    K = conv.weight.detach().double().unflatten(0, (G, O))
    S = torch.linalg.svdvals(svd_matrices(K, method.lower()))
    rank = max(1, int(frac*S.shape[-1]))
    blk = getattr(Conv_Decomposer(), method)(conv, rank=rank)
    err = (block_kernel(blk, G)-K).norm().item()
    want = tail(S, rank)   # groups are factorized independently: the squared tails add up
    assert abs(err-want) <= ATOL[dtype]*K.norm().item(), f"{method} on {conv_id(shape)} {dtype} rank {rank}: error {err:.8g}, Eckart–Young tail {want:.8g}"

@pytest.mark.parametrize('energy', [0.3, 0.75, 0.95, 1.0])
@pytest.mark.parametrize('method', ['SVD', 'Spatial', 'Linear'])
def test_energy_picks_smallest_rank(method, energy):
    "energy=e (round_to=1) keeps the smallest rank whose leading singular values hold at least e of the squared total"
    K = randk(8, 6, 3, 3, seed=3)
    if method=='Linear':
        layer = nn.Linear(18, 8)
        with torch.no_grad(): layer.weight.copy_(K.flatten(1)[:, :18])
        S = torch.linalg.svdvals(layer.weight.detach().double())
        blk = FC_Decomposer().SVD(layer, energy=energy, round_to=1)
    else:
        layer = conv_with(K)
        S = torch.linalg.svdvals(svd_matrices(K.double()[None], method.lower())[0])
        blk = getattr(Conv_Decomposer(), method)(layer, energy=energy, round_to=1)
    share = S.square().cumsum(0)/S.square().sum()
    want = int((share < energy-1e-12).sum())+1
    assert blk.rank==want, f"{method} energy={energy}: rank {blk.rank}, expected {want} (cumulative shares {share.numpy().round(3)})"

# ---- Tucker-2 and CP: the error falls as the rank grows, down to zero at full rank

def tucker_errors(K, ranks, G=1): return [rel(block_kernel(Conv_Decomposer().Tucker(conv_with(K, G), rank=r), G), K.double().unflatten(0, (G,-1))) for r in ranks]
def cp_errors(K, ranks, G=1): return [rel(block_kernel(Conv_Decomposer().CP(conv_with(K, G), rank=r), G), K.double().unflatten(0, (G,-1))) for r in ranks]

MONO = [(8,6,3,3,1), (12,8,3,5,1), (8,4,3,3,2)]
SLACK = 1e-6  # Tucker's HOOI and CP's ALS are not exact minimisers: allow rounding, not a rise

@pytest.mark.parametrize('shape', MONO, ids=[conv_id(s) for s in MONO])
def test_tucker_error_falls_with_rank(shape):
    O,I,kh,kw,G = shape
    ranks = [(r, max(1, r*I//O)) for r in range(1, O+1)]
    errs = tucker_errors(randk(G*O, I, kh, kw, seed=1), ranks, G)
    rises = [(ranks[i], ranks[i+1]) for i in range(len(errs)-1) if errs[i+1] > errs[i]+SLACK]
    assert not rises, f"Tucker on {conv_id(shape)}: error rose between ranks {rises}; errors {np.round(errs, 5)}"
    assert errs[-1] < 1e-6, f"Tucker on {conv_id(shape)} at full ranks {ranks[-1]}: error {errs[-1]:.2e}"

@pytest.mark.parametrize('shape', MONO, ids=[conv_id(s) for s in MONO])
def test_cp_error_falls_with_rank(shape):
    O,I,kh,kw,G = shape
    ranks = [1, 2, 4, 8, 16, 24, 32]
    errs = cp_errors(randk(G*O, I, kh, kw, seed=2), ranks, G)
    rises = [(ranks[i], ranks[i+1]) for i in range(len(errs)-1) if errs[i+1] > errs[i]+SLACK]
    assert not rises, f"CP on {conv_id(shape)}: error rose between ranks {rises}; errors {np.round(errs, 4)}"
    full = Conv_Decomposer().CP(conv_with(K := randk(G*O, I, kh, kw, seed=2), G), rank='full')
    assert (e := rel(block_kernel(full, G), K.double().unflatten(0, (G,-1)))) < 1e-6, f"CP on {conv_id(shape)} at rank='full': error {e:.2e}"

# ---- TensorLy is the reference implementation

REF = [(8,6,3,3), (6,10,3,3), (12,8,3,5), (16,16,3,3), (4,12,5,5)]
def ref_id(s): return 'x'.join(map(str, s))

TUCKER_RANKS = [(1,1), (2,2), (3,2), (4,4), (2,5), (6,4)]
TUCKER_CASES = [pytest.param(s, r, id=f"{ref_id(s)}-r{r[0]}x{r[1]}")
                for s in REF for r in TUCKER_RANKS if r[0] <= s[0] and r[1] <= s[1]]

@pytest.mark.parametrize('shape,rank', TUCKER_CASES)
def test_tucker_matches_tensorly(shape, rank):
    "Our Tucker-2 is no worse than TensorLy's partial_tucker (HOOI to convergence) on the channel modes, within 1%"
    K = randk(*shape, seed=sum(shape))
    ours = rel(block_kernel(Conv_Decomposer().Tucker(conv_with(K), rank=rank)), K.double()[None])
    X = K.double().numpy()
    with tl.backend_context('numpy'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        (core, factors), _ = partial_tucker(X, list(rank), modes=[0,1], init='svd', random_state=0)
        ref = float(np.linalg.norm(tl.tenalg.multi_mode_dot(core, factors, modes=[0,1]) - X)/np.linalg.norm(X))
    assert ours <= 1.01*ref + 1e-9, f"Tucker {ref_id(shape)} ranks {rank}: our error {ours:.5f} vs TensorLy partial_tucker {ref:.5f} ({ours/ref-1:+.2%})"

CP_RANKS = [1, 3, 5, 8, 12, 20]
CP_CASES = [(s, r) for s in REF for r in CP_RANKS]
CP_ITERS = 30  # the most sweeps cp makes (on small kernels like these)

@pytest.mark.parametrize('shape,rank', CP_CASES, ids=[f"{ref_id(s)}-r{r}" for s,r in CP_CASES])
def test_cp_matches_tensorly(shape, rank):
    "Our CP is no worse than TensorLy's parafac(init='svd') with the same iteration budget, within 5%"
    K = randk(*shape, seed=sum(shape))
    ours = rel(block_kernel(Conv_Decomposer().CP(conv_with(K), rank=rank)), K.double()[None])
    X = K.double().numpy()
    with tl.backend_context('numpy'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = float(np.linalg.norm(tl.cp_to_tensor(parafac(X, rank, n_iter_max=CP_ITERS, init='svd', random_state=0)) - X)/np.linalg.norm(X))
    assert ours <= 1.05*ref + 1e-9, f"CP {ref_id(shape)} rank {rank}: our error {ours:.4f} vs TensorLy parafac {ref:.4f} ({ours/ref-1:+.2%})"

# ---- CP stability on a realistic layer size

@pytest.mark.parametrize('rank', [16, 32])
def test_cp_stable_on_64x64(rank):
    "No degenerate CP (huge components cancelling each other): factors finite and of the kernel's scale, fit error < 1"
    K = randk(64, 64, 3, 3, seed=7)
    blk = Conv_Decomposer().CP(conv_with(K), rank=rank)
    ws = [f.weight.detach().double() for f in blk]
    assert all(torch.isfinite(w).all() for w in ws), f"CP rank {rank} on 64×64×3×3: non-finite factors"
    cols = [ws[0][:,:,0,0], ws[1][:,0,:,0], ws[2][:,0,0,:], ws[3][:,:,0,0].T]   # rank×(I, kh, kw, O)
    norms = torch.stack([c.norm(dim=1) for c in cols])                        # 4×rank column norms
    Kn = K.double().norm().item()
    share = norms.max().item()/Kn**0.25   # each of the 4 factors carries a 4th root of a component's weight
    assert share <= 2, f"CP rank {rank} on 64×64×3×3: a factor column has norm {norms.max():.3g}, {share:.2f}× ‖K‖^¼"
    lam = norms.prod(0)
    assert lam.max().item() <= 2*Kn, f"CP rank {rank} on 64×64×3×3: a component has weight {lam.max():.3g} > 2‖K‖ = {2*Kn:.3g}"
    e = rel(block_kernel(blk), K.double()[None])
    assert e < 1, f"CP rank {rank} on 64×64×3×3: fit error {e:.3f}"

# ---- big layers take another path (float32, randomized subspace iteration on the Gram, bf16 where the CPU has it)

@pytest.mark.slow
@pytest.mark.parametrize('rank', [64, 256])
def test_big_linear_svd_near_tail(rank):
    "A 1536×9000 Linear (m²n = 2.1e10, the subspace-iteration path): the truncated SVD's error is within the documented 2% of the tail"
    m,n = 1536, 9000
    lin = nn.Linear(n, m, bias=False)
    with torch.no_grad(): lin.weight.copy_(randk(m, n, seed=5)*torch.logspace(0, -1, m)[:,None])   # a decaying spectrum
    W = lin.weight.detach().double()
    ev = torch.linalg.eigvalsh(W @ W.T).flip(0).clamp_min(0)        # σ², much cheaper than svdvals here
    want = ev[rank:].sum().sqrt().item()
    blk = FC_Decomposer().SVD(lin, rank=rank)
    err = (W - blk[1].weight.detach().double() @ blk[0].weight.detach().double()).norm().item()
    assert err <= 1.02*want, f"Linear({n}, {m}) rank {rank}: error {err:.6g}, Eckart–Young tail {want:.6g} ({err/want-1:+.2%})"

# ---- ranks from fractions are multiples of ROUND_TO (8) by default: the channel blocks of runtimes' vector kernels

from fasterai_lr.factorize import ROUND_TO, round_rank, round_rank_up
from fasterai_lr.layers import layer_full_ranks
from fasterai_lr.decompose import decompose_model
from fasterai_lr.callback import DecomposeCallback

def _aligned(r, full, step=ROUND_TO): return all(a==f or a % step==0 or a < step for a,f in zip(*((r, full) if isinstance(r, tuple) else ((r,), (full,)))))

ROUNDED = [(m, opt, v) for m in ('Tucker', 'CP', 'SVD', 'Spatial') for opt,v in (('keep', 0.3), ('keep', 0.5), ('percent_removed', 0.4), ('energy', 0.7))
           if not (m=='CP' and opt=='energy')]

@pytest.mark.parametrize('method,opt,v', ROUNDED, ids=[f"{m}-{o}-{v}" for m,o,v in ROUNDED])
def test_fraction_ranks_are_rounded(method, opt, v):
    "keep= and percent_removed= round down to multiples of 8 (or leave the full rank), energy= rounds up; round_to=1 gives the exact rule"
    layer = conv_with(randk(72, 40, 3, 3, seed=5))
    f,full = getattr(Conv_Decomposer(), method),layer_full_ranks(layer)[method.lower()]
    r,exact = f(layer, **{opt: v}).rank,f(layer, **{opt: v}, round_to=1).rank
    assert _aligned(r, full), f"{method} {opt}={v}: rank {r} is not a multiple of {ROUND_TO}"
    if opt=='energy': assert r==round_rank_up(exact, ROUND_TO, full), (r, exact)
    elif method!='Tucker' or opt=='percent_removed': assert r==round_rank(exact, ROUND_TO, full), (r, exact)
    else:   # Tucker's keep= searches the pairs of multiples for the least error bound: within keep, at most the exact pair's parameters
        cost = lambda rk: sum(l.weight.numel() for l in f(layer, rank=rk))
        assert cost(exact) >= cost(r) and cost(r) <= v*layer.weight.numel() and cost(r) > 0.6*v*layer.weight.numel(), (r, exact)
    assert _aligned(f(layer, **{opt: v}, round_to=16).rank, full, 16), f"{method} {opt}={v}, round_to=16"

def test_walk_and_callback_round():
    "decompose_model and DecomposeCallback round the same way, and take round_to=; a bad round_to is refused before anything is touched"
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 72, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 12, 12))
    _,rep = decompose_model(model, 'tucker', keep=0.5, quiet=True, head=True)
    mods = dict(model.named_modules())
    done = rep[rep.method.notna()]
    assert len(done) >= 2 and all(_aligned(r, layer_full_ranks(mods[n])[m]) for n,m,r in zip(done.layer, done.method, done['rank'])), rep
    _,exact = decompose_model(model, 'tucker', keep=0.5, quiet=True, head=True, round_to=1)
    assert list(exact['rank']) != list(rep['rank']), "round_to=1 gives the exact ranks"
    assert DecomposeCallback(keep=0.5, round_to=1).opts['round_to']==1 and DecomposeCallback(keep=0.5).opts['round_to']==ROUND_TO
    for bad in (0, 2.5, 'eight'):
        with pytest.raises((ValueError, TypeError), match='round_to'): decompose_model(model, 'tucker', keep=0.5, quiet=True, round_to=bad)
        with pytest.raises((ValueError, TypeError), match='round_to'): DecomposeCallback(keep=0.5, round_to=bad)
