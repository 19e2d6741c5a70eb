"fastai's applications end to end with DecomposeCallback: each learner decomposes at the chosen epoch, trains on, exports with `learn.export` and reloads with equal outputs"
import inspect, math, warnings, pytest, torch, numpy as np, pandas as pd
from torch import nn
from fastai.learner import Learner, load_learner
from fastai.data.core import DataLoaders, TfmdLists
from fastai.torch_core import set_seed
from fastai.callback.schedule import *
from fasterai_lr.core import Factorized
from fasterai_lr.callback import DecomposeCallback

def fit(learn, epochs=2, lr=1e-3, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, **kw)

def n_params(m): return sum(p.numel() for p in m.parameters())
def n_blocks(m): return sum(isinstance(b, Factorized) for b in m.modules())

def round_trip(learn, tmp_path, batch):
    "`learn` exported and loaded back: the reloaded model's outputs on `batch` (a tuple of inputs) equal the learner's"
    learn.path = tmp_path
    learn.export('app.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        back = load_learner(tmp_path/'app.pkl')
    with torch.no_grad(): want, got = learn.model.eval()(*batch), back.model.eval()(*batch)
    assert n_blocks(back.model) == n_blocks(learn.model), "the reloaded model lost its blocks"
    torch.testing.assert_close(got, want, rtol=0, atol=0)

def check(learn, tmp_path, keep=0.5, start=1, epochs=2, lr=1e-3, **cb):
    "Fit `learn` with the callback from epoch `start`; it decomposes, fewer parameters, finite losses, and the export reloads"
    p0 = n_params(learn.model)
    fit(learn, epochs, lr, cbs=DecomposeCallback(start, keep=keep, verbose=False, **cb))
    assert n_blocks(learn.model) > 0, "nothing was decomposed"
    assert n_params(learn.model) < p0, (n_params(learn.model), p0)
    losses = [float(v) for v in learn.recorder.losses]
    assert losses and all(map(math.isfinite, losses)), losses[-5:]
    xb = learn.dls.valid.one_batch()[:learn.dls.n_inp]
    round_trip(learn, tmp_path, xb)
    return learn

# ---- vision: a classifier (fastai's vision_learner: a ResNet-18 body and fastai's head)

def test_vision_learner(tmp_path):
    from fastai.vision.all import vision_learner, resnet18
    set_seed(0)
    x = torch.rand(24, 3, 32, 32); y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()   # which channel is brighter
    items = list(zip(x, y))
    dls = DataLoaders.from_dsets(TfmdLists(items[:16], None), TfmdLists(items[16:], None), bs=8, device='cpu', num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=2, normalize=False, loss_func=nn.functional.cross_entropy)
    check(learn, tmp_path, method='tucker')

# ---- vision: a U-Net (fastai's DynamicUnet over a ResNet-18)

def test_unet_learner(tmp_path):
    from fastai.vision.all import unet_learner, resnet18, CrossEntropyLossFlat
    set_seed(0)
    x = torch.rand(24, 3, 32, 32)
    y = (x.mean(1) > 0.5).long()                               # a mask: the bright pixels
    items = list(zip(x, y))
    dls = DataLoaders.from_dsets(TfmdLists(items[:16], None), TfmdLists(items[16:], None), bs=8, device='cpu', num_workers=0)
    learn = unet_learner(dls, resnet18, pretrained=False, n_out=2, normalize=False, loss_func=CrossEntropyLossFlat(axis=1))
    check(learn, tmp_path, method='svd')

# ---- tabular: embeddings for the categories, Linears after them

def test_tabular_learner(tmp_path):
    from sklearn.datasets import load_wine
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize
    d = load_wine(as_frame=True)
    df = d.frame.copy()
    for c in ('alcohol', 'magnesium'): df[c+'_bin'] = pd.qcut(df[c], 4, labels=False).astype(str)   # two categorical columns
    df['target'] = df['target'].astype(str)
    set_seed(0)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['alcohol_bin', 'magnesium_bin'],
                                     cont_names=list(d.feature_names), y_names='target', bs=32, valid_idx=list(range(0, len(df), 5)))
    learn = tabular_learner(dls, layers=[64, 32])
    check(learn, tmp_path, lr=1e-2)

def test_collab_learner(tmp_path):
    from fastai.collab import CollabDataLoaders, collab_learner
    rng = np.random.default_rng(0)
    u,i = rng.integers(0, 30, 600), rng.integers(0, 20, 600)
    df = pd.DataFrame(dict(user=u, item=i, rating=((u % 5) + (i % 3) + rng.normal(0, .3, 600)).clip(0, 5).astype('float32')))
    set_seed(0)
    dls = CollabDataLoaders.from_df(df, bs=64, valid_pct=0.2, seed=0)
    learn = collab_learner(dls, use_nn=True, layers=[32, 16], y_range=(0, 5.5))
    check(learn, tmp_path)

# ---- text: fastai's AWD-LSTM classifier, on Python's own docstrings

def docstrings()->pd.DataFrame:
    "Docstrings of functions from two standard modules, labelled by module: text that ships with Python"
    import os, string, math as m, itertools, collections
    rows = []
    for label,mods in (('math', (m, itertools)), ('text', (string, collections, os.path))):
        for mod in mods:
            for k,f in vars(mod).items():
                if not k.startswith('_') and callable(f) and (doc := inspect.getdoc(f)) and len(doc) > 40: rows.append((doc[:400], label))
    return pd.DataFrame(rows, columns=['text', 'label'])

def test_text_classifier_learner(tmp_path):
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    set_seed(0)
    df = docstrings()
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_pct=0.2, seed=0, bs=16, seq_len=32)
    learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, drop_mult=0.5)
    p0 = n_params(learn.model)
    check(learn, tmp_path, lr=1e-2)
    from fasterai_lr.layers import FactorizedEmbeddingDropout, FactorizedWeightDropout
    enc = learn.model[0].module
    assert isinstance(enc.encoder_dp, FactorizedEmbeddingDropout) and enc.encoder_dp.emb is enc.encoder, "the embedding was not decomposed"
    assert all(isinstance(r, FactorizedWeightDropout) for r in enc.rnns), "the LSTMs were not decomposed"
    assert n_params(learn.model) < 0.8*p0, (n_params(learn.model), p0)   # (weight_hh, most of the rest, is not factorized)

# ---- time series: a 1-D CNN (as tsai's ResNet or InceptionTime are) on synthetic series

class SeriesCNN(nn.Sequential):
    "Conv1d blocks over a (batch, channels, time) series, global pooling, a Linear head"
    def __init__(self, c_in=2, c=24, n_out=2):
        block = lambda i, o, k: [nn.Conv1d(i, o, k, padding='same', bias=False), nn.BatchNorm1d(o), nn.ReLU()]
        super().__init__(*block(c_in, c, 7), *block(c, c, 5), *block(c, c, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, n_out))

def test_series_conv1d(tmp_path):
    set_seed(0)
    t = torch.linspace(0, 1, 64)
    f = torch.randint(0, 2, (96,))                                                 # the class: the series' frequency
    x = torch.stack([torch.sin(2*math.pi*(3+4*f[:,None])*t), torch.cos(2*math.pi*(3+4*f[:,None])*t)], 1) + 0.3*torch.randn(96, 2, 64)
    items = list(zip(x, f))
    dls = DataLoaders.from_dsets(TfmdLists(items[:64], None), TfmdLists(items[64:], None), bs=16, device='cpu', num_workers=0)
    learn = Learner(dls, SeriesCNN(), loss_func=nn.functional.cross_entropy)
    learn = check(learn, tmp_path, lr=1e-2, epochs=3)
    assert sum(isinstance(b, Factorized) and 'Conv1d' in b.source for b in learn.model.modules()) >= 2, "the Conv1d layers were not decomposed"
