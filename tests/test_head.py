"""The model's output layer (`output_layer`: the last nn.Linear or nn.Conv2d the model registers) is kept by whole-model
walks (the decomposers' `decompose`, `decompose_model`, budgets, `DecomposeCallback`) with the report note `HEAD_NOTE`,
unless `head=True` is passed or its exact name is in `layers=`. Per-layer calls decompose whatever they are given."""
import pytest, torch, pandas as pd
from collections import OrderedDict
from torch import nn
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, decompose_model, output_layer, HEAD_NOTE
from fasterai_lr.ranks import Budget, candidates

def net()->nn.Module:
    "Two convs and a Linear head whose weights are nearly rank 2: a budget that may take it does (a rank-2 SVD costs a fifth and loses nothing)"
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                                  pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, 64)))
    with torch.no_grad(): m.head.weight.copy_(torch.randn(64, 2)@torch.randn(2, 16) + 1e-4*torch.randn(64, 16))
    return m.eval()

def fcn()->nn.Module:
    "A fully convolutional model: its output layer is a 3×3 conv"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()

def fc(m, **kw):
    d = FC_Decomposer(); return d.decompose(m, rank=2, quiet=True, **kw), d.report
def conv(m, **kw):
    d = Conv_Decomposer(); return d.decompose(m, 'tucker', rank=2, quiet=True, **kw), d.report
def model(m, **kw): return decompose_model(m, 'tucker', rank=2, quiet=True, **kw)
def budget(m, **kw): return decompose_model(m, 'tucker', rank=Budget(params=0.8), quiet=True, **kw)

# (id, walk, model, its output layer, the other layers the walk decomposes by default)
WALKS = [('FC_Decomposer', fc, net, 'head', []), ('Conv_Decomposer', conv, fcn, '4', ['0', '2']),
         ('decompose_model', model, net, 'head', ['features.0', 'features.2']), ('decompose_model-fcn', model, fcn, '4', ['0', '2']),
         ('Budget', budget, net, 'head', None)]
PARAMS = [pytest.param(*w[1:], id=w[0]) for w in WALKS]

def decomposed(m): return [n for n,b in m.named_modules() if isinstance(b, Factorized)]

def test_output_layer():
    assert output_layer(net())=='head' and output_layer(fcn())=='4'
    assert output_layer(nn.Sequential(nn.ReLU())) is None, "no Linear or Conv2d: no output layer"
    done = decompose_model(net(), 'tucker', rank=2, head=True, quiet=True)[0]
    assert output_layer(done) is None, f"a decomposed output layer is no output layer to keep: {output_layer(done)!r}"

@pytest.mark.parametrize('walk,make,out,others', PARAMS)
def test_default_keeps_the_output_layer(walk, make, out, others):
    m = make()
    new,rep = walk(m)
    row = rep.set_index('layer').loc[out]
    assert row['note']==HEAD_NOTE and pd.isna(row['method']), f"{out}: report row {row.to_dict()}"
    kept = new.get_submodule(out)
    assert type(kept) is type(m.get_submodule(out)) and torch.equal(kept.weight, m.get_submodule(out).weight), f"{out} changed: {kept!r}"
    if others is not None: assert decomposed(new)==others, f"decomposed {decomposed(new)}, expected {others}"
    else: assert decomposed(new), "the budget decomposed nothing"

@pytest.mark.parametrize('walk,make,out,others', PARAMS)
def test_head_true_decomposes_it(walk, make, out, others):
    new,rep = walk(make(), head=True)
    assert isinstance(new.get_submodule(out), Factorized), f"head=True: {out} is {new.get_submodule(out)!r}"
    assert HEAD_NOTE not in set(rep['note']), rep[['layer', 'note']]
    if others is not None: assert decomposed(new)==sorted(others+[out], key=list(dict(make().named_modules())).index)

@pytest.mark.parametrize('walk,make,out,others', PARAMS)
def test_naming_it_in_layers_decomposes_it(walk, make, out, others):
    new,rep = walk(make(), layers=[out])
    assert decomposed(new)==[out], f"layers=[{out!r}]: decomposed {decomposed(new)}"

def test_a_module_holding_it_is_not_its_name():
    "layers= naming a module that holds the output layer takes the others in it, not the output layer"
    m = nn.Sequential(OrderedDict(body=fcn()))
    new,rep = decompose_model(m, 'tucker', rank=2, layers=['body'], quiet=True)
    assert decomposed(new)==['body.0', 'body.2'] and rep.set_index('layer').loc['body.4', 'note']==HEAD_NOTE, rep[['layer', 'note']]

def test_exclude_wins_over_head():
    d = FC_Decomposer()
    with pytest.raises(ValueError, match='no nn.Linear layer to decompose'): d.decompose(net(), rank=2, head=True, exclude=['head'], quiet=True)

def test_per_layer_calls_unchanged():
    m = net()
    assert isinstance(FC_Decomposer().SVD(m.head, rank=2), Factorized)
    assert isinstance(Conv_Decomposer().Tucker(fcn()[4], rank=2), Factorized)

def test_budget_plans_leave_it_out():
    "A budget's candidates and plan leave out the output layer unless head=True or layers= names it; its report has no row for it"
    m = net()
    assert [n for n,*_ in candidates(m)]==['features.0', 'features.2'] and [n for n,*_ in candidates(m, head=True)][-1]=='head'
    for kw,has in ((dict(), False), (dict(head=True), True), (dict(layers=['head']), True)):
        b = Budget(params=0.8)
        plan = b.plan(m, **kw)
        assert ('head' in plan)==has and ('head' in set(b.report.layer))==has, f"{kw}: plan {plan}, report rows {list(b.report.layer)}"
    assert Budget(params=0.8).plan(m, layers=['head']).keys()=={'head'}

def test_one_walk_over_both_kinds_in_module_order():
    "decompose_model: Linear and Conv2d layers in one walk, one report, its rows in the model's module order"
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb,self.c1,self.c2,self.fc,self.out = nn.Linear(8, 48), nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 16), nn.Linear(16, 4)
        def forward(self, x): return self.out(self.fc(self.c2(self.c1(self.emb(x).view(-1, 3, 4, 4))).mean((2, 3))))
    new,rep = decompose_model(M(), 'tucker', keep=0.5, quiet=True)
    assert list(rep.layer)==['emb', 'c1', 'c2', 'fc', 'out'], list(rep.layer)
    assert list(rep.method)[:4]==['svd', 'tucker', 'tucker', 'svd'] and rep.note.iloc[-1]==HEAD_NOTE, rep[['layer', 'method', 'note']]
    assert new(torch.randn(2, 8)).shape==(2, 4)

# ---- the callback

@pytest.fixture(scope='module')
def dls():
    from fasterai_lr.cli import digits_dls
    return digits_dls(bs=128)

@pytest.mark.parametrize('kw,want', [(dict(), ['body.1.0', 'body.2.0', 'body.3.0']), (dict(head=True), ['body.1.0', 'body.2.0', 'body.3.0', 'head.2']),
                                     (dict(layers=['head.2']), ['head.2'])], ids=['default', 'head', 'layers'])
def test_callback(dls, kw, want):
    from fastai.torch_core import set_seed
    from fasterai_lr.cli import digits_learner
    from fasterai_lr.callback import DecomposeCallback, dense_layers
    set_seed(0)
    learn = digits_learner(dls, c=8)
    assert dense_layers(learn.model, **kw)[nn.Linear]==(['head.2'] if kw else []), dense_layers(learn.model, **kw)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=(cb := DecomposeCallback(1, keep=0.5, verbose=False, **kw)))
    assert decomposed(learn.model)==want, f"{kw}: decomposed {decomposed(learn.model)}, expected {want}"
    notes = cb.report.set_index('layer')['note']
    assert (notes.get('head.2')==HEAD_NOTE)==(not kw), f"{kw}: report notes {notes.to_dict()}"
