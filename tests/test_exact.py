"At rank='full' every method computes exactly what the layer it replaces computed: a grid of Conv2d and Linear settings"
import random, pytest, torch, pandas as pd
from torch import nn
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer

TOL = 1e-5  # float32: the factors are computed in float64 and rounded once, the block runs 2–4 float32 layers
METHODS = ('Tucker', 'CP', 'SVD', 'Spatial')

def relerr(y, ref): return ((y-ref).norm()/ref.norm()).item()
def pair(v): return (v, v) if isinstance(v, int) else tuple(v)

# ---- the grid: a seeded draw of valid Conv2d settings, plus hand-picked edge cases

KERNELS = [1, 3, 5, 7, (1,3), (3,1), (3,5), (5,3)]
STRIDES = [1, 2, (2,1)]
PADDINGS = [0, 1, 2, 3, (1,0), (0,2), (2,1), 'same', 'valid']
DILATIONS = [1, 2, (1,2)]
MODES = ['zeros', 'reflect', 'replicate', 'circular']
GROUPS = [1, 2, 4]

def case_id(c)->str:
    k,s,d = pair(c['k']),pair(c['s']),pair(c['d'])
    p = c['p'] if isinstance(c['p'], str) else 'x'.join(map(str, pair(c['p'])))
    return f"k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p}-d{d[0]}x{d[1]}-{c['mode']}-{'bias' if c['bias'] else 'nobias'}-g{c['g']}-{c['cin']}to{c['cout']}"

def draw(n=250, seed=0)->list[dict]:
    "`n` valid settings drawn at random (PyTorch allows padding='same' only with stride 1); 4–12 channels"
    rng,out = random.Random(seed),{}
    while len(out) < n:
        c = dict(k=rng.choice(KERNELS), s=rng.choice(STRIDES), p=rng.choice(PADDINGS), d=rng.choice(DILATIONS),
                 mode=rng.choice(MODES), bias=rng.random() < 0.5, g=rng.choice(GROUPS))
        if c['p']=='same' and pair(c['s'])!=(1,1): continue
        g = c['g']
        c['cin'],c['cout'] = (g*rng.randint(-(-4//g), 12//g) for _ in range(2))
        out[case_id(c)] = c
    return list(out.values())

EDGES = [  # what a random draw may miss
    dict(k=1, s=2, p=0, d=1, mode='zeros', bias=True, g=1, cin=6, cout=10),            # strided 1×1 (ResNet shortcut)
    dict(k=7, s=2, p=3, d=1, mode='zeros', bias=False, g=1, cin=1, cout=8),            # stem on a grey image: one input channel
    dict(k=3, s=1, p=1, d=1, mode='reflect', bias=True, g=1, cin=12, cout=1),          # one output channel
    dict(k=3, s=1, p=1, d=1, mode='zeros', bias=True, g=8, cin=8, cout=8),             # depthwise
    dict(k=(3,5), s=(2,1), p=(1,2), d=1, mode='replicate', bias=True, g=4, cin=4, cout=8),  # depthwise, multiplier 2
    dict(k=(2,4), s=1, p='same', d=1, mode='zeros', bias=True, g=1, cin=5, cout=7),    # even kernel: 'same' pads unevenly
    dict(k=(4,2), s=1, p='same', d=(1,2), mode='reflect', bias=False, g=1, cin=6, cout=4),
    dict(k=3, s=1, p=3, d=1, mode='zeros', bias=True, g=1, cin=4, cout=6),             # padding wider than the kernel
    dict(k=1, s=1, p=1, d=1, mode='reflect', bias=True, g=2, cin=4, cout=6),           # padded 1×1
    dict(k=5, s=3, p=2, d=2, mode='circular', bias=True, g=2, cin=6, cout=4),          # stride above 2
    dict(k=(5,3), s=(2,1), p='valid', d=(1,2), mode='zeros', bias=False, g=4, cin=12, cout=4),
    dict(k=3, s=1, p=2, d=1, mode='circular', bias=False, g=1, cin=4, cout=4, hw=(2,3)),  # circular padding = input size
]

def make_conv(c)->nn.Conv2d:
    return nn.Conv2d(c['cin'], c['cout'], c['k'], c['s'], c['p'], c['d'], groups=c['g'], bias=c['bias'], padding_mode=c['mode'])

def input_for(conv:nn.Conv2d, hw=None, n:int=2)->torch.Tensor:
    "A batch just big enough for `conv` (the dilated kernel fits, reflect padding < size), height ≠ width"
    if hw is None:
        pads = conv.padding if not isinstance(conv.padding, str) else (0,0) if conv.padding=='valid' else \
               tuple(-(-d*(k-1)//2) for k,d in zip(conv.kernel_size, conv.dilation))
        hw = [d*(k-1)+1+p+extra for k,d,p,extra in zip(conv.kernel_size, conv.dilation, pads, (2,3))]
    return torch.randn(n, conv.in_channels, *hw)

CASES = draw() + EDGES
assert len({case_id(c) for c in CASES})==len(CASES) >= 200, "the grid should hold at least 200 distinct Conv2d settings"
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

@pytest.mark.parametrize('c', CASES, ids=[case_id(c) for c in CASES])
def test_conv_full_rank_exact(c):
    "Each method at rank='full' on one Conv2d setting (the methods share a test: the grid is big and pytest's per-test overhead is not)"
    conv = make_conv(c)
    x = input_for(conv, c.get('hw'))
    with torch.no_grad(): ref = conv(x)
    bad = []
    for method in METHODS:
        blk = getattr(Conv_Decomposer(), method)(conv, rank='full')
        assert isinstance(blk, Factorized) and blk.method==method.lower(), f"{method} on {case_id(c)}: got {blk!r}"
        with torch.no_grad(): y = blk(x)
        if y.shape!=ref.shape: bad.append(f"{method}: output shape {tuple(y.shape)}, expected {tuple(ref.shape)}")
        elif (e := relerr(y, ref)) > TOL: bad.append(f"{method}: relative error {e:.2e} > {TOL}")
    assert not bad, f"rank='full' on {case_id(c)} (input {tuple(x.shape)}): " + '; '.join(bad)

# ---- Linear: 2-d, 1-d, 3-d (batch, tokens, features) and 4-d inputs

@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'nobias'])
@pytest.mark.parametrize('fin,fout', [(12,5), (5,12), (8,8), (1,6), (6,1)])
@pytest.mark.parametrize('lead', [(4,), (), (2,7), (2,3,5)], ids=['2d', '1d', '3d-tokens', '4d'])
def test_linear_full_rank_exact(fin, fout, bias, lead):
    lin = nn.Linear(fin, fout, bias=bias)
    x = torch.randn(*lead, fin)
    blk = FC_Decomposer().SVD(lin, rank='full')
    assert blk.rank==min(fin, fout), f"Linear({fin}, {fout}): full rank {blk.rank}, expected {min(fin, fout)}"
    with torch.no_grad(): y,ref = blk(x),lin(x)
    e = relerr(y, ref)
    assert e <= TOL, f"SVD at rank='full' on Linear({fin}, {fout}, bias={bias}), input {tuple(x.shape)}: relative error {e:.2e}"

# ---- whole models

class TinyCNN(nn.Module):
    "A small CNN with a plain, a depthwise, a 1×1, a grouped non-square strided reflect-padded conv, and a Linear head"
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, (3,5), stride=2, padding=(1,2), groups=4, padding_mode='reflect')
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    def forward(self, x): return self.head(self.grouped(self.pw(self.dw(self.stem(x)))))

def tiny_cnn():
    m = TinyCNN()
    with torch.no_grad(): m.stem[1].running_mean.uniform_(-.5, .5); m.stem[1].running_var.uniform_(.5, 2)
    return m.eval()

# exact ranks of the grouped conv's per-group 3×3×3×5 kernel (O=I=3): independent of the library's full_ranks
GROUPED_FULL = dict(tucker=(3,3), svd=min(3, 3*3*5), spatial=min(3*3, 3*5), cp=min(3*3*3, 3*3*5, 3*3*5, 3*3*5))

@pytest.mark.parametrize('method', ['tucker', 'cp', 'svd', 'spatial'])
def test_model_full_rank_exact(method):
    net,x = tiny_cnn(),torch.randn(2, 3, 11, 14)
    cd = Conv_Decomposer()
    new = cd.decompose(net, method, rank='full', quiet=True)
    with torch.no_grad(): e = relerr(new(x), net(x))
    assert e <= TOL, f"decompose(model, {method!r}, rank='full'): relative error {e:.2e}"
    rep = cd.report.set_index('layer')
    assert set(rep.index)=={'stem.0', 'dw', 'pw', 'grouped'}, f"{method}: report rows {list(rep.index)}"
    # depthwise: left as it is, and the report says why
    assert type(new.dw) is nn.Conv2d and torch.equal(new.dw.weight, net.dw.weight), f"{method}: the depthwise conv was changed: {new.dw}"
    assert 'depthwise' in rep.loc['dw', 'note'] and pd.isna(rep.loc['dw', 'method']), f"{method}: depthwise row {rep.loc['dw'].to_dict()}"
    # 1×1: channel SVD whatever the method
    assert isinstance(new.pw, Factorized) and new.pw.method=='svd', f"{method}: the 1×1 conv became {new.pw!r}"
    # grouped: factorized per group, every factor conv that mixes channels keeps the 4 groups (or is depthwise)
    g = new.grouped
    assert isinstance(g, Factorized) and g.method==method, f"{method}: the grouped conv became {g!r}"
    assert rep.loc['grouped', 'rank']==GROUPED_FULL[method], f"{method}: grouped conv rank {rep.loc['grouped', 'rank']}, expected per-group full rank {GROUPED_FULL[method]}"
    for f in g:
        assert f.groups==4 or f.groups==f.in_channels==f.out_channels, f"{method}: factor {f} mixes the 4 groups of the grouped conv"
    with torch.no_grad():
        h = torch.randn(2, 12, 7, 9)
        e = relerr(g(h), net.grouped(h))
    assert e <= TOL, f"{method}: grouped conv block relative error {e:.2e}"
    assert type(new.head[3]) is nn.Linear, f"Conv_Decomposer must leave Linear layers alone, got {new.head[3]!r}"

@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'nobias'])
def test_token_model_full_rank_exact(bias):
    "FC_Decomposer on a model whose Linears see (batch, tokens, features)"
    net = nn.Sequential(nn.Linear(6, 10, bias=bias), nn.GELU(), nn.LayerNorm(10), nn.Linear(10, 4, bias=bias))
    x = torch.randn(3, 7, 6)
    new = FC_Decomposer().decompose(net, rank='full', head=True, quiet=True)   # the output Linear too
    assert all(isinstance(new[i], Factorized) for i in (0, 3)), f"bias={bias}: not every Linear was factorized: {new}"
    with torch.no_grad(): e = relerr(new(x), net(x))
    assert e <= TOL, f"FC_Decomposer().decompose(rank='full') on a token model (bias={bias}): relative error {e:.2e}"
