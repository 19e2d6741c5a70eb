"""Conv1d, Conv3d and transposed convs through the whole pipeline: the walk, budgets (weight-only and calibrated), VBMF, latency,
plans, ONNX and the callback, on small models of each kind"""
import math, warnings, pytest, torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.core import Factorized, LAYER_METHODS, CONV_KINDS, output_layer
from fasterai_lr.decompose import decompose_model, Conv_Decomposer, report_totals
from fasterai_lr.ranks import Budget, VBMF, n_params
from fasterai_lr.calibrate import Calibration
from fasterai_lr.latency import LatencyAware, LatencyBudget, fold_bn, merge_linear, optimize, layer_key
from fasterai_lr.export import decomposition_plan, save_decomposed, load_decomposed, to_onnx, onnx_error

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

# ---- the models: one a kind (and two that mix a conv with its transpose)

def block1d(i, o, k=3, **kw): return [nn.Conv1d(i, o, k, padding=k//2, **kw), nn.BatchNorm1d(o), nn.ReLU()]

def series_cnn():
    "A 1-D CNN for series: Conv1d + BatchNorm1d + ReLU blocks, pooling, a Linear head"
    torch.manual_seed(0)
    return nn.Sequential(*block1d(3, 16, 5), *block1d(16, 32), nn.MaxPool1d(2), *block1d(32, 32, groups=2), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(32, 2))

def video_cnn():
    "A tiny 3-D CNN: Conv3d (a strided one, a non-cubic one), BatchNorm3d, pooling, a Linear head"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv3d(16, 16, (1,3,3), padding=(0,1,1)), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 3))

class UNet(nn.Module):
    "A U-Net-like decoder: two encoder convs, up by ConvTranspose2d (one with output padding), a skip concatenated, a 1×1 head"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc1,self.enc2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
        self.fuse = nn.Conv2d(32, 16, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2)
        self.out = nn.Conv2d(8, 1, 1)
    def forward(self, x):
        e1 = self.enc1(x).relu()
        u = self.up1(self.enc2(e1).relu()).relu()
        return self.out(self.up2(self.fuse(torch.cat([u, e1], 1)).relu()).relu())

def autoencoder_1d():
    "Conv1d down, ConvTranspose1d up"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 16, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose1d(24, 16, 4, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose1d(16, 4, 4, stride=2, padding=1))

def volume_decoder():
    "Conv3d down, ConvTranspose3d up"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 12, 3, padding=1), nn.ReLU(), nn.Conv3d(12, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose3d(16, 12, 2, stride=2), nn.ReLU(), nn.Conv3d(12, 2, 1))

MODELS = {  # name: (constructor, one input's shape)
    'series': (series_cnn, (3, 32)), 'video': (video_cnn, (2, 5, 6, 6)), 'unet': (UNet, (3, 8, 8)),
    'ae1d': (autoencoder_1d, (4, 32)), 'volume': (volume_decoder, (2, 4, 6, 6))}

def model(name): return MODELS[name][0]().eval()
def batch(name, n=4, seed=1): return torch.randn(n, *MODELS[name][1], generator=torch.Generator().manual_seed(seed))
def rel(a, b): return ((a-b).norm()/b.norm()).item()
def convs(net): return [n for n,m in net.named_modules() if isinstance(m, CONV_KINDS)]
def methods_of(net):
    "Every method some conv of `net` takes (a 1-D model: no spatial)"
    return [m for m in LAYER_METHODS[nn.Conv2d] if any(m in LAYER_METHODS[type(l)] for l in net.modules() if isinstance(l, CONV_KINDS))]

CASES = [(n, m) for n in MODELS for m in methods_of(model(n))]

# ---- the walk

@pytest.mark.parametrize('name,method', CASES, ids=[f"{n}-{m}" for n,m in CASES])
def test_full_rank_exact(name, method):
    "rank='full' by every method the model's kinds take: the same outputs, every conv a block (1×1 and 1-D spatial by SVD, noted)"
    net,x = model(name), batch(name)
    new,rep = decompose_model(net, method, rank='full', sample=x, head=True, quiet=True)
    assert (e := rel(new(x), net(x))) <= TOL, f"{name} by {method} at rank='full': relative error {e:.2e}"
    done = set(rep.layer[rep.method.notna()])
    assert set(convs(net)) <= done, f"{name} by {method}: convs left dense: {set(convs(net)) - done}\n{rep[['layer','note']]}"
    for n,m,note in zip(rep.layer, rep.method, rep.note):
        l = net.get_submodule(n)
        if isinstance(l, CONV_KINDS) and m!=method:
            assert m=='svd' and note in ('1×1: SVD', '1-D: SVD (its spatial split)'), f"{name} by {method}: {n} got {m} ({note!r})"

def test_chosen_methods_get_no_shape_note():
    "A method a plan (or a rule) chose for a k×k conv shows in the method column: the 1×1 and 1-D notes are only for layers the walk's method cannot take"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                        nn.Flatten(), nn.Linear(16*16, 10)).eval()
    _,rep = decompose_model(net, 'tucker', rank={'0': ('svd', 2), '2': ('spatial', 4), '4': ('svd', 4)}, sample=(3, 4, 4), quiet=True)
    test = dict(zip(rep.layer, rep.note))
    assert (test['0'], test['2'], test['4'])==('', '', '1×1: SVD'), test
    _,rep = decompose_model(model('series'), 'spatial', rank={'0': 4, '3': ('tucker', 4)}, sample=batch('series'), quiet=True)
    test = dict(zip(rep.layer, rep.note))
    assert (test['0'], test['3'])==('1-D: SVD (its spatial split)', ''), test

@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_blocks_take_the_layers_mode(mode):
    "Each block is in the mode of the layer it replaces: an eval-mode model gives an eval-mode model, by every path (weights, calibration, a plan)"
    net,x = getattr(model('series'), mode)(), batch('series')
    for kw in (dict(keep=0.5), dict(keep=0.5, calib=Calibration([x])), dict(rank=Budget(params=0.5))):
        new,_ = decompose_model(net, sample=x, quiet=True, **kw)
        assert any(isinstance(m, Factorized) for m in new.modules())
        assert {m.training for m in new.modules()}=={mode=='train'}, f"{kw}: modes {[(n, m.training) for n,m in new.named_modules()]}"

def test_cp_energy_refused_only_where_cp_would_take_a_layer():
    "energy= is not defined for CP: refused at the first layer CP would take; a selection CP takes nothing of (Linears, 1×1) decomposes by SVD"
    net,x = model('series'), batch('series')
    with pytest.raises(ValueError, match='0: energy= is not defined for CP'): decompose_model(net, 'cp', energy=0.9, sample=x, quiet=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32*16, 64), nn.Linear(64, 10))
    new,rep = decompose_model(net, 'cp', energy=0.5, layers=['1', '3'], sample=(3, 4, 4), quiet=True)
    assert list(rep.method)==['svd', 'svd'] and all(isinstance(new.get_submodule(n), Factorized) for n in '13'), rep

@pytest.mark.parametrize('name', MODELS)
def test_keep_half(name):
    "keep=0.5: fewer parameters in the report and in the model, each decomposed layer within half of its parameters"
    net,x = model(name), batch(name)
    new,rep = decompose_model(net, keep=0.5, sample=x, quiet=True)
    t = report_totals(rep)
    assert t['decomposed'] and t['params_after'] < t['params'], f"{name}: {t}"
    assert n_params(new) == n_params(net) - t['params'] + t['params_after'], f"{name}: the report's totals are not the model's"
    done = rep[rep.method.notna()]
    assert (done.params_after <= 0.5*done.params + 1).all(), f"{name}: a layer above keep=0.5\n{done}"
    assert new(x).shape == net(x).shape

def layer_macs(module, x)->int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc: module(x)
    return fc.get_total_flops()//2

@pytest.mark.parametrize('name,method', CASES, ids=[f"{n}-{m}" for n,m in CASES])
def test_report_macs(name, method):
    "The report's MACs, before and after, are what torch's FlopCounterMode counts on each layer and its block (FLOPs/2), per sample"
    net,x = model(name), batch(name, n=1)
    new,rep = decompose_model(net, method, keep=0.4, sample=x, head=True, quiet=True)
    ins = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m,i,o,n=n: ins.update({n: i[0]})) for n in rep.layer]
    with torch.no_grad(): net(x)
    for h in hooks: h.remove()
    for r in rep.itertuples():
        if r.method is None: continue
        got = layer_macs(net.get_submodule(r.layer), ins[r.layer]), layer_macs(new.get_submodule(r.layer), ins[r.layer])
        assert (r.macs, r.macs_after) == got, f"{name} {r.layer} by {r.method} at {r.rank}: report {(r.macs, r.macs_after)}, counted {got}"

@pytest.mark.parametrize('name', MODELS)
def test_budget(name):
    "Budget(params=0.5), weight-only and with a Calibration: the whole model within half its parameters; method='auto' too"
    net,x = model(name), batch(name)
    cal = Calibration([batch(name, 8, seed=s) for s in range(2)])
    for rule,method in [(Budget(params=0.5), 'tucker'), (Budget(params=0.5, calib=cal), 'tucker'), (Budget(params=0.5), 'auto')]:
        new,rep = decompose_model(net, method, rank=rule, sample=x, quiet=True)
        assert n_params(new) <= 0.5*n_params(net), f"{name} {rule!r} ({method}, calib={rule.calib is not None}): {n_params(new)} of {n_params(net)}"
        assert rule.achieved <= 0.5 and torch.isfinite(new(x)).all()
        if method=='auto':
            for n,m in zip(rep.layer, rep.method):
                if isinstance(m, str): assert m in LAYER_METHODS[type(net.get_submodule(n))], f"{name}: {n} got {m}"

def test_budget_macs():
    "Budget(macs=0.5) on the 1-D model: its multiply-adds, as FlopCounterMode counts them, at most half"
    net,x = model('series'), batch('series', n=1)
    new,_ = decompose_model(net, rank=Budget(macs=0.5), sample=x, quiet=True)
    assert layer_macs(new, x) <= 0.5*layer_macs(net, x), (layer_macs(new, x), layer_macs(net, x))

@pytest.mark.parametrize('name', ['series', 'unet', 'volume'])
def test_calibrated_exact_and_better(name):
    "Data-aware factors (transposed convs too, sequential or not): exact at rank='full', nearer the outputs than weight-only at keep=0.3"
    net,xs = model(name), [batch(name, 8, seed=s) for s in range(3)]
    x = torch.cat(xs)
    for seq in (False, True):
        # (sequential at damp=0 divides float32 noise by a near-singular Gram: 6e-4 on `series`, as on its Conv2d twin; the ridge is exact)
        for method in ('svd', 'tucker'):
            cal = Calibration(xs, sequential=seq, damp=0.01 if seq else 0.)
            new,_ = decompose_model(net, method, rank='full', calib=cal, head=True, quiet=True)
            assert (e := rel(new(x), net(x))) <= TOL, f"{name} {method} sequential={seq} at rank='full': {e:.2e}"
    for method in ('tucker', 'svd', 'cp'):
        data,_ = decompose_model(net, method, keep=0.3, calib=Calibration(xs), head=True, quiet=True)
        weight,_ = decompose_model(net, method, keep=0.3, head=True, quiet=True)
        assert rel(data(x), net(x)) < rel(weight(x), net(x)), f"{name} {method}: data-aware {rel(data(x), net(x)):.3f}, weight-only {rel(weight(x), net(x)):.3f}"

@pytest.mark.parametrize('name', ['series', 'video', 'unet'])
def test_vbmf(name):
    "VBMF gives each layer of the new kinds a rank within its full rank (SVD and Tucker)"
    net,x = model(name), batch(name)
    for method in ('svd', 'tucker'):
        new,rep = decompose_model(net, method, rank=VBMF(), sample=x, quiet=True)
        assert torch.isfinite(new(x)).all() and report_totals(rep)['decomposed'], f"{name} {method}\n{rep}"

def test_decomposer_takes_every_kind():
    "Conv_Decomposer().decompose walks every conv kind; the output layer is the last conv of any kind"
    net = model('ae1d')
    assert Conv_Decomposer.kind == CONV_KINDS and output_layer(net) == '6'
    new = Conv_Decomposer().decompose(net, 'cp', rank='full', head=True, quiet=True)
    assert all(isinstance(new.get_submodule(n), Factorized) for n in convs(net))

# ---- latency

def mac_timer(mods, x):
    "A deterministic stand-in for time_calls: seconds ∝ multiply-adds"
    return [1e-9*(layer_macs(m.eval(), x) + 1000) for m in mods]

def test_latency_on_1d():
    "LatencyAware and LatencyBudget plan a Conv1d model, LatencyAware a Conv3d one; layer_key tells kinds and output padding apart"
    net,x = model('series'), batch('series', n=1)
    new,rep = decompose_model(net, rank=LatencyAware(keep=0.5, timer=mac_timer, methods=('tucker','svd','spatial')), sample=x, quiet=True)
    assert report_totals(rep)['decomposed'] and torch.isfinite(new(x)).all()
    lb = LatencyBudget(keep=0.7, timer=mac_timer, round_to=1)
    new,rep = decompose_model(net, 'auto', rank=lb, sample=x, quiet=True)
    assert lb.achieved <= 0.7 and report_totals(rep)['decomposed'], lb.report
    net,x = model('video'), batch('video', n=1)   # channels_last (the timer's default) is for 4-d weights: a Conv3d's stay as they are
    new,rep = decompose_model(net, rank=LatencyAware(keep=0.5, timer=mac_timer), sample=x, quiet=True)
    assert report_totals(rep)['decomposed'] and torch.isfinite(new(x)).all()
    keys = {layer_key(k(4, 4, 3)) for k in CONV_KINDS} | {layer_key(nn.ConvTranspose2d(4, 4, 3, stride=2, output_padding=1))}
    assert len(keys) == len(CONV_KINDS) + 1

@pytest.mark.parametrize('name', ['series', 'video', 'unet'])
def test_fold_and_merge(name):
    "fold_bn folds BatchNorm1d/3d after Conv1d/3d, merge_linear and optimize leave the outputs as they were"
    net,x = model(name), batch(name)
    with torch.no_grad(): ref = net(x)
    folded = fold_bn(decompose_model(net, rank='full', quiet=True, head=True)[0])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert rel(merge_linear(folded)(x), ref) <= TOL and rel(optimize(net, x)(x), ref) <= TOL

# ---- plans and ONNX

@pytest.mark.parametrize('name', MODELS)
def test_plan_roundtrip(name, tmp_path):
    "save_decomposed, then load_decomposed on a fresh model: the same plan and the same outputs"
    net,x = model(name), batch(name)
    new,_ = decompose_model(net, 'cp' if name=='volume' else 'tucker', keep=0.5, sample=x, quiet=True)
    back = load_decomposed(MODELS[name][0], save_decomposed(new, tmp_path/'m.pth')).eval()
    assert decomposition_plan(back) == decomposition_plan(new)
    with torch.no_grad(): assert torch.equal(back(x), new(x)), name

@pytest.mark.parametrize('name', ['series', 'unet'])
def test_onnx(name, tmp_path):
    "A decomposed Conv1d model and ConvTranspose2d model export to ONNX, and onnxruntime gives their outputs"
    pytest.importorskip('onnxruntime')
    net,x = model(name), batch(name)
    new,_ = decompose_model(net, 'svd' if name=='series' else 'tucker', keep=0.5, sample=x, quiet=True)
    path = to_onnx(new, x, tmp_path/'m.onnx', dynamo=False)
    assert (e := onnx_error(path, new, batch(name, n=3, seed=5))) < 1e-4, f"{name}: ONNX error {e:.2e}"

# ---- the callback

def test_callback_1d():
    "DecomposeCallback(start_epoch=1, keep=0.5) on a fastai Learner for the 1-D CNN on synthetic series: 2 epochs, decomposed, finite loss"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.torch_core import set_seed
    from fasterai_lr.callback import DecomposeCallback
    set_seed(0)
    t = torch.linspace(0, 1, 32)
    y = torch.randint(0, 2, (256,))
    freq = torch.where(y==0, 3., 7.)[:,None,None]
    xs = torch.sin(2*math.pi*freq*t + torch.rand(256, 3, 1)*6) + 0.3*torch.randn(256, 3, 32)
    ds = list(zip(xs, y))
    dls = DataLoaders.from_dsets(ds[:192], ds[192:], bs=32, device='cpu')
    cb = DecomposeCallback(start_epoch=1, keep=0.5, verbose=False)
    learn = Learner(dls, series_cnn(), loss_func=nn.CrossEntropyLoss(), cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    assert cb.totals['decomposed'].iloc[0] == 3 and any(isinstance(m, Factorized) for m in learn.model.modules()), cb.report
    losses = [v for v in learn.recorder.values[-1][:2]]
    assert all(math.isfinite(v) for v in losses), losses

class SizedUp(nn.Module):
    "A decoder that calls its ConvTranspose2d with output_size=, which a block (a Sequential) cannot take"
    def __init__(self):
        super().__init__()
        self.down,self.up = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1)
        self.out = nn.Conv2d(8, 8, 1)
    def forward(self, x): return self.out(self.up(self.down(x), output_size=x.shape[-2:]))

@pytest.mark.parametrize('probe', [True, False])
def test_output_size_call_stays(probe):
    "A transposed conv called with output_size= stays, seen in the forward pass (sample=) or in its parent's source; the rest decomposes"
    net,x = SizedUp().eval(), torch.randn(2, 8, 9, 9)
    new,rep = decompose_model(net, rank='full', sample=x if probe else None, quiet=True)
    note = rep.set_index('layer').note['up']
    assert 'output_size=' in note and type(new.up) is nn.ConvTranspose2d and isinstance(new.down, Factorized), rep
    assert rel(new(x), net(x)) <= TOL
