"""Where the parts meet, found by using them together: sweep + calibration, optimize + save, roofline at a batch, a budget with a
calibration on a Transformer, MACs of fused layers, the demo's arguments, and inputs the latency tools refuse"""
import warnings, pytest, torch
from torch import nn
from fasterai_lr.all import *
from fasterai_lr.ranks import SpeedModel
from fasterai_lr.cli import digits_cnn, demo

def same(a, b): return a.state_dict().keys()==b.state_dict().keys() and all(torch.equal(v, b.state_dict()[k]) for k,v in a.state_dict().items())

@pytest.fixture
def digits():
    torch.manual_seed(0)
    X = torch.rand(64, 1, 8, 8)
    return digits_cnn().eval(), X, Calibration(X.split(16))

@pytest.mark.parametrize('by', ['params', 'keep'])
def test_sweep_fits_the_factors_with_the_calibration(digits, by):
    "sweep(calib=): the same model as decompose_model with that calibration (data-aware factors, not only a data-aware plan)"
    model, X, cal = digits
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # (the speed guard's notes)
        sweep(model, lambda m: seen.append(m) or 0., X[:8], fractions=(0.4,), by=by, latency=False, calib=cal)
        rank = dict(rank=Budget(params=0.4, calib=cal)) if by=='params' else dict(keep=0.4, calib=cal)
        want,_ = decompose_model(model, 'tucker', sample=X[:8], quiet=True, **rank)
        weights_only,_ = decompose_model(model, 'tucker', sample=X[:8], quiet=True, **({'keep': 0.4} if by=='keep' else {'rank': rank['rank'].plan(model, 'tucker', X[:8])}))
    assert same(seen[-1], want) and not same(seen[-1], weights_only)
    with pytest.raises(ValueError, match="alloc= shape a Budget, and by='keep' uses none"):
        sweep(model, lambda m: 0., X[:8], fractions=(0.4,), by='keep', latency=False, alloc='greedy')

def test_plan_of_a_merged_model(tmp_path):
    """merge_linear folds a neighbour into a block's factor: the plan keeps the block's method and rank with the step, and the loader
    rebuilds the block, redoes the merge and loads the merged weights"""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    model = make()
    new,_ = decompose_model(model, 'svd', rank={'1': 4}, quiet=True)
    opt = optimize(new, memory_format=torch.contiguous_format)
    x = torch.randn(3, 64)
    assert torch.allclose(opt(x), new(x), atol=1e-5) and isinstance(opt[1][0], nn.Identity), opt   # (the block's first factor merged into '0')
    plan = decomposition_plan(opt)
    assert plan['layers']=={'1': {'method': 'svd', 'rank': 4, 'source': 'Linear(64, 32)'}} and plan['inference_steps']==['merge_linear']
    back = load_decomposed(make, save_decomposed(opt, tmp_path/'m.pt'))
    assert torch.allclose(back(x), opt(x), atol=1e-6) and str(back)==str(opt)
    assert decomposition_plan(back)==plan

def test_roofline_at_the_batch_asked():
    "roofline(batch=8, speed=...): the ceiling's time at batch 8 whatever batch the SpeedModel was made for; bad input refused"
    m = digits_cnn().eval()
    at = lambda b: roofline(m, (1, 8, 8), batch=8, reps=1, speed=SpeedModel(flops=1e11, bandwidth=2e10, overhead=1e-5, batch=b)).roofline_ms
    assert torch.allclose(torch.tensor(at(1).values), torch.tensor(at(8).values))
    with pytest.raises(ValueError, match=r'batch=0 is outside \[1'): roofline(m, (1, 8, 8), batch=0)
    with pytest.raises(TypeError, match="speed='fast': pass a SpeedModel"): roofline(m, (1, 8, 8), speed='fast')

def test_latency_tools_leave_the_model_and_refuse_bad_input():
    m = digits_cnn().train()
    fastest_format(m, (1, 8, 8))
    assert m.training, "fastest_format changed the caller's model's mode"
    x = torch.randn(2, 1, 8, 8)
    for f,err,msg in [(lambda: optimize(m, memory_format='nhwc'), TypeError, "memory_format='nhwc': pass torch.channels_last"),
                      (lambda: compile_model(m, x, None, memory_format='channels_last'), TypeError, 'pass torch.channels_last'),
                      (lambda: compile_model(m, x, 'fastest', reps=0), ValueError, r'reps=0 is outside'),
                      (lambda: optimize(m, fold='yes'), TypeError, "fold='yes': pass True or False"),
                      (lambda: reuse_cpu_memory('no'), TypeError, "on='no': pass True")]:
        with pytest.raises(err, match=msg): f()
    assert m.training

def test_budget_with_calibration_on_a_transformer():
    "Budget + Calibration on TransformerEncoder layers: the plan's checks put blocks in as the walk does (the encoder layer's fast path off)"
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(s):
            super().__init__()
            s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0., batch_first=True), 2, enable_nested_tensor=False)
            s.head = nn.Linear(64, 2)
        def forward(s, x): return s.head(s.enc(x).mean(1))
    net, xs = Net().eval(), [torch.randn(8, 12, 64) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        new,rep = decompose_model(net, rank=Budget(params=0.5), calib=Calibration(xs), quiet=True)
    t = report_totals(rep)
    assert t['decomposed'] and t['params_after'] <= 0.55*t['params'] and torch.isfinite(new(xs[0])).all(), rep

def test_macs_of_fused_layers():
    "model_macs counts what the fused inference paths hide: attention (its fast path off while counting) and oneDNN's RNN layers"
    x = torch.randn(1, 12, 64)
    lstm = nn.LSTM(64, 64, batch_first=True, bidirectional=True, num_layers=2)
    assert model_macs(lstm, x) == 12*(2*(256*64 + 256*64) + 2*(256*128 + 256*64))
    enc = nn.TransformerEncoderLayer(64, 4, 128, dropout=0., batch_first=True)
    with torch.enable_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as fc: enc(x)   # (the plain path: every product)
    assert model_macs(enc, x) == fc.get_total_flops()//2 > 0
    assert torch.backends.mha.get_fastpath_enabled(), "model_macs left attention's fast path off"

def test_decompose_keeps_channels_last():
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1)).to(memory_format=torch.channels_last)
    new,_ = decompose_model(m, keep=0.5, head=True, quiet=True)
    ws = [p for p in new.parameters() if p.ndim==4 and p.shape[-1] > 1]
    assert ws and all(p.is_contiguous(memory_format=torch.channels_last) for p in ws)

@pytest.mark.parametrize('kw,msg', [(dict(epochs=0), r'epochs=0 is outside \[1'), (dict(epochs=2, start_epoch=5), r'start_epoch=5 is outside \[0, 1\]')])
def test_demo_refuses_before_training(kw, msg):
    with pytest.raises(ValueError, match=msg): demo(plot='', reps=1, quiet=True, **kw)

# ---- models of several inputs (fastai's tabular model: categories and continuous columns)

@pytest.fixture
def tabular():
    import numpy as np, pandas as pd
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, set_seed
    rng = np.random.default_rng(0)
    df = pd.DataFrame(dict(a=rng.integers(0, 4, 200).astype(str), b=rng.normal(size=200), c=rng.normal(size=200)))
    df['y'] = ((df.b + (df.a=='1')) > 0).astype(str)
    set_seed(0)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['a'], cont_names=['b','c'], y_names='y', bs=32)
    return dls, tabular_learner(dls, layers=[64, 32])

def test_mac_budget_on_a_model_of_two_inputs(tabular):
    "sample= takes the tuple of inputs (fastai's xb), or the calibration's first batch stands for it; MACs and latency count on both"
    dls, learn = tabular
    cat, cont, _ = dls.train.one_batch()
    m = learn.model.eval()
    M = model_macs(m, (cat, cont))
    assert M == model_macs(m, [cat[:1], cont[:1]]) == model_macs(m, dict(x_cat=cat, x_cont=cont)) > 64*32
    cal = Calibration(dls.train, n_batches=2)
    a,_ = decompose_model(m, rank=Budget(macs=0.5), sample=(cat, cont), calib=cal, quiet=True)
    b,_ = decompose_model(m, rank=Budget(macs=0.5), calib=cal, quiet=True)   # (no sample=: the calibration's inputs)
    assert same(a, b) and model_macs(a, (cat, cont)) <= 0.5*M
    assert cpu_latency(a, (cat, cont), min_run_time=0.01, reps=1) > 0
    with pytest.raises(ValueError, match="several inputs .*timing the whole model here takes one input tensor"):
        decompose_model(m, rank=LatencyBudget(0.5), sample=(cat, cont), quiet=True)

def test_callback_mac_budget_on_a_model_of_two_inputs(tabular):
    "DecomposeCallback with a MAC budget and calib=True on a tabular learner: it counts MACs on the batch's inputs, not only at the swap"
    dls, learn = tabular
    cb = DecomposeCallback(start_epoch=1, rank=Budget(macs=0.5), calib=True, verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2, cbs=cb)
    t = cb.totals.iloc[0]
    assert t.decomposed > 0 and t.macs_after <= 0.5*t.macs

@pytest.mark.parametrize('dynamo', [True, False])
def test_onnx_export_of_a_model_of_two_inputs(tabular, tmp_path, dynamo):
    "to_onnx/onnx_error take the tuple or dict of inputs (fastai's xb): one ONNX input each, the batch left free"
    dls, learn = tabular
    xb = dls.one_batch()[:2]
    new,_ = decompose_model(learn.model, 'svd', keep=0.5, sample=xb, quiet=True)
    for s in (xb, dict(x_cat=xb[0], x_cont=xb[1]), dict(x_cont=xb[1], x_cat=xb[0])):   # (a dict in any order)
        path = to_onnx(new, s, tmp_path/'tab.onnx', dynamo=dynamo)
        assert onnx_error(path, new, s) < 1e-5 and onnx_error(path, new, tuple(v[:3] for v in xb)) < 1e-5
    with pytest.raises(ValueError, match='takes 2 inputs'): onnx_error(path, new, xb[1])

def test_sequential_calibration_of_a_stateful_model():
    """Calibration(sequential=True) runs its batches side by side: fastai's AWD_LSTM keeps its hidden state on the module, so each batch
    runs through modules of its own (a last, smaller batch crashed; equal ones raced)"""
    from fastai.text.models.awdlstm import AWD_LSTM
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.enc = AWD_LSTM(60, 32, 48, 2, pad_token=1); s.head = nn.Linear(32, 48); s.out = nn.Linear(48, 2)
        def forward(s, x): s.enc.reset(); return s.out(torch.relu(s.head(s.enc(x)[:, -1])))
    torch.manual_seed(0)
    net = Net().eval()
    xs = [torch.randint(2, 60, (8, 12)) for _ in range(3)] + [torch.randint(2, 60, (5, 12))]
    outs = [decompose_model(net, keep=0.5, calib=Calibration(xs, sequential=True), quiet=True)[0](xs[0]) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # and it runs through the blocks of the layers fitted without it (the RNNs' weight-only ones): the head fits on what they give
    y = torch.cat([net(x) for x in xs])
    err = lambda seq: (torch.cat(list(map(decompose_model(net, keep=0.5, calib=Calibration(xs, sequential=seq), quiet=True, head=True)[0], xs))) - y).norm()/y.norm()
    assert err(True) < err(False)/3   # (0.005 against 0.037; 0.038 when it ran through the dense RNNs)

def test_sequential_calibration_runs_through_attention_blocks():
    "An attention and an embedding are fitted alone, on the dense model's inputs; the layers after them fit on their blocks' outputs"
    class T(nn.Module):
        def __init__(s):
            super().__init__(); s.emb = nn.Embedding(50, 32); s.head = nn.Linear(32, 5)
            s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
        def forward(s, x): return s.head(s.enc(s.emb(x)).mean(1))
    torch.manual_seed(0)
    m, xs = T().eval(), [torch.randint(0, 50, (16, 10)) for _ in range(4)]
    y = torch.cat([m(x) for x in xs])
    err = lambda seq: (torch.cat(list(map(decompose_model(m, keep=0.4, calib=Calibration(xs, sequential=seq), quiet=True, head=True)[0], xs))) - y).norm()/y.norm()
    assert err(True) < 0.97*err(False)   # (0.78 against 0.83; 0.83 when it ran through the dense attention)

# ---- deployment copies: optimized models save, and half-precision models time in their dtype

def test_optimized_model_saves_and_loads(digits, tmp_path):
    "save_decomposed after optimize(): the plan keeps the folds (inference_steps), load_decomposed redoes them before the weights load"
    from fasterai_lr.cli import digits_cnn
    model, X, cal = digits
    new,_ = decompose_model(model, keep=0.5, calib=cal, quiet=True)
    opt = optimize(new, memory_format=torch.contiguous_format)
    assert decomposition_plan(opt)['inference_steps'] == ['fold_bn'] and 'inference_steps' not in decomposition_plan(new)
    back = load_decomposed(digits_cnn, save_decomposed(opt, tmp_path/'opt.pt')).eval()
    assert torch.allclose(back(X), opt(X), atol=1e-6) and torch.allclose(back(X), new(X), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in back.modules())
    plan = {**decomposition_plan(opt), 'inference_steps': ['quantize']}
    with pytest.raises(ValueError, match=r"inference_steps \['quantize'\] are unknown"): apply_plan(digits_cnn(), plan)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_timing_in_the_models_dtype(digits, dtype):
    "optimize(memory_format='auto') and LatencyAware time a half-precision model on inputs of its dtype (float32 ones failed)"
    model, X, _ = digits
    h = decompose_model(model, keep=0.5, quiet=True)[0].to(dtype)
    assert (optimize(h, X.to(dtype))(X.to(dtype)).float() - h(X.to(dtype)).float()).abs().max() < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        new,_ = decompose_model(model.to(dtype), rank=LatencyAware(), sample=X[:2].to(dtype), quiet=True)
    assert new(X.to(dtype)).dtype == dtype
