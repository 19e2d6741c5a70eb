"Parameters and multiply-adds of every factorized block match the closed forms, counted by numel and torch's FlopCounterMode"
import random, pytest, torch, pandas as pd
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.factorize import conv_costs, linear_costs
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, layer_costs

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

def pair(v): return (v, v) if isinstance(v, int) else tuple(v)

def macs(module:nn.Module, x:torch.Tensor)->int:
    "Multiply-adds of one forward pass as torch counts them (FLOPs/2 for conv and matmul; bias adds are not counted)"
    with torch.no_grad(), FlopCounterMode(display=False) as fc: module(x)
    flops = fc.get_total_flops()
    assert flops % 2 == 0, f"odd FLOP count {flops} for {module}"
    return flops//2

def weight_numel(m:nn.Module)->int: return sum(f.weight.numel() for f in m.modules() if isinstance(f, (nn.Conv2d, nn.Linear)))

@pytest.mark.parametrize('layer,x', [(lambda b: nn.Conv2d(4, 6, 3, padding=1, bias=b), torch.randn(1, 4, 7, 9)),
                                     (lambda b: nn.Linear(5, 7, bias=b), torch.randn(1, 3, 5))], ids=['conv', 'linear'])
def test_flop_counter_ignores_bias(layer, x):
    "The closed forms count no bias adds; check that torch's counter does not either, or the comparisons below mean nothing"
    with_bias,without = macs(layer(True), x),macs(layer(False), x)
    assert with_bias==without, f"FlopCounterMode counts bias: {with_bias} vs {without} multiply-adds"

# ---- a grid of convs: settings that change the geometry of the factor layers

KERNELS = [1, 3, 5, (1,3), (3,1), (3,5), (5,3)]
def draw(n=36, seed=1)->list[dict]:
    rng,out = random.Random(seed),[]
    while len(out) < n:
        c = dict(k=rng.choice(KERNELS), s=rng.choice([1, 2, (2,1)]), p=rng.choice([0, 1, (1,2), 'same', 'valid']),
                 d=rng.choice([1, 2, (1,2)]), g=rng.choice([1, 2, 4]), mode=rng.choice(['zeros', 'reflect', 'circular']))
        if c['p']=='same' and pair(c['s'])!=(1,1): continue
        c['cin'],c['cout'] = (c['g']*rng.randint(-(-4//c['g']), 12//c['g']) for _ in range(2))
        out.append(c)
    return out

CASES = draw() + [dict(k=(3,5), s=(2,1), p=(1,2), d=(1,2), g=4, mode='zeros', cin=8, cout=12),
                  dict(k=(2,4), s=1, p='same', d=1, g=1, mode='zeros', cin=5, cout=7),
                  dict(k=7, s=2, p=3, d=1, g=1, mode='reflect', cin=3, cout=8)]
def case_id(c):
    k,s,d = pair(c['k']),pair(c['s']),pair(c['d'])
    p = c['p'] if isinstance(c['p'], str) else 'x'.join(map(str, pair(c['p'])))
    return f"k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p}-d{d[0]}x{d[1]}-g{c['g']}-{c['mode']}-{c['cin']}to{c['cout']}"

def make(c):
    conv = nn.Conv2d(c['cin'], c['cout'], c['k'], c['s'], c['p'], c['d'], groups=c['g'], padding_mode=c['mode'])
    kh,kw = conv.kernel_size
    x = torch.randn(1, c['cin'], conv.dilation[0]*(kh-1)+4, conv.dilation[1]*(kw-1)+5)
    return conv,x

def full_rank(method, O, I, kh, kw):
    "Exact ranks per group, written out here rather than taken from the library"
    return dict(SVD=min(O, I*kh*kw), Spatial=min(I*kh, O*kw), Tucker=(O, I),
                CP=min(O*I*kh, O*I*kw, O*kh*kw, I*kh*kw))[method]

def ranks_for(method, O, I, kh, kw):
    full = full_rank(method, O, I, kh, kw)
    if method=='Tucker': return [(1,1), (max(1, O//2), max(1, I//3)), full]
    return sorted({1, max(1, full//2), full})

@pytest.mark.parametrize('method', ['Tucker', 'CP', 'SVD', 'Spatial'])
@pytest.mark.parametrize('c', CASES, ids=[case_id(c) for c in CASES])
def test_conv_costs(c, method):
    conv,x = make(c)
    G = conv.groups
    O,I,(kh,kw) = conv.out_channels//G, conv.in_channels//G, conv.kernel_size
    y = conv(x)
    hw = dict(hw_in=tuple(x.shape[-2:]), hw_out=tuple(y.shape[-2:]))
    shapes = (tuple(x.shape), tuple(y.shape))
    # the original layer
    p0,m0 = conv_costs('original', None, O, I, kh, kw, G, **hw)
    assert (p0, m0)==(conv.weight.numel(), macs(conv, x)), f"original {case_id(c)}: closed form {(p0, m0)}, counted {(conv.weight.numel(), macs(conv, x))}"
    assert layer_costs(conv, shapes=shapes)==(p0, m0), f"layer_costs(original {case_id(c)}) = {layer_costs(conv, shapes=shapes)}, expected {(p0, m0)}"
    for r in ranks_for(method, O, I, kh, kw):
        blk = getattr(Conv_Decomposer(), method)(conv, rank=r)
        assert blk.rank==r, f"{method} {case_id(c)}: asked rank {r}, block has {blk.rank}"
        counted = (weight_numel(blk), macs(blk, x))
        closed = conv_costs(method.lower(), r, O, I, kh, kw, G, **hw)
        assert closed==counted, f"{method} rank {r} on {case_id(c)}, input {tuple(x.shape)}: conv_costs (params, MACs) = {closed}, counted {counted}"
        lc = layer_costs(conv, method.lower(), r, shapes)
        assert lc==counted, f"{method} rank {r} on {case_id(c)}: layer_costs = {lc}, counted {counted}"
        assert layer_costs(conv, method.lower(), r)==(counted[0], None), f"{method} rank {r} on {case_id(c)}: layer_costs without shapes"

@pytest.mark.parametrize('rank', [1, 3, 'full'])
@pytest.mark.parametrize('fin,fout', [(12,5), (5,12), (8,8)])
@pytest.mark.parametrize('lead', [(1,), (1,7), (1,2,3)], ids=['2d', '3d-tokens', '4d'])
def test_linear_costs(fin, fout, rank, lead):
    lin = nn.Linear(fin, fout)
    x = torch.randn(*lead, fin)
    tokens = x[0].numel()//fin
    p0,m0 = linear_costs(None, fout, fin)
    assert (p0, m0*tokens)==(lin.weight.numel(), macs(lin, x)), f"Linear({fin}, {fout}) input {tuple(x.shape)}: closed form {(p0, m0*tokens)}"
    blk = FC_Decomposer().SVD(lin, rank=rank)
    r = blk.rank
    p,m = linear_costs(r, fout, fin)
    counted = (weight_numel(blk), macs(blk, x))
    assert (p, m*tokens)==counted, f"SVD rank {r} of Linear({fin}, {fout}) input {tuple(x.shape)}: closed form {(p, m*tokens)}, counted {counted}"
    lc = layer_costs(lin, 'svd', r, (tuple(x.shape), tuple(lin(x).shape)))
    assert lc==counted, f"layer_costs(Linear({fin}, {fout}), svd, {r}) on {tuple(x.shape)} = {lc}, counted {counted}"

# ---- keep= is a parameter budget

KEEP_LAYERS = [('conv', lambda: nn.Conv2d(12, 16, 3, padding=1)), ('grouped', lambda: nn.Conv2d(8, 12, (3,5), groups=2)),
               ('linear', lambda: nn.Linear(20, 12))]

KEEP_CASES = [pytest.param(kind, make, method, keep, id=f"{kind}-{method}-{keep}")
              for kind,make in KEEP_LAYERS for method in (['SVD'] if kind=='linear' else ['Tucker', 'CP', 'SVD', 'Spatial'])
              for keep in (0.1, 0.3, 0.5, 0.8)]

@pytest.mark.parametrize('kind,make,method,keep', KEEP_CASES)
def test_keep_is_a_budget(kind, make, method, keep):
    "keep=k (round_to=1): the factors hold at most k of the layer's weights (unless the smallest rank already holds more); for one-rank methods, the largest such rank"
    layer = make()
    f = FC_Decomposer().SVD if kind=='linear' else getattr(Conv_Decomposer(), method)
    blk = f(layer, keep=keep, round_to=1)   # (any rank: the default's multiples of 8 are tested in test_truncation)
    p0,p1 = layer.weight.numel(),weight_numel(blk)
    smallest = blk.rank in (1, (1,1))
    assert p1 <= keep*p0 or smallest, f"{method} keep={keep} on {kind}: rank {blk.rank} holds {p1}/{p0} = {p1/p0:.3f} of the weights"
    if method!='Tucker':
        full = f(layer, rank='full').rank
        if blk.rank < full:
            bigger = weight_numel(f(layer, rank=blk.rank+1))
            assert bigger > keep*p0, f"{method} keep={keep} on {kind}: rank {blk.rank+1} would hold {bigger/p0:.3f} ≤ {keep}, yet rank {blk.rank} was chosen"

# ---- the report of a whole-model decomposition

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, (3,5), stride=2, padding=(1,2), dilation=(1,2), padding_mode='reflect')
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding='same', groups=4)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 6)
    def forward(self, x):
        x = self.g(self.pw(self.dw(self.c2(self.c1(x).relu()).relu())))
        x = x.flatten(2).mT                       # (batch, tokens, features)
        return self.fc2(self.fc1(x).relu()).mean(1)

def inputs_of(model, names, x)->dict:
    "The input each of the modules `names` gets in a forward pass of `x`"
    got,hooks = {},[model.get_submodule(n).register_forward_hook(lambda m,i,o,n=n: got.__setitem__(n, i[0])) for n in names]
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    return got

REPORT_CASES = [(Conv_Decomposer, 'tucker', dict(keep=0.4)), (Conv_Decomposer, 'cp', dict(rank=6)), (Conv_Decomposer, 'svd', dict(energy=0.8)),
                (Conv_Decomposer, 'spatial', dict(percent_removed=0.5)), (Conv_Decomposer, 'tucker', dict(rank='full')),
                (FC_Decomposer, 'svd', dict(rank=4)), (FC_Decomposer, 'svd', dict(keep=0.9))]
@pytest.mark.parametrize('dec,method,opts', REPORT_CASES, ids=[f"{d.__name__}-{m}-{k}={v}" for d,m,o in REPORT_CASES for k,v in o.items()])
@pytest.mark.parametrize('sample', ['tensor', 'shape'])
def test_report_counts_match_flop_counter(dec, method, opts, sample):
    "The report's params/macs are the original layer's weights and FLOPs/2, params_after/macs_after the new block's, for batch 1"
    net = Net().eval()
    x = torch.randn(2, 3, 12, 15)
    d = dec()
    new = d.decompose(net, method, sample=x if sample=='tensor' else tuple(x.shape[1:]), head=True, quiet=True, **opts)   # fc2 (tokens) too
    rep = d.report.set_index('layer')
    names = list(rep.index)
    assert names==[n for n,m in net.named_modules() if isinstance(m, d.kind)], f"report rows {names}"
    before,after = inputs_of(net, names, x[:1]),inputs_of(new, names, x[:1])
    for n in names:
        row,old,blk = rep.loc[n],net.get_submodule(n),new.get_submodule(n)
        case = f"{dec.__name__}.decompose({method!r}, {opts}, sample={sample}) layer {n}"
        assert (row['params'], row['macs'])==(old.weight.numel(), macs(old, before[n])), f"{case}: report params/macs {(row['params'], row['macs'])}, counted {(old.weight.numel(), macs(old, before[n]))}"
        assert isinstance(blk, Factorized)==pd.notna(row['method']), f"{case}: report method {row['method']!r} but the layer is {type(blk).__name__}"
        counted = (weight_numel(blk), macs(blk, after[n]))
        assert (row['params_after'], row['macs_after'])==counted, f"{case}: report params_after/macs_after {(row['params_after'], row['macs_after'])}, counted {counted}"

# ---- counting runs the model in eval mode and gives every module its own mode back (a frozen BatchNorm stays frozen)

@pytest.mark.parametrize('count', ['model_macs', 'layer_shapes', 'model_costs', 'cpu_latency'])
def test_counting_keeps_each_modules_mode(count):
    from fasterai_lr.ranks import model_macs
    from fasterai_lr.evaluate import cpu_latency
    from fasterai_lr.decompose import layer_shapes
    from fasterai_lr.callback import model_costs
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    m[1].eval()                                            # as fastai's BnFreeze leaves it
    run = dict(model_macs=lambda: model_macs(m, (3, 8, 8)), layer_shapes=lambda: layer_shapes(m, (3, 8, 8), ['0']),
               model_costs=lambda: model_costs(m, torch.randn(2, 3, 8, 8)), cpu_latency=lambda: cpu_latency(m, (3, 8, 8), min_run_time=0.01))[count]
    stats = m[1].running_mean.clone()
    run()
    assert [x.training for x in m.modules()] == [True, True, False, True], f"{count} changed the modes: {[x.training for x in m.modules()]}"
    assert torch.equal(m[1].running_mean, stats), f"{count} ran the model in training mode (BatchNorm statistics moved)"
