"Data-aware decomposition: exact whitened errors, conv methods against weight-only, singular Grams, data sources, bounded statistics"
import copy, itertools, pytest, torch, torch.nn.functional as F
from torch import nn
from fasterai_lr.core import *
from fasterai_lr.factorize import *
from fasterai_lr.layers import *
from fasterai_lr.decompose import *
from fasterai_lr.calibrate import *

def smooth(n, c, hw, seed=0, dtype=torch.float64):
    "Images whose neighbouring pixels and channels correlate, like natural ones"
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, c, hw+4, hw+4, generator=g, dtype=dtype), 5, 1, 0)
    return torch.einsum('nchw,cd->ndhw', x, torch.randn(c, c, generator=g, dtype=dtype)/c**0.5 + torch.eye(c, dtype=dtype))

def correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)

def block_in(model, name, xs):
    "The inputs that layer `name` of `model` receives on the batches `xs`"
    got = []
    h = model.get_submodule(name).register_forward_hook(lambda m,i,o: got.append(i[0]))
    with torch.no_grad():
        for x in xs: model(x)
    h.remove()
    return torch.cat(got)

@pytest.mark.parametrize("m,n,r", [(48,64,4), (48,64,20), (64,48,10), (40,30,12)])
def test_linear_error_is_whitened_tail(m, n, r):
    xs = list(correlated(600, n).split(100))
    model = nn.Sequential(nn.Linear(n, m)).double()
    cal = Calibration(xs, damp=0)
    new = FC_Decomposer().decompose(model, rank=r, head=True, quiet=True, calib=cal)   # (the one Linear is the output layer)
    W = model[0].weight
    X = torch.cat(xs)
    Wh = new[0][1].weight @ new[0][0].weight
    err = (X@W.mT - X@Wh.mT).norm()/(X@W.mT).norm()
    tail = cal.errors('0')
    assert abs(err - tail[r]) <= 1e-6*tail[r], f"{m}×{n} rank {r}: output error {err} vs whitened tail {tail[r]}"
    A,B = svd_factors(W.detach(), r)
    err_w = (X@W.mT - X@(A@B).mT).norm()/(X@W.mT).norm()
    assert err < err_w, f"{m}×{n} rank {r}: data-aware {err} not below weight SVD {err_w}"

CONVS = [dict(i=8, o=16, k=3, padding=1), dict(i=6, o=12, k=3, padding=1, stride=2), dict(i=8, o=8, k=3, padding='same', dilation=2),
         dict(i=8, o=16, k=3, padding=1, padding_mode='reflect'), dict(i=8, o=12, k=3, padding=1, groups=2), dict(i=4, o=10, k=(3,5), padding=(1,2), padding_mode='circular')]

def make_conv(c, seed=0):
    torch.manual_seed(seed)
    c = dict(c); i,o,k = c.pop('i'), c.pop('o'), c.pop('k')
    return nn.Conv2d(i, o, k, **c).double()

def conv_out_err(conv, blk, x):
    with torch.no_grad(): y = conv(x); return ((blk(x)-y).norm()/(y-conv.bias[:,None,None]).norm()).item()

@pytest.mark.parametrize("method", ['svd', 'spatial', 'tucker', 'cp'])
@pytest.mark.parametrize("ci", range(len(CONVS)))
def test_conv_beats_weight_only(method, ci):
    conv = make_conv(CONVS[ci])
    xs = [smooth(16, conv.in_channels, 12, seed=s) for s in range(3)]
    model = nn.Sequential(conv)
    K = kernel(conv)
    r = layer_rank(K, method, 'keep', 0.3)
    cal = Calibration(xs).prepare(model, ['0'])
    blk = cal.build('0', conv, method, r)
    ref = BUILDERS[method](conv, r)
    assert [type(l) for l in blk]==[type(l) for l in ref] and [l.weight.shape for l in blk]==[l.weight.shape for l in ref], f"{method} {CONVS[ci]}: structure differs from weight-only"
    x = torch.cat(xs)
    e, ew = conv_out_err(conv, blk, x), conv_out_err(conv, ref, x)
    assert e < ew, f"{method} {CONVS[ci]} rank {r}: data-aware output error {e:.4f} not below weight-only {ew:.4f}"

@pytest.mark.parametrize("method", ['svd', 'spatial', 'tucker', 'cp'])
@pytest.mark.parametrize("ci", [0, 3, 4])
def test_full_rank_exact(method, ci):
    conv = make_conv(CONVS[ci])
    xs = [smooth(8, conv.in_channels, 10)]
    cal = Calibration(xs).prepare(nn.Sequential(conv), ['0'])
    blk = cal.build('0', conv, method, full_ranks(kernel(conv).shape)[method])
    e = conv_out_err(conv, blk, xs[0])
    assert e < 1e-6, f"{method} {CONVS[ci]} at full rank: output error {e}"

@pytest.mark.parametrize("method", ['svd', 'spatial', 'tucker', 'cp'])
def test_rank_deficient_grams(method):
    "A constant channel, a dead channel and fewer samples than features: no crash, finite factors, no worse than weight-only"
    conv = make_conv(dict(i=8, o=16, k=3, padding=1))
    x = smooth(1, 8, 4)                       # 16 positions < 72 patch features
    x[:,2] = 1.; x[:,5] = 0.
    r = layer_rank(kernel(conv), method, 'keep', 0.3)
    for damp in (0., 0.01):
        blk = Calibration([x], damp=damp).prepare(nn.Sequential(conv), ['0']).build('0', conv, method, r)
        assert all(torch.isfinite(l.weight).all() for l in blk), f"{method} damp={damp}: non-finite factors"
        e, ew = conv_out_err(conv, blk, x), conv_out_err(conv, BUILDERS[method](conv, r), x)
        assert e <= ew*1.001, f"{method} damp={damp}: {e} above weight-only {ew}"

def test_singular_and_indefinite_gram():
    for G in [torch.zeros(5, 5), torch.ones(6, 6), -torch.eye(4), torch.diag(torch.tensor([1., 0., -1e-9, 1e-20]))]:
        S,Si = gram_sqrt(G)
        assert torch.isfinite(S).all() and torch.isfinite(Si).all(), f"gram_sqrt fails on {G}"
        test = S@Si
        assert torch.allclose(test, torch.eye(len(G), dtype=test.dtype), atol=1e-4), f"S·S⁻¹ is not I for {G}"
    with pytest.raises(ValueError, match='non-finite'): gram_sqrt(torch.full((3,3), float('nan')))

def test_dead_layer_falls_back():
    "A Linear that only ever sees zeros gets the weight SVD"
    lin = nn.Linear(10, 8).double()
    blk = Calibration([torch.zeros(4, 10, dtype=torch.float64)], damp=0).prepare(nn.Sequential(lin), ['0']).build('0', lin, 'svd', 3)
    A,B = svd_factors(lin.weight.detach(), 3)
    assert torch.allclose(blk[1].weight@blk[0].weight, A@B, atol=1e-8)

def test_stats_fixed_size_and_row_cap():
    conv = make_conv(dict(i=4, o=8, k=3, padding=1))
    sizes = []
    for nb in (1, 6):
        cal = Calibration([smooth(8, 4, 16, seed=s) for s in range(nb)], n_batches=nb, max_rows=500).prepare(nn.Sequential(conv), ['0'])
        st = cal.layer_stats('0', conv, 'svd')
        sizes.append(st.G.shape)
        assert st.rows == 500*nb, f"{nb} batches of 2048 positions with max_rows=500: {st.rows} rows"
    assert sizes[0]==sizes[1]==(1, 36, 36), sizes
    st = Calibration([smooth(8, 4, 16)], max_rows=10**6).prepare(nn.Sequential(conv), ['0']).layer_stats('0', conv, 'tucker')
    assert st.Cin.shape==(1,4,4) and st.Cout.shape==(1,8,8) and st.G is None

def test_dataloader_list_tensor_and_cap():
    from fastai.data.load import DataLoader
    lin = nn.Linear(12, 10).double()
    X = correlated(96, 12); y = torch.zeros(96, dtype=torch.long)
    dl = DataLoader(list(zip(X, y)), bs=16)
    blocks = [Calibration(d, n_batches=3, damp=0).prepare(nn.Sequential(lin), ['0']).build('0', lin, 'svd', 4)
              for d in (dl, list(X.split(16)), [(x, 0) for x in X.split(16)], X[:48])]
    for b in blocks[1:]:
        assert torch.allclose(b[1].weight@b[0].weight, blocks[0][1].weight@blocks[0][0].weight, atol=1e-8), "data sources disagree"
    pulled = []
    def gen():
        for i,x in enumerate(X.split(8)): pulled.append(i); yield x
    Calibration(gen(), n_batches=2).prepare(nn.Sequential(lin), ['0'])
    assert len(pulled)==2, f"n_batches=2 drew {len(pulled)} batches"
    for bad,msg in [([], 'no batch'), (['a'], 'must be tensors'), (3, 'iterable')]:
        with pytest.raises((ValueError, TypeError), match=msg): Calibration(bad).prepare(nn.Sequential(lin), ['0'])

def test_sequential_corrects_earlier_errors():
    "In sequential mode a layer is the best rank-r map from its new inputs to the dense layer's outputs: its output error is lower"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    xs = list(correlated(512, 32).split(128))
    X = torch.cat(xs)
    y = block_in(model, '3', xs)                 # the dense model's output of layer 2 (after its ReLU)
    errs = {}
    for seq in (False, True):
        new = FC_Decomposer().decompose(model, rank=6, layers=['0','2'], quiet=True, calib=Calibration(xs, sequential=seq, damp=0))
        errs[seq] = ((block_in(new, '3', xs)-y).norm()/y.norm()).item()
    assert errs[True] < errs[False], f"layer 2's output error: sequential {errs[True]} not below per-layer {errs[False]}"

def test_whole_model_report_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, padding_mode='replicate'))
    xs = [smooth(4, 3, 12, seed=s, dtype=torch.float32) for s in range(2)]
    d = Conv_Decomposer()
    for method in ('tucker', 'cp'):
        w = d.decompose(model, method, keep=0.3, head=True, quiet=True); rw = d.report   # (head=True: the padding_mode='replicate' conv is the output layer)
        c = d.decompose(model, method, keep=0.3, head=True, quiet=True, calib=Calibration(xs)); rc = d.report
        assert rw.drop(columns='note').equals(rc.drop(columns='note')), f"{method}: reports differ"
        assert [p.shape for p in w.parameters()]==[p.shape for p in c.parameters()]

@pytest.mark.parametrize("rank", [(6, 8), (16, 3)])
def test_tucker_one_side_full(rank):
    "A full-rank Tucker side is folded into the core, as the weight-only builder does; the data-aware block matches its layers"
    conv = make_conv(CONVS[0])
    xs = [smooth(16, 8, 12, seed=s) for s in range(2)]
    blk = Calibration(xs).prepare(nn.Sequential(conv), ['0']).build('0', conv, 'tucker', rank)
    ref = conv_tucker(conv, rank)
    assert [l.weight.shape for l in blk]==[l.weight.shape for l in ref], f"rank {rank}: {blk} vs {ref}"
    x = torch.cat(xs)
    e, ew = conv_out_err(conv, blk, x), conv_out_err(conv, ref, x)
    assert e < ew, f"rank {rank}: data-aware {e:.4f} not below weight-only {ew:.4f}"

def test_plan_error_swaps_into_one_copy():
    "plan_error swaps each plan's blocks into one working copy and back: the figures of a fresh copy per plan, bit for bit, one copy made, the model untouched"
    import copy
    from fasterai_lr.calibrate import _first, flat_outputs
    from fasterai_lr.layers import builder
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad(): net.train()(torch.randn(8, 3, 10, 10))          # BatchNorm statistics, and the model left in train mode
    state,mods = {k: v.clone() for k,v in net.state_dict().items()},[(n, id(m), m.training) for n,m in net.named_modules()]
    def fresh(cal, plan, n_batches=2, samples=None):                      # a copy of the model for each plan, as plan_error once made
        new = copy.deepcopy(net)
        for n,(m,r) in plan.items():
            blk = cal.build(n, cal.mods[n], m, r, sequential=False)
            new.set_submodule(n, blk if blk is not None else builder(cal.mods[n], m)(cal.mods[n], r))
        xs = [_first(x, samples) for x in cal.xs[:n_batches]]
        with evaluating(cal.ref): y0 = torch.cat([flat_outputs(cal._forward(cal.ref, x)) for x in xs])
        with evaluating(new): y = torch.cat([flat_outputs(cal._forward(new, x)) for x in xs])
        return ((y-y0).double().square().sum()/y0.double().square().sum().clamp_min(1e-60)).sqrt().item()   # (in float64, as plan_error)
    plans = [{'0': ('svd', 3)}, {'3': ('tucker', (8, 6))}, {'3': ('cp', 5), '8': ('svd', 4)}, {'0': ('spatial', 4), '3': ('svd', 6), '5': ('svd', 5), '8': ('svd', 2)}, {}]
    for seq in (False, True):
        cal = Calibration([torch.randn(6, 3, 10, 10) for _ in range(3)], sequential=seq).prepare(net, ['0', '3', '5', '8'])
        for p in plans + plans[::-1]:
            for kw in (dict(), dict(n_batches=1, samples=4), dict(n_batches=3)):
                assert cal.plan_error(net, p, **kw)==fresh(cal, p, **kw), f"sequential={seq}, {p}, {kw}: not the figure of a fresh copy"
        work = cal._work[2]
        assert cal._working_copy(net) is work, "the working copy should be made once for the model's weights"
        assert not any(isinstance(m, Factorized) for m in work.modules()), "a plan's block was left in the working copy"
    assert [(n, id(m), m.training) for n,m in net.named_modules()]==mods and all(torch.equal(state[k], v) for k,v in net.state_dict().items()), "the model changed"
    with torch.no_grad(): net[0].weight.add_(1)                            # new weights: a new working copy
    assert cal._working_copy(net) is not work

def _after_conv(c, seed=0):
    "A conv of `CONVS` (`c`) behind a 3×3 conv and a ReLU that are decomposed before it"
    conv = make_conv(c, seed)
    torch.manual_seed(seed+1)
    return nn.Sequential(nn.Conv2d(conv.in_channels, conv.in_channels, 3, padding=1), nn.ReLU(), conv).double()

def _unfolded(conv, x):
    "The im2col rows (positions × I·k·k) an ungrouped 2-D `conv` reads from `x`, padded its way (torch's own unfold)"
    p = conv.padding if conv.padding!='same' else tuple(d*(k-1)//2 for d,k in zip(conv.dilation, conv.kernel_size))
    x = F.pad(x, [q for v in reversed(p) for q in (v, v)], mode='constant' if conv.padding_mode=='zeros' else conv.padding_mode)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2).flatten(0, 1)

@pytest.mark.parametrize("ci", range(len(CONVS)))
def test_sequential_tucker(ci):
    """Sequential Tucker-2 refits its core to the dense outputs from the inputs the decomposed layers before it give: exact at full rank
    for every conv setting; behind a decomposed conv, at full rank, the least-squares map from those inputs (ungrouped convs: checked
    against torch's unfold and lstsq); at half rank the output error below a per-layer fit's"""
    model = _after_conv(CONVS[ci])
    xs = [smooth(8, model[0].in_channels, 12, seed=s) for s in range(3)]
    x = torch.cat(xs)
    with torch.no_grad(): y = model(x)
    rel = lambda m: ((m(x)-y).norm()/y.norm()).item()
    fit = lambda ranks, seq, damp=0.01: Conv_Decomposer().decompose(model, 'tucker', rank=ranks, head=True, quiet=True, calib=Calibration(xs, sequential=seq, damp=damp))
    full,r0 = full_ranks(kernel(model[2]).shape)['tucker'],(model[0].in_channels, model[0].in_channels//2)
    with torch.no_grad():
        assert (e := rel(fit('full', True))) < 1e-6, f"{CONVS[ci]} sequential Tucker-2 at full rank: output error {e:.2e}"
        if model[2].groups==1:   # (a full-rank block, which `decompose` leaves as the layer: `blocks` builds it)
            net = copy.deepcopy(model)
            cal = Calibration(xs, sequential=True, damp=0).prepare(net, ['0', '2'])
            net[0],net[2] = cal.blocks([('0', net[0], 'tucker', r0), ('2', net[2], 'tucker', full)]).values()
            X = _unfolded(model[2], block_in(net, '2', xs))
            Y = (y - model[2].bias[:,None,None]).movedim(1, -1).flatten(0, -2)
            best = (X@torch.linalg.lstsq(X, Y).solution - Y).norm()/y.norm()
            assert abs(rel(net) - best) < 1e-6, f"{CONVS[ci]}: sequential at full rank {rel(net):.6f}, least squares {best:.6f}"
        half = tuple(max(1, v//2) for v in full)
        e = {seq: rel(fit({'0': r0, '2': half}, seq)) for seq in (False, True)}
    assert e[True] < e[False], f"{CONVS[ci]} rank {half} behind {r0}: sequential {e[True]:.4f} not below per-layer {e[False]:.4f}"

def test_sequential_tucker_lone_build():
    "A lone sequential `build` of a Tucker-2 layer streams its core's statistics at that rank: the same block as the one-pass lockstep"
    model = _after_conv(CONVS[0])
    xs = [smooth(8, 8, 12, seed=s) for s in range(2)]
    items = [(n, model.get_submodule(n), 'tucker', (6, 4)) for n in ('0', '2')]
    one = Calibration(xs, sequential=True).prepare(copy.deepcopy(model), ['0', '2'])
    blocks = one.blocks(items)
    lone = Calibration(xs, sequential=True).prepare(net := copy.deepcopy(model), ['0', '2'])
    net[0] = lone.build('0', net[0], 'tucker', (6, 4))
    blk = lone.build('2', net[2], 'tucker', (6, 4))
    assert seq_key('2', 'chan', (6, 4)) in lone.stats and lone.stats[seq_key('2', 'chan', (6, 4))].kind=='core'
    for a,b in zip(blocks['2'], blk): assert torch.allclose(a.weight, b.weight, atol=1e-8), "lone build differs from the lockstep's"
