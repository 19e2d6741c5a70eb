"Every builder's factors are balanced (each rank component has one norm in every layer that holds it) and compute what the unbalanced factorization computes"
import pytest, torch
from torch import nn
from fasterai_lr.factorize import svd_factors, svd_matrix, tucker2, tucker2_to_tensor, cp, cp_to_tensor, full_ranks
from fasterai_lr.layers import BUILDERS, kernel, linear_svd, component_norms

BAL = 1e-5  # relative spread of a component's norms over its factors: float32 weights of float64 factors
OUT = 1e-4  # relative output error, float32

LAYERS = {  # name: a layer and its input
    'plain':      (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 9, 8)),
    'groups-bias':(lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=True), (2, 8, 7, 9)),
    'nonsquare':  (lambda: nn.Conv2d(6, 8, (3,5), stride=(2,1), padding=(1,2), bias=False), (2, 6, 11, 13)),
    'strided':    (lambda: nn.Conv2d(4, 6, 5, stride=2, dilation=(1,2), padding=2, padding_mode='reflect'), (2, 4, 12, 14)),
    'depthwise':  (lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6), (2, 6, 8, 8)),
    'pointwise':  (lambda: nn.Conv2d(10, 7, 1, groups=1), (2, 10, 5, 6)),
    'linear':     (lambda: nn.Linear(20, 9), (3, 20)),
}
METHODS = ('svd', 'spatial', 'tucker', 'cp')

def relerr(y, ref): return ((y-ref).norm()/ref.norm()).item()

def ranks(K, method)->dict:
    "A few ranks of `method` for kernels K: truncated ones and the full one; Tucker's with each mode kept whole too"
    f = full_ranks(K.shape)[method]
    if method!='tucker': return {'low': max(1, f//3), 'mid': max(1, f-1), 'full': f}
    (O,I),h = f, lambda n: max(1, n//2)
    return {'low': (h(O), h(I)), 'out-whole': (O, h(I)), 'in-whole': (h(O), I), 'full': (O, I)}

def truncated_kernel(K, method, rank):
    "The kernel the unbalanced factorization of `method` at `rank` stands for, from `factorize` directly"
    O,I,kh,kw = K.shape[-4:]
    if method=='tucker': return tucker2_to_tensor(*tucker2(K, rank))
    if method=='cp': return cp_to_tensor(cp(K, rank))
    M = torch.matmul(*svd_factors(svd_matrix(K, method), rank))
    return M.unflatten(-1, (I,kh,kw)) if method=='svd' else M.unflatten(-1, (O,kw)).unflatten(-3, (I,kh)).movedim(-2,-4)

def run_with(layer, Kh, x):
    "`layer` run with kernels Kh (G×O×I×kh×kw) for its weights"
    W = Kh.flatten(0,1).to(layer.weight.dtype)
    if isinstance(layer, nn.Linear): return nn.functional.linear(x, W[...,0,0], layer.bias)
    return layer._conv_forward(x, W, layer.bias)

CASES = [(n, m, r) for n,(make,_) in LAYERS.items() for m in (('svd',) if n=='linear' else METHODS)
         for r in ranks(kernel(make()), m)]

@pytest.mark.parametrize('name,method,rk', CASES, ids=[f"{n}-{m}-{r}" for n,m,r in CASES])
def test_balanced_and_unchanged(name, method, rk):
    make,shape = LAYERS[name]
    layer,x = make(), torch.randn(*shape)
    K = kernel(layer)
    rank = ranks(K, method)[rk]
    blk = linear_svd(layer, rank) if isinstance(layer, nn.Linear) else BUILDERS[method](layer, rank)
    for ns in component_norms(blk):
        live = (ns > 0).all(0)
        spread = (ns[:, live]/ns[:1, live] - 1).abs().max().item() if live.any() else 0.
        assert spread <= BAL, f"{name} {method} rank {rank}: a component's norms differ by {spread:.2e} across its factors\n{ns}"
    with torch.no_grad():
        y = blk(x)
        e = relerr(y, layer(x)) if rk=='full' else relerr(y, run_with(layer, truncated_kernel(K, method, rank), x))
    what = "the layer's output" if rk=='full' else "the unbalanced factorization's output"
    assert e <= OUT, f"{name} {method} rank {rank}: relative error {e:.2e} to {what}"

def test_tucker_whole_mode_has_no_layer():
    "A mode kept whole is left the identity that the block folds into the core: the block's layers are what `shell` lays out"
    conv = nn.Conv2d(8, 12, 3, padding=1)
    for rank,n in (((12, 4), 2), ((6, 8), 2), ((12, 8), 1), ((6, 4), 3)):
        blk = BUILDERS['tucker'](conv, rank)
        assert len(blk)==n, f"Tucker {rank}: {len(blk)} layers, expected {n}"
        assert len(component_norms(blk))==n-1, f"Tucker {rank}: {len(component_norms(blk))} stacks of component norms for {n} layers"
