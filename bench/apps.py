"""fastai's tabular and text learners, dense and with DecomposeCallback at keep=0.5: parameters and accuracy after the same
fine-tuning, side by side in one run (data that ships with scikit-learn and with Python; seeds fixed).

Run: python bench/apps.py [--epochs 8] [--start 4] [--keep 0.5] [--out bench/out/apps.txt]
"""
import argparse, sys, warnings, torch, pandas as pd
from pathlib import Path
from fastai.torch_core import set_seed
from fastai.callback.schedule import *
from fastai.metrics import accuracy
from fasterai_lr.core import Factorized
from fasterai_lr.callback import DecomposeCallback
sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
from test_apps import docstrings   # the docstring corpus the tests use

def tabular(seed):
    from sklearn.datasets import load_breast_cancer
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize
    d = load_breast_cancer(as_frame=True); df = d.frame.copy()
    for c in ('mean radius', 'mean texture'): df[c+' bin'] = pd.qcut(df[c], 8, labels=False).astype(str)
    df['target'] = df['target'].astype(str)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['mean radius bin', 'mean texture bin'],
                                     cont_names=list(d.feature_names), y_names='target', bs=32, valid_idx=list(range(0, len(df), 4)))
    return tabular_learner(dls, layers=[200, 100], metrics=accuracy), 1e-2

def text(seed):
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    dls = TextDataLoaders.from_df(docstrings(), text_col='text', label_col='label', valid_pct=0.25, seed=seed, bs=16, seq_len=48)
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, drop_mult=0.3, metrics=accuracy), 3e-3

def run(make, cbs, epochs, seed=0):
    set_seed(seed)
    learn,lr = make(seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    n = sum(p.numel() for p in learn.model.parameters())
    return n, float(learn.recorder.values[-1][-1]), sum(isinstance(m, Factorized) for m in learn.model.modules())

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--epochs', type=int, default=8); p.add_argument('--start', type=int, default=4)
    p.add_argument('--keep', type=float, default=0.5); p.add_argument('--out')
    a = p.parse_args(argv)
    torch.set_num_threads(1); warnings.filterwarnings('ignore')
    lines = [f"{'learner':28} {'params dense':>13} {'params decomposed':>18} {'kept':>6} {'blocks':>6} {'acc dense':>10} {'acc decomposed':>15}"]
    for name,make in (('tabular_learner (cancer)', tabular), ('text_classifier (AWD-LSTM)', text)):
        n0,a0,_ = run(make, [], a.epochs)
        n1,a1,b = run(make, [DecomposeCallback(a.start, keep=a.keep, verbose=False)], a.epochs)
        lines.append(f"{name:28} {n0:>13,} {n1:>18,} {n1/n0:>6.0%} {b:>6} {a0:>10.3f} {a1:>15.3f}")
        print(lines[-1], flush=True)
    if a.out: Path(a.out).write_text('\n'.join(lines)+'\n')
    print('\n'.join(lines))

if __name__=='__main__': main()
