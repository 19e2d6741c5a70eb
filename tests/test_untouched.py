"Never a silently wrong model: modules used twice, tied weights, weights read outside a layer's forward, hooks, pruned and scripted models"
import copy, warnings, pytest, torch, pandas as pd
import torch.nn.utils.prune
from torch import nn
from fasterai_lr.all import *

def n_params(m): return sum(p.numel() for p in m.parameters())   # (parameters() counts a shared or tied tensor once)
def same_state(a, b): return a.state_dict().keys()==b.state_dict().keys() and all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
def blocks(m): return [k for k,v in m.named_modules(remove_duplicate=False) if isinstance(v, Factorized)]
def first_names_of(m): return {a: n for n,ps in module_paths(m).items() for a in ps}
X = torch.randn(4, 16)

# ---- a module used at two places
def shared_flat():
    lin = nn.Linear(16, 16); return nn.Sequential(lin, nn.ReLU(), lin)
def shared_nested():
    lin = nn.Linear(16, 16); inner = nn.Sequential(lin, nn.ReLU())
    return nn.Sequential(nn.Sequential(inner), inner, nn.Sequential(nn.Sequential(lin)), nn.Linear(16, 4))
def shared_container():   # a whole block used twice: its layers have two names each
    blk = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)); return nn.Sequential(blk, blk, nn.Linear(16, 4))

@pytest.mark.parametrize('make', [shared_flat, shared_nested, shared_container])
@pytest.mark.parametrize('rank', ['full', 4])
def test_shared_module_decomposed_once(make, rank):
    torch.manual_seed(0); m = make(); ref = copy.deepcopy(m)
    d = FC_Decomposer(); new = d.decompose(m, rank=rank, quiet=True, head=True)
    assert same_state(m, ref)                                              # the model passed in is untouched
    every = dict(new.named_modules(remove_duplicate=False))
    for first,names in module_paths(m).items():                           # every place holds the one block
        if isinstance(dict(m.named_modules())[first], nn.Linear):
            assert len({id(every[a]) for a in names})==1 and isinstance(every[names[0]], Factorized), (first, names)
    rep = d.report
    left = set(rep.layer[rep.method.isna()])
    assert all(first_names_of(m).get(k, k) in left for k,v in every.items() if isinstance(v, nn.Linear) and not any(k.startswith(b+'.') for b in blocks(new)))
    assert len(rep)==len({id(v) for v in m.modules() if isinstance(v, nn.Linear)})   # a shared layer is one row
    assert rep['params'].sum()==sum(v.weight.numel() for v in {id(v): v for v in m.modules() if isinstance(v, nn.Linear)}.values())
    bias = sum(v.bias.numel() for v in {id(v): v for v in m.modules() if isinstance(v, nn.Linear)}.values())
    assert n_params(new)==rep['params_after'].sum() + bias                  # counted once, in the model and in the report
    for r in rep.itertuples():
        if r.layer in module_paths(m): assert 'one block at each' in r.note and all(a in r.note for a in module_paths(m)[r.layer]), r.note
    if rank=='full': torch.testing.assert_close(new(X), m(X), atol=1e-5, rtol=1e-5)
    else: assert n_params(new) < n_params(m)

def test_shared_conv_and_macs_counted_per_call():
    torch.manual_seed(0); c = nn.Conv2d(8, 8, 3, padding=1); m = nn.Sequential(c, nn.ReLU(), c, nn.Flatten(), nn.Linear(8*6*6, 3))
    x = torch.randn(2, 8, 6, 6)
    d = Conv_Decomposer(); new = d.decompose(m, 'tucker', rank='full', sample=x, quiet=True)
    torch.testing.assert_close(new(x), m(x), atol=1e-4, rtol=1e-4)
    assert new[0] is new[2] and isinstance(new[0], Factorized)
    row = d.report.set_index('layer').loc['0']
    assert row['macs']==2*8*8*9*36                                          # it runs twice
    assert row['macs_after']==row['macs']                                     # full-rank Tucker-2 is its core alone: the same cost, both calls counted

def test_shared_module_named_by_its_second_name():
    m = shared_flat()
    new = FC_Decomposer().decompose(m, rank={'2': 4}, quiet=True)             # '2' is the same layer as '0'
    assert new[0] is new[2] and new[0].rank==4
    new = FC_Decomposer().decompose(m, layers=['2'], keep=0.5, quiet=True, head=True)
    assert new[0] is new[2] and isinstance(new[0], Factorized)
    new = FC_Decomposer().decompose(shared_nested(), exclude=['2'], keep=0.5, quiet=True, head=True)
    assert isinstance(new[1][0], nn.Linear) and new[1][0] is new[0][0][0]   # excluded at one place: left at all

def test_shared_module_with_calibration_and_budget():
    torch.manual_seed(0); m = shared_nested(); xs = [torch.randn(32, 16) for _ in range(2)]
    for sequential in (False, True):
        cal = Calibration(xs, sequential=sequential)
        d = FC_Decomposer(); new = d.decompose(m, rank='full', calib=cal, quiet=True, head=True)
        torch.testing.assert_close(new(X), m(X), atol=1e-4, rtol=1e-4)
        assert new[1][0] is new[0][0][0] is new[2][0][0] and isinstance(new[1][0], Factorized)
    new,rep = decompose_model(m, rank=Budget(params=0.5, calib=Calibration(xs)), head=True, quiet=True)
    assert new[1][0] is new[0][0][0] and n_params(new) < n_params(m)

# ---- weights read outside the layer's own forward
class ReadsAsS(nn.Module):
    def __init__(s): super().__init__(); s.fc = nn.Linear(16, 16); s.out = nn.Linear(16, 4)
    def forward(s, x): return s.out(x @ s.fc.weight.T + s.fc.bias)
class ReadsInHelper(nn.Module):
    def __init__(self): super().__init__(); self.fc = nn.Linear(16, 16); self.out = nn.Linear(16, 4)
    def project(self, x): return x @ self.fc.weight.T
    def forward(self, x): return self.out(self.project(x))
class ReadsByGetattr(nn.Module):
    def __init__(self): super().__init__(); self.fc = nn.Linear(16, 16); self.out = nn.Linear(16, 4)
    def forward(self, x): return self.out(torch.nn.functional.linear(x, getattr(self, 'fc').weight))
class ReadsByName(nn.Module):   # a read no source pattern sees: only running the model shows it
    def __init__(self): super().__init__(); self.fc = nn.Linear(16, 16); self.out = nn.Linear(16, 4); self.which = 'fc'
    def forward(self, x): return self.out(x @ self._modules[self.which].weight.T)
class ReadsFromGrandparent(nn.Module):
    def __init__(self): super().__init__(); self.body = nn.Sequential(nn.Linear(16, 16)); self.out = nn.Linear(16, 4)
    def forward(self, x): return self.out(x * self.body[0].weight.sum() + x @ getattr(self.body, '0').weight.T)
class ReadsSettings(nn.Module):
    def __init__(self): super().__init__(); self.fc = nn.Linear(16, 8); self.out = nn.Linear(8, 4)
    def forward(self, x): return self.out(self.fc(x).view(-1, self.fc.out_features))
class InitReads(nn.Module):   # touching the weight at construction is no read at run time: decomposed
    def __init__(self):
        super().__init__(); self.fc = nn.Linear(16, 16); self.out = nn.Linear(16, 4)
        with torch.no_grad(): self.fc.weight.mul_(0.5)
    def forward(self, x): return self.out(torch.relu(self.fc(x)))

READERS = [ReadsAsS, ReadsInHelper, ReadsByGetattr, ReadsByName, ReadsFromGrandparent, ReadsSettings]

# without an input to run (how='source'), a read that no source spells out (ReadsByName) is not seen: pass sample= (the callback passes a batch)
@pytest.mark.parametrize('cls,how', [(c, h) for c in READERS for h in ('sample', 'calib', 'source') if (c, h)!=(ReadsByName, 'source')])
def test_weight_read_outside_forward_stays(cls, how):
    torch.manual_seed(0); m = cls(); ref = copy.deepcopy(m)
    kw = dict(sample=X) if how=='sample' else dict(calib=Calibration([X])) if how=='calib' else {}
    d = FC_Decomposer(); new = d.decompose(m, keep=0.5, quiet=True, **kw)
    name = [n for n,v in m.named_modules() if isinstance(v, nn.Linear) and n!='out'][0]
    row = d.report.set_index('layer').loc[name]
    assert row['method'] is None and ('outside its forward' in row['note'] or 'read directly' in row['note']), row['note']
    assert isinstance(new.get_submodule(name), nn.Linear)
    new(X)                                                                   # the model runs
    assert same_state(m, ref)

def test_read_by_name_seen_by_running():
    d = FC_Decomposer(); d.decompose(ReadsByName(), keep=0.5, quiet=True, sample=(16,))
    assert d.report.set_index('layer').loc['fc', 'note']=="its weight is read outside its forward, by ReadsByName.forward (seen in a forward pass)"

class Describes(nn.Module):   # reads the layer's settings and weight in methods forward never calls (timm's feature_info, reparameterize)
    def __init__(self): super().__init__(); self.fc = nn.Linear(16, 16); self.out = nn.Linear(16, 4)
    def feature_info(self): return dict(num_chs=self.fc.out_features)
    def reparameterize(self): return self.fc.weight.sum()
    def forward(self, x): return self.out(torch.relu(self.fc(x)))

@pytest.mark.parametrize('cls', [Describes, InitReads])
def test_reads_not_at_run_time_are_no_reads(cls):
    "Reads in methods forward never calls, or at construction, are no run-time reads: the layer is decomposed, with or without an input"
    torch.manual_seed(0); m = cls()
    for kw in ({}, dict(sample=X)):
        d = FC_Decomposer(); new = d.decompose(m, rank='full', quiet=True, **kw)
        assert isinstance(new.fc, Factorized), d.report.note.tolist()
        torch.testing.assert_close(new(X), m(X), atol=1e-5, rtol=1e-5)

def test_reads_in_callback_and_budget():
    "The callback runs the model on a batch: a parent reading a weight keeps that layer, and the fit goes on"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset
    torch.manual_seed(0); xs,ys = torch.randn(64, 16), torch.randint(0, 4, (64,))
    dls = DataLoaders.from_dsets(TensorDataset(xs, ys), TensorDataset(xs, ys), bs=16)
    learn = Learner(dls, ReadsInHelper(), loss_func=nn.CrossEntropyLoss())
    cb = DecomposeCallback(start_epoch=1, keep=0.5, head=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(2, 1e-3, cbs=cb)
    assert isinstance(learn.model.fc, nn.Linear) and isinstance(learn.model.out, Factorized)
    assert 'outside its forward' in cb.report.set_index('layer').loc['fc', 'note']

# ---- tied weights
class TwoTied(nn.Module):
    "Two Linears holding one weight (their biases their own), across two submodules"
    def __init__(self, bias2=True):
        super().__init__(); self.a = nn.Sequential(nn.Linear(16, 16)); self.b = nn.Sequential(nn.ReLU(), nn.Linear(16, 16, bias=bias2))
        self.b[1].weight = self.a[0].weight; self.out = nn.Linear(16, 4)
    def forward(self, x): return self.out(self.b(self.a(x)) + self.a(x))
class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__(); self.emb = nn.Embedding(50, 16); self.mid = nn.Linear(16, 16); self.dec = nn.Linear(16, 50); self.dec.weight = self.emb.weight
    def forward(self, x): return self.dec(torch.relu(self.mid(self.emb(x))))
class TiedOtherGeometry(nn.Module):
    def __init__(self):
        super().__init__(); self.c1 = nn.Conv2d(8, 8, 3, padding=1); self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1); self.c2.weight = self.c1.weight
        self.out = nn.Conv2d(8, 2, 1)
    def forward(self, x): return self.out(self.c2(torch.relu(self.c1(x))))

@pytest.mark.parametrize('bias2', [True, False])
@pytest.mark.parametrize('calib', [False, True])
def test_tied_linears_share_one_factor_pair(bias2, calib):
    torch.manual_seed(0); m = TwoTied(bias2); ref = copy.deepcopy(m)
    kw = dict(calib=Calibration([torch.randn(32, 16)])) if calib else {}
    d = FC_Decomposer(); new = d.decompose(m, rank='full', quiet=True, **kw)
    torch.testing.assert_close(new(X), m(X), atol=1e-4, rtol=1e-4)
    fa,fb = new.a[0], new.b[1]
    assert isinstance(fa, Factorized) and isinstance(fb, Factorized)
    assert fa[0].weight is fb[0].weight and fa[1].weight is fb[1].weight       # the tie is kept
    assert (fb[1].bias is None)==(not bias2) and (fb[1].bias is None or fb[1].bias is not fa[1].bias)
    rep = d.report.set_index('layer')
    assert rep.loc['b.1', 'params']==rep.loc['b.1', 'params_after']==0 and 'tied to a.0' in rep.loc['b.1', 'note']
    assert same_state(m, ref)
    new = d.decompose(m, keep=0.5, quiet=True, **kw)
    blk_params = sum(p.numel() for p in new.a[0].parameters() if p.dim()>1)
    assert d.report.set_index('layer').loc[['a.0', 'b.1'], 'params_after'].sum()==blk_params   # the pair's factors counted once
    opt = torch.optim.SGD(new.parameters(), lr=0.1); new(X).sum().backward(); opt.step()
    assert new.a[0][0].weight is new.b[1][0].weight                          # still one weight after a training step

def test_tied_to_embedding_stays_with_reason():
    torch.manual_seed(0); m = TiedEmbedding(); x = torch.randint(0, 50, (3, 5))
    d = FC_Decomposer(); new = d.decompose(m, keep=0.5, quiet=True, head=True)
    rep = d.report.set_index('layer')
    assert pd.isna(rep.loc['dec', 'method']) and rep.loc['dec', 'note']=="its weight is tied to emb.weight (Embedding), which is not decomposed with it: decomposing one side would untie them"
    assert new.dec.weight is new.emb.weight and isinstance(new.mid, Factorized)
    new(x)

def test_tied_other_geometry_stays():
    torch.manual_seed(0); m = TiedOtherGeometry(); x = torch.randn(2, 8, 8, 8)
    d = Conv_Decomposer(); new = d.decompose(m, 'tucker', keep=0.5, quiet=True)
    rep = d.report.set_index('layer')
    assert rep.loc[['c1', 'c2'], 'method'].isna().all() and 'tied to' in rep.loc['c1', 'note'] and 'geometry' in rep.loc['c1', 'note']
    assert new.c1.weight is new.c2.weight
    torch.testing.assert_close(new(x), m(x))

def test_tied_and_one_side_excluded_stays():
    m = TwoTied(); d = FC_Decomposer(); new = d.decompose(m, exclude=['b'], keep=0.5, quiet=True)
    assert isinstance(new.a[0], nn.Linear) and new.a[0].weight is new.b[1].weight and 'tied to b.1' in d.report.set_index('layer').loc['a.0', 'note']

# ---- hooks, pruned, scripted, the root
def test_forward_hooks_move_to_the_block():
    torch.manual_seed(0); m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)); seen = []
    m[0].register_forward_hook(lambda mod, i, o: seen.append(('post', o.shape)))
    m[0].register_forward_pre_hook(lambda mod, i: seen.append(('pre', i[0].shape)))
    d = FC_Decomposer(); new = d.decompose(m, rank='full', quiet=True)
    assert 'forward hooks now run on the block' in d.report.note[0]
    seen.clear(); y = new(X)
    assert seen==[('pre', X.shape), ('post', torch.Size([4, 16]))]
    m[2].register_full_backward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match='backward hooks'): FC_Decomposer().decompose(m, head=True, quiet=True)

def test_pruned_model_is_refused_untouched():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)); nn.utils.prune.l1_unstructured(m[2], 'weight', 0.5)
    ref = {k: v.clone() for k,v in m.state_dict().items()}   # (a pruned model cannot be deep-copied: that is the trap)
    for f in (lambda: FC_Decomposer().decompose(m, keep=0.5), lambda: decompose_model(m, keep=0.5)):
        with pytest.raises(ValueError, match=r"pruned with torch.nn.utils.prune.*prune.remove\(module, 'weight'\)"): f()
        assert m.state_dict().keys()==ref.keys() and all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
    nn.utils.prune.remove(m[2], 'weight'); FC_Decomposer().decompose(m, keep=0.5, quiet=True)   # as the message says

def test_scripted_model_is_refused():
    m = torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    for f in (lambda: FC_Decomposer().decompose(m), lambda: decompose_model(m)):
        with pytest.raises(TypeError, match='TorchScript.*decompose the model, then script'): f()

def test_root_named_in_layers_is_the_whole_model():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    d = FC_Decomposer(); new = d.decompose(m, layers=[''], keep=0.5, quiet=True)
    assert isinstance(new[0], Factorized) and isinstance(new[2], nn.Linear)   # the output layer is kept unless named itself

# ---- all of it at once, the way a user chains it: a budget with a calibration inside the callback, then fine-tuning
class Odd(nn.Module):
    "A conv used twice, two tied Linears, and a parent that reads one Linear's weight"
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1); self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.a,self.b = nn.Linear(16, 16), nn.Linear(16, 16); self.b.weight = self.a.weight
        self.read = nn.Linear(16, 16); self.out = nn.Linear(16, 4)
    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.conv(torch.relu(self.stem(x))))))
        x = x.mean((2, 3))
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))) + x @ self._modules['read'].weight.T)

@pytest.mark.parametrize('method', ['tucker', 'auto'])
def test_budget_calibration_callback_on_odd_model(method):
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset
    torch.manual_seed(0); xs = torch.randn(96, 3, 8, 8); ys = (xs.mean((1, 2, 3)) > 0).long() + 2*(xs[:, 0].mean((1, 2)) > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(xs, ys), TensorDataset(xs, ys), bs=16)
    learn = Learner(dls, Odd(), loss_func=nn.CrossEntropyLoss())
    cb = DecomposeCallback(start_epoch=1, method=method, rank=Budget(params=0.6), calib=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(3, 3e-3, cbs=cb)
    m = learn.model; rep = cb.report.set_index('layer')
    assert isinstance(m.read, nn.Linear) and 'outside its forward' in rep.loc['read', 'note']
    assert rep.loc['conv', 'macs']==2*16*16*9*8*8                               # called twice: its multiply-adds counted for both calls
    if isinstance(m.a, Factorized): assert isinstance(m.b, Factorized) and m.a[0].weight is m.b[0].weight and rep.loc['b', 'params']==0
    else: assert isinstance(m.b, nn.Linear) and m.a.weight is m.b.weight
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in Odd().parameters())
    ids = [id(p) for g in learn.opt.param_lists for p in g]
    assert len(ids)==len(set(ids)) and set(ids)=={id(p) for p in m.parameters()}   # the optimizer holds each live parameter once
    assert learn.recorder.values[-1][0] < 10                                     # it trained on (finite losses)

# ---- save and reload keep the sharing and the ties
@pytest.mark.parametrize('make', [shared_nested, shared_container, TwoTied])
def test_save_reload_keeps_sharing_and_ties(make, tmp_path):
    torch.manual_seed(0); m = make(); new = FC_Decomposer().decompose(m, keep=0.5, quiet=True, head=True)
    back = load_decomposed(make, save_decomposed(new, tmp_path/'m.pt'))
    torch.testing.assert_close(back(X), new(X))
    assert n_params(back)==n_params(new)
    plan = decomposition_plan(new)
    if make is TwoTied: assert plan['version']==2 and plan['layers']['b.1']['tied']=='a.0' and back.a[0][0].weight is back.b[1][0].weight
    else:
        assert plan['version']==1
        every = dict(back.named_modules(remove_duplicate=False))
        for names in module_paths(m).values(): assert len({id(every[a]) for a in names})==1, names   # one module at every place, as saved

class Attention(nn.Module):
    def __init__(self): super().__init__(); self.attn,self.ff = nn.MultiheadAttention(16, 2, batch_first=True),nn.Linear(16, 16)
    def forward(self, x): return self.ff(self.attn(x, x, x)[0])

@pytest.mark.parametrize('kw', [{}, dict(sample=torch.randn(2, 5, 16))])
def test_attention_projection_read_by_torch_stays(kw):
    "torch's own classes read weights too: MultiheadAttention its out_proj's, TransformerEncoderLayer its Linears' (its fast path)"
    torch.manual_seed(0); m = Attention().eval(); x = torch.randn(2, 5, 16)
    d = FC_Decomposer(); new = d.decompose(m, rank='full', head=True, quiet=True, **kw)
    rep = d.report.set_index('layer')
    assert isinstance(new.attn.out_proj, nn.Linear) and 'MultiheadAttention.forward' in rep.loc['attn.out_proj', 'note'], rep.loc['attn.out_proj', 'note']
    assert isinstance(new.ff, Factorized)
    torch.testing.assert_close(new(x), m(x), atol=1e-4, rtol=1e-4)
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    d.decompose(enc, head=True, quiet=True, **kw)
    # the model itself: no parent to rebuild around its blocks (inside a model, `ADAPTERS` turns its fast path off: test_walk_kinds)
    assert all('TransformerEncoderLayer.forward' in d.report.set_index('layer').loc[n, 'note'] for n in ('linear1', 'linear2'))

# ---- the other ends of the pipeline: latency budgets and ONNX see the shared and tied layers as they are
def test_latency_budget_and_onnx_on_odd_model(tmp_path):
    import onnxruntime as ort
    from fasterai_lr.latency import LatencyBudget, LatencyCache
    from torch.utils.flop_counter import FlopCounterMode
    def mac_timer(mods, x):   # deterministic: multiply-adds plus a cost per leaf layer
        out = []
        for m in mods:
            with FlopCounterMode(display=False) as fc, torch.no_grad(): m.eval()(x)
            out.append((fc.get_total_flops()//2 + 100*sum(1 for c in m.modules() if not c._modules))*1e-9)
        return out
    m = Odd().eval(); x = torch.randn(2, 3, 8, 8)
    new,rep = decompose_model(m, rank=LatencyBudget(keep=0.7, timer=mac_timer, cache=LatencyCache(), check=False), sample=x, quiet=True)
    rep = rep.set_index('layer')
    assert isinstance(new.read, nn.Linear) and 'outside its forward' in rep.loc['read', 'note']
    assert (isinstance(new.a, Factorized) and new.a[0].weight is new.b[0].weight) or (isinstance(new.a, nn.Linear) and new.a.weight is new.b.weight)
    path = to_onnx(new, x, tmp_path/'odd.onnx', dynamo=False)
    sess = ort.InferenceSession(str(path))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), new(x).detach(), atol=1e-4, rtol=1e-4)
    assert rep.loc['conv', 'macs']==2*16*16*9*8*8   # the conv runs twice: counted twice
