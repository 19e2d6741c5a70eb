"DecomposeCallback: after the swap every new parameter trains, the optimizer holds exactly the live parameters with what it had, the schedule goes on"
import math, warnings, pytest, torch
from functools import partial
from torch import nn
from fastai.learner import load_learner
from fastai.callback.core import Callback
from fastai.callback.schedule import *
from fastai.callback.channelslast import ChannelsLast
from fastai.optimizer import Adam, SGD, OptimWrapper
from fastai.torch_core import set_seed, trainable_params
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import decompose_model, RankRule, ModelBudget, Calibrator
from fasterai_lr.ranks import VBMF, Budget
from fasterai_lr.callback import DecomposeCallback, dense_layers
from fasterai_lr.cli import digits_dls, digits_learner

# ---- helpers

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=128)  # 897 training images: 7 batches an epoch

def learner(dls, c=8, **kwargs):
    set_seed(0)  # weights and batch order
    return digits_learner(dls, c=c, **kwargs)

def fit(learn, *args, how='fit', **kwargs):
    with learn.no_bar(), learn.no_logging(): getattr(learn, how)(*args, **kwargs)

class Probe(Callback):
    "At every training batch where `learn.model` is a new object: what the optimizer holds and how far each trainable parameter moves in the step"
    order,run_valid = 5,False  # after DecomposeCallback's before_batch
    def before_fit(self): self.model0,self.swaps,self.groups0 = self.model,[],len(self.opt.param_lists)
    def before_batch(self):
        self.now = self.model is not self.model0
        if not self.now: return
        self.model0 = self.model
        self.swaps.append(dict(opt={id(p) for p,*_ in self.opt.all_params()}, groups=len(self.opt.param_lists),
                               trainable={id(p) for p in self.model.parameters() if p.requires_grad}, model={id(p) for p in self.model.parameters()}))
    def before_step(self):
        if self.now: self.w = {n: p.detach().clone() for n,p in self.model.named_parameters()}
    def after_step(self):
        if self.now: self.swaps[-1]['moved'] = {n: (p.detach()-self.w[n]).abs().max().item() for n,p in self.model.named_parameters() if p.requires_grad}

def check_swaps(probe, n=1, case=''):
    "`n` swaps, after each: every trainable parameter moved, the optimizer holds exactly the trainable ones, same number of groups"
    assert len(probe.swaps) == n, f"{case}: {len(probe.swaps)} swaps, expected {n}"
    for s in probe.swaps:
        still = [k for k,v in s['moved'].items() if not v > 0]
        assert not still, f"{case}: parameters that did not move in the first step after the swap: {still}"
        assert s['opt'] <= s['model'], f"{case}: {len(s['opt']-s['model'])} stale parameters (not in the model) in the optimizer"
        assert s['trainable'] <= s['opt'], f"{case}: {len(s['trainable']-s['opt'])} trainable parameters missing from the optimizer"
        assert s['groups'] == probe.groups0, f"{case}: {s['groups']} parameter groups after the swap, {probe.groups0} before"

def warns(f, match):
    with pytest.warns(UserWarning, match=match): return f()

# ---- the trap, and that the probe sees it

class NaiveSwap(Callback):
    "What the trap looks like: a decomposed model put in `learn.model`, the optimizer left as it was"
    def before_epoch(self):
        if self.epoch==1: self.learn.model = decompose_model(self.model, quiet=True)[0]

def test_probe_catches_a_naive_swap(dls):
    learn = learner(dls)
    fit(learn, 2, 1e-3, cbs=[NaiveSwap(), probe := Probe()])
    s, = probe.swaps
    assert all(v == 0 for v in s['moved'].values()), "with the old optimizer, no parameter of the new model should move"
    assert not s['opt'] & s['model'], "the old optimizer should hold none of the new model's parameters"
    with pytest.raises(AssertionError, match='did not move'): check_swaps(probe, case='naive')

# ---- every new parameter trains, whatever the optimizer, the splitter, the method

OPTS = dict(adam=Adam, sgd=partial(SGD, mom=0.9), torch_adamw=partial(OptimWrapper, opt=torch.optim.AdamW))

@pytest.mark.parametrize('method', ['tucker', 'cp', 'svd', 'spatial'])
@pytest.mark.parametrize('opt', list(OPTS))
def test_new_layers_train(dls, method, opt):
    learn = learner(dls, opt_func=OPTS[opt])
    fit(learn, 2, 1e-3, cbs=[cb := DecomposeCallback(1, method, keep=0.5, verbose=False), probe := Probe()])
    check_swaps(probe, case=f"{method}, {opt}")
    assert cb.totals.decomposed[0] >= 3, f"{method}, {opt}: only {cb.totals.decomposed[0]} layers decomposed"
    assert not dense_layers(learn.model)[nn.Conv2d][1:], f"{method}, {opt}: convolutions left dense: {dense_layers(learn.model)}"

@pytest.mark.parametrize('splitter', ['trainable_params', 'body_head'])
def test_groups_and_exact_parameters(dls, splitter):
    learn = learner(dls, **(dict(splitter=trainable_params) if splitter=='trainable_params' else {}))
    fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, verbose=False), probe := Probe()])
    check_swaps(probe, case=splitter)
    s = probe.swaps[0]
    assert s['opt'] == s['trainable'] == s['model'], f"{splitter}: optimizer and model parameters differ"
    assert len(learn.opt.param_lists) == (1 if splitter=='trainable_params' else 2)

# ---- the extension points: rank rules, whole-model budgets, data-aware factors

class Fixed(RankRule):
    "A rank rule: `.ranks(model, candidates)`"
    def ranks(self, model, cands, sample=None, calib=None): return {n: (2, 2) if meth=='tucker' else 2 for n,_,meth,_ in cands}

class Planner(ModelBudget):
    "A whole-model budget: `.plan(model, method, ...)`, called once at the swap"
    def plan(self, model, method, sample=None, layers=None, exclude=None, calib=None, head=False):
        self.seen = (method, sample.shape, layers, exclude, calib, head)
        return {'body.2.0': (4, 4), 'head.2': 3}

class Calib(Calibrator):
    "Data-aware factors: `.prepare(model, names)`, then `.blocks([(name, layer, method, rank)])` → {name: block, or None: the weight-only block}"
    def __init__(self): self.built = []
    def prepare(self, model, names): self.names = list(names); return self
    def blocks(self, items):
        self.built += [n for n,*_ in items]
        return {n: None for n,*_ in items}

@pytest.mark.parametrize('case', ['dict', 'ranks', 'plan', 'calib'])
def test_extension_points(dls, case):
    opts = dict(dict=dict(rank={'body.1.0': (3, 3)}), ranks=dict(rank=Fixed()), plan=dict(rank=(planner := Planner()), head=True),
                calib=dict(keep=0.5, calib=(calib := Calib())))[case]
    learn = learner(dls)
    fit(learn, 2, 1e-3, cbs=[cb := DecomposeCallback(1, exclude=['body.3'], verbose=False, **opts), probe := Probe()])
    check_swaps(probe, case=case)
    done = cb.report.dropna(subset=['method']).set_index('layer')['rank'].to_dict()
    want = dict(dict={'body.1.0': (3, 3)}, ranks={'body.1.0': (2, 2), 'body.2.0': (2, 2)},   # (the output layer head.2 is kept: no candidate)
                plan={'body.2.0': (4, 4), 'head.2': 3}, calib=None)[case]
    if want is not None: assert done == want, f"{case}: decomposed {done}, expected {want}"
    if case=='plan': assert planner.seen == ('tucker', (128, 1, 8, 8), None, ['body.3'], None, True), f"plan called with {planner.seen}"
    if case=='calib': assert calib.names == calib.built == list(done) == ['body.1.0', 'body.2.0'], f"calib prepared {calib.names}, built {calib.built}, decomposed {list(done)}"

def test_calib_true_calibrates_at_the_swap(dls):
    "calib=True: a Calibration of learn.dls.train, made at the swap (batches as the model sees them then)"
    from fasterai_lr.calibrate import Calibration
    learn = learner(dls)
    fit(learn, 2, 1e-3, cbs=[cb := DecomposeCallback(1, keep=0.5, calib=True, verbose=False), probe := Probe()])
    check_swaps(probe, case='calib=True')
    assert isinstance(cb.calib_used, Calibration) and cb.calib_used.data is learn.dls.train, f"calibrated with {cb.calib_used!r}"
    assert cb.totals.decomposed[0] >= 3, cb.report[['layer', 'method', 'note']]

# ---- what carries over

class Before(Callback):
    "The optimizer and model of the batch before the current one"
    order,run_valid = -1,False
    def before_batch(self): self.prev = (self.opt, self.model, [dict(h) for h in self.opt.hypers])

class Witness(Callback):
    "At the first batch after the swap, before its step: the old optimizer and model, and what the new optimizer holds"
    order,run_valid = 6,False  # after DecomposeCallback
    def before_fit(self): self.seen = None
    def before_batch(self):
        old_opt, old_model, old_hypers = self.before.prev
        if self.model is old_model or self.seen: return
        new_opt, old_ids = self.opt, {id(p) for p in old_model.parameters()}
        self.seen = dict(old_hypers=old_hypers, hypers=[dict(h) for h in new_opt.hypers], model=self.model, old_ids=old_ids,
                         lost=[(tuple(p.shape), k) for p in self.model.parameters() if id(p) in old_ids
                               for k,v in old_opt.state[p].items() if new_opt.state[p].get(k) is not v],
                         state={id(p): dict(new_opt.state[p]) for p,*_ in new_opt.all_params()})

def test_state_hypers_and_marks_carry_over(dls):
    learn = learner(dls, wd=0.05)
    w = Witness(); w.before = Before()
    fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, keep=0.5, exclude=['head'], verbose=False), w.before, w])
    s = w.seen
    assert s['hypers'] == s['old_hypers'], f"hyper-parameters changed at the swap: {s['old_hypers']} -> {s['hypers']}"
    assert s['hypers'][0]['wd'] == 0.05
    model, state = s['model'], s['state']
    assert {id(p) for p in model.head.parameters()} <= s['old_ids'], "the head was excluded: its parameters should be the same objects"
    assert not s['lost'], f"optimizer state of kept parameters not carried over (shape, key): {s['lost']}"
    kept = [p for p in model.parameters() if id(p) in s['old_ids']]
    assert kept and all('grad_avg' in state[id(p)] for p in kept), "kept parameters should have their Adam moments"
    new = [p for p in model.parameters() if id(p) not in s['old_ids']]
    assert new and all(set(state[id(p)]) <= {'do_wd', 'force_train'} for p in new), "new factor parameters should start from a fresh state"
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert all(state[id(p)].get('do_wd') is False and state[id(p)].get('force_train') for p in bn), "batch norms lost do_wd=False or force_train=True"
    assert state[id(model.head[-1].bias)].get('do_wd') is False, "a bias lost do_wd=False"
    assert all(state[id(p)].get('do_wd', True) for p in new if p.dim() > 1), "a factor weight was exempted from weight decay"

def test_schedule_goes_on(dls):
    "The hyper-parameters of every group at every batch are those of the same fit without the callback"
    class Hypers(Callback):
        order = 70
        def before_fit(self): self.seen = []
        def after_batch(self):
            if self.training: self.seen.append([dict(h) for h in self.opt.hypers])
    runs = {}
    for name,cbs in (('dense', []), ('decomposed', [DecomposeCallback(2, keep=0.25, verbose=False)])):
        learn = learner(dls)
        fit(learn, 4, slice(1e-3, 1e-2), how='fit_one_cycle', cbs=cbs+[h := Hypers()])
        runs[name] = h.seen
    assert len(runs['dense']) == len(runs['decomposed']) == 4*7
    for i,(a,b) in enumerate(zip(runs['dense'], runs['decomposed'])):
        assert a == b, f"batch {i}: hyper-parameters differ, dense {a} vs decomposed {b}"
    assert len(runs['dense'][0]) == 2

def test_frozen_state_kept(dls):
    learn = learner(dls)
    learn.freeze()
    fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, verbose=False), probe := Probe()])
    assert learn.opt.frozen_idx == 1
    body_bn = {id(p) for m in learn.model.body.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    for n,p in learn.model.named_parameters():
        should = n.startswith('head') or id(p) in body_bn  # train_bn: batch norms train in frozen groups
        assert p.requires_grad == should, f"{n}: requires_grad={p.requires_grad} in a learner frozen up to the head"
    moved = probe.swaps[0]['moved']
    assert all(v > 0 for v in moved.values()), f"trainable parameters that did not move: {[k for k,v in moved.items() if not v > 0]}"
    assert any(isinstance(m, Factorized) for m in learn.model.body.modules()), "the frozen body should have been decomposed too"

# ---- the ways a fit is run

def test_fine_tune(dls):
    learn = learner(dls)
    probe = Probe()
    warns(lambda: fit(learn, 2, how='fine_tune', freeze_epochs=1, cbs=[DecomposeCallback(1, verbose=False), probe]), "fine_tune's first, frozen fit")
    check_swaps(probe, case='fine_tune')
    assert learn.recorder.decompositions.iteration[0] == 7, "should decompose at epoch 1 of the unfrozen fit"

def test_reusable_across_fits(dls):
    cb = DecomposeCallback(1, keep=0.5, verbose=False)
    a, b = learner(dls), learner(dls, c=4)
    fit(a, 2, 1e-3, cbs=[cb, pa := Probe()])
    n_b = sum(p.numel() for p in b.model.parameters())
    fit(b, 2, 1e-3, cbs=[cb, pb := Probe()])
    check_swaps(pa, case='first learner'); check_swaps(pb, case='second learner')
    assert cb.totals.params[0] == n_b, "the totals should be the second learner's"
    model = a.model
    fit(a, 2, 1e-3, cbs=[cb, pa := Probe()])
    assert a.model is model and not pa.swaps, "a second fit on a decomposed model should train it as it is"

@pytest.mark.parametrize('how', ['persistent', 'fine_tune'])
def test_each_stage_once_a_learner(dls, tmp_path, how):
    """Two fits with the callback on one learner (it is in the learner's cbs, or fine_tune runs its frozen and unfrozen fits with it): the
    model is decomposed once, in the fit its start falls in; the next fit trains it as it is, with no warning, and a budget is not spent
    again on the layers it left"""
    cb = DecomposeCallback(0.5, rank=Budget(params=0.4), calib=True, verbose=False)
    learn = learner(dls, cbs=cb if how=='persistent' else None, path=tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        if how=='persistent': fit(learn, 1, 1e-3); model = learn.model; fit(learn, 2, 1e-3, how='fit_one_cycle')
        else: fit(learn, 2, how='fine_tune', freeze_epochs=1, cbs=cb)
    assert len(cb.totals)==1 and cb.totals.params_after[0]==sum(p.numel() for p in learn.model.parameters()), cb.totals
    assert how!='persistent' or learn.model is model
    assert not [o for o in w if 'DecomposeCallback' in str(o.message) or 'cannot be met' in str(o.message)], [str(o.message) for o in w]
    if how=='persistent': learn.export(tmp_path/'learn.pkl')   # (the learner, callback and all, still pickles)
    fit(other := learner(dls), 1, 1e-3, cbs=cb)                # another learner: decomposed afresh
    assert any(isinstance(m, Factorized) for m in other.model.modules())

def test_idle_in_lr_find_validate_get_preds(dls, tmp_path):
    learn = learner(dls, cbs=DecomposeCallback(0, verbose=False), path=tmp_path)  # lr_find saves a model there
    model = learn.model
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.lr_find(num_it=5, show_plot=False); learn.validate(); learn.get_preds()
    assert learn.model is model and not any(isinstance(m, Factorized) for m in model.modules())
    assert not [o for o in w if 'DecomposeCallback' in str(o.message)], "not even a warning"

def test_stages_and_fractions(dls):
    learn = learner(dls)
    cb = DecomposeCallback([0.25, 2], layers=[['head.2'], None], keep=0.5, verbose=False)   # the output layer, by its name
    fit(learn, 4, 1e-3, how='fit_one_cycle', cbs=[cb, probe := Probe()])
    check_swaps(probe, n=2, case='two stages')
    assert list(cb.totals.iteration) == [math.ceil(0.25*4*7), 2*7]
    assert cb.report.groupby('stage').layer.apply(list).to_dict() == {0: ['head.2'], 1: ['body.0.0', 'body.1.0', 'body.2.0', 'body.3.0']}
    assert cb.totals.params_after[1] < cb.totals.params_after[0] < cb.totals.params[0]

# ---- precision, memory format, export

class CPUAutocast(Callback):
    "bfloat16 autocast on the CPU, where fastai's MixedPrecision (CUDA autocast, GradScaler) does nothing"
    order = 10
    def before_batch(self): self.ctx = torch.autocast('cpu', dtype=torch.bfloat16); self.ctx.__enter__()
    def after_pred(self): self.dtypes = getattr(self, 'dtypes', set()) | {self.pred.dtype}; self.learn.pred = self.pred.float()
    def after_loss(self): self.ctx.__exit__(None, None, None)

def test_mixed_precision(dls):
    learn = learner(dls, c=16)
    fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, verbose=False), ac := CPUAutocast(), probe := Probe()])
    check_swaps(probe, case='bf16 autocast')
    assert torch.bfloat16 in ac.dtypes, "the forward pass did not run in bfloat16"
    learn = learner(dls).to_fp16()  # on a CPU its autocast and GradScaler are disabled, but its fake-optimizer step runs
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
        warnings.filterwarnings('ignore', message='.*cuda.*')
        fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, verbose=False), probe := Probe()])
    check_swaps(probe, case='to_fp16')

def test_channels_last(dls):
    learn = learner(dls)
    fit(learn, 2, 1e-3, cbs=[ChannelsLast(), DecomposeCallback(1, method='tucker', verbose=False), probe := Probe()])
    check_swaps(probe, case='channels_last')
    ws = [m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1 and m.weight.shape[1] > 1]
    assert ws and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in ws), "new convolutions are not channels-last"

def test_export_round_trip(dls, tmp_path):
    learn = learner(dls)
    fit(learn, 2, 1e-3, cbs=DecomposeCallback(1, verbose=False))
    learn.path = tmp_path
    learn.export('decomposed.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        back = load_learner(tmp_path/'decomposed.pkl')
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): want, got = learn.model.eval()(x), back.model.eval()(x)
    assert sum(isinstance(m, Factorized) for m in back.model.modules()) >= 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)

# ---- accuracy on the digits

def test_digits_accuracy_within_a_point():
    "The demo's CNN, 8 epochs of one-cycle; Tucker-2 at keep=0.25 from epoch 4 (head excluded) ends within 1 point of the dense run"
    acc = {}
    for name,cbs in (('dense', []), ('decomposed', [DecomposeCallback(4, keep=0.25, exclude=['head'], verbose=False)])):
        set_seed(0)
        learn = digits_learner(digits_dls(seed=0))
        fit(learn, 8, 1e-2, how='fit_one_cycle', cbs=cbs)
        acc[name] = 100*float(learn.recorder.values[-1][-1])
    assert acc['dense'] > 97, f"the dense run is off: {acc}"
    assert acc['decomposed'] >= acc['dense'] - 1, f"decomposed {acc['decomposed']:.2f}% vs dense {acc['dense']:.2f}%: more than 1 point lost"

# ---- what is refused, and what is warned about

@pytest.mark.parametrize('kwargs,err', [
    (dict(start_epoch=1.5), 'not an epoch'), (dict(start_epoch=-1), 'not an epoch'), (dict(start_epoch=True), 'not an epoch'),
    (dict(start_epoch=[1, 3]), 'one list of layer names'), (dict(start_epoch=[1, 3], layers=['a', 'b']), 'one list of layer names'),
    (dict(method='tuckr'), "unknown method 'tuckr'"), (dict(keep=0.5, rank=4), 'pass only one of'), (dict(keep=2), 'outside'),
    (dict(layers=3), 'must be a list of layer names')])
def test_bad_options(kwargs, err):
    with pytest.raises((ValueError, TypeError), match=err): DecomposeCallback(**kwargs)

def test_refused_before_training(dls):
    learn = learner(dls)
    model = learn.model
    with pytest.raises(ValueError, match="no layer named 'bdy'"): fit(learn, 1, cbs=DecomposeCallback(0, layers=['bdy']))
    with pytest.raises(ValueError, match="'head.1' is a Flatten"): fit(learn, 1, cbs=DecomposeCallback(0, exclude=['head.1']))
    # energy= with CP: refused at before_fit, where the model says which layers CP would take (here every conv)
    with pytest.raises(ValueError, match="method='cp' would factorize body.1.0, body.2.0, body.3.0, and energy= gives no CP rank"):
        fit(learn, 1, cbs=DecomposeCallback(0, method='cp', energy=0.9))
    assert learn.model is model and not any(isinstance(m, Factorized) for m in model.modules()), "the refused fit changed the model"
    cb = DecomposeCallback(0, method='cp', energy=0.5, layers=['head.2'], head=True, round_to=1)   # CP takes no layer here: the Linear by SVD
    fit(learner(dls), 1, cbs=cb)
    assert list(cb.report.method)==['svd'], cb.report
    learn.opt_func = OptimWrapper(opt=torch.optim.SGD(model.parameters(), lr=0.1))
    learn.opt = None
    with pytest.raises(TypeError, match='already built'): fit(learn, 1, cbs=DecomposeCallback(0))
    assert learn.model is model and not any(isinstance(m, Factorized) for m in model.modules()), "a refused fit changed the model"
    bare = learner(dls, splitter=trainable_params)
    bare.model = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))
    bare.opt = None
    with pytest.raises(ValueError, match='no nn.Linear or nn.Conv2d'): fit(bare, 1, cbs=DecomposeCallback(0))

class Batches(Callback):
    "How many training batches ran"
    def before_fit(self): self.n = 0
    def after_batch(self): self.n += self.training

@pytest.mark.parametrize('kwargs,err', [
    (dict(method='cp', rank=VBMF()), "method='cp' would factorize body.1.0, body.2.0, body.3.0, and rank=VBMF\\(\\) gives no CP rank"),
    (dict(rank={'nope': 4}), "rank= names 'nope', which is not a layer"), (dict(rank={'body.1.0': (4,)}), 'is not a rank'),
    (dict(rank={'body.1.0': 999}), 'body.1.0: rank=999 is above the full Tucker ranks'), (dict(rank=10_000), 'above the full rank of every layer'),
    (dict(method='auto', rank={'body.1.0': 4}), 'the rank plan gives a rank but no method')])
def test_refused_before_the_dense_epochs(dls, kwargs, err):
    "What the walk would refuse at the swap is refused before the first training batch, the model as it was"
    learn, n = learner(dls), Batches()
    model = learn.model
    with pytest.raises(ValueError, match=err): fit(learn, 3, cbs=[DecomposeCallback(2, **kwargs), n])
    assert n.n==0 and learn.model is model and not any(isinstance(m, Factorized) for m in model.modules())

def test_auto_needs_a_budget_at_construction():
    with pytest.raises(ValueError, match="method='auto' lets a rank budget choose"): DecomposeCallback(method='auto', rank=VBMF())

def test_idle_outside_fit(dls):
    "validate and get_preds (which run before_fit too) with the callback attached: no error, no warning, nothing decomposed; before a fit and after one"
    learn = learner(dls)
    learn.add_cb(cb := DecomposeCallback(1, keep=0.25, verbose=False))
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            with learn.no_bar(): learn.validate(); learn.get_preds()
        fit(learn, 2)
    assert len(cb.totals)==1 and any(isinstance(m, Factorized) for m in learn.model.modules())

def test_stage_with_nothing_left_warns(dls):
    "A later stage whose layers an earlier one took: a warning at its epoch, and training goes on"
    learn = learner(dls)
    cb = DecomposeCallback([1, 2], layers=[None, ['body.3']], keep=0.25, verbose=False)
    warns(lambda: fit(learn, 3, 1e-2, cbs=cb), 'no layer left to decompose at start_epoch=2 among layers=')
    assert len(cb.totals)==1 and len(learn.recorder.values)==3

def test_trackers_start_over_at_the_swap(dls, tmp_path):
    "SaveModelCallback whose best epoch came before the swap, EarlyStoppingCallback that would stop at its loss jump: the fit runs to its end on the decomposed model"
    from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau
    learn = learner(dls, path=tmp_path)
    fit(learn, 4, 1e-2, how='fit_one_cycle', cbs=[DecomposeCallback(3, keep=0.05, verbose=False), SaveModelCallback(), EarlyStoppingCallback(patience=1), ReduceLROnPlateau(patience=1)])
    assert len(learn.recorder.values)==4 and any(isinstance(m, Factorized) for m in learn.model.modules()), "the fit stopped or loaded the dense checkpoint"

def test_past_the_end_warns(dls):
    learn = learner(dls)
    model = learn.model
    warns(lambda: fit(learn, 2, 1e-3, cbs=DecomposeCallback(2)), 'at or past the end of this fit')
    assert learn.model is model

# ---- a real fastai vision learner

def test_vision_learner_fine_tune():
    "fastai's vision_learner (ResNet-18, three parameter groups, frozen body) through fine_tune, on random 16×16 images"
    from fastai.vision.all import vision_learner, resnet18
    from fastai.data.core import DataLoaders, TfmdLists
    set_seed(0)
    items = list(zip(torch.randn(40, 3, 16, 16), torch.randint(0, 4, (40,))))
    dls = DataLoaders.from_dsets(TfmdLists(items[:32], None), TfmdLists(items[32:], None), bs=16, device='cpu', num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=4, loss_func=nn.functional.cross_entropy)
    probe = Probe()
    warns(lambda: fit(learn, 2, how='fine_tune', freeze_epochs=1, cbs=[DecomposeCallback(1, 'svd', keep=0.5, verbose=False), probe]), 'frozen fit')
    check_swaps(probe, case='vision_learner')
    assert probe.groups0 == 3 and learn.opt.frozen_idx == 0
    assert sum(isinstance(m, Factorized) for m in learn.model.modules()) == 21, "every conv and linear of ResNet-18 and fastai's head, but the output layer"
    assert type(learn.model[1][-1]) is nn.Linear, f"the output layer should be kept: {learn.model[1][-1]!r}"

@pytest.mark.parametrize('budget', [Budget(params=0.02), Budget(params=0.02, round_to=8), Budget(macs=0.02, sample=(1, 8, 8))])
def test_unmeetable_budget_refused_before_training(dls, budget):
    "A budget no plan meets (on any weights) is refused before the first training batch, model untouched, with the figure the swap would give"
    learn = learner(dls)
    model, w, seen = learn.model, {k: v.clone() for k,v in learn.model.state_dict().items()}, []
    class Count(Callback):
        def after_batch(self): seen.append(1)
    with pytest.raises(ValueError, match='cannot be met') as e: fit(learn, 2, 1e-3, cbs=[DecomposeCallback(1, rank=budget), Count()])
    assert not seen and learn.model is model and all(torch.equal(v, model.state_dict()[k]) for k,v in w.items())
    with pytest.raises(ValueError) as at_swap: decompose_model(model, 'tucker', rank=budget, quiet=True)
    assert str(at_swap.value) in str(e.value)
    fit(learn, 2, 1e-3, cbs=DecomposeCallback(1, rank=Budget(**{budget.by: 0.5}, sample=budget.sample), verbose=False))   # one it can meet: no refusal
    assert any(isinstance(m, Factorized) for m in learn.model.modules())
