"One-layer RNNs (nn.LSTM, nn.GRU, nn.RNN) by the SVD of their input weights, and the adapters for fastai's EmbeddingDropout and WeightDropout"
import copy, itertools, math, tempfile, pytest, torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from fasterai_lr.core import Factorized, FactorizedRNN, RNN_KINDS, LAYER_METHODS, copy_model
from fasterai_lr.layers import kernel, embedding_svd, rnn_svd, FactorizedEmbeddingDropout, FactorizedWeightDropout
from fasterai_lr.decompose import RNN_Decomposer, FC_Decomposer, decompose_model, layer_costs
from fasterai_lr.ranks import Budget, VBMF
from fasterai_lr.export import save_decomposed, load_decomposed
from fastai.text.models.awdlstm import EmbeddingDropout, WeightDropout, AWD_LSTM
from fastai.text.models.core import get_text_classifier, get_language_model

def n_params(m): return sum(p.numel() for p in m.parameters())
def out(y): return y[0] if isinstance(y, tuple) else y
def same_state(a, b): return a.keys()==b.keys() and all(torch.equal(a[k], b[k]) for k in a)

SETTINGS = [dict(kind=k, bidirectional=bd, batch_first=bf, bias=b) for k,bd,bf,b in itertools.product(RNN_KINDS, (False, True), (False, True), (True, False))]
SETTINGS += [dict(kind=nn.LSTM, proj_size=5, bidirectional=bd, batch_first=True, bias=True) for bd in (False, True)]
SETTINGS += [dict(kind=nn.RNN, nonlinearity='relu', bidirectional=False, batch_first=True, bias=True)]

def make(kind, I=12, H=9, **kw): torch.manual_seed(0); return kind(I, H, **kw).eval()
def name(s): return '-'.join(f"{k}={v.__name__ if isinstance(v, type) else v}" for k,v in s.items())

@pytest.mark.parametrize('s', SETTINGS, ids=map(name, SETTINGS))
def test_exact_at_full_rank(s):
    rnn = make(**s)
    x = torch.randn(3, 7, 12) if s['batch_first'] else torch.randn(7, 3, 12)
    blk = RNN_Decomposer().SVD(rnn, rank='full')
    assert isinstance(blk, FactorizedRNN) and blk.rank==min(kernel(rnn).shape[1:3]), blk
    with torch.no_grad():
        for a,b in zip(torch.utils._pytree.tree_leaves(blk(x)), torch.utils._pytree.tree_leaves(rnn(x))): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{s}")
        hx = tuple(torch.randn_like(t) for t in torch.utils._pytree.tree_leaves(rnn(x)[1]))   # a given state goes to the factor RNN
        hx = hx if isinstance(rnn, nn.LSTM) else hx[0]
        torch.testing.assert_close(blk(x, hx)[0], rnn(x, hx)[0], atol=1e-5, rtol=1e-4, msg=f"{s} with hx")
        torch.testing.assert_close(blk(x[0] if s['batch_first'] else x[:,0])[0], rnn(x[0] if s['batch_first'] else x[:,0])[0], atol=1e-5, rtol=1e-4)  # unbatched

def test_packed_sequence():
    rnn = make(nn.LSTM, batch_first=True, bidirectional=True)
    x = pack_padded_sequence(torch.randn(3, 7, 12), [7, 5, 2], batch_first=True)
    blk = rnn_svd(rnn, 12)
    with torch.no_grad(): torch.testing.assert_close(blk(x)[0].data, rnn(x)[0].data, atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize('kind', RNN_KINDS)
def test_eckart_young_and_costs(kind):
    rnn = make(kind, I=20, H=8, bidirectional=True)
    W = kernel(rnn)[0,:,:,0,0]
    S = torch.linalg.svdvals(W)
    for r in (1, 4, 10):
        blk = rnn_svd(rnn, r)
        A = torch.cat([getattr(blk[1], f'weight_ih_l0{d}') for d in ('', '_reverse')])
        err = (A @ blk[0].weight - W).norm()/W.norm()
        torch.testing.assert_close(err, S[r:].square().sum().sqrt()/W.norm(), atol=1e-5, rtol=1e-4)
        p,m = layer_costs(rnn, 'svd', r, ((5, 2, 20), (5, 2, 16), 1))   # time steps first
        assert p == blk[0].weight.numel() + A.numel() == r*(W.shape[0]+20), (p, r)
        assert m == p*5, m                                                                     # per sample: 5 time steps
        assert n_params(blk) - p == n_params(rnn) - W.numel(), "weight_hh and the biases are not kept as they were"
    first = make(kind, I=20, H=8, bidirectional=True, batch_first=True)
    assert layer_costs(first, shapes=((2, 7, 20), (2, 7, 16), 1)) == (W.numel(), 7*W.numel())   # batch_first: (N, T, in)

def test_keep_energy_and_grad():
    rnn = make(nn.GRU, I=64, H=16)
    blk = RNN_Decomposer().SVD(rnn, keep=0.5, round_to=1)
    assert blk.rank*(48+64) <= 0.5*48*64 < (blk.rank+1)*(48+64), blk.rank
    assert RNN_Decomposer().SVD(rnn, keep=0.5).rank == blk.rank//8*8   # (the default: multiples of 8)
    assert RNN_Decomposer().SVD(rnn, energy=1.0).rank == 48
    rnn.requires_grad_(False)
    assert not any(p.requires_grad for p in RNN_Decomposer().SVD(rnn, rank=4).parameters())

def test_refusals_leave_the_layer():
    deep = make(nn.LSTM, num_layers=2)
    before = copy.deepcopy(deep.state_dict())
    with pytest.raises(ValueError, match='num_layers=2'): RNN_Decomposer().SVD(deep, rank=2)
    assert same_state(before, deep.state_dict())
    with pytest.raises(TypeError, match=r'use RNN_Decomposer\(\).SVD'): FC_Decomposer().SVD(make(nn.LSTM), rank=2)
    with pytest.raises(TypeError, match='takes an nn.LSTM'): RNN_Decomposer().SVD(nn.Linear(4, 4), rank=2)
    with pytest.raises(ValueError, match='above the full rank'): RNN_Decomposer().SVD(make(nn.LSTM), rank=13)
    with pytest.raises(ValueError, match='too small to factorize'): RNN_Decomposer().SVD(make(nn.RNN, I=2, H=2), keep=0.5)
    nan = make(nn.LSTM)
    with torch.no_grad(): nan.weight_hh_l0[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'): RNN_Decomposer().SVD(nan, rank=2)

class Tagger(nn.Module):
    "Tokens → embedding → LSTM → GRU → Linear"
    def __init__(self, layers=1, bidir=True):
        super().__init__()
        self.emb,self.out = nn.Embedding(60, 16),nn.Linear(20, 5)
        self.lstm,self.gru = nn.LSTM(16, 24, layers, batch_first=True, bidirectional=bidir),nn.GRU(48 if bidir else 24, 20, batch_first=True)
    def forward(self, x): return self.out(self.gru(self.lstm(self.emb(x))[0])[0])

@pytest.mark.parametrize('sample', [False, True])
def test_walk(sample):
    torch.manual_seed(0); m = Tagger().eval(); x = torch.randint(0, 60, (3, 11))
    s = x if sample else None
    full,rep = decompose_model(m, rank='full', quiet=True, sample=s)
    with torch.no_grad(): torch.testing.assert_close(full(x), m(x), atol=1e-5, rtol=1e-4)
    assert rep.set_index('layer').loc[['lstm', 'gru'], 'method'].tolist() == ['svd']*2, rep
    half,rep = decompose_model(m, keep=0.5, quiet=True, sample=s)
    assert isinstance(half.lstm, FactorizedRNN) and isinstance(half.gru, FactorizedRNN), half
    assert n_params(half) < n_params(m)
    assert all('weight_ih only' in t for t in rep.set_index('layer').loc[['lstm', 'gru'], 'note']), rep.note
    if sample: assert rep.set_index('layer').loc['lstm', 'macs'] == 11*4*24*2*16, rep.macs
    deep,rep = decompose_model(Tagger(layers=2), keep=0.5, quiet=True, sample=s)
    assert isinstance(deep.lstm, nn.LSTM) and 'num_layers=2' in rep.set_index('layer').loc['lstm', 'note'], rep

def test_rules_and_plans(tmp_path):
    torch.manual_seed(0); m = Tagger().eval(); x = torch.randint(0, 60, (3, 11))
    new,rep = decompose_model(m, rank=Budget(params=0.8), quiet=True, sample=x)
    assert isinstance(new.lstm, FactorizedRNN) and n_params(new) <= 0.8*n_params(m) + 1, rep
    decompose_model(m, rank=VBMF(), quiet=True)
    new,_ = decompose_model(m, keep=0.5, quiet=True)
    save_decomposed(new, tmp_path/'m.pt')
    back = load_decomposed(Tagger, tmp_path/'m.pt').eval()
    with torch.no_grad(): torch.testing.assert_close(back(x), new.eval()(x), rtol=0, atol=0)

def test_weight_set_from_outside_stays():
    class Dropping(nn.Module):   # a weight-dropout wrapper fasterai_lr has no adapter for
        def __init__(self, rnn):
            super().__init__(); self.module = rnn; w = rnn.weight_hh_l0; del rnn.weight_hh_l0
            self.raw = nn.Parameter(w.data); rnn.weight_hh_l0 = self.raw.clone()
        def forward(self, x): setattr(self.module, 'weight_hh_l0', nn.functional.dropout(self.raw, 0.2) if self.training else self.raw.clone()); return self.module(x)
    m = nn.Sequential(Dropping(make(nn.LSTM, batch_first=True)))
    with torch.no_grad(): m.eval()(torch.randn(2, 3, 12))
    _,rep = decompose_model(nn.Sequential(m, nn.Linear(9, 2)), keep=0.5, quiet=True)
    assert 'weight_hh_l0 is no parameter' in rep.set_index('layer').loc['0.0.module', 'note'], rep.note

# ---- fastai's EmbeddingDropout and WeightDropout

def test_embedding_dropout():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=1)
    ed,fed = EmbeddingDropout(emb, 0.5),FactorizedEmbeddingDropout(embedding_svd(emb, 8), 0.5)
    w = torch.randint(0, 50, (4, 9)); w[0, :3] = 1
    with torch.no_grad(): torch.testing.assert_close(fed.eval()(w), ed.eval()(w), atol=1e-6, rtol=1e-5)
    for seed in range(3):
        torch.manual_seed(seed); a = ed.train()(w)
        torch.manual_seed(seed); b = fed.train()(w)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.abs().sum(-1)==0, b.abs().sum(-1) < 1e-6), "not the same rows dropped"
    assert fed.emb[0].padding_idx == 1 and not fed.emb[0].weight[1].any()

@pytest.mark.parametrize('bidir', [False, True])
def test_weight_dropout(bidir):
    torch.manual_seed(0)
    wd = WeightDropout(nn.LSTM(12, 10, batch_first=True, bidirectional=bidir), 0.5)
    x = torch.randn(2, 5, 12)
    new,rep = decompose_model(nn.Sequential(wd, ), rank='full', quiet=True, sample=x)
    f = new[0]
    assert isinstance(f, FactorizedWeightDropout) and isinstance(f.module, FactorizedRNN), rep
    assert 'weight_hh_l0' not in dict(f.module[1].named_parameters()) and f.weight_hh_l0_raw.shape == (40, 10)
    for seed in range(3):   # the same dropout of weight_hh: the same outputs
        torch.manual_seed(seed); a = wd.train()(x)[0]
        torch.manual_seed(seed); b = f.train()(x)[0]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    with torch.no_grad(): torch.testing.assert_close(f.eval()(x)[0], wd.eval()(x)[0], atol=1e-5, rtol=1e-4)
    f.train()(x)[0].sum().backward()
    assert f.weight_hh_l0_raw.grad is not None and f.weight_hh_l0_raw.grad.abs().sum() > 0, "the raw weight_hh does not train"

def test_weight_dropout_of_weight_ih_stays():
    wd = WeightDropout(nn.LSTM(12, 10, batch_first=True), 0.5, ['weight_hh_l0', 'weight_ih_l0'])
    with torch.no_grad(): wd.eval()(torch.randn(2, 3, 12))
    m = nn.Sequential(wd, nn.Linear(10, 2))
    before = copy.deepcopy(m.state_dict())
    new,rep = decompose_model(m, keep=0.5, quiet=True)
    assert 'drops out weight_ih_l0' in rep.set_index('layer').loc['0.module', 'note'], rep.note
    assert isinstance(new[0], WeightDropout) and same_state(before, m.state_dict())

CFG = dict(emb_sz=20, n_hid=30, n_layers=3, pad_token=1, bidir=False, output_p=0.4, hidden_p=0.3, input_p=0.4, embed_p=0.05, weight_p=0.5)

@pytest.mark.parametrize('bidir', [False, True])
def test_awd_classifier_before_its_first_forward(bidir):
    "A raw get_text_classifier model (WeightDropout holds non-leaf tensors, which deepcopy refuses): decomposed directly, exact at full rank"
    torch.manual_seed(0)
    m = get_text_classifier(AWD_LSTM, 200, 2, config={**CFG, 'bidir': bidir})
    with pytest.raises(RuntimeError): copy.deepcopy(m)
    x = torch.randint(0, 200, (4, 12))
    full,rep = decompose_model(m, rank='full', quiet=True)
    assert rep.method.notna().sum() == 5, rep   # the embedding, 3 LSTMs, the head's hidden Linear
    half,rep = decompose_model(m, keep=0.5, quiet=True, sample=x)
    m.eval(); full.eval(); half.eval()
    for a in (m, full, half): a[0].reset()
    with torch.no_grad(): torch.testing.assert_close(full(x)[0], m(x)[0], atol=1e-5, rtol=1e-4)
    assert isinstance(half[0].module.encoder_dp, FactorizedEmbeddingDropout) and half[0].module.encoder_dp.emb is half[0].module.encoder
    assert all(isinstance(r, FactorizedWeightDropout) for r in half[0].module.rnns)
    assert n_params(half) < 0.8*n_params(m), (n_params(half), n_params(m))
    half.train()
    half(x)[0].sum().backward()   # trains: dropout masks, the raw weights
    assert all(r.weight_hh_l0_raw.grad is not None for r in half[0].module.rnns)

def test_awd_bad_input_leaves_the_model():
    m = get_text_classifier(AWD_LSTM, 200, 2, config=CFG)
    before = {k: v.clone() for k,v in m.state_dict().items()}
    with pytest.raises(ValueError, match='above the full rank of every layer'): decompose_model(m, rank=500, quiet=True)
    with pytest.raises(ValueError, match='pass only one of'): decompose_model(m, rank=2, keep=0.5, quiet=True)
    assert same_state(before, m.state_dict())
    assert type(m[0].module.encoder_dp) is EmbeddingDropout and type(m[0].module.rnns[0]) is WeightDropout

def test_awd_language_model_keeps_its_tie():
    m = get_language_model(AWD_LSTM, 100, config=dict(CFG, tie_weights=True, out_bias=True))
    x = torch.randint(0, 100, (2, 7))
    for head in (False, True):
        new,rep = decompose_model(m, keep=0.5, quiet=True, sample=x, head=head)
        r = rep.set_index('layer')
        assert pd_isna(r.loc['0.encoder', 'method']) and 'tied to 1.decoder.weight' in r.loc['0.encoder', 'note'], rep.note
        assert new[1].decoder.weight is new[0].encoder.weight and new[0].encoder_dp.emb is new[0].encoder
        assert type(new[0].encoder_dp) is EmbeddingDropout and isinstance(new[0].rnns[0], FactorizedWeightDropout)

def pd_isna(v): return v is None or (isinstance(v, float) and math.isnan(v))

def test_awd_plan_reload(tmp_path):
    torch.manual_seed(0)
    make = lambda: get_text_classifier(AWD_LSTM, 200, 2, config=CFG)
    new,_ = decompose_model(make(), keep=0.5, quiet=True)
    save_decomposed(new, tmp_path/'awd.pt')
    back = load_decomposed(make, tmp_path/'awd.pt')
    x = torch.randint(0, 200, (4, 12))
    new.eval(); back.eval(); new[0].reset(); back[0].reset()
    assert isinstance(back[0].module.encoder_dp, FactorizedEmbeddingDropout) and isinstance(back[0].module.rnns[1], FactorizedWeightDropout)
    with torch.no_grad(): torch.testing.assert_close(back(x)[0], new(x)[0], rtol=0, atol=0)

def test_copy_model():
    m = get_text_classifier(AWD_LSTM, 200, 2, config=CFG)
    c = copy_model(m)
    assert c[0].module.rnns[0].module.weight_hh_l0.grad_fn is None
    x = torch.randint(0, 200, (4, 12))
    m.eval(); c.eval()
    with torch.no_grad(): torch.testing.assert_close(c(x)[0], m(x)[0], rtol=0, atol=0)

class TimeFirst(nn.Module):
    "An LSTM over (time, batch, features) inputs, as nn.LSTM takes them by default"
    def __init__(self): super().__init__(); self.lstm,self.out = nn.LSTM(16, 24),nn.Linear(24, 3)
    def forward(self, x): return self.out(self.lstm(x)[0])

def test_latency_rules_and_calibration():
    from fasterai_lr.latency import LatencyAware, LayerTimer
    from fasterai_lr.calibrate import Calibration
    torch.manual_seed(0); m = TimeFirst().eval(); x = torch.randn(7, 2, 16)
    seen = []
    def timer(mods, xb): seen.append(tuple(xb.shape)); return [1/(1+i) for i in range(len(mods))]   # every option faster
    new,rep = decompose_model(m, rank=LatencyAware(keep=0.5, timer=timer, sample=x), quiet=True)
    # timed at batch 1 in dim 1, time steps first (sample= gives one item of dim 0, as for every model: here one time step)
    assert isinstance(new.lstm, FactorizedRNN) and seen and all(s[1:]==(1, 16) for s in seen), (rep, seen)
    new,rep = decompose_model(m, keep=0.5, calib=Calibration([x]), quiet=True)
    assert isinstance(new.lstm, FactorizedRNN) and 'weight-only' in rep.set_index('layer').loc['lstm', 'note'], rep.note
