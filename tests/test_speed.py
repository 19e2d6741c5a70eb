"The speed model behind the budgets' guard (no budget makes a model slower), the op costs it reads, and the roofline table"
import math, warnings, pytest, torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.all import *
from fasterai_lr.factorize import factor_costs, kernel_costs
from fasterai_lr.decompose import layer_ops, layer_costs
from fasterai_lr.ranks import SpeedModel, slow_options, fast_curves
import pandas as pd
from fasterai_lr.latency import measured_speed, roofline, plot_roofline, runtime_profile, speedup_ceiling, COMPILE_OPTIONS

def digits_like():
    "The shape of the trained digits CNN of bench/: two 3×3 conv stages on 8×8, then two Linears"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()

SHAPES = ((1, 128, 4, 4), (1, 128, 4, 4), 1)

# ---- op costs

@pytest.mark.parametrize('method,rank', [('original', None), ('svd', 5), ('spatial', 4), ('tucker', (6, 3)), ('tucker', (8, 3)), ('cp', 5)])
@pytest.mark.parametrize('transposed', [False, True])
def test_factor_costs_sum_to_kernel_costs(method, rank, transposed):
    fs = factor_costs(method, rank, 8, 6, (3, 5), 2, (9, 11), (5, 11), transposed)
    assert (sum(f[0] for f in fs), sum(f[1] for f in fs)) == kernel_costs(method, rank, 8, 6, (3, 5), 2, (9, 11), (5, 11), transposed)
    assert all(f[2] >= 0 and f[3] >= 0 for f in fs)

@pytest.mark.parametrize('layer,x', [(nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.randn(2, 16, 12, 12)),
                                     (nn.Conv2d(16, 24, (3, 1), padding=(1, 0), groups=2), torch.randn(2, 16, 9, 7)),
                                     (nn.Conv1d(12, 20, 5, padding=2), torch.randn(2, 12, 30)),
                                     (nn.Linear(40, 30), torch.randn(2, 7, 40))])
def test_layer_ops_match_the_blocks(layer, x):
    "Each op of a block: its MACs as FlopCounterMode counts that factor, its input and output sizes as they run"
    shapes = (tuple(x.shape), tuple(layer(x).shape), 1)
    for method in LAYER_METHODS[layer_kind(layer)]:
        if method=='spatial' and isinstance(layer, nn.Conv1d): continue
        rank = (6, 5) if method=='tucker' else 4
        block = decompose_model(nn.Sequential(layer), method, rank=rank, quiet=True, head=True)[0][0]
        ops = [o for o in layer_ops(layer, method, rank, shapes) if o[0]]
        leaves = [m for m in block.modules() if isinstance(m, (nn.Linear, *CONV_KINDS))]
        seen = []
        hooks = [m.register_forward_hook(lambda m,i,o: seen.append((i[0][0].numel(), o[0].numel()))) for m in leaves]
        with torch.no_grad(): block(x)
        for h in hooks: h.remove()
        assert [(i, o) for *_,i,o in ops] == seen, (method, ops, seen)
        with FlopCounterMode(display=False) as fc, torch.no_grad(): block(x[:1])
        assert sum(o[1] for o in ops) == fc.get_total_flops()//2 == layer_costs(layer, method, rank, shapes)[1]
        assert sum(o[0] for o in ops) == sum(m.weight.numel() for m in leaves)

def test_layer_ops_not_modelled():
    assert layer_ops(nn.Conv2d(3, 4, 3)) is None                                        # no input size
    assert layer_ops(nn.Embedding(10, 4), shapes=((1, 5), (1, 5, 4), 1)) is None
    assert layer_ops(nn.MultiheadAttention(8, 2), shapes=((3, 1, 8), (3, 1, 8), 1)) is None

# ---- the speed model

def test_speed_model_orders_a_small_layer():
    "At 4×4 and batch 1 a 128→128 3×3 conv is mostly overhead: Tucker (128, 92) adds an op and saves little (measured slower in bench/), (36, 26) saves most"
    c, s = nn.Conv2d(128, 128, 3, padding=1), SpeedModel()
    assert s.slower(c, 'tucker', [(128, 92), (36, 26), (64, 64)], SHAPES).tolist() == [True, False, False]
    assert s.slower(c, 'svd', [120], SHAPES).tolist() == [True]
    t = s.seconds(layer_ops(c, 'tucker', (torch.tensor([8, 32, 64, 128]), torch.tensor([8, 32, 64, 128])), SHAPES))
    assert (t[1:] >= t[:-1]).all()                                                      # more rank, more time
    assert s.slower(c, 'tucker', [(36, 26)], None) is None                              # no sizes: cannot tell

def test_speed_model_batch_and_overhead():
    "Overhead dominates at batch 1, work at a large batch: the same factorization can be slower at 1 and faster at 64"
    l, sh = nn.Linear(512, 256), ((1, 512), (1, 256), 1)
    assert SpeedModel(batch=1).slower(l, 'svd', [84], sh).tolist() == [True]
    assert SpeedModel(batch=256, overhead=0).slower(l, 'svd', [84], sh).tolist() == [False]
    assert SpeedModel(overhead=0).slower(l, 'svd', [150], sh).tolist() == [False]        # without overhead only the work counts
    assert SpeedModel(overhead=0, margin=0.5).slower(l, 'svd', [150], sh).tolist() == [True]

@pytest.mark.parametrize('kw,msg', [(dict(flops=0), 'flops'), (dict(bandwidth=-1), 'bandwidth'), (dict(overhead=-1), 'overhead'),
                                    (dict(batch=0), 'batch'), (dict(margin=-0.1), 'margin')])
def test_speed_model_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg): SpeedModel(**kw)

def test_budget_speed_bad_input():
    with pytest.raises(TypeError, match='SpeedModel'): Budget(params=0.5, speed='fast')
    with pytest.raises(TypeError, match='SpeedModel'): Budget(params=0.5, speed=1e-5)

# ---- the guard in Budget

@pytest.mark.parametrize('by,keep', [('params', 0.5), ('macs', 0.6)])
def test_guard_never_takes_a_slower_option(by, keep):
    net, speed = digits_like(), SpeedModel()
    b = Budget(**{by: keep}, sample=(1, 8, 8))
    with warnings.catch_warnings(): warnings.simplefilter('error'); new,rep = decompose_model(net, 'tucker', rank=b, sample=(1, 8, 8), quiet=True)
    assert not b.slowed and b.achieved <= keep + 1e-9
    shapes = {n: s for n,_,_,s in candidates(net, 'tucker', (1, 8, 8))}
    for r in b.report.itertuples():
        if r.rank is None: continue
        assert not speed.slower(net.get_submodule(r.layer), r.method, [r.rank], shapes[r.layer])[0], r
    got = n_params(new)/n_params(net) if by=='params' else model_macs(new, (1, 8, 8))/model_macs(net, (1, 8, 8))
    assert abs(got - b.achieved) < 1e-9

def test_guard_falls_back_and_says_so():
    "Where only slower factorizations meet the budget, it takes them, warns, and the report marks them; a weights-bound model needs none"
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64*16*16, 10))
    b = Budget(params=0.95, sample=(64, 16, 16), speed=SpeedModel(overhead=0, flops=1e20, bandwidth=1e6))   # weights-bound: fewer weights pay
    plan = b.plan(net, 'tucker', head=True)
    assert plan and not b.slowed
    b = Budget(params=0.99, sample=(64, 16, 16), speed=SpeedModel(overhead=1.))
    with pytest.warns(UserWarning, match='modelled slower'): plan = b.plan(net, 'tucker', head=True)
    assert b.slowed and (b.report.note=='modelled slower than the layer: taken to meet the budget').any()

def test_guard_notes_left_layers():
    "Two convs where only the big one pays: the small one is left with the guard's note, the budget met by the other"
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 256, 1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1),
                        nn.Flatten(), nn.Linear(256*4, 10))
    b = Budget(params=0.6, sample=(8, 2, 2), speed=SpeedModel(overhead=1e-5, flops=1e9, bandwidth=1e12))
    plan = b.plan(net, 'tucker')
    note = b.report.set_index('layer').note
    assert '4' in plan and '0' not in plan and note['0'].startswith('kept: every cheaper factorization is modelled slower'), b.report
    free = Budget(params=0.6, sample=(8, 2, 2), speed=None); free.plan(net, 'tucker')
    assert (free.report.note.str.startswith('kept: every cheaper').sum()) == 0

def test_guard_overshoot_warns():
    "Where the only options modelled faster cut far more than asked, the plan takes them (no slower model) and says so; speed=None lands near the budget"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Flatten(), nn.Linear(128*4, 10))
    b = Budget(params=0.9, sample=(128, 2, 2))
    with pytest.warns(UserWarning, match=r"keeps .* far under the 90% asked: the factorizations modelled faster than their layers cut more than that \(0 at rank"):
        b.plan(net, 'tucker')
    assert b.achieved < 0.72, b.report
    free = Budget(params=0.9, sample=(128, 2, 2), speed=None)
    with warnings.catch_warnings(): warnings.simplefilter('error'); free.plan(net, 'tucker')
    assert 0.72 <= free.achieved <= 0.9, free.report

def test_guard_without_sizes_is_unchecked():
    "Without sample= the guard cannot model a conv: the plan is the unguarded one, and `unchecked` names the layers"
    net = digits_like()
    b, free = Budget(params=0.4), Budget(params=0.4, speed=None)
    assert b.plan(net, 'tucker') == free.plan(net, 'tucker')
    assert set(b.unchecked) == {n for n,*_ in candidates(net, 'tucker')} and free.unchecked == []

def test_guard_with_calibration_and_callback():
    "The guard composed: a data-aware budget, and the callback (which passes its batch as the sample) on a Learner"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.callback.schedule import fit_one_cycle
    from torch.utils.data import TensorDataset, DataLoader
    net, X = digits_like(), torch.randn(64, 1, 8, 8)
    b = Budget(params=0.5, calib=Calibration([X[:32]]), sample=(1, 8, 8))
    new,rep = decompose_model(net, 'tucker', rank=b, calib=Calibration([X[:32]]), sample=(1, 8, 8), quiet=True)
    assert b.achieved <= 0.5 + 1e-9 and not b.slowed
    y = torch.randint(0, 10, (64,))
    dls = DataLoaders(DataLoader(TensorDataset(X, y), batch_size=16), DataLoader(TensorDataset(X, y), batch_size=16))
    learn = Learner(dls, digits_like(), loss_func=nn.CrossEntropyLoss())
    cb = DecomposeCallback(start_epoch=1, rank=Budget(params=0.5), verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=cb)
    assert n_params(learn.model) <= 0.5*n_params(digits_like()) + 1 and math.isfinite(learn.recorder.losses[-1])

# ---- this machine's figures and the roofline table

def test_measured_speed_and_roofline():
    s = measured_speed(reps=3)
    assert s.flops > 1e8 and s.bandwidth > 1e7 and 0 < s.overhead < 1e-2
    net = digits_like()
    dec,_ = decompose_model(net, 'tucker', keep=0.5, quiet=True)
    for m in (net, dec):
        t = roofline(m, (1, 8, 8), speed=s, reps=2)
        leaves = [n for n,x in m.named_modules() if isinstance(x, (nn.Linear, nn.Conv2d))]
        assert list(t.layer) == leaves
        assert t.macs.sum() == model_macs(m, (1, 8, 8))
        assert (t.ms > 0).all() and (t.intensity > 0).all() and set(t.bound) <= {'memory', 'compute'}
        assert ((t.intensity < s.flops/s.bandwidth) == (t.bound=='memory')).all()
    ax = plot_roofline({'dense': roofline(net, (1, 8, 8), speed=s, reps=1)}, s)
    assert ax.get_xscale() == 'log' and len(ax.collections) == 1

def test_measured_speed_in_a_runtime():
    "The per-op overhead measured where the model will run feeds the budgets' speed guard for that runtime"
    ort = measured_speed(runtime='onnxruntime', reps=2)
    assert ort.flops > 1e8 and 0 <= ort.overhead < 1e-2
    net = digits_like()
    small,_ = decompose_model(net, 'tucker', rank=Budget(params=0.5, sample=(1, 8, 8), speed=ort), quiet=True)
    assert n_params(small) <= 0.5*n_params(net) + 1
    with pytest.raises(ValueError, match="unknown runtime='ort'"): measured_speed(runtime='ort')
    with pytest.raises(ValueError, match="device='cpu'"): measured_speed(device='meta', runtime='onnxruntime')

# ---- where the time goes in a runtime, and the ceiling

def profiled_grid():
    "Convs of every setting the profile reads (stride, padding, dilation, non-square kernels, groups, depthwise, 1-D, transposed) and a Linear, channels in 16s (the blocked layout pads none)"
    return nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, (1, 3), padding=(0, 2), dilation=2),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 3, padding='same', groups=2),
                         nn.ConvTranspose2d(64, 32, 2, stride=2), nn.ConvTranspose2d(32, 32, 3, padding=1, groups=2, dilation=1), nn.Flatten(2), nn.Conv1d(32, 16, 5, stride=3), nn.Flatten(), nn.Linear(16*84, 16)).eval()

@pytest.mark.parametrize('runtime,options', [('onnxruntime', None), ('compile', COMPILE_OPTIONS), ('compile', None)])
def test_runtime_profile(runtime, options):
    "Every conv and Linear the runtime runs is a row of its kind, their multiply-adds are the model's, times are positive"
    net = profiled_grid()
    p = runtime_profile(net, (16, 16, 16), batch=4, runtime=runtime, options=options, reps=2, threads=2 if runtime=='compile' else None)   # (compile runs on torch's)
    kinds = p.kind[p.macs > 0].tolist()
    assert kinds == ['conv 3×3', 'conv 1×3', 'depthwise 3×3', 'grouped 3×3', 'transposed 2×2', 'transposed 3×3', 'conv 5', 'linear'], kinds
    assert p.macs.sum() == 4*model_macs(net, (16, 16, 16)) and (p.ms > 0).all()
    assert (p.cin[p.macs > 0].tolist(), p.cout[p.macs > 0].tolist()) == ([16, 32, 32, 32, 64, 32, 32, 1344], [32, 32, 32, 64, 32, 32, 16, 16])
    if runtime=='compile': assert p.node.iloc[-1] == 'other'
    assert p.attrs == dict(runtime=runtime, batch=4, threads=torch.get_num_threads())

def test_speedup_ceiling():
    "Untouched ops keep their time: the ceiling from figures, a model of no decomposable op, and two real profiles"
    prof = lambda ms, macs, kinds: pd.DataFrame(dict(ms=ms, macs=macs, kind=kinds))
    kinds = ['conv 1×1', 'depthwise 3×3', 'MaxPool']
    c = speedup_ceiling(prof([50, 40, 10], [90, 10, 0], kinds), prof([40, 40, 10], [30, 10, 0], kinds))
    assert c.ceiling == pytest.approx(100/(50 + 50*30/90)) and c.ceiling_of_mac == pytest.approx(c.ceiling*40/100)
    assert [c.speedup, c.of_mac, c.untouched_time, c.untouched_macs] == pytest.approx([100/90, 100/90*40/100, 0.5, 0.1])
    assert speedup_ceiling(prof([5], [0], ['MaxPool']), prof([5], [0], ['MaxPool'])).ceiling == 1
    net = profiled_grid()
    dense = runtime_profile(net, (16, 16, 16), batch=2, reps=1)
    c = speedup_ceiling(dense, runtime_profile(decompose_model(net, 'tucker', keep=0.5, quiet=True)[0], (16, 16, 16), batch=2, reps=1))
    dw = dense.kind.str.startswith('depthwise') | (dense.macs == 0)
    assert c.untouched_time == pytest.approx(dense.ms[dw].sum()/dense.ms.sum()) and c.mac_ratio > 1.5

@pytest.mark.parametrize('runtime', ['onnxruntime', 'compile'])
def test_profile_of_a_model_the_callback_decomposed(runtime):
    "Composed: the digits CNN a calibrated MAC budget swapped in mid-fit (training mode, BatchNorms, factor blocks) profiles in the runtime, is left as it was, and fine-tunes on"
    from fastai.callback.schedule import fit_one_cycle
    from fasterai_lr.cli import digits_dls, digits_learner
    torch.manual_seed(0)
    learn = digits_learner(digits_dls(bs=128), c=16)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    dense = runtime_profile(learn.model, (1, 8, 8), batch=4, runtime=runtime, reps=1)
    cb = DecomposeCallback(start_epoch=1, rank=Budget(macs=0.5), calib=True, verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=cb)
    m = learn.model.train()
    before = {k: v.clone() for k,v in m.state_dict().items()}
    p = runtime_profile(m, (1, 8, 8), batch=4, runtime=runtime, reps=1)
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k,v in before.items())
    convs = p.macs[p.kind.map(lambda k: k.startswith(('conv', 'linear')))].sum()
    assert convs >= 4*model_macs(m, (1, 8, 8)) > 0 and (convs == 4*model_macs(m, (1, 8, 8)) or runtime=='onnxruntime')   # (onnxruntime pads channels to its block)
    c = speedup_ceiling(dense, p)
    assert c.mac_ratio > 1.5 and 0 < c.ceiling_of_mac <= 1 + 1e-9
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4); loss,acc = learn.validate()[:2]
    assert math.isfinite(loss) and acc > 0.8, acc   # (the dense model: 0.90, decomposed and fine-tuned: 0.89)

class Attention(nn.Module):
    "Two Linears whose outputs meet in a product of activations (attention's), a second such product, and a Linear head"
    def __init__(self): super().__init__(); self.q,self.k,self.o = nn.Linear(32, 32),nn.Linear(32, 32),nn.Linear(32, 10)
    def forward(self, x): return self.o(((self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1) @ x).mean(1))

def test_runtime_profile_matmuls():
    "A product of two activations is a 'matmul', which no decomposition takes; a MatMul with a weight is a Linear"
    net = Attention().eval()
    p = runtime_profile(net, (16, 32), batch=2, reps=1)
    assert sorted(p.kind[p.macs > 0]) == ['linear']*3 + ['matmul']*2 and p.macs.sum() == 2*model_macs(net, torch.randn(1, 16, 32))
    c = speedup_ceiling(p, p)
    assert c.untouched_macs == pytest.approx(p.macs[p.kind=='matmul'].sum()/p.macs.sum()) and c.ceiling == pytest.approx(1)

def test_speedup_ceiling_refuses():
    "Two profiles from different runtimes, batches or threads do not compare; a table that is not a profile is named"
    prof = lambda **at: pd.DataFrame(dict(ms=[5.], macs=[9], kind=['conv 1×1'])).pipe(lambda d: d.attrs.update(at) or d)
    base = dict(runtime='onnxruntime', batch=64, threads=1)
    for k,v in (('runtime', 'compile'), ('batch', 1), ('threads', 2)):
        with pytest.raises(ValueError, match=f"dense profile ran at {k}={base[k]!r}, the decomposed one at {k}={v!r}"): speedup_ceiling(prof(**base), prof(**{**base, k: v}))
    assert speedup_ceiling(prof(**base), prof()).ceiling == 1   # (a table of one's own, without attrs: taken as it is)
    with pytest.raises(TypeError, match="decomposed= is a Series: pass a `runtime_profile`"): speedup_ceiling(prof(), prof().ms)
    with pytest.raises(TypeError, match="dense= is a DataFrame without the columns kind, ms, macs"): speedup_ceiling(prof().drop(columns='kind'), prof())

def test_runtime_profile_refuses():
    with pytest.raises(ValueError, match="pass 'onnxruntime' or 'compile'"): runtime_profile(nn.Linear(4, 4), (4,), runtime='eager')
    with pytest.raises(ValueError, match="unknown runtime='ort'"): runtime_profile(nn.Linear(4, 4), (4,), runtime='ort')
    with pytest.raises(ValueError, match=r'batch=0 is outside \[1'): runtime_profile(nn.Linear(4, 4), (4,), batch=0)
    with pytest.raises(ValueError, match="on the CPU"): runtime_profile(nn.Linear(4, 4).to('meta'), (4,))

# ---- timing in a runtime

def test_runtimes():
    from fasterai_lr.latency import in_runtime, runtime_timer, OrtRunner, LayerTimer, LatencyCache, LatencyAware
    net, x = digits_like(), torch.randn(3, 1, 8, 8)
    with torch.no_grad(): want = net(x)
    got = in_runtime(net, x, 'onnxruntime')(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    assert in_runtime(net, x, 'eager') is net
    with pytest.raises(ValueError, match="unknown runtime='tensorrt'"): in_runtime(net, x, 'tensorrt')
    with pytest.raises(ValueError, match="unknown runtime"): runtime_timer('tvm')
    t = runtime_timer('onnxruntime', reps=1)
    assert t.runtime == 'onnxruntime' and all(s > 0 for s in t([net, net[:3]], x))
    la = LatencyAware(keep=0.5, timer=t, cache=LatencyCache(), sample=(1, 8, 8))
    new,rep = decompose_model(net, rank=la, quiet=True)
    with torch.no_grad(): assert new(x).shape == want.shape
    keys = {k[-1] for k in la.timer.cache}
    assert keys == {'onnxruntime'}, keys

# ---- ranks in multiples of 8 keep onnxruntime's blocked layout (no reorder around a factor chain); exact ranks break it

def test_aligned_ranks_keep_onnxruntimes_layout():
    """The graph onnxruntime optimizes a decomposed resnet18 to has as many NCHWc reorders as the dense one's, by every fraction rule and an
    aligned budget; but around a factor narrower than onnxruntime's channel block (8 with AVX2, 16 with AVX-512): a reorder in, and one out"""
    from torchvision.models import resnet18
    from fasterai_lr.latency import ort_reorders, fold_bn
    net, x = resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    orig = dict(net.named_modules())
    block = 16 if torch.backends.cpu.get_cpu_capability().startswith('AVX512') else 8
    def extra(**kw):
        new = decompose_model(net, quiet=True, **kw)[0]
        tup = lambda r: r if isinstance(r, tuple) else (r,)
        narrow = sum(any(r < min(block, f) for r,f in zip(tup(m.rank), tup(layer_full_ranks(orig[n])[m.method])))   # (a full rank stays)
                     for n,m in new.named_modules() if isinstance(m, Factorized))
        return ort_reorders(new, x) - dense, narrow
    dense = ort_reorders(fold_bn(net), x)
    assert dense <= 2, f"the dense resnet18 has {dense} reorders: onnxruntime does not use NCHWc here"
    for kw in (dict(keep=0.5), dict(method='svd', keep=0.3), dict(energy=0.5), dict(rank=Budget(params=0.5)), dict(rank=Budget(params=0.3, round_to=8))):   # (percent_removed=: the stem's
        # 3 input channels get rank 1 or 2, below one block, which stays: a reorder)
        more, narrow = extra(**kw)
        assert more <= 2*narrow, f"{kw}: {more} reorders more than the dense model, {narrow} factors narrower than a block of {block}"
    assert extra(keep=0.5, round_to=1)[0] > 10, "exact ranks: a reorder pair around each unaligned factor chain"

def test_budget_aligns_where_it_can():
    "Budget's default: ranks in multiples of 8 in layers of 64 channels or more; any rank where aligned ones cannot meet the budget (.aligned says which)"
    from fasterai_lr.factorize import rank_step
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 96, 3), nn.ReLU(), nn.Conv2d(96, 16, 3), nn.Flatten(), nn.LazyLinear(10))
    net(torch.randn(1, 3, 12, 12))
    b = Budget(params=0.3, speed=None)
    _,rep = decompose_model(net, 'tucker', rank=b, quiet=True)
    mods = dict(net.named_modules())
    done = rep[rep.method.notna()]
    assert b.aligned and len(done) >= 2, rep
    for n,r in zip(done.layer, done['rank']):
        full = layer_full_ranks(mods[n])['tucker']
        assert all(a==f or a % rank_step(f)==0 for a,f in zip(r, full)), (n, r, full)
    tight = Budget(params=0.12, speed=None)
    decompose_model(net, 'tucker', rank=tight, quiet=True)
    assert tight.aligned is False and tight.achieved <= 0.12, (tight.aligned, tight.achieved)
    with pytest.raises(ValueError, match='cannot be met'): decompose_model(net, 'tucker', rank=Budget(params=0.12, round_to=8, speed=None), quiet=True)
    given = Budget(params=0.3, round_to=1, speed=None)
    decompose_model(net, 'tucker', rank=given, quiet=True)
    assert given.aligned is None, "an explicit round_to is taken as it is"

@pytest.mark.parametrize('rule', ['keep', 'budget', 'budget for onnxruntime'])
def test_aligned_through_the_callback_on_a_trained_model(rule):
    """Trained digits CNN, then DecomposeCallback (keep=0.5, or a Budget with calib=True, its speed guard modelled for eager PyTorch or for
    onnxruntime) and fine-tuning: aligned ranks, no new reorder, accuracy kept, and the result compiles to the same outputs"""
    import copy
    from fastai.torch_core import set_seed
    from fasterai_lr.cli import digits_learner, digits_dls
    from fasterai_lr.factorize import rank_step, ROUND_TO
    from fasterai_lr.latency import ort_reorders, compile_model
    set_seed(0)
    learn = digits_learner(digits_dls(bs=64), c=32)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 3e-3)
        dense_acc = float(learn.validate()[1])
        x, trained = learn.dls.one_batch()[0][:1].cpu(), copy.deepcopy(learn.model).cpu()
        speed = measured_speed(runtime='onnxruntime', reps=2) if rule.endswith('onnxruntime') else 'model'
        cb = DecomposeCallback(start_epoch=1, verbose=False, **(dict(keep=0.5) if rule=='keep' else dict(rank=Budget(params=0.4, speed=speed), calib=True)))
        learn.fit_one_cycle(3, 1e-3, cbs=cb)
        acc = float(learn.validate()[1])
    mods,step = dict(trained.named_modules()),(lambda f: ROUND_TO) if rule=='keep' else rank_step
    done = cb.report[cb.report.method.notna()]
    assert len(done) >= 2, cb.report
    for n,m,r in zip(done.layer, done.method, done['rank']):
        full = layer_full_ranks(mods[n])[m]
        for a,f in zip(*((r, full) if isinstance(r, tuple) else ((r,), (full,)))):
            assert a==f or a < ROUND_TO or a % step(f)==0, f"{rule}: {n} rank {r}, full {full}"
    assert ort_reorders(learn.model.cpu(), x) == ort_reorders(trained, x), "the decomposed model leaves onnxruntime's blocked layout"
    assert acc >= dense_acc - 0.03, f"{rule}: {acc:.3f} after fine-tuning, dense {dense_acc:.3f}"
    small = learn.model.cpu().eval()
    with torch.inference_mode(): assert torch.allclose(compile_model(small, x)(x), small(x), atol=1e-4), f"{rule}: compiled, the outputs differ"
