"""Bad input to the whole-model paths (plans, save/load, decompose's options, calibration, the callback): a clear error
that says what was wrong, and the model passed in left exactly as it was.

The per-layer checks (ranks, keep, energy, NaN weights, quantized layers, ...) are in test_errors.py. A second
decompose of a decomposed model is tested apart (`test_second_decompose_*`): `Factorized` blocks are left as they are,
with a warning when nothing else is left (decomposing the factors again would compound the truncation: at keep=0.5
it moved the output of a small CNN by 28%, about as much as the first decompose did)."""
import json, os, socket, warnings, pytest, torch, torch.distributed as dist
from collections import OrderedDict
from torch import nn
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, decompose_model
from fasterai_lr.export import decomposition_plan, apply_plan, save_decomposed, load_decomposed

def net()->nn.Module:
    return nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, 4)))
def small()->nn.Module: return decompose_model(net(), 'tucker', rank='full', head=True, quiet=True)[0]
def plan()->dict: return decomposition_plan(small())
def x(): return torch.randn(2, 3, 8, 8)
def meta_net():
    with torch.device('meta'): return net()

def edit(change):
    "A plan of `small()` changed by `change(plan['layers'])`"
    p = plan(); change(p['layers']); return p

def setitem(d, k, v): d[k] = v

# ---- did anything change?

from untouched_check import _same, snapshot, assert_untouched

# ---- the cases: (id, build the target, call on it, exception type, a piece of the message)

def fresh_file(tmp, what):
    p = f"{tmp}/m.pth"
    torch.save(what, p); return p

def calib(data):
    from fasterai_lr.calibrate import Calibration
    return Calibration(data)

class OldCalib:
    "The calib= protocol before `.blocks`: `.prepare(model, names)` and `.build(name, layer, method, rank)` per layer"
    def prepare(self, model, names): return self
    def build(self, name, layer, method, rank): return None

def budget(**kw):
    from fasterai_lr.ranks import Budget
    return Budget(**kw)

def callback(**kw):
    from fasterai_lr.callback import DecomposeCallback
    return DecomposeCallback(**kw)

CASES = [
    # plans that do not fit the model, or are not plans
    ('plan-not-a-dict', net, lambda m, t: apply_plan(m, 'resnet18.json'), ValueError, 'not a decomposition plan'),
    ('plan-no-format', net, lambda m, t: apply_plan(m, {'version': 1, 'layers': {}}), ValueError, 'not a decomposition plan'),
    ('plan-newer-version', net, lambda m, t: apply_plan(m, {**plan(), 'version': 4}), ValueError, 'plan format version 4 is newer than this fasterai_lr reads (3)'),
    ('plan-version-not-int', net, lambda m, t: apply_plan(m, {**plan(), 'version': '1'}), ValueError, "plan version '1' is not a version"),
    ('plan-missing-layer', net, lambda m, t: apply_plan(m, edit(lambda l: setitem(l, 'features.9', l['head']))), ValueError, "the plan decomposes 'features.9', which the model does not have"),
    ('plan-wrong-type', net, lambda m, t: apply_plan(m, edit(lambda l: setitem(l, 'features.1', l.pop('features.0')))), ValueError, "but the model's 'features.1' is a ReLU"),
    ('plan-wrong-shape', lambda: nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 4, 3)))), lambda m, t: apply_plan(m, plan()), ValueError,
     "the plan's 'features.0' was Conv2d(8, 3, 3, 3), but the model's is Conv2d(4, 3, 3, 3)"),
    ('plan-Conv2d-on-Linear', net, lambda m, t: apply_plan(m, edit(lambda l: setitem(l, 'head', l['features.0']))), ValueError, "the plan's 'head' was Conv2d(8, 3, 3, 3), but the model's is Linear(4, 16)"),
    ('plan-unknown-method', net, lambda m, t: apply_plan(m, edit(lambda l: l['features.2'].update(method='tuckr', rank=3))), ValueError, "unknown method 'tuckr' for a Conv2d"),
    ('plan-Tucker-for-Linear', net, lambda m, t: apply_plan(m, edit(lambda l: l['head'].update(method='tucker', rank=[2, 2]))), ValueError, "unknown method 'tucker' for a Linear"),
    ('plan-Tucker-int-rank', net, lambda m, t: apply_plan(m, edit(lambda l: l['features.2'].update(rank=3))), ValueError, "Tucker's rank is a pair [r_out, r_in] of positive ints, got 3"),
    ('plan-CP-pair-rank', net, lambda m, t: apply_plan(m, edit(lambda l: l['features.2'].update(method='cp', rank=[2, 3]))), ValueError, "the rank of 'cp' is a positive int, got [2, 3]"),
    ('plan-zero-rank', net, lambda m, t: apply_plan(m, edit(lambda l: l['head'].update(rank=0))), ValueError, "the rank of 'svd' is a positive int, got 0"),
    ('plan-bool-rank', net, lambda m, t: apply_plan(m, edit(lambda l: l['head'].update(rank=True))), ValueError, "the rank of 'svd' is a positive int, got True"),
    ('plan-rank-above-full', net, lambda m, t: apply_plan(m, edit(lambda l: l['features.2'].update(rank=[17, 8]))), ValueError, "rank (17, 8) is above the full rank (16, 8) of tucker for Conv2d(16, 8, 3, 3)"),
    ('plan-entry-not-a-dict', net, lambda m, t: apply_plan(m, edit(lambda l: setitem(l, 'head', 'svd'))), ValueError, "plan entry 'head' is 'svd'; each entry is a dict"),
    ('plan-on-decomposed-model', small, lambda m, t: apply_plan(m, plan()), ValueError, "'features.0' is already decomposed; apply a plan to a fresh, undecomposed instance"),
    ('plan-on-a-string', lambda: 'resnet18', lambda m, t: apply_plan(m, plan()), TypeError, 'apply_plan takes an nn.Module, got str'),
    # files
    ('load-plain-state_dict', net, lambda m, t: load_decomposed(m, fresh_file(t, net().state_dict())), ValueError, "holds no decomposition plan and state_dict; save decomposed models with save_decomposed"),
    ('load-pickled-model', net, lambda m, t: load_decomposed(m, fresh_file(t, small())), ValueError, "holds pickled objects, not the plan and weights of save_decomposed"),
    ('load-other-architecture', lambda: nn.Sequential(nn.Linear(3, 3)), lambda m, t: load_decomposed(m, save_decomposed(small(), f'{t}/s.pth')), ValueError, "which the model does not have"),
    ('load-weights-of-other-ranks', net, lambda m, t: load_decomposed(m, fresh_file(t, dict(plan=plan(), state_dict=decompose_model(net(), 'tucker', rank=2, quiet=True)[0].state_dict()))),
     RuntimeError, 'size mismatch'),
    # the model itself
    ('meta-device-model', meta_net, lambda m, t: decompose_model(m, 'tucker', quiet=True), ValueError, 'is on the meta device and has no weights to factorize'),
    ('meta-device-model-with-sample', meta_net, lambda m, t: Conv_Decomposer().decompose(m, sample=(3, 8, 8), quiet=True), ValueError, 'is on the meta device'),
    ('model-not-a-module', lambda: 'resnet18', lambda m, t: decompose_model(m, 'tucker', quiet=True), TypeError, 'takes an nn.Module, got str'),
    ('model-is-a-bare-Linear', lambda: nn.Linear(32, 32), lambda m, t: FC_Decomposer().decompose(m, rank=4, quiet=True), ValueError, 'FC_Decomposer().SVD'),
    ('model-without-layers', lambda: nn.Sequential(nn.ReLU()), lambda m, t: decompose_model(m, quiet=True), ValueError, 'no nn.Linear or nn.Conv2d layer to decompose'),
    # options
    ('sample-wrong-channels', net, lambda m, t: decompose_model(m, sample=(5, 8, 8), quiet=True), ValueError, 'does not run through the model'),
    ('sample-a-string', net, lambda m, t: decompose_model(m, sample='224', quiet=True), (TypeError, ValueError), "sample='224'"),
    ('layers-and-exclude-overlap', net, lambda m, t: Conv_Decomposer().decompose(m, layers=['features'], exclude=['features'], quiet=True), ValueError, 'in both layers= and exclude='),
    ('layers-a-bad-name', net, lambda m, t: Conv_Decomposer().decompose(m, layers='features.7', rank=2, quiet=True), ValueError, "no layer named 'features.7'"),
    ('rank-dict-a-Sequential', net, lambda m, t: Conv_Decomposer().decompose(m, rank={'features': 2}, quiet=True), ValueError, "rank= names 'features', which is not a layer"),
    ('model-in-DataParallel', lambda: nn.DataParallel(net()), lambda m, t: decompose_model(m, quiet=True), ValueError, 'wrapped in DataParallel; decompose model.module'),
    ('model-is-a-bare-Conv2d', lambda: nn.Conv2d(8, 8, 3), lambda m, t: Conv_Decomposer().decompose(m, 'cp', rank=4, quiet=True), ValueError, 'Conv_Decomposer().CP(layer'),
    ('rank-dict-unknown-layer', net, lambda m, t: Conv_Decomposer().decompose(m, rank={'features.9': 2}, quiet=True), ValueError, "'features.9'"),
    ('rank-dict-zero', net, lambda m, t: Conv_Decomposer().decompose(m, 'svd', rank={'features.2': 0}, quiet=True), ValueError, 'is not a rank'),
    ('rank-dict-float', net, lambda m, t: Conv_Decomposer().decompose(m, 'svd', rank={'features.2': 2.5}, quiet=True), ValueError, 'is not a rank'),
    ('rank-dict-and-keep', net, lambda m, t: Conv_Decomposer().decompose(m, rank={'features.2': 2}, keep=0.5, quiet=True), ValueError, 'pass only one of'),
    ('calib-without-prepare', net, lambda m, t: Conv_Decomposer().decompose(m, calib=object(), quiet=True), TypeError, 'calib='),
    ('calib-old-build-protocol', net, lambda m, t: decompose_model(m, calib=OldCalib(), quiet=True), TypeError, 'calib= takes an object with .prepare(model, names) and .blocks('),
    # method='auto': a budget (or a {layer: (method, rank)} plan) chooses each layer's method
    ('auto-without-budget', net, lambda m, t: decompose_model(m, 'auto', keep=0.5, quiet=True), ValueError, "method='auto' lets a rank budget choose"),
    ('auto-Conv-without-budget', net, lambda m, t: Conv_Decomposer().decompose(m, 'auto', rank=2, quiet=True), ValueError, "method='auto' lets a rank budget choose"),
    ('auto-plan-without-method', net, lambda m, t: decompose_model(m, 'auto', rank={'features.2': 3}, quiet=True), ValueError, 'features.2: the rank plan gives a rank but no method'),
    ('auto-FC', net, lambda m, t: FC_Decomposer().decompose(m, 'auto', rank={'head': ('svd', 2)}, quiet=True), ValueError, "unknown method 'auto'"),
    ('budget-sensitivity', net, lambda m, t: budget(params=0.5, sensitivity=x()), TypeError, 'Budget(sensitivity=) is replaced by calib=Calibration(data)'),
    # calibration data
    ('calib-empty', net, lambda m, t: Conv_Decomposer().decompose(m, calib=calib([]), quiet=True), ValueError, 'the calibration data gave no batch'),
    ('calib-not-tensors', net, lambda m, t: Conv_Decomposer().decompose(m, calib=calib(['a', 'b']), quiet=True), TypeError, 'calibration batches must be tensors'),
    ('calib-wrong-channels', net, lambda m, t: Conv_Decomposer().decompose(m, calib=calib([torch.randn(2, 5, 8, 8)]), quiet=True), ValueError, 'calibration batch'),
    ('calib-wrong-ndim', net, lambda m, t: Conv_Decomposer().decompose(m, calib=calib([torch.randn(3, 8, 8)]), quiet=True), ValueError, 'calibration batch'),
    ('calib-nan-data', net, lambda m, t: Conv_Decomposer().decompose(m, calib=calib([torch.full((2, 3, 8, 8), float('nan'))]), quiet=True), ValueError, 'non-finite'),
    # the callback's conflicting options
    ('callback-rank-and-keep', lambda: None, lambda m, t: callback(rank=2, keep=0.5), ValueError, 'pass only one of'),
    ('callback-negative-start', lambda: None, lambda m, t: callback(start_epoch=-1), ValueError, 'start_epoch=-1 is not an epoch'),
    ('callback-stages-without-layers', lambda: None, lambda m, t: callback(start_epoch=[1, 2]), ValueError, 'pass layers= as one list of layer names'),
    ('callback-auto-without-budget', lambda: None, lambda m, t: callback(method='auto', keep=0.5), ValueError, "method='auto' lets a rank budget choose"),
    ('callback-calib-old-protocol', lambda: None, lambda m, t: callback(calib=OldCalib()), TypeError, 'pass True (calibrate on learn.dls.train at the swap) or a Calibration(data)'),
]

PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]

@pytest.mark.parametrize('build,call,exc,msg', PARAMS)
def test_bad_input(build, call, exc, msg, tmp_path):
    target = build()
    before = snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(exc) as info: call(target, tmp_path)
    assert msg in str(info.value), f"the error should say {msg!r}; it says: {str(info.value)!r}"
    assert_untouched(before, target, f"after the error {str(info.value)!r}")

def test_enough_kinds(): assert len(CASES) >= 20, len(CASES)

def test_untouched_check_can_fail():
    for change in (lambda m: m.head.weight.data.add_(1), lambda m: m.features.__setitem__(1, nn.GELU()), lambda m: m.head.requires_grad_(False)):
        m = net(); before = snapshot(m); change(m)
        with pytest.raises(AssertionError): assert_untouched(before, m, 'changed')

# ---- one layer name may be given as a str

@pytest.mark.parametrize('call,want', [(lambda m: Conv_Decomposer().decompose(m, layers='features.0', rank=2, quiet=True), ['features.0']),
                                       (lambda m: decompose_model(m, layers='features.0', rank=2, quiet=True)[0], ['features.0']),
                                       (lambda m: Conv_Decomposer().decompose(m, exclude='features.0', rank=2, quiet=True), ['features.2'])])
def test_layers_as_one_name(call, want):
    done = [n for n,m in call(net()).named_modules() if isinstance(m, Factorized)]
    assert done==want, f"decomposed {done}, expected {want}"

# ---- start_epoch beyond the run: a warning (the fit itself is fine), and nothing decomposed

def test_start_epoch_beyond_the_run():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    ds = list(zip(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))))
    learn = Learner(DataLoaders(DataLoader(ds, bs=8), DataLoader(ds, bs=8)), net(), loss_func=nn.CrossEntropyLoss(), cbs=callback(start_epoch=5))
    learn.logger = lambda *a, **k: None
    with pytest.warns(UserWarning, match=r"start_epoch=5 is at or past the end of this fit \(1 epochs\)"): learn.fit(1)
    assert not any(isinstance(m, Factorized) for m in learn.model.modules()), "nothing should be decomposed"

# ---- a model already decomposed: decompose it again

def test_second_decompose_is_a_no_op_with_a_message():
    "Factorized blocks are left as they are (decomposing their factors again would compound the truncation), with a warning"
    once = decompose_model(net(), 'tucker', keep=0.5, head=True, quiet=True)[0]   # every layer, the output layer too
    before = snapshot(once)
    with pytest.warns(UserWarning, match='already decomposed; the model is returned as it was'):
        twice,rep = decompose_model(once, 'cp', keep=0.25, head=True, quiet=True)
    nested = [n for n,m in twice.named_modules() if isinstance(m, Factorized) and any(isinstance(c, Factorized) for c in m.modules() if c is not m)]
    assert not nested, f"blocks decomposed again: {nested}"
    xx = x()
    with torch.no_grad(): assert torch.equal(twice(xx), once(xx)), "the second decompose changed the output"
    assert_untouched(before, once, 'second decompose')

def test_second_decompose_takes_the_rest():
    "A model decomposed in part: a second decompose takes the layers left, and leaves the blocks"
    part = Conv_Decomposer().decompose(net(), 'svd', layers=['features.0'], keep=0.5, quiet=True)
    blk = part.features[0]
    new,rep = decompose_model(part, 'tucker', keep=0.5, head=True, quiet=True)
    assert new.features[0][0].weight.data_ptr()!=blk[0].weight.data_ptr() and repr(new.features[0])==repr(blk), "the block should be kept as it was (in the copy)"
    assert isinstance(new.features[2], Factorized) and new.features[2].method=='tucker' and isinstance(new.head, Factorized), rep[['layer', 'method', 'note']]
    assert 'features.0' not in set(rep['layer']) and 'features.0.0' not in set(rep['layer']), f"the block's factors were candidates: {list(rep['layer'])}"

# ---- a DDP-wrapped model (as fastai's DistributedTrainer leaves learn.model)

def test_ddp_wrapped_model():
    "Decomposing inside a DDP wrapper would leave its reducer tracking the replaced parameters: an error says to decompose model.module"
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net())
        before = snapshot(ddp)
        with pytest.raises(ValueError, match='wrapped in DistributedDataParallel'): decompose_model(ddp, 'tucker', quiet=True)
        assert_untouched(before, ddp, 'DDP')
    finally: dist.destroy_process_group()
