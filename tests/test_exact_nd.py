"Conv1d, Conv3d and transposed convs: exact at rank='full', blocks cost what `kernel_costs` says, truncation behaves, clear refusals"
import math, random, pytest, torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.factorize import kernel_costs, full_ranks, svd_matrix, as_2d
from fasterai_lr.layers import Factorized, kernel, layer_method, conv_spatial, component_norms
from fasterai_lr.decompose import Conv_Decomposer

TOL = 1e-5  # float32: the factors are computed in float64 and rounded once, the block runs 2–5 float32 layers
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

def relerr(y, ref): return ((y-ref).norm()/ref.norm()).item()
def tup(v, n): return (v,)*n if isinstance(v, int) else tuple(v)

# ---- the grids: a seeded draw of valid settings per kind, plus hand-picked edge cases

KINDS = {  # name: (class, spatial dims, transposed)
    'Conv1d': (nn.Conv1d, 1, False), 'Conv3d': (nn.Conv3d, 3, False), 'ConvTranspose2d': (nn.ConvTranspose2d, 2, True),
    'ConvTranspose1d': (nn.ConvTranspose1d, 1, True), 'ConvTranspose3d': (nn.ConvTranspose3d, 3, True)}
METHODS = {n: ('Tucker', 'CP', 'SVD') if nd==1 else ('Tucker', 'CP', 'SVD', 'Spatial') for n,(_,nd,_) in KINDS.items()}
CHOICES = {  # kernels (non-cubic ones too), strides, paddings (strings: not for transposed convs), dilations; per spatial dims
    1: dict(k=[1, 2, 3, 5, 7], s=[1, 2, 3], p=[0, 1, 2, 3, (2,), 'same', 'valid'], d=[1, 2, 3]),
    2: dict(k=[1, 3, 5, (1,3), (3,1), (3,5), (2,4)], s=[1, 2, (2,1), (1,3)], p=[0, 1, 2, (1,0), (0,2)], d=[1, 2, (1,2)]),
    3: dict(k=[1, 3, (1,3,3), (3,1,1), (3,2,3), (2,3,1), (1,1,3)], s=[1, 2, (1,2,1), (2,1,1)], p=[0, 1, (1,0,1), (0,1,0), 'same', 'valid'],
            d=[1, (1,2,1), (2,1,1)]),
}
MODES = ['zeros', 'reflect', 'replicate', 'circular']
MAX_SIZE = {1: 24, 2: 12, 3: 7}   # input side: Conv3d inputs stay within 7³

def case_id(c)->str:
    n = KINDS[c['kind']][1]
    x = lambda v: 'x'.join(map(str, tup(v, n)))
    p = c['p'] if isinstance(c['p'], str) else x(c['p'])
    op = f"-op{x(c['op'])}" if 'op' in c else ''
    b = 'bias' if c['bias'] else 'nobias'
    return f"{c['kind']}-k{x(c['k'])}-s{x(c['s'])}-p{p}-d{x(c['d'])}{op}-{c['mode']}-{b}-g{c['g']}-{c['cin']}to{c['cout']}"

def pads(c, n):
    "Padding per side (the larger side of an uneven 'same')"
    if not isinstance(c['p'], str): return tup(c['p'], n)
    return (0,)*n if c['p']=='valid' else tuple(-(-d*(k-1)//2) for k,d in zip(tup(c['k'], n), tup(c['d'], n)))

def input_size(c)->tuple:
    "Input sides just big enough for the setting (the dilated kernel fits, reflect padding < side), unequal sides"
    n,tr = KINDS[c['kind']][1:]
    if tr: return tuple(3+i for i in range(n))
    return tuple(d*(k-1)+1+extra for k,d,extra in zip(tup(c['k'], n), tup(c['d'], n), (2, 1, 0)[:n] if n==3 else (2, 3)[:n]))

def valid(c)->bool:
    n,tr = KINDS[c['kind']][1:]
    if c['p']=='same' and tup(c['s'], n)!=(1,)*n: return False   # PyTorch allows padding='same' with stride 1 only
    size = input_size(c)
    if not tr: return max(size) <= MAX_SIZE[n] and all(p < s for p,s in zip(pads(c, n), size))
    out = [(i-1)*s - 2*p + d*(k-1) + o + 1 for i,s,p,d,k,o in zip(size, *(tup(c[a], n) for a in ('s', 'p', 'd', 'k', 'op')))]
    return min(out) >= 1

def draw(kind:str, n_cases:int, seed:int, max_ch:int=12)->list[dict]:
    "`n_cases` distinct valid settings of `kind` drawn at random: groups 1/2/4, 4–`max_ch` channels"
    rng,out = random.Random(seed),{}
    _,n,tr = KINDS[kind]
    ch = CHOICES[n]
    while len(out) < n_cases:
        c = dict(kind=kind, k=rng.choice(ch['k']), s=rng.choice(ch['s']), p=rng.choice(ch['p']), d=rng.choice(ch['d']),
                 mode='zeros' if tr else rng.choice(MODES), bias=rng.random() < 0.5, g=rng.choice([1, 2, 4]))
        if tr:   # no string padding; output padding below the stride or the dilation, per dim
            if isinstance(c['p'], str): continue
            c['op'] = tuple(rng.randrange(max(s, d)) for s,d in zip(tup(c['s'], n), tup(c['d'], n)))
        g = c['g']
        c['cin'],c['cout'] = (g*rng.randint(-(-4//g), max_ch//g) for _ in range(2))
        if valid(c): out[case_id(c)] = c
    return list(out.values())

def edge(kind, k, s=1, p=0, d=1, mode='zeros', bias=True, g=1, cin=4, cout=6, op=None):
    c = dict(kind=kind, k=k, s=s, p=p, d=d, mode=mode, bias=bias, g=g, cin=cin, cout=cout)
    if KINDS[kind][2]: c['op'] = op or 0
    assert valid(c), case_id(c)
    return c

EDGES = [  # what a random draw may miss
    edge('Conv1d', 1, s=2, cin=6, cout=10),                                        # strided pointwise
    edge('Conv1d', 7, s=2, p=3, cin=1, cout=8, bias=False),                        # one input channel (a raw signal)
    edge('Conv1d', 3, p=1, mode='reflect', cin=12, cout=1),                        # one output channel
    edge('Conv1d', 3, p=1, g=8, cin=8, cout=8),                                    # depthwise
    edge('Conv1d', 4, p='same', d=2, mode='circular', cin=5, cout=7),              # even kernel: 'same' pads unevenly
    edge('Conv1d', 3, p=3, cin=4, cout=6),                                         # padding wider than the kernel
    edge('Conv3d', 1, s=2, cin=6, cout=8),
    edge('Conv3d', 3, p=1, g=4, cin=4, cout=8, mode='replicate'),                  # depthwise, multiplier 2
    edge('Conv3d', (3,1,1), p=(1,0,0), mode='reflect', cin=3, cout=8),             # temporal-only kernel, RGB video
    edge('Conv3d', (1,3,3), s=(1,2,2), p=(0,1,1), mode='circular', cin=5, cout=3), # spatial-only kernel
    edge('Conv3d', (2,2,2), p='same', cin=4, cout=4, bias=False),
    edge('ConvTranspose2d', 4, s=2, p=1, cin=8, cout=4),                           # the DCGAN upsampler
    edge('ConvTranspose2d', 3, s=2, p=1, op=1, g=2, cin=6, cout=4),                # output padding to double the size
    edge('ConvTranspose2d', 1, s=2, op=(1,0), cin=4, cout=6),                      # strided pointwise
    edge('ConvTranspose2d', (3,5), s=(3,1), p=(0,2), d=(1,2), op=(2,1), g=4, cin=8, cout=8),  # output padding below the dilation
    edge('ConvTranspose2d', 3, p=1, g=4, cin=4, cout=4),                           # depthwise
    edge('ConvTranspose1d', 4, s=2, p=1, cin=6, cout=4),
    edge('ConvTranspose3d', (2,4,4), s=(1,2,2), p=(0,1,1), cin=4, cout=6),
]

GRIDS = {'Conv1d': draw('Conv1d', 200, 0), 'Conv3d': draw('Conv3d', 200, 1, max_ch=8), 'ConvTranspose2d': draw('ConvTranspose2d', 200, 2),
         'ConvTranspose1d': draw('ConvTranspose1d', 30, 3), 'ConvTranspose3d': draw('ConvTranspose3d', 30, 4, max_ch=8)}
CASES = [c for g in GRIDS.values() for c in g] + EDGES
for kind in ('Conv1d', 'Conv3d', 'ConvTranspose2d'):
    n = len({case_id(c) for c in CASES if c['kind']==kind})
    assert n >= 200, f"the grid should hold at least 200 distinct {kind} settings, has {n}"
assert len({case_id(c) for c in CASES})==len(CASES), "duplicate settings"

def make(c)->nn.Module:
    cls,n,tr = KINDS[c['kind']]
    kw = dict(output_padding=c['op']) if tr else dict(padding_mode=c['mode'])
    return cls(c['cin'], c['cout'], c['k'], c['s'], c['p'], dilation=c['d'], groups=c['g'], bias=c['bias'], **kw)

def sample(conv, c, n:int=2)->torch.Tensor: return torch.randn(n, conv.in_channels, *input_size(c))

@pytest.mark.parametrize('c', CASES, ids=[case_id(c) for c in CASES])
def test_full_rank_exact(c):
    "Each method at rank='full' on one setting: same output, and its factor layers are the source's kind"
    conv = make(c)
    x = sample(conv, c)
    with torch.no_grad(): ref = conv(x)
    bad = []
    for method in METHODS[c['kind']]:
        blk = getattr(Conv_Decomposer(), method)(conv, rank='full')
        assert isinstance(blk, Factorized) and blk.method==method.lower(), f"{method} on {case_id(c)}: got {blk!r}"
        assert all(type(f) is type(conv) for f in blk), f"{method} on {case_id(c)}: factor layers {[type(f).__name__ for f in blk]}"
        with torch.no_grad(): y = blk(x)
        if y.shape!=ref.shape: bad.append(f"{method}: output shape {tuple(y.shape)}, expected {tuple(ref.shape)}")
        elif (e := relerr(y, ref)) > TOL: bad.append(f"{method}: relative error {e:.2e} > {TOL}")
    assert not bad, f"rank='full' on {case_id(c)} (input {tuple(x.shape)}): " + '; '.join(bad)

# ---- costs: parameters counted, multiply-adds as torch's FlopCounterMode counts them

def macs(module, x)->int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc: module(x)
    return fc.get_total_flops()//2   # FLOPs/2: no bias adds (tests/test_costs.py checks the counter ignores them)

def full_rank(method, O, I, ks):
    "Exact ranks per group, written out here rather than taken from the library"
    kh,kw = math.prod(ks[:-1]),ks[-1]
    dims = [O, I, *ks]
    return dict(SVD=min(O, I*kh*kw), Spatial=min(I*kh, O*kw), Tucker=(O, I),
                CP=min(math.prod(dims[:i]+dims[i+1:]) for i in range(len(dims))))[method]

def ranks_for(method, O, I, ks):
    full = full_rank(method, O, I, ks)
    if method=='Tucker': return [(1,1), (max(1, O//2), max(1, I//3)), full]
    return sorted({1, max(1, full//2), full})

COST_CASES = [dict(c, bias=False) for g in GRIDS.values() for c in g[:10]] + [dict(c, bias=False) for c in EDGES[::3]]

@pytest.mark.parametrize('c', COST_CASES, ids=[case_id(c) for c in COST_CASES])
def test_costs(c):
    "Every block's parameters (bias-free layers: all of them are weights) and multiply-adds match `kernel_costs`"
    conv = make(c)
    x = sample(conv, c, n=1)
    G,O,I,*ks = kernel(conv).shape
    sizes = dict(size_in=tuple(x.shape[2:]), size_out=tuple(conv(x).shape[2:]), transposed=conv.transposed)
    count = lambda m: (sum(p.numel() for p in m.parameters()), macs(m, x))
    closed = kernel_costs('original', None, O, I, ks, G, **sizes)
    assert closed==count(conv), f"original {case_id(c)}: kernel_costs {closed}, counted {count(conv)}"
    for method in METHODS[c['kind']]:
        for r in ranks_for(method, O, I, ks):
            blk = getattr(Conv_Decomposer(), method)(conv, rank=r)
            assert blk.rank==r, f"{method} {case_id(c)}: asked rank {r}, block has {blk.rank}"
            closed,counted = kernel_costs(method.lower(), r, O, I, ks, G, **sizes), count(blk)
            assert closed==counted, f"{method} rank {r} on {case_id(c)}, input {tuple(x.shape)}: kernel_costs (params, MACs) = {closed}, counted {counted}"

# ---- truncation

def block_kernel(blk:Factorized)->torch.Tensor:
    "The per-group kernel (G×O×I×k…) a block computes: its layers' kernels multiplied in channels, their disjoint spatial axes side by side"
    G = blk[0].groups
    T = None
    for l in blk:
        W = kernel(l)
        if l.groups > G:   # depthwise: a diagonal G×R×R×k… kernel
            W = torch.diag_embed(W.reshape(G, -1, *W.shape[3:]).movedim(1, -1)).movedim(-2, 1).movedim(-1, 2)
        W = W.double()
        T = W if T is None else torch.einsum('goc...,gci...->goi...', W, T)
    return T

SWEEP = [edge('Conv1d', 5, p=2, cin=8, cout=12, g=2), edge('Conv3d', (3,2,3), p=1, cin=6, cout=8),
         edge('ConvTranspose2d', (3,5), s=2, p=1, op=1, cin=8, cout=10), edge('ConvTranspose3d', 3, s=2, cin=4, cout=6, g=2)]
SWEEP_CASES = [(c, m) for c in SWEEP for m in METHODS[c['kind']]]

@pytest.mark.parametrize('c,method', SWEEP_CASES, ids=[f"{case_id(c)}-{m}" for c,m in SWEEP_CASES])
def test_error_falls_with_rank(c, method):
    "The relative error of the kernel a block computes does not grow with the rank, and is 0 at full rank"
    conv = make(c)
    K = kernel(conv).double()
    G,O,I,*ks = K.shape
    full = full_rank(method, O, I, ks)
    rs = [(max(1, round(f*O)), max(1, round(f*I))) for f in (.2, .4, .6, .8)] + [full] if method=='Tucker' else \
         sorted({max(1, round(f*full)) for f in (.1, .25, .5, .75)}) + [full]
    errs = [relerr(block_kernel(getattr(Conv_Decomposer(), method)(conv, rank=r)), K) for r in rs]
    slack = 1e-2 if method=='CP' else 1e-6   # CP: ALS finds a local optimum, a rank's may be a little worse than a lower rank's
    assert all(b <= a*(1+slack) + 1e-7 for a,b in zip(errs, errs[1:])), f"{method} on {case_id(c)}: errors {errs} at ranks {rs} grow"
    assert errs[-1] <= TOL, f"{method} on {case_id(c)}: error {errs[-1]:.2e} at full rank"
    assert errs[0] > 10*TOL, f"{method} on {case_id(c)}: the lowest rank is already exact, the sweep says nothing"

EY = [(c, m) for c in SWEEP for m in ('SVD', 'Spatial') if m in METHODS[c['kind']]]

@pytest.mark.parametrize('c,method', EY, ids=[f"{case_id(c)}-{m}" for c,m in EY])
def test_eckart_young(c, method):
    "Channel and spatial SVD: the relative weight error at rank r is the tail of the singular values past r (over all groups)"
    conv = make(c)
    K = kernel(conv).double()
    S = torch.linalg.svdvals(svd_matrix(as_2d(K, K.ndim-3), method.lower()))   # G×min(m,n)
    for r in range(1, S.shape[-1]+1):
        tail = (S[:, r:].square().sum()/S.square().sum()).sqrt().item()
        e = relerr(block_kernel(getattr(Conv_Decomposer(), method)(conv, rank=r)), K)
        assert abs(e - tail) <= 1e-5, f"{method} rank {r} on {case_id(c)}: relative weight error {e:.7f}, singular value tail {tail:.7f}"

@pytest.mark.parametrize('c', SWEEP, ids=[case_id(c) for c in SWEEP])
@pytest.mark.parametrize('keep', [0.25, 0.5])
def test_keep_budget(c, keep):
    "keep= (round_to=1) gives the largest rank whose block holds at most `keep` of the layer's parameters"
    conv = make(c)
    G,O,I,*ks = kernel(conv).shape
    p0 = kernel_costs('original', None, O, I, ks, G)[0]
    for method in METHODS[c['kind']]:
        blk = getattr(Conv_Decomposer(), method)(conv, keep=keep, round_to=1)
        p,least = sum(l.weight.numel() for l in blk), blk.rank in (1, (1,1))   # rank 1 is the least keep= gives, over budget or not
        assert p <= keep*p0 or least, f"{method} keep={keep} on {case_id(c)}: {p} parameters at rank {blk.rank}, over {keep} of {p0}"
        if method=='Tucker': continue
        assert kernel_costs(method.lower(), blk.rank+1, O, I, ks, G)[0] > keep*p0, f"{method} keep={keep} on {case_id(c)}: rank {blk.rank}+1 fits too"

@pytest.mark.parametrize('c', SWEEP, ids=[case_id(c) for c in SWEEP])
def test_balanced(c):
    "Each rank component has one norm in every layer that holds it, for n-D and transposed blocks too"
    conv = make(c)
    for method in METHODS[c['kind']]:
        G,O,I,*ks = kernel(conv).shape
        r = full_rank(method, O, I, ks)
        blk = getattr(Conv_Decomposer(), method)(conv, rank=(max(1, O//2), max(1, I//2)) if method=='Tucker' else max(1, r//2))
        for ns in component_norms(blk):
            live = (ns > 0).all(0)
            spread = (ns[:, live]/ns[:1, live] - 1).abs().max().item() if live.any() else 0.
            assert spread <= 1e-5, f"{method} on {case_id(c)}: a component's norms differ by {spread:.2e} across its factors"

# ---- what is refused, and what a model's walk does instead

def snapshot(layer): return {k: v.clone() for k,v in layer.state_dict().items()}

@pytest.mark.parametrize('make_layer', [lambda: nn.Conv1d(4, 6, 3), lambda: nn.ConvTranspose1d(4, 6, 3, stride=2)],
                         ids=['Conv1d', 'ConvTranspose1d'])
@pytest.mark.parametrize('opt', [dict(rank=2), dict(rank='full'), dict(keep=0.5), dict(energy=0.9), dict(percent_removed=0.5)], ids=str)
def test_spatial_on_1d_refused(make_layer, opt):
    "Spatial SVD of a 1-D conv is its channel SVD: a ValueError that says to pass SVD, the layer unchanged"
    layer = make_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"pass method='svd' \(Conv_Decomposer\(\)\.SVD\)") as info:
        Conv_Decomposer().Spatial(layer, name='enc.0', **opt)
    assert 'enc.0' in str(info.value), f"the error does not name the layer: {info.value}"
    assert all(torch.equal(v, layer.state_dict()[k]) for k,v in before.items()), "the layer was changed"
    with pytest.raises(ValueError, match="method 'svd'"): conv_spatial(layer, 2)

@pytest.mark.parametrize('layer,method,expected', [
    (nn.Conv1d(4, 4, 1), 'tucker', 'svd'), (nn.Conv3d(4, 4, 1), 'cp', 'svd'), (nn.ConvTranspose2d(4, 4, 1, stride=2), 'tucker', 'svd'),
    (nn.Conv1d(4, 4, 3), 'spatial', 'svd'), (nn.Conv1d(4, 4, 3), 'cp', 'cp'), (nn.Conv3d(4, 4, (1,1,3)), 'spatial', 'spatial'),
    (nn.ConvTranspose3d(4, 4, 3), 'tucker', 'tucker')], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v)
def test_layer_method(layer, method, expected):
    got = layer_method(layer, method)
    assert got==expected, f"layer_method({layer}, {method!r}) = {got!r}, expected {expected!r}"

def test_transposed_kernel_layout():
    "`kernel` of a transposed conv is out-channels first, per group, like every other layer's"
    ct = nn.ConvTranspose2d(4, 6, (3,5), groups=2)          # weight 4×3×3×5: in-channels first
    K = kernel(ct)
    assert K.shape==(2, 3, 2, 3, 5), f"kernel shape {tuple(K.shape)}"
    assert torch.equal(K[1, 2, 0], ct.weight[2+0, 2]), "kernel[g, o, i] is weight[g·I + i, o]"
    assert full_ranks(K.shape)==dict(svd=3, spatial=6, tucker=(3, 2), cp=18), f"full ranks {full_ranks(K.shape)}"
